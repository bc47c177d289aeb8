"""The flows package against the `flow` command: the same models, numbers and messages.

The `flow` binary is found at FLOW_BIN, or at target/release/flow of this checkout
(cargo build --release -p flow-cli); tests that compare with it skip, saying so, without
it. The zuko test runs where FLOWS_ZUKO_PYTHON (default /tmp/torchenv/bin/python) has
zuko and PyTorch.
"""

import json
import os
import pathlib
import signal
import struct
import subprocess
import threading
import warnings

import numpy as np
import pytest

import flows

ROOT = pathlib.Path(__file__).resolve().parents[3]
FLOW = pathlib.Path(os.environ.get("FLOW_BIN", ROOT / "target" / "release" / "flow"))
ZUKO_PYTHON = os.environ.get("FLOWS_ZUKO_PYTHON", "/tmp/torchenv/bin/python")

needs_flow = pytest.mark.skipif(
    not FLOW.exists(), reason=f"no flow binary at {FLOW} (cargo build --release -p flow-cli)"
)


def moons(n, seed, noise=0.1):
    """Two interleaving half circles, as scikit-learn draws them."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    points = np.stack([x, y], 1) + rng.normal(scale=noise, size=(n, 2))
    return points, upper.astype(np.float64)[:, None]


def flow_cli(*args):
    """Runs `flow`; returns (exit status, the last line it printed to stderr)."""
    r = subprocess.run([str(FLOW), *map(str, args)], capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode, lines[-1] if lines else ""


def cli_error(*args):
    code, line = flow_cli(*args)
    assert code == 2, line
    assert line.startswith("error: "), line
    return line[len("error: "):]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small NSF fitted to moons, saved."""
    x, _ = moons(1000, seed=1)
    model = flows.Flow(2, flow="nsf", layers=2, hidden=16, bins=4)
    summary = model.fit(x, steps=40, batch=128, seed=3, progress=False)
    path = tmp_path_factory.mktemp("nsf") / "moons.safetensors"
    model.save(path)
    return model, path, summary


def test_fit_returns_the_summary_and_lowers_the_loss(trained):
    model, _, summary = trained
    assert summary["steps"] == summary["total_steps"] == 40
    # A tenth of the rows is held out to validate on, as flow train does.
    assert summary["n_train"] == 900 and summary["n_val"] == 100 and not summary["interrupted"]
    x, _ = moons(500, seed=2)
    untrained = flows.Flow(2, flow="nsf", layers=2, hidden=16, bins=4)
    untrained.fit(x, steps=1, batch=128, seed=3, progress=False)
    assert model.log_prob(x).mean() > untrained.log_prob(x).mean() + 0.1


@needs_flow
def test_log_probs_are_those_of_flow_log_prob(trained, tmp_path):
    model, path, _ = trained
    x, _ = moons(300, seed=5)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    code, line = flow_cli("log-prob", "--model", path, "--input", tmp_path / "x.npy", "--out", tmp_path / "lp.npy")
    assert code == 0, line
    cli = np.load(tmp_path / "lp.npy")
    np.testing.assert_allclose(model.log_prob(x), cli, rtol=0, atol=1e-6)
    np.testing.assert_allclose(flows.load(path).log_prob(x), cli, rtol=0, atol=1e-6)


@needs_flow
def test_seeded_samples_are_those_of_flow_sample(trained, tmp_path):
    model, path, _ = trained
    code, line = flow_cli("sample", "--model", path, "--n", 50, "--seed", 9, "--out", tmp_path / "s.npy")
    assert code == 0, line
    np.testing.assert_allclose(model.sample(50, seed=9), np.load(tmp_path / "s.npy"), rtol=0, atol=1e-6)


