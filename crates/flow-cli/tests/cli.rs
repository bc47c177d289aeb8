//! The `flow` binary end to end: a small training run, every command on its output,
//! and bad input ending in one clear line with exit code 2.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

fn flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow")
}

fn ok(args: &[&str]) -> String {
    let out = flow(args);
    assert!(
        out.status.success(),
        "flow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("flows-cli-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fn path(name: &str) -> String {
    dir().join(name).to_string_lossy().into_owned()
}

/// A small model trained once and shared by the tests.
fn model() -> &'static str {
    static MODEL: OnceLock<String> = OnceLock::new();
    MODEL.get_or_init(|| {
        let (m, val) = (path("model.safetensors"), path("val.csv"));
        ok(&["data", "moons", "--n", "500", "--seed", "9", "--out", &val]);
        ok(&[
            "train",
            "--data",
            "moons",
            "--n",
            "2000",
            "--steps",
            "60",
            "--hidden",
            "32",
            "--layers",
            "4",
            "--batch",
            "256",
            "--val",
            &val,
            "--val-every",
            "20",
            "--out",
            &m,
            "--metrics",
            &path("metrics.jsonl"),
        ]);
        m
    })
}

fn read_csv(p: &str) -> Vec<Vec<f32>> {
    std::fs::read_to_string(p)
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
        .collect()
}

#[test]
fn encode_then_decode_round_trips_files() {
    let m = model();
    let (z, x2) = (path("z.csv"), path("x2.csv"));
    let val = path("val.csv");
    ok(&["encode", "--model", m, "--input", &val, "--out", &z]);
    ok(&["decode", "--model", m, "--input", &z, "--out", &x2]);
    let (a, b) = (read_csv(&val), read_csv(&x2));
    assert_eq!(a.len(), 500);
    assert_eq!(a.len(), b.len());
    for (r, s) in a.iter().zip(&b) {
        for (u, v) in r.iter().zip(s) {
            assert!((u - v).abs() <= 1e-5 * (1.0 + u.abs()), "{u} vs {v}");
        }
    }
}

#[test]
fn log_prob_sample_inspect_plot_and_metrics() {
    let m = model();
    let lp = path("lp.csv");
    let summary = ok(&[
        "log-prob",
        "--model",
        m,
        "--input",
        &path("val.csv"),
        "--out",
        &lp,
    ]);
    assert!(summary.contains("bits/dim"), "{summary}");
    assert_eq!(read_csv(&lp).len(), 500);

    let s = path("s.csv");
    ok(&[
        "sample",
        "--model",
        m,
        "--n",
        "300",
        "--seed",
        "4",
        "--out",
        &s,
        "--plot",
        &path("s.png"),
    ]);
    let again = path("s2.csv");
    ok(&[
        "sample", "--model", m, "--n", "300", "--seed", "4", "--out", &again,
    ]);
    assert_eq!(
        read_csv(&s),
        read_csv(&again),
        "same seed, different samples"
    );
    assert_eq!(read_csv(&s).len(), 300);

    // One screen; the whole file with --json.
    let info = ok(&["inspect", "--model", m]);
    assert!(info.lines().count() <= 24, "{info}");
    assert!(info.contains("layers: 4 (4 affine)"), "{info}");
    assert!(info.contains("settings: activation leaky-relu"), "{info}");
    assert!(info.contains("training: 60 of 60 steps"), "{info}");
    let all: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--model", m, "--json"])).expect("JSON");
    assert_eq!(
        all["tensors"]["layers.3.t.2.weight"]["shape"],
        serde_json::json!([1, 32])
    );
    assert_eq!(all["config"]["dim"], 2);
    assert_eq!(all["training"]["steps"], 60);
    let params: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a parameter count");
    let counted: usize = all["tensors"]
        .as_object()
        .expect("tensors")
        .iter()
        .filter(|(name, _)| !name.starts_with("train_state."))
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("size") as usize)
                .product::<usize>()
        })
        .sum();
    assert_eq!(params, counted, "{info}");

    ok(&[
        "plot",
        "--model",
        m,
        "--out",
        &path("d.png"),
        "--data",
        &path("val.csv"),
    ]);
    for png in ["s.png", "d.png"] {
        let bytes = std::fs::read(dir().join(png)).expect("png");
        assert_eq!(&bytes[1..4], b"PNG");
    }
    let metrics = std::fs::read_to_string(dir().join("metrics.jsonl")).expect("metrics");
    assert!(metrics.lines().count() >= 3);
    assert!(metrics
        .lines()
        .all(|l| l.starts_with('{') && l.contains("\"loss\"")));
}

