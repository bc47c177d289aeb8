"""Which conditioner a conditional NSF fits better, by the shape of the posterior.

Held-out NLL (nats, −E log q(θ | x) on 2 000 fresh simulations) of `flow train --data
sims.csv --context-dim D --flow nsf` at its defaults (residual conditioners) against the
same with `--conditioner plain --hidden 128 --hidden-layers 2`, training seeds 0, 1, 2,
on two families of simulators:

- Gaussian linear in `d` dimensions (θ ~ U(−1, 1)^d, x ~ N(θ, σ²·I)), as sbibm's
  "Gaussian linear uniform" (d = 10, σ² = 0.1) and with σ² = 0.01, whose posterior lies
  well inside the prior's box rather than cut off by its edges;
- SLCP (sbibm: θ ~ U(−3, 3)^5, four draws x_i ~ N((θ1, θ2), Σ) with standard
  deviations θ3², θ4² and correlation tanh θ5).

Prints one markdown row per simulator and network: the NLL at each seed and their mean.
Usage: python benches/npe_conditioners.py --flow target/release/flow --out DIR
"""

import argparse
import pathlib
import re
import subprocess

import numpy as np

SEEDS = (0, 1, 2)
TEST_SIMS = 2_000
NETWORKS = {
    "residual 64 × 2 (the defaults)": [],
    "plain 128 × 2": ["--conditioner", "plain", "--hidden", "128", "--hidden-layers", "2"],
}


def gaussian_linear(d, variance):
    def simulate(n, rng):
        theta = rng.uniform(-1, 1, size=(n, d))
        return theta, theta + np.sqrt(variance) * rng.standard_normal((n, d))

    return simulate


def slcp(n, rng):
    theta = rng.uniform(-3, 3, size=(n, 5))
    s1, s2, rho = theta[:, 2:3] ** 2, theta[:, 3:4] ** 2, np.tanh(theta[:, 4:5])
    z = rng.standard_normal((n, 4, 2))
    first = theta[:, 0:1] + s1 * z[:, :, 0]
    second = theta[:, 1:2] + s2 * (rho * z[:, :, 0] + np.sqrt(1 - rho**2) * z[:, :, 1])
    return theta, np.stack((first, second), axis=2).reshape(n, 8)


def write(path, theta, x):
    header = [f"theta{i}" for i in range(theta.shape[1])]
    header += [f"x{i}" for i in range(x.shape[1])]
    np.savetxt(path, np.hstack((theta, x)), delimiter=",", header=",".join(header), comments="")


def nll(flow, model, test):
    out = subprocess.run(
        [flow, "log-prob", "--model", model, "--input", test],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(re.search(r"NLL (\S+)", out.stdout + out.stderr).group(1))


def budgets(text):
    """`--sims`: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1000,3000, got {text!r}")
    return values


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", required=True, help="the flow binary")
    ap.add_argument("--out", required=True, help="where simulations and models go")
    ap.add_argument(
        "--sims",
        default=[1000],
        type=budgets,
        help="simulation budgets, comma-separated positive integers",
    )
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {
        f"Gaussian linear, d = {d}, σ² = {v}": gaussian_linear(d, v)
        for v in (0.1, 0.01)
        for d in (2, 4, 6, 10)
    }
    tasks["SLCP"] = slcp
    print("| simulator | simulations | network | NLL, seeds 0 / 1 / 2 | mean |")
    print("| --- | --- | --- | --- | --- |")
    for k, (name, simulate) in enumerate(tasks.items()):
        test = out / f"task{k}-test.csv"
        write(test, *simulate(TEST_SIMS, np.random.default_rng([k, 0])))
        for n in args.sims:
            theta, x = simulate(n, np.random.default_rng([k, n]))
            sims = out / f"task{k}-{n}.csv"
            write(sims, theta, x)
            for net, flags in NETWORKS.items():
                scores = []
                for seed in SEEDS:
                    model = out / f"task{k}-{n}-{len(flags)}-{seed}.safetensors"
                    train = [args.flow, "train", "--data", str(sims), "--flow", "nsf"]
                    train += ["--context-dim", str(x.shape[1]), "--seed", str(seed)]
                    train += ["--out", str(model), *flags]
                    subprocess.run(train, check=True, capture_output=True)
                    scores.append(nll(args.flow, str(model), str(test)))
                each = " / ".join(f"{s:.3f}" for s in scores)
                print(f"| {name} | {n} | {net} | {each} | {np.mean(scores):.3f} |", flush=True)


if __name__ == "__main__":
    main()