def test_float32_and_float64_inputs_give_the_same_numbers_in_their_own_dtype(trained):
    model, _, _ = trained
    x, _ = moons(64, seed=6)
    lp64 = model.log_prob(x)
    lp32 = model.log_prob(x.astype(np.float32))
    assert lp64.dtype == np.float64 and lp32.dtype == np.float32
    np.testing.assert_array_equal(lp64, lp32.astype(np.float64))
    z = model.encode(x)
    assert z.dtype == np.float64 and model.encode(x.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(model.decode(z), x, atol=1e-4)


def test_density_integrates_to_one(trained):
    model, _, _ = trained
    # A grid over the box the moons' density lives in: the mass outside is negligible.
    g = np.linspace(-3.5, 4.5, 321)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(model.log_prob(np.stack([xx.ravel(), yy.ravel()], 1)))
    mass = p.sum() * (g[1] - g[0]) ** 2
    assert abs(mass - 1) < 0.02, mass


def test_a_single_context_row_applies_to_every_point():
    x, labels = moons(1000, seed=7)
    model = flows.Flow(2, context=1, flow="maf", layers=2, hidden=16)
    model.fit(x, context=labels, steps=30, batch=128, seed=1, progress=False)
    points, _ = moons(20, seed=8)
    one = model.log_prob(points, context=np.array([[1.0]]))
    many = model.log_prob(points, context=np.ones((20, 1)))
    np.testing.assert_array_equal(one, many)
    assert not np.allclose(one, model.log_prob(points, context=np.zeros((1, 1))))
    # One sample per context row, and one row for all.
    per_row = model.sample(3, context=np.array([[0.0], [1.0], [0.0]]), seed=2)
    assert per_row.shape == (3, 2)
    shared = model.sample(5, context=np.array([[1.0]]), seed=2)
    assert shared.shape == (5, 2) and np.isfinite(shared).all()
    with pytest.raises(ValueError, match="conditional on 1 context features: give context"):
        model.log_prob(points)
    with pytest.raises(ValueError, match="context has 2 rows for 20 points"):
        model.log_prob(points, context=np.ones((2, 1)))


@needs_flow
def test_a_conditional_fit_on_few_rows_takes_smaller_batches(tmp_path):
    x, labels = moons(1000, seed=7)

    def batch_of(**options):
        model = flows.Flow(2, context=1, flow="maf", layers=2, hidden=16)
        model.fit(x, context=labels, steps=2, seed=1, progress=False, **options)
        path = tmp_path / "model.safetensors"
        model.save(path)
        r = subprocess.run(
            [str(FLOW), "inspect", "--model", str(path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(r.stdout)["metadata"]["train_config"]["batch_size"]

    # 900 training rows: halved from 512 until two batches fit an epoch; as flow train.
    assert batch_of() == 256
    assert batch_of(batch=512) == 512


def test_the_context_is_standardised_so_its_scale_does_not_change_the_fit():
    x, labels = moons(1000, seed=7)
    points, test_labels = moons(50, seed=8)

    def fitted(scale, shift, **options):
        model = flows.Flow(2, context=1, flow="nsf", layers=2, hidden=16, bins=4, **options)
        model.fit(x, context=labels * scale + shift, steps=40, batch=128, seed=1, progress=False)
        return model.log_prob(points, context=test_labels * scale + shift)

    as_labels = fitted(1.0, 0.0)
    np.testing.assert_allclose(fitted(1000.0, 5.0), as_labels, rtol=0, atol=1e-4)
    # Without standardisation the network sees the context's scale.
    assert np.abs(fitted(1000.0, 5.0, standardize=False) - as_labels).max() > 1e-2


def test_a_bounded_model_samples_inside_its_box_and_refuses_points_outside():
    x, _ = moons(1000, seed=9)
    model = flows.Flow(2, flow="nsf", layers=2, hidden=16, bounds=[(-1.5, 2.5), (-1.0, None)])
    model.fit(x, steps=30, seed=1, progress=False)
    s = model.sample(4000, seed=3)
    assert (s[:, 0] > -1.5).all() and (s[:, 0] < 2.5).all() and (s[:, 1] > -1.0).all()
    # The same box as flow train --bounds writes it.
    text = flows.Flow(2, flow="nsf", layers=2, hidden=16, bounds="-1.5:2.5,-1:inf")
    text.fit(x, steps=30, seed=1, progress=False)
    np.testing.assert_array_equal(text.log_prob(x[:20]), model.log_prob(x[:20]))
    with pytest.raises(ValueError, match=r"x: row 2, column 2: -2 lies outside the model's bounds -1:inf"):
        model.log_prob(np.array([[0.0, 0.0], [0.5, -2.0]]))


def test_bounds_held_by_rejection_keep_samples_inside_and_renormalise_the_density():
    x, _ = moons(1000, seed=9)
    x = x[(x[:, 0] > 0.0) & (x[:, 0] < 1.0)]
    options = dict(flow="nsf", layers=2, hidden=16)
    model = flows.Flow(2, bounds="0:1,-inf:inf", bounds_by="rejection", **options)
    model.fit(x, steps=30, batch=128, seed=1, progress=False)
    s = model.sample(4000, seed=3)
    assert ((s[:, 0] > 0.0) & (s[:, 0] < 1.0)).all()
    # The same flow without bounds trains the same weights; inside the box the
    # density is its density over its mass there, a constant above 1.
    free = flows.Flow(2, **options)
    free.fit(x, steps=30, batch=128, seed=1, progress=False)
    shift = model.log_prob(x[:50]) - free.log_prob(x[:50])
    assert shift.min() > 0.0
    np.testing.assert_allclose(shift, shift[0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="--bounds-by says how --bounds hold: give --bounds too"):
        flows.Flow(2, bounds_by="rejection", **options)


def test_ctrl_c_stops_fit_with_the_weights_of_the_last_step():
    x, _ = moons(2000, seed=3)
    model = flows.Flow(2, flow="realnvp", layers=2, hidden=32)
    timer = threading.Timer(0.5, signal.raise_signal, (signal.SIGINT,))
    timer.start()
    try:
        summary = model.fit(x, steps=10_000_000, batch=64, seed=1, patience=0, progress=False)
    finally:
        timer.cancel()
    assert summary["interrupted"], summary
    assert 0 < summary["steps"] < summary["total_steps"]
    assert summary["stopped"] == f"interrupted after step {summary['steps']}"
    assert np.isfinite(model.log_prob(x[:100])).all()


def test_export_to_zuko_reads_back_with_the_same_densities(tmp_path):
    x, _ = moons(800, seed=4)
    for flow, options in [("realnvp", dict(layers=3, hidden=8)), ("maf", dict(layers=2, hidden=8))]:
        model = flows.Flow(2, flow=flow, **options)
        model.fit(x * [3.0, 0.5] + [1.0, -2.0], steps=20, seed=2, progress=False)
        code = model.export(tmp_path / f"{flow}.safetensors", to="zuko")
        assert "zuko.flows." in code and "AffineTransform" in code, code
        activation = "leaky-relu" if flow == "realnvp" else "relu"
        back = flows.import_weights("zuko", tmp_path / f"{flow}.safetensors", clamp=3.0, activation=activation)
        np.testing.assert_allclose(back.log_prob(x), model.log_prob(x), rtol=0, atol=1e-5)


def zuko_available():
    try:
        r = subprocess.run([ZUKO_PYTHON, "-c", "import zuko, torch"], capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


READER = '''
import json, struct, numpy, torch
def load_file(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    types = {"F32": numpy.float32, "F64": numpy.float64, "U8": numpy.uint8, "I64": numpy.int64}
    out = {}
    for name, t in header.items():
        if name != "__metadata__":
            a, b = t["data_offsets"]
            data = numpy.frombuffer(raw[8 + n + a:8 + n + b], dtype=types[t["dtype"]])
            out[name] = torch.from_numpy(data.reshape(t["shape"]).copy())
    return out
'''


@pytest.mark.skipif(not zuko_available(), reason=f"zuko and PyTorch are not installed for {ZUKO_PYTHON}")
def test_exported_flows_score_as_ours_inside_zuko(tmp_path):
    x, labels = moons(600, seed=11)
    x = np.concatenate([x, x[:, :1] ** 2], 1)
    for flow, options in [("realnvp", dict(layers=3, hidden=8)), ("realnvp", dict(nets="joint", hidden=8)), ("maf", dict(layers=2, hidden=8, base="diag"))]:
        model = flows.Flow(3, context=1, flow=flow, **options)
        model.fit(x, context=labels, steps=20, seed=2, progress=False)
        path = tmp_path / "zuko.safetensors"
        code = model.export(path, to="zuko")
        np.save(tmp_path / "x.npy", x[:50])
        np.save(tmp_path / "c.npy", labels[:50])
        script = READER + code.replace("safetensors.torch.load_file", "load_file").replace("safetensors.torch, ", "")
        script += f'''
flow = flow.double()
x = torch.tensor(numpy.load("{tmp_path / 'x.npy'}"))
c = torch.tensor(numpy.load("{tmp_path / 'c.npy'}"))
print(json.dumps(flow(c).log_prob(x).tolist()))
'''
        r = subprocess.run([ZUKO_PYTHON, "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        theirs = np.array(json.loads(r.stdout))
        np.testing.assert_allclose(theirs, model.log_prob(x[:50], context=labels[:50]), atol=1e-5)


# Each bad input, from Python and on the command line: the same one-line message.
@needs_flow
@pytest.mark.parametrize(
    "python, flags",
    [
        (lambda: flows.Flow(2, flow="realnvp", bins=4), ["--flow", "realnvp", "--bins", "4"]),
        (lambda: flows.Flow(2, flow="nsf", layers=0), ["--flow", "nsf", "--layers", "0"]),
        (lambda: flows.Flow(2, flow="maf", hidden=1), ["--flow", "maf", "--hidden", "1"]),
        (lambda: flows.Flow(2, flow="maf", base="mixture:0"), ["--flow", "maf", "--base", "mixture:0"]),
        (lambda: flows.Flow(2, flow="realnvp", scale="exp", clamp=2.0), ["--flow", "realnvp", "--scale", "exp", "--clamp", "2"]),
        (lambda: flows.Flow(2, flow="nsf", tail_bound=-1.0), ["--flow", "nsf", "--tail-bound", "-1"]),
        (lambda: flows.Flow(2, flow="maf", order="random", coupling="affine"), ["--flow", "maf", "--order", "random", "--coupling", "affine"]),
        (lambda: flows.Flow(2, flow="maf").fit(moons(10, 0)[0], lr=-1.0), ["--flow", "maf", "--lr", "-1"]),
        (lambda: flows.Flow(2, flow="maf").fit(moons(10, 0)[0], steps=0), ["--flow", "maf", "--steps", "0"]),
        (lambda: flows.Flow(2, flow="maf").fit(moons(10, 0)[0], warmup=3), ["--flow", "maf", "--warmup", "3"]),
        (lambda: flows.Flow(2, flow="maf").fit(moons(10, 0)[0], patience=3, val_fraction=0.0), ["--flow", "maf", "--patience", "3", "--val-fraction", "0"]),
        (lambda: flows.Flow(2, flow="maf").fit(moons(10, 0)[0], val_fraction=1.0), ["--flow", "maf", "--val-fraction", "1"]),
        (lambda: flows.Flow(2, flow="maf", bounds="0:1"), ["--flow", "maf", "--bounds", "0:1"]),
    ],
)
def test_bad_options_raise_the_message_of_flow_train(python, flags, tmp_path):
    np.save(tmp_path / "x.npy", moons(10, 0)[0].astype(np.float32))
    message = cli_error("train", "--data", tmp_path / "x.npy", "--out", tmp_path / "m.safetensors", *flags)
    with pytest.raises(ValueError) as e:
        python()
    assert str(e.value) == message


@needs_flow
def test_bad_files_raise_the_message_of_flow(trained, tmp_path):
    _, path, _ = trained
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(OSError) as e:
        flows.load(missing)
    assert str(e.value) == cli_error("inspect", "--model", missing)
    np.save(tmp_path / "x.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError) as e:
        flows.load(tmp_path / "x.npy")
    assert str(e.value) == cli_error("inspect", "--model", tmp_path / "x.npy")
    with pytest.raises(ValueError) as e:
        flows.import_weights("zuko", path, clamp=-1.0)
    assert str(e.value) == cli_error("import", "--from", "zuko", "--input", path, "--out", tmp_path / "o.safetensors", "--clamp", "-1")
    with pytest.raises(ValueError) as e:
        flows.import_weights("zuko", path)
    assert str(e.value) == cli_error("import", "--from", "zuko", "--input", path, "--out", tmp_path / "o.safetensors")
    with pytest.raises(ValueError) as e:
        flows.load(path).export(tmp_path / "z.safetensors", to="zuko")
    assert str(e.value) == cli_error("export", "--to", "zuko", "--model", path, "--out", tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


def test_a_model_is_written_only_to_a_safetensors_path(trained, tmp_path):
    model, _, _ = trained
    for name in ["m.csv", "m.npy", "m"]:
        with pytest.raises(ValueError, match="a model is written as safetensors: give a path ending in .safetensors"):
            model.save(tmp_path / name)
        with pytest.raises(ValueError, match="a model is written as safetensors"):
            model.export(tmp_path / name, to="zuko")
        assert not (tmp_path / name).exists()
    model.save(tmp_path / "m.SafeTensors")
    assert flows.load(tmp_path / "m.SafeTensors").features == 2


def test_values_that_are_not_finite_real_float32_numbers_are_refused(trained):
    model, _, _ = trained
    for x, message in [
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), "line 2: NaN or infinite value"),
        (np.array([[np.inf, 0.0]], np.float32), "line 1: NaN or infinite value"),
        (np.array([[0.0, 0.0], [1e39, 0.0]]), "line 2: 1e39 lies beyond float32"),
        (np.full((1, 2), 1 + 5j), "must hold real numbers, got an array of dtype complex128"),
        (np.array([["1", "2"]]), "must hold real numbers, got an array of dtype <U1"),
        (np.array([[None, 1.0]], dtype=object), "must hold real numbers, got an array of dtype object"),
    ]:
        for method in (model.log_prob, model.encode, model.decode):
            with pytest.raises(ValueError, match=f"^[xz]:? {message}"):
                method(x)
    conditional = flows.Flow(2, context=1, flow="maf", layers=1, hidden=8)
    x, labels = moons(200, seed=5)
    conditional.fit(x, context=labels, steps=2, progress=False)
    with pytest.raises(ValueError, match="context: line 1: NaN or infinite value"):
        conditional.log_prob(x[:3], context=np.full((3, 1), np.nan))
    with pytest.raises(ValueError, match="context: line 1: NaN or infinite value"):
        conditional.sample(2, context=[[np.nan]])


def test_sizes_are_refused_before_anything_of_their_size_is_made(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match="features: more than the limit"):
        flows.Flow(2**40)
    with pytest.raises(ValueError, match="context features: more than the limit"):
        flows.Flow(2, context=2**40)
    wide = flows.Flow(4096, flow="realnvp", layers=1, hidden=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few rows for so many features, as intended
        wide.fit(np.random.default_rng(0).normal(size=(20, 4096)), steps=1, val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="samples of .* values: more than the limit"):
        wide.sample(2**26)


def test_negative_counts_are_value_errors_naming_the_argument(trained):
    model, _, _ = trained
    x, _ = moons(50, seed=2)
    for call, name in [
        (lambda: flows.Flow(-1), "features"),
        (lambda: flows.Flow(2, context=-1), "context"),
        (lambda: model.sample(-1), "n"),
        (lambda: flows.Flow(2).fit(x, steps=-1, progress=False), "steps"),
        (lambda: flows.Flow(2).fit(x, batch=-1, progress=False), "batch"),
        (lambda: flows.Flow(2).fit(x, epochs=-1, progress=False), "epochs"),
        (lambda: flows.Flow(2).fit(x, patience=-1, progress=False), "patience"),
        (lambda: flows.Flow(2, layers=-1), "--layers"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} must be at least 0, got -1$"):
            call()


def test_seeds_take_the_whole_range_of_flow_sample(trained, tmp_path):
    model, path, _ = trained
    big = 2**64 - 1
    drawn = model.sample(5, seed=big)
    if FLOW.exists():
        out = tmp_path / "big-seed.npy"
        args = ["sample", "--model", path, "--n", 5, "--seed", big, "--out", out]
        subprocess.run([str(FLOW), *map(str, args)], check=True, capture_output=True)
        np.testing.assert_array_equal(drawn.astype(np.float32), np.load(out))
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=f"seed must be a whole number from 0 to {2**64 - 1}, got {bad}"):
            model.sample(2, seed=bad)


def test_an_export_over_the_file_the_model_was_read_from_is_refused(trained, tmp_path):
    _, path, _ = trained
    copy = tmp_path / "read.safetensors"
    copy.write_bytes(pathlib.Path(path).read_bytes())
    before = copy.read_bytes()
    with pytest.raises(ValueError, match="the model was read from this file: export to another path"):
        flows.load(copy).export(tmp_path / "." / "read.safetensors", to="zuko")
    assert copy.read_bytes() == before


def test_python_side_errors_name_the_problem(trained):
    model, _, _ = trained
    with pytest.raises(ValueError, match=r"x must be a 2-D array of shape \(rows, 2\), got shape \(5,\)"):
        model.log_prob(np.zeros(5))
    with pytest.raises(ValueError, match="not been fitted"):
        flows.Flow(2).sample(3)
    with pytest.raises(ValueError, match="unknown option `breadth`"):
        flows.Flow(2, breadth=3)
    with pytest.raises(
        ValueError,
        match=r"`width` is an option of the image families \(tarflow\), which train with `flow train`",
    ):
        flows.Flow(2, width=3)
    with pytest.raises(ValueError, match=r"invalid value 'swish' for '--activation'"):
        flows.Flow(2, activation="swish")
    with pytest.raises(ValueError, match="context: the model is not conditional"):
        model.log_prob(np.zeros((1, 2)), context=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="x: line 2: NaN or infinite value"):
        flows.Flow(2, flow="maf").fit(np.array([[0.0, 1.0], [np.nan, 0.0]]), progress=False)


def test_a_conditional_nsf_keeps_whichever_of_its_two_networks_validates_better():
    x, labels = moons(600, seed=4)
    model = flows.Flow(2, context=1)
    own, rival = "the nsf defaults", "--conditioner plain --hidden 128 --hidden-layers 2"
    networks = {own: "residual", rival: "plain"}
    for _ in range(2):  # a second fit chooses afresh, between the same two
        summary = model.fit(x, context=labels, steps=60, progress=False)
        [other] = summary["rivals"]
        assert other["label"] in networks
        assert summary["best_val_nll"] <= other["best_val_nll"]
        kept = rival if other["label"] == own else own
        assert model.config["recipe"]["network"] == networks[kept]
    # Each trained as it does alone: the rival's score is that of its network given.
    hidden = {"conditioner": "plain", "hidden": 128, "hidden_layers": 2}
    given = {own: {"conditioner": "residual"}, rival: hidden}[other["label"]]
    alone = flows.Flow(2, context=1, **given).fit(x, context=labels, steps=60, progress=False)
    assert "rivals" not in alone
    assert alone["best_val_nll"] == other["best_val_nll"]
    # Without validation, its own network alone.
    summary = flows.Flow(2, context=1).fit(x, context=labels, steps=5, val_fraction=0, progress=False)
    assert "rivals" not in summary