fn fails(args: &[&str], needle: &str) {
    let out = flow(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "flow {args:?}: {err}");
    assert!(
        err.contains(needle),
        "flow {args:?}: expected `{needle}` in {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn bad_input_is_one_clear_line() {
    let m = model();
    let wide = path("wide.csv");
    std::fs::write(&wide, "1,2,3\n4,5,6\n").expect("write");
    fails(
        &["log-prob", "--model", m, "--input", &wide],
        "the model has 2 features",
    );
    let ragged = path("ragged.csv");
    std::fs::write(&ragged, "1,2\n4\n").expect("write");
    fails(
        &[
            "encode",
            "--model",
            m,
            "--input",
            &ragged,
            "--out",
            &path("o.csv"),
        ],
        "line 2",
    );
    fails(
        &[
            "sample",
            "--model",
            m,
            "--n",
            "5",
            "--temperature",
            "0",
            "--out",
            &path("o.csv"),
        ],
        "temperature",
    );
    fails(
        &[
            "sample",
            "--model",
            m,
            "--n",
            "5",
            "--out",
            "/no/such/dir/o.csv",
        ],
        "does not exist",
    );
    fails(
        &[
            "train",
            "--data",
            "moons",
            "--steps",
            "0",
            "--out",
            &path("x.safetensors"),
        ],
        "steps",
    );
    fails(
        &[
            "train",
            "--data",
            "moons",
            "--device",
            "tpu",
            "--out",
            &path("x.safetensors"),
        ],
        "unknown device",
    );
    fails(
        &[
            "train",
            "--data",
            "nowhere.csv",
            "--out",
            &path("x.safetensors"),
        ],
        "neither a file",
    );
    let junk = path("junk.safetensors");
    std::fs::write(&junk, b"\x08\0\0\0\0\0\0\0{}xxxxxxx").expect("write");
    fails(&["inspect", "--model", &junk], "junk.safetensors");
    fails(
        &[
            "sample",
            "--model",
            &path("absent.safetensors"),
            "--n",
            "3",
            "--out",
            &path("o.csv"),
        ],
        "absent.safetensors",
    );
    let train = |extra: &[&str]| -> Vec<String> {
        [
            "train",
            "--data",
            "moons",
            "--steps",
            "2",
            "--out",
            &path("x.safetensors"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from)
        .collect()
    };
    for (extra, needle) in [
        (&["--flow", "nsf", "--bins", "0"][..], "--bins"),
        (&["--flow", "nsf", "--bins", "5000"], "--bins"),
        (&["--flow", "nsf-ar", "--tail-bound", "-1"], "--tail-bound"),
        (&["--base", "mixture:0"], "at least 1 component"),
        (&["--base", "gamma"], "--base `gamma`"),
        (
            &["--flow", "maf", "--hidden", "1"],
            "at least 2 hidden units",
        ),
        (&["--flow", "glow"], "needs the image shape"),
        (&["--flow", "flowplusplus"], "invalid value 'flowplusplus'"),
    ] {
        let args = train(extra);
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    }
    assert!(
        !Path::new(&path("x.safetensors")).exists(),
        "a failed run wrote a model"
    );
}

/// The mean log-prob `log-prob` prints.
fn mean_log_prob(summary: &str) -> f64 {
    summary
        .split("mean log-prob ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no mean log-prob in {summary}"))
}

#[test]
fn every_family_trains_and_serves_every_command() {
    let val = path("val.csv");
    model(); // writes val.csv
             // Two moons under N(0, I) alone: about −2.4 nats; every trained flow must do better.
    for (family, base) in [
        ("nice", "normal"),
        ("nsf", "mixture:2"),
        ("nsf-ar", "diag"),
        ("maf", "normal"),
        ("iaf", "mixture:3"),
    ] {
        let m = path(&format!("family-{family}.safetensors"));
        let mut train = vec![
            "train", "--data", "moons", "--n", "2000", "--steps", "150", "--flow", family,
            "--hidden", "32", "--layers", "3", "--base", base, "--out", &m,
        ];
        // The spline flags apply to the spline families alone.
        if family.starts_with("nsf") {
            train.extend(["--bins", "6", "--tail-bound", "4"]);
        }
        ok(&train);
        let info = ok(&["inspect", "--model", &m]);
        assert!(info.contains(&format!("family: {family}\n")), "{info}");
        let lp = mean_log_prob(&ok(&["log-prob", "--model", &m, "--input", &val]));
        assert!(lp > -2.2, "{family} with a {base} base: mean log-prob {lp}");

        let (z, x2) = (
            path(&format!("z-{family}.csv")),
            path(&format!("x-{family}.csv")),
        );
        ok(&["encode", "--model", &m, "--input", &val, "--out", &z]);
        ok(&["decode", "--model", &m, "--input", &z, "--out", &x2]);
        for (r, s) in read_csv(&val).iter().zip(&read_csv(&x2)) {
            for (u, v) in r.iter().zip(s) {
                assert!(
                    (u - v).abs() <= 1e-4 * (1.0 + u.abs()),
                    "{family}: {u} vs {v}"
                );
            }
        }
        let s = path(&format!("s-{family}.csv"));
        ok(&[
            "sample", "--model", &m, "--n", "400", "--seed", "2", "--out", &s,
        ]);
        let samples = read_csv(&s);
        assert_eq!(samples.len(), 400);
        // Samples come from the model: they score about as well as the data does.
        let on_samples = mean_log_prob(&ok(&["log-prob", "--model", &m, "--input", &s]));
        assert!(
            (on_samples - lp).abs() < 0.6,
            "{family}: samples score {on_samples}, data {lp}"
        );
    }
}

#[test]
fn imported_models_work_with_every_command() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/interop");
    for (source, stem, bound) in [
        ("seed", "seed_stacked3", None),
        ("normflows", "normflows_readme_realnvp_K4", None),
        ("nflows", "nflows_SimpleRealNVP_f2_h32_L4_B2", None),
        ("zuko", "zuko_RealNVP_f2_T4_h64x2", None),
        ("freia", "freia_GLOW_x3_clamp2", None),
        ("zuko", "zuko_NSF_f2_T3_K8_h64x2", None),
        ("zuko", "zuko_MAF_f3_T3_h64x2", None),
        ("nflows", "nflows_RQcoupling_f2_L4_K8_h32_B2", Some("3")),
        ("nflows", "nflows_MAF_f2_L4_h32", None),
        ("normflows", "normflows_CoupledRQS_f3_L4_K8_h32_B2", None),
        ("normflows", "normflows_ARQS_f3_L3_K8_h32_B2", None),
        ("normflows", "normflows_MAF_f3_L4_h32_B2", None),
        ("normflows", "normflows_Glow_L2_K2_c1_8x8_h16", None),
    ] {
        let weights = fixtures.join(format!("{stem}.safetensors"));
        let weights = weights.to_string_lossy();
        let m = path(&format!("{stem}.safetensors"));
        let mut import = vec!["import", "--from", source, "--input", &weights, "--out", &m];
        if let Some(b) = bound {
            // Not in the weights: the bound the source was built with.
            import.extend(["--tail-bound", b]);
            let mut bad = import.clone();
            if let Some(last) = bad.last_mut() {
                *last = "-1";
            }
            fails(&bad, "tail bound must be positive");
        }
        ok(&import);
        let x = path(&format!("{stem}_x.csv"));
        ok(&["sample", "--model", &m, "--n", "50", "--out", &x]);
        ok(&["log-prob", "--model", &m, "--input", &x]);
        ok(&["inspect", "--model", &m]);
        // Decode and encode moderate latents (samples may hold the seed model's
        // explosions, which encode to NaN).
        let sampled = std::fs::read_to_string(&x).expect("samples");
        let dim = sampled.lines().last().map_or(0, |l| l.split(',').count());
        let latents: String = (0..20)
            .map(|i| {
                let row: Vec<String> = (0..dim)
                    .map(|j| format!("{}", ((i * 7 + j * 3) % 11) as f64 / 5.0 - 1.0))
                    .collect();
                row.join(",") + "\n"
            })
            .collect();
        let (z, back) = (
            path(&format!("{stem}_z.csv")),
            path(&format!("{stem}_back.csv")),
        );
        std::fs::write(&z, latents).expect("latents");
        ok(&["decode", "--model", &m, "--input", &z, "--out", &back]);
        ok(&["encode", "--model", &m, "--input", &back, "--out", &z]);
    }
    // The seed model exports back to the seed layout; the trained reference model,
    // which standardises its input, cannot and says why.
    let back = path("seed_back.safetensors");
    ok(&[
        "export",
        "--to",
        "seed",
        "--model",
        &path("seed_stacked3.safetensors"),
        "--out",
        &back,
    ]);
    ok(&[
        "import",
        "--from",
        "seed",
        "--input",
        &back,
        "--out",
        &path("seed_again.safetensors"),
    ]);
    fails(
        &[
            "export",
            "--to",
            "seed",
            "--model",
            model(),
            "--out",
            &path("nope.safetensors"),
        ],
        "standardises",
    );
    fails(
        &[
            "import",
            "--from",
            "zuko",
            "--input",
            &fixtures.join("seed_stacked3.safetensors").to_string_lossy(),
            "--out",
            &path("z.safetensors"),
        ],
        "not a zuko flow",
    );
}

