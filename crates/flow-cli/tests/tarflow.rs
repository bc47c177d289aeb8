//! TarFlow through the `flow` binary: trained on the built-in digits, stopped and
//! resumed, scored in bits/dim, sampled as a grid and inspected; the noise option
//! reported as such; hostile sizes refused in one line.

use std::{path::PathBuf, process::Command};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-tarflow-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Runs `flow args`: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, Some(0), "flow {args:?} failed: {err}");
    out
}

fn bits_per_dim(text: &str) -> f64 {
    let at = text.find(" bits/dim").unwrap_or_else(|| panic!("{text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

/// A small TarFlow on the digits: 2×2 patches, 2 blocks of 1 layer of width 16 (and
/// the family's batch of 64).
const SMALL: [&str; 12] = [
    "--data",
    "digits",
    "--flow",
    "tarflow",
    "--blocks",
    "2",
    "--layers-per-block",
    "1",
    "--width",
    "16",
    "--heads",
    "2",
];

/// The batch a model's recorded training configuration gives.
fn batch_of(model: &str) -> u64 {
    let bytes = std::fs::read(model).expect("model");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("train_config"))
        .expect("train_config in the metadata")
        .clone();
    let cfg: serde_json::Value = serde_json::from_str(&text).expect("train_config JSON");
    cfg["batch_size"].as_u64().expect("batch_size")
}

#[test]
fn tarflow_on_digits_trains_resumes_scores_samples_and_inspects() {
    let d = dir();
    let p = |name: &str| d.join(name).to_string_lossy().into_owned();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train"];
        args.extend_from_slice(&SMALL);
        args.extend_from_slice(&["--steps", "120", "--out", out]);
        args.extend_from_slice(extra);
        ok(&args);
    };
    train(&p("straight.safetensors"), &[]);
    train(
        &p("split.safetensors"),
        &["--checkpoint-every", "60", "--stop-at", "60"],
    );
    train(
        &p("split.safetensors"),
        &["--resume", &p("split.safetensors")],
    );
    ok(&["data", "digits", "--split", "test", "--out", &p("test.csv")]);
    let score = |model: &str, out: &str| {
        ok(&[
            "log-prob",
            "--model",
            model,
            "--input",
            &p("test.csv"),
            "--out",
            out,
        ])
    };
    let printed = score(&p("straight.safetensors"), &p("lp_straight.csv"));
    score(&p("split.safetensors"), &p("lp_split.csv"));
    assert_eq!(
        std::fs::read(p("lp_straight.csv")).expect("lp"),
        std::fs::read(p("lp_split.csv")).expect("lp"),
        "the resumed run differs from the straight one"
    );
    // TarFlow trains on batches of 64 unless told otherwise.
    assert_eq!(batch_of(&p("straight.safetensors")), 64);
    // 120 steps already beat the uniform distribution's log2(17) = 4.09 bits/dim.
    let bpd = bits_per_dim(&printed);
    assert!(bpd < 17f64.log2(), "{printed}");
    assert!(!printed.contains("noised"), "{printed}");

    let info = ok(&["inspect", "--model", &p("straight.safetensors")]);
    assert!(info.contains("family: tarflow"), "{info}");
    assert!(
        info.contains("images: 8x8x1 (HxWxC), 17 pixel levels"),
        "{info}"
    );

    ok(&[
        "sample",
        "--model",
        &p("straight.safetensors"),
        "--n",
        "16",
        "--out",
        &p("grid.png"),
    ]);
    let png = std::fs::read(p("grid.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    ok(&[
        "sample",
        "--model",
        &p("straight.safetensors"),
        "--n",
        "4",
        "--out",
        &p("s.csv"),
    ]);
    let rows = std::fs::read_to_string(p("s.csv")).expect("csv");
    assert_eq!(rows.lines().count(), 5, "{rows}");

    // With noise augmentation the reported likelihood is the noised data's.
    let noised = p("noised.safetensors");
    let mut args = vec!["train"];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(&["--steps", "20", "--noise-std", "0.05", "--out", &noised]);
    args.extend_from_slice(&["--batch", "32"]);
    ok(&args);
    assert_eq!(batch_of(&noised), 32, "--batch overrides the family's");
    let printed = ok(&["log-prob", "--model", &noised, "--input", &p("test.csv")]);
    assert!(
        printed.contains("the likelihood of the noised data")
            && printed.contains("standard deviation 0.05"),
        "{printed}"
    );
}

#[test]
fn hostile_tarflow_settings_are_one_line_errors() {
    let d = dir();
    let out = d.join("never.safetensors").to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--patch", "3"],
            "--flow tarflow on 8x8x1 images: patch size 3 does not divide the height and width of a 1×8×8 image",
        ),
        (
            &["--width", "30", "--heads", "4"],
            "4 heads do not divide an embedding width of 30",
        ),
        (&["--blocks", "0"], "--blocks must be at least 1, got 0"),
        (
            &["--width", "99999999999"],
            "--width 99999999999 is more than the largest allowed, 65536",
        ),
        (
            &["--layers-per-block", "5000"],
            "--layers-per-block 5000 is more than the largest allowed, 1024",
        ),
        (
            &["--noise-std", "-1"],
            "--noise-std must be at least 0 and finite in f32",
        ),
        (
            &["--depth", "3"],
            "--depth applies to glow, not tarflow",
        ),
    ];
    for (extra, expect) in cases {
        let mut args = vec![
            "train", "--data", "digits", "--flow", "tarflow", "--out", &out,
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected `{expect}` in {err}"
        );
    }
    let (code, _, err) = run(&[
        "train", "--data", "digits", "--flow", "glow", "--patch", "2", "--out", &out,
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--patch applies to tarflow, not glow"),
        "{err}"
    );
    assert!(!d.join("never.safetensors").exists());
}