#[test]
fn conditional_flows_from_the_command_line() {
    let (m, train) = (path("cond.safetensors"), path("cond-train.csv"));
    let test = path("cond-test.csv");
    ok(&[
        "data",
        "moons",
        "--n",
        "3000",
        "--seed",
        "1",
        "--with-labels",
        "--out",
        &train,
    ]);
    ok(&[
        "data",
        "moons",
        "--n",
        "400",
        "--seed",
        "2",
        "--with-labels",
        "--out",
        &test,
    ]);
    assert_eq!(read_csv(&test)[0].len(), 3, "labels are the last column");
    ok(&[
        "train",
        "--data",
        &train,
        "--context-dim",
        "1",
        "--steps",
        "400",
        "--hidden",
        "32",
        "--layers",
        "4",
        "--batch",
        "256",
        "--out",
        &m,
    ]);
    let inspect = ok(&["inspect", "--model", &m]);
    assert!(inspect.contains("context features: 1"), "{inspect}");
    assert!(inspect.contains("family: realnvp"), "{inspect}");

    // The same rows with the other label are far less likely.
    let flipped = path("cond-flipped.csv");
    let rows: Vec<String> = read_csv(&test)
        .iter()
        .map(|r| format!("{},{},{}", r[0], r[1], 1.0 - r[2]))
        .collect();
    std::fs::write(&flipped, format!("x0,x1,label\n{}\n", rows.join("\n"))).expect("write");
    let mean = |input: &str| -> f64 {
        let out = ok(&["log-prob", "--model", &m, "--input", input]);
        let after = out.split("mean log-prob").nth(1).expect("mean log-prob");
        after
            .split_whitespace()
            .next()
            .expect("value")
            .parse()
            .expect("number")
    };
    let (right, wrong) = (mean(&test), mean(&flipped));
    assert!(
        right > wrong + 1.0,
        "{right} with the true label, {wrong} flipped"
    );

    // Encoding and decoding keep the condition column; samples carry theirs.
    let (z, back) = (path("cond-z.csv"), path("cond-back.csv"));
    ok(&["encode", "--model", &m, "--input", &test, "--out", &z]);
    ok(&["decode", "--model", &m, "--input", &z, "--out", &back]);
    let (rows, decoded) = (read_csv(&test), read_csv(&back));
    assert_eq!(rows.len(), decoded.len());
    for (a, b) in rows.iter().zip(decoded) {
        assert!((a[0] - b[0]).abs() < 1e-3 && (a[1] - b[1]).abs() < 1e-3 && a[2] == b[2]);
    }
    let samples = path("cond-samples.csv");
    ok(&[
        "sample",
        "--model",
        &m,
        "--n",
        "50",
        "--context",
        "1",
        "--out",
        &samples,
    ]);
    let s = read_csv(&samples);
    assert!(s.len() == 50 && s.iter().all(|r| r.len() == 3 && r[2] == 1.0));
    let per_row = path("cond-per-row.csv");
    std::fs::write(&per_row, "label\n0\n1\n1\n").expect("write");
    ok(&[
        "sample",
        "--model",
        &m,
        "--context-file",
        &per_row,
        "--out",
        &samples,
    ]);
    let s = read_csv(&samples);
    assert_eq!(s.iter().map(|r| r[2]).collect::<Vec<_>>(), [0.0, 1.0, 1.0]);

    fails(
        &["sample", "--model", &m, "--n", "5", "--out", &samples],
        "give --context",
    );
    fails(
        &[
            "sample",
            "--model",
            &m,
            "--n",
            "5",
            "--context",
            "1,2",
            "--out",
            &samples,
        ],
        "--context has 2 values, the model takes 1",
    );
    model(); // writes val.csv: two data columns, no context
    fails(
        &["log-prob", "--model", &m, "--input", &path("val.csv")],
        "then 1 context features",
    );
    fails(
        &[
            "sample",
            "--model",
            model(),
            "--n",
            "5",
            "--context",
            "1",
            "--out",
            &samples,
        ],
        "not conditional",
    );
}

#[test]
fn every_flag_has_a_help_line() {
    let commands = [
        "data", "train", "log-prob", "sample", "encode", "decode", "inspect", "plot", "import",
        "export",
    ];
    for command in commands {
        let help = ok(&[command, "-h"]);
        let options = help.split("Options:").nth(1).unwrap_or_default();
        let lines: Vec<&str> = options.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with("--")
                || line.starts_with("--help")
                || line.starts_with("--version")
            {
                continue;
            }
            // The help text follows the flag and its value, on its line or the next
            // (clap's bracketed annotations, such as the default, are not help).
            let text = line.split('[').next().unwrap_or_default();
            let same_line = text
                .split_whitespace()
                .skip(1)
                .any(|w| !w.starts_with('<') && !w.starts_with("--"));
            let next_line = lines
                .get(i + 1)
                .is_some_and(|l| !l.is_empty() && !l.starts_with('-'));
            assert!(
                same_line || next_line,
                "flow {command}: `{line}` has no help line"
            );
        }
    }
}

#[test]
fn commands_read_and_write_in_chunks_so_memory_does_not_grow_with_the_rows() {
    // 16 features: a whole-file read of the larger file would hold tens of MiB more.
    let write = |name: &str, rows: usize| -> String {
        let p = path(name);
        let mut text = String::with_capacity(rows * 16 * 10);
        for r in 0..rows {
            let row: Vec<String> = (0..16)
                .map(|j| format!("{:.4}", ((r * 31 + j * 17) % 97) as f32 / 48.5 - 1.0))
                .collect();
            text.push_str(&row.join(","));
            text.push('\n');
        }
        std::fs::write(&p, text).expect("write");
        p
    };
    let (small, large) = (
        write("rows-small.csv", 20_000),
        write("rows-large.csv", 300_000),
    );
    let m = path("wide.safetensors");
    ok(&[
        "train", "--data", &small, "--steps", "5", "--hidden", "64", "--layers", "2", "--out", &m,
    ]);
    let peak = |input: &str, command: &str| -> f64 {
        let out = path(&format!("{command}-out.csv"));
        let mut args = vec![command, "--model", &m, "--input", input, "--out", &out];
        if command == "log-prob" {
            args.truncate(5);
        }
        let o = flow(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        match err.split("peak memory ").nth(1) {
            Some(rest) => rest
                .split_whitespace()
                .next()
                .expect("mib")
                .parse()
                .expect("number"),
            None => panic!("no peak memory in {err}"),
        }
    };
    for command in ["log-prob", "encode"] {
        let (a, b) = (peak(&small, command), peak(&large, command));
        assert!(
            b < a + 16.0,
            "{command}: peak memory {a} MiB for 20 000 rows, {b} MiB for 300 000"
        );
    }
    let encoded = read_csv(&path("encode-out.csv"));
    assert_eq!(encoded.len(), 300_000, "every row written");
}

/// The words of `flow train`'s output after `prefix` on the line that starts with it.
fn line_after<'a>(stderr: &'a str, prefix: &str) -> &'a str {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line `{prefix}…` in {stderr}"))
}

/// The training configuration `flow inspect --json` reports for `model`.
fn train_config_of(model: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--model", model, "--json"])).expect("JSON");
    all["metadata"]["train_config"].clone()
}

/// The exponential schedule's decay `flow inspect --json` reports for `model`.
fn decay_of(model: &str) -> f64 {
    train_config_of(model)["schedule"]["decay"]
        .as_f64()
        .expect("an exponential schedule")
}

/// The learning rate `flow inspect --json` reports for `model`.
fn lr_of(model: &str) -> f64 {
    train_config_of(model)["optimizer"]["lr"]
        .as_f64()
        .expect("a learning rate")
}

/// 3000 labelled moons written to `name`, for conditional runs.
fn labelled_moons(name: &str) -> String {
    let data = path(name);
    ok(&[
        "data",
        "moons",
        "--n",
        "3000",
        "--with-labels",
        "--out",
        &data,
    ]);
    data
}

/// One step of a conditional run on `data` (the label as context) in batches of 16,
/// saved to `model`, with `extra` flags: its log.
fn train_conditional(data: &str, model: &str, extra: &[&str]) -> String {
    let args = [
        "train",
        "--data",
        data,
        "--context-dim",
        "1",
        "--batch",
        "16",
        "--stop-at",
        "1",
        "--out",
        model,
    ];
    let out = flow(&[&args[..], extra].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn a_conditional_nsf_takes_its_learning_rate_from_the_number_of_rows() {
    let data = labelled_moons("cond-nsf-3000.csv");
    let m = path("cond-nsf.safetensors");
    let train = |extra: &[&str]| train_conditional(&data, &m, extra);
    // 2700 training rows: 1e-3·√(1000/2700), decaying by 1 − that, stretched over the
    // 8450 steps of 50 epochs.
    train(&["--flow", "nsf"]);
    let lr = 1e-3 * (1000.0f64 / 2700.0).sqrt();
    assert!((lr_of(&m) - lr).abs() < 1e-15, "{} against {lr}", lr_of(&m));
    let decay = (1.0 - lr).powf(5000.0 / 8450.0);
    assert!(
        (decay_of(&m) - decay).abs() < 1e-12,
        "{} against {decay}",
        decay_of(&m)
    );
    // A rate given stands; a family without its own rule keeps the trainer's.
    train(&["--flow", "nsf", "--lr", "0.002"]);
    assert_eq!(lr_of(&m), 0.002);
    train(&["--flow", "realnvp"]);
    assert_eq!(lr_of(&m), 0.001);
}

#[test]
fn a_conditional_run_on_many_rows_runs_for_epochs_its_decay_stretched() {
    let data = labelled_moons("cond-3000.csv");
    let m = path("cond-epochs.safetensors");
    let train = |extra: &[&str]| train_conditional(&data, &m, extra);
    // 2700 training rows in batches of 16: 169 steps an epoch, 50 epochs, more than the
    // cap of 5000; the decay then spreads the same fall over them.
    let err = train(&[]);
    assert!(err.contains(", for at most 8450 steps,"), "{err}");
    let want = 0.999f64.powf(5000.0 / 8450.0);
    assert!(
        (decay_of(&m) - want).abs() < 1e-12,
        "{} against {want}",
        decay_of(&m)
    );
    // A decay given stands; a length given leaves both as they were.
    let err = train(&["--lr-decay", "0.99"]);
    assert!(err.contains(", for at most 8450 steps,"), "{err}");
    assert_eq!(decay_of(&m), 0.99);
    let err = train(&["--steps", "3"]);
    assert!(err.contains(", for at most 3 steps,"), "{err}");
    assert_eq!(decay_of(&m), 0.999);
    // In batches of 512 the same rows come to 300 steps: the cap.
    let out = flow(&[
        "train",
        "--data",
        &data,
        "--context-dim",
        "1",
        "--stop-at",
        "1",
        "--out",
        &m,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(", for at most 5000 steps,"), "{err}");
    assert_eq!(decay_of(&m), 0.999);
}

/// The number after `key` in `line`, up to the next space.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    let word = rest.split_whitespace().next().unwrap_or_default();
    word.parse()
        .unwrap_or_else(|e| panic!("{word} in {line}: {e}"))
}

#[test]
fn a_conditional_nsf_keeps_whichever_of_its_two_networks_validates_better() {
    let data = path("cond-choice.csv");
    ok(&[
        "data",
        "moons",
        "--n",
        "600",
        "--with-labels",
        "--out",
        &data,
    ]);
    let m = path("cond-choice.safetensors");
    let run = |extra: &[&str]| {
        let args = [
            "train",
            "--data",
            &data,
            "--context-dim",
            "1",
            "--flow",
            "nsf",
            "--steps",
            "60",
            "--out",
            &m,
        ];
        let out = flow(&[&args[..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    const RIVAL: &str = "--conditioner plain --hidden 128 --hidden-layers 2";
    let beside = format!("training {RIVAL} beside it on the same batches");
    let err = run(&[]);
    assert!(err.contains(&beside), "{err}");
    let kept = err
        .lines()
        .find(|l| l.starts_with("kept "))
        .unwrap_or_else(|| panic!("{err}"));
    let (best, other) = (
        number_after(kept, "best validation NLL "),
        number_after(kept, " against "),
    );
    assert!(best <= other, "{kept}");
    let saved = ok(&["inspect", "--model", &m]);
    let plain_kept = kept.starts_with(&format!("kept {RIVAL}:"));
    let over = if plain_kept {
        "the nsf defaults"
    } else {
        RIVAL
    };
    assert!(
        saved.contains(&format!(
            "kept over {over} (best validation NLL {other:.4})"
        )),
        "{saved}"
    );
    assert_eq!(saved.contains("network plain"), plain_kept, "{saved}");
    // Each network trained as it does alone: the two scores are those of the two
    // networks given by flag, which train alone.
    let alone = |extra: &[&str]| {
        let err = run(extra);
        assert!(!err.contains(&beside), "{err}");
        let trained = err
            .lines()
            .find(|l| l.starts_with("trained "))
            .unwrap_or_else(|| panic!("{err}"));
        number_after(trained, "best validation NLL ")
    };
    let plain = alone(&[
        "--conditioner",
        "plain",
        "--hidden",
        "128",
        "--hidden-layers",
        "2",
    ]);
    let residual = alone(&["--conditioner", "residual"]);
    let (want_best, want_other) = match plain_kept {
        true => (plain, residual),
        false => (residual, plain),
    };
    assert_eq!((best, other), (want_best, want_other), "{kept}");
    // Without validation, or where an option sets the network, nothing trains beside.
    for extra in [&["--val-fraction", "0"][..], &["--hidden", "32"]] {
        let err = run(extra);
        assert!(
            !err.contains(&beside) && !err.contains("kept "),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn a_conditional_run_on_few_rows_takes_smaller_batches() {
    let data = path("cond-1000.csv");
    ok(&[
        "data",
        "moons",
        "--n",
        "1000",
        "--with-labels",
        "--out",
        &data,
    ]);
    let m = path("cond-batch.safetensors");
    let run = |extra: &[&str]| {
        let args = ["train", "--data", &data, "--stop-at", "1", "--out", &m];
        let out = flow(&[&args[..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    // 900 training rows: 512 would not fit twice in an epoch, 256 does.
    let err = run(&["--context-dim", "1"]);
    assert!(err.contains(" in batches of 256,"), "{err}");
    // A batch given stands; a model without context keeps the trainer's.
    let err = run(&["--context-dim", "1", "--batch", "512"]);
    assert!(err.contains(" in batches of 512,"), "{err}");
    let err = run(&[]);
    assert!(err.contains(" in batches of 512,"), "{err}");
}

#[test]
fn a_run_without_val_holds_rows_out_and_says_what_it_kept() {
    let m = path("held-out.safetensors");
    let args = [
        "train", "--data", "moons", "--n", "1000", "--steps", "40", "--hidden", "16", "--layers",
        "2", "--batch", "64", "--out", &m,
    ];
    let out = flow(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Validated once an epoch: 900 rows in batches of 64.
    assert!(
        err.contains("training realnvp on 900 samples of 2 features in batches of 64, 100 held out to validate on (--val-fraction 0.1, seed 0), for at most 40 steps, stopping after 20 validation scores without improvement (one every 15 steps)"),
        "{err}"
    );
    assert_eq!(line_after(&err, "stopped: "), "reached the cap of 40 steps");
    let kept = line_after(&err, &format!("saved {m}: "));
    assert!(kept.starts_with("the weights of step "), "{kept}");
    assert!(kept.contains(", the best validation NLL ("), "{kept}");
    // The rate is also given without the seconds spent validating: more steps a second.
    let trained = line_after(&err, "trained ");
    let rate_before = |label: &str| -> f64 {
        let at = trained.find(label).unwrap_or_else(|| panic!("{trained}"));
        let start = trained[..at].rfind('(').expect("a rate in brackets") + 1;
        trained[start..at].parse().expect("a rate")
    };
    let (all, training) = (rate_before(" steps/s)"), rate_before(" steps/s without)"));
    assert!(trained.contains("s of it validating ("), "{trained}");
    assert!(training > all, "{trained}");
    // The metrics carry both losses.
    let metrics = path("held-out.jsonl");
    let out = flow(&[&args[..], &["--metrics", &metrics]].concat());
    assert!(out.status.success());
    let text = std::fs::read_to_string(&metrics).expect("metrics");
    assert!(
        text.lines()
            .any(|l| l.contains("\"loss\":") && l.contains("\"val_nll\":")),
        "{text}"
    );
    // --val-fraction 0 trains on every row.
    let out = flow(&[&args[..11], &["--val-fraction", "0", "--out", &m]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("on 1000 samples of 2 features in batches of 512, without validation, for at most 40 steps\n"),
        "{err}"
    );
    assert_eq!(
        line_after(&err, &format!("saved {m}: ")),
        "the weights of the last step, 40"
    );
    assert!(!err.contains("validating"), "{err}");
}

#[test]
fn a_bounded_model_samples_inside_its_box_and_refuses_rows_outside() {
    let m = path("bounded.safetensors");
    ok(&[
        "train",
        "--data",
        "moons",
        "--n",
        "1000",
        "--steps",
        "30",
        "--flow",
        "nsf",
        "--hidden",
        "16",
        "--layers",
        "2",
        "--bounds",
        "-1.5:2.5,-1:inf",
        "--out",
        &m,
    ]);
    let inspect = ok(&["inspect", "--model", &m]);
    assert!(
        inspect.contains("bounds: x0 -1.5:2.5, x1 -1:inf"),
        "{inspect}"
    );
    let samples = path("bounded-samples.csv");
    ok(&[
        "sample",
        "--model",
        &m,
        "--n",
        "5000",
        "--temperature",
        "2",
        "--out",
        &samples,
    ]);
    for row in read_csv(&samples) {
        assert!(
            (-1.5..=2.5).contains(&row[0]) && row[1] >= -1.0,
            "outside the box: {row:?}"
        );
    }
    let outside = path("bounded-outside.csv");
    std::fs::write(&outside, "x0,x1\n0,0\n0.5,-2\n").expect("write");
    fails(
        &["log-prob", "--model", &m, "--input", &outside],
        &format!(
            "{outside}: row 2, column 2: -2 lies outside the model's bounds -1:inf (ends excluded)"
        ),
    );
    fails(
        &[
            "encode",
            "--model",
            &m,
            "--input",
            &outside,
            "--out",
            &path("z.csv"),
        ],
        "row 2, column 2: -2 lies outside",
    );
    fails(
        &[
            "train", "--data", "moons", "--bounds", "-1.5:2.5", "--flow", "realnvp", "--out", &m,
        ],
        "--bounds gives 1 entries for 2 data columns",
    );
    fails(
        &[
            "export",
            "--to",
            "zuko",
            "--model",
            &m,
            "--out",
            &path("bounded-zuko.safetensors"),
        ],
        "cannot export to zuko: the model is confined to a box (--bounds), which that tool's flows have no layer for",
    );
}

#[test]
fn bounds_held_by_rejection_keep_samples_inside_and_renormalise_log_probs() {
    // Rows spread over the unit square, which a briefly trained flow overflows.
    let data = path("unit-square.csv");
    let mut state = 12345u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let rows: String = (0..600)
        .map(|_| format!("{},{}\n", uniform(), uniform()))
        .collect();
    std::fs::write(&data, format!("a,b\n{rows}")).expect("write");
    let train = |extra: &[&str], out: &str| {
        let base = [
            "train", "--data", &data, "--steps", "30", "--flow", "nsf", "--hidden", "16",
            "--layers", "2", "--out", out,
        ];
        ok(&[&base[..], extra].concat());
    };
    let (held, free) = (path("rejection.safetensors"), path("free.safetensors"));
    train(&["--bounds", "0:1,0:1", "--bounds-by", "rejection"], &held);
    train(&[], &free);
    let inspect = ok(&["inspect", "--model", &held]);
    assert!(
        inspect.contains("bounds: a 0:1, b 0:1 (held by rejection)"),
        "{inspect}"
    );
    let samples = path("rejection-samples.csv");
    ok(&["sample", "--model", &held, "--n", "3000", "--out", &samples]);
    let drawn = read_csv(&samples);
    assert_eq!(drawn.len(), 3000);
    assert!(drawn.iter().all(|r| r.iter().all(|v| *v > 0.0 && *v < 1.0)));
    // The same weights as the free flow's; the density inside is its density over its
    // mass there, a constant above 1.
    let scores = |m: &str, name: &str| {
        let out = path(name);
        let run = flow(&["log-prob", "--model", m, "--input", &data, "--out", &out]);
        assert!(run.status.success());
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        (read_csv(&out), err)
    };
    let ((held_lp, note), (free_lp, _)) =
        (scores(&held, "held-lp.csv"), scores(&free, "free-lp.csv"));
    assert!(
        note.contains("estimated from 10000 draws at each of 1 distinct context(s)"),
        "{note}"
    );
    let shift = held_lp[0][0] - free_lp[0][0];
    assert!(shift > 0.0, "{shift}");
    for (h, f) in held_lp.iter().zip(&free_lp) {
        assert!((h[0] - f[0] - shift).abs() < 1e-4, "{h:?} {f:?}");
    }
    // A conditional model: each sample drawn at its own row's context until it lands
    // inside, and one normaliser per distinct context.
    let given = path("unit-square-given.csv");
    let rows: String = (0..600)
        .map(|_| format!("{},{},{}\n", uniform(), uniform(), uniform()))
        .collect();
    std::fs::write(&given, format!("a,b,c\n{rows}")).expect("write");
    let conditional = path("rejection-given.safetensors");
    ok(&[
        "train",
        "--data",
        &given,
        "--context-dim",
        "1",
        "--steps",
        "30",
        "--flow",
        "nsf",
        "--hidden",
        "16",
        "--layers",
        "2",
        "--bounds",
        "0:1,0:1",
        "--bounds-by",
        "rejection",
        "--out",
        &conditional,
    ]);
    let contexts = path("rejection-contexts.csv");
    std::fs::write(&contexts, "c\n0.1\n0.5\n0.9\n").expect("write");
    let samples = path("rejection-given-samples.csv");
    ok(&[
        "sample",
        "--model",
        &conditional,
        "--context-file",
        &contexts,
        "--n",
        "200",
        "--out",
        &samples,
    ]);
    let drawn = read_csv(&samples);
    assert_eq!(drawn.len(), 600);
    assert!(drawn
        .iter()
        .all(|r| r[1] > 0.0 && r[1] < 1.0 && r[2] > 0.0 && r[2] < 1.0));
    let scored = path("rejection-given-scored.csv");
    std::fs::write(
        &scored,
        "a,b,c\n0.5,0.5,0.1\n0.2,0.7,0.5\n0.5,0.5,0.1\n0.9,0.1,0.9\n",
    )
    .expect("write");
    let run = flow(&["log-prob", "--model", &conditional, "--input", &scored]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("at each of 3 distinct context(s)"), "{err}");
    // More distinct contexts than normalisers are estimated for: refused before any
    // is, and nothing written.
    let many = path("rejection-many-contexts.csv");
    let rows: String = (0..1001)
        .map(|i| format!("0.5,0.5,{}\n", i as f64 / 1001.0))
        .collect();
    std::fs::write(&many, format!("a,b,c\n{rows}")).expect("write");
    let out = path("rejection-many-lp.csv");
    fails(
        &[
            "log-prob",
            "--model",
            &conditional,
            "--input",
            &many,
            "--out",
            &out,
        ],
        "at most 1000 of them (10000 draws each): these rows have more",
    );
    assert!(!Path::new(&out).exists());
    fails(
        &[
            "train",
            "--data",
            &data,
            "--bounds-by",
            "rejection",
            "--out",
            &held,
        ],
        "--bounds-by says how --bounds hold: give --bounds too",
    );
    fails(
        &[
            "train",
            "--data",
            &data,
            "--bounds",
            "0:1,0:1",
            "--bounds-by",
            "clip",
            "--out",
            &held,
        ],
        "--bounds-by `clip`: expected logit or rejection",
    );
}
