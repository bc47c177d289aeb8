//! Image flows through the `flow` binary: Glow on the built-in digits trained, resumed,
//! scored in bits/dim and sampled; RealNVP's image architecture on an IDX file.

use std::{path::PathBuf, process::Command};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-images-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Runs `flow args`, which must succeed; returns its stdout and stderr.
fn flow(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .output()
        .expect("run flow");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "flow {args:?} failed: {stderr}");
    (stdout, stderr)
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> f64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number before `{label}` in {text}"))
}

fn csv_values(path: &PathBuf) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .expect("csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
        .collect()
}

/// The training settings a model file records.
fn train_config(model: &PathBuf) -> serde_json::Value {
    let bytes = std::fs::read(model).expect("model");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("train_config"))
        .expect("train_config in the metadata")
        .clone();
    serde_json::from_str(&text).expect("train_config JSON")
}

#[test]
fn glow_on_digits_trains_resumes_scores_and_samples() {
    let d = dir("glow");
    let p = |name: &str| d.join(name).to_string_lossy().into_owned();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            "digits",
            "--flow",
            "glow",
            "--scales",
            "2",
            "--depth",
            "1",
            "--channels",
            "8",
            "--batch",
            "64",
            "--steps",
            "200",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        flow(&args);
    };
    // Straight, and stopped at 100 then resumed: ActNorm keeps its initialisation and
    // the dequantisation noise follows the step, so both end the same bit for bit.
    train(&p("straight.safetensors"), &[]);
    train(
        &p("split.safetensors"),
        &["--checkpoint-every", "100", "--stop-at", "100"],
    );
    train(
        &p("split.safetensors"),
        &["--resume", &p("split.safetensors")],
    );

    flow(&["data", "digits", "--split", "test", "--out", &p("test.csv")]);
    let test = csv_values(&d.join("test.csv"));
    assert_eq!((test.len(), test[0].len()), (297, 64));

    let score = |model: &str, out: &str| {
        flow(&[
            "log-prob",
            "--model",
            model,
            "--input",
            &p("test.csv"),
            "--out",
            out,
        ])
        .0
    };
    let printed = score(&p("straight.safetensors"), &p("lp_straight.csv"));
    score(&p("split.safetensors"), &p("lp_split.csv"));
    let (a, b) = (
        std::fs::read(d.join("lp_straight.csv")).expect("lp"),
        std::fs::read(d.join("lp_split.csv")).expect("lp"),
    );
    assert_eq!(a, b, "the resumed run differs from the straight one");

    // Per row: the dequantised log-likelihood of the pixels in nats; the summary's
    // bits/dim is its negative mean over 64·ln 2.
    let rows: Vec<f64> = csv_values(&d.join("lp_straight.csv"))
        .into_iter()
        .map(|r| r[0])
        .collect();
    assert_eq!(rows.len(), 297);
    assert!(rows.iter().all(|v| v.is_finite() && *v < 0.0), "{rows:?}");
    let mean = rows.iter().sum::<f64>() / rows.len() as f64;
    let bpd = number_after(&printed, "bits/dim");
    assert!(
        (bpd + mean / (64.0 * std::f64::consts::LN_2)).abs() < 1e-3,
        "{printed} vs mean {mean}"
    );
    // 200 steps already beat the uniform distribution's log2(17) = 4.09 bits/dim.
    assert!(bpd < 17f64.log2(), "{bpd} bits/dim");
    // Another noise draw (`--seed`) moves the estimate a little, not the model.
    let (other, _) = flow(&[
        "log-prob",
        "--model",
        &p("straight.safetensors"),
        "--input",
        &p("test.csv"),
        "--seed",
        "7",
    ]);
    let bpd7 = number_after(&other, "bits/dim");
    assert!(bpd7 != bpd && (bpd7 - bpd).abs() < 0.05, "{bpd} vs {bpd7}");

    // Glow's defaults regularise: Adam with decoupled weight decay 0.1 (AdamW).
    let optimizer = &train_config(&d.join("straight.safetensors"))["optimizer"];
    assert_eq!(optimizer["kind"], "adam-w", "{optimizer}");
    assert_eq!(optimizer["weight_decay"], 0.1, "{optimizer}");

    let (info, _) = flow(&["inspect", "--model", &p("straight.safetensors")]);
    assert!(
        info.contains("images: 8x8x1 (HxWxC), 17 pixel levels"),
        "{info}"
    );

    flow(&[
        "sample",
        "--model",
        &p("straight.safetensors"),
        "--n",
        "5",
        "--out",
        &p("s.csv"),
    ]);
    let samples = csv_values(&d.join("s.csv"));
    assert_eq!(samples.len(), 5);
    assert!(samples
        .iter()
        .flatten()
        .all(|v| v.fract() == 0.0 && (0.0..17.0).contains(v)));
    flow(&[
        "sample",
        "--model",
        &p("straight.safetensors"),
        "--n",
        "16",
        "--temperature",
        "0.7",
        "--out",
        &p("grid.png"),
    ]);
    let png = std::fs::read(d.join("grid.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

/// An IDX file (MNIST's format) of `n` images `h×w`, unsigned bytes.
fn idx(n: usize, h: usize, w: usize, pixels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for v in [n, h, w] {
        b.extend_from_slice(&(v as u32).to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

#[test]
fn realnvp_image_trains_on_an_idx_file() {
    let d = dir("realnvp");
    let p = |name: &str| d.join(name).to_string_lossy().into_owned();
    // 64 4×4 images with 4 levels: a bright left half.
    let pixels: Vec<u8> = (0..64 * 16)
        .map(|i| {
            let (k, j) = (i / 16, i % 4);
            ((k + i) % 2) as u8 + if j < 2 { 2 } else { 0 }
        })
        .collect();
    std::fs::write(d.join("x.idx"), idx(64, 4, 4, &pixels)).expect("idx");
    let data = p("x.idx");
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            &data,
            "--flow",
            "realnvp-image",
            "--pixel-levels",
            "4",
            "--scales",
            "2",
            "--channels",
            "8",
            "--batch",
            "32",
            "--steps",
            "30",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        flow(&args);
    };
    train(&p("m.safetensors"), &[]);
    // Stopped at 15 and resumed: the batch-norm running statistics travel with the
    // checkpoint, so the result is the straight run's bit for bit.
    train(
        &p("split.safetensors"),
        &["--checkpoint-every", "15", "--stop-at", "15"],
    );
    train(
        &p("split.safetensors"),
        &["--resume", &p("split.safetensors")],
    );
    for (model, out) in [("m", "lp_m.csv"), ("split", "lp_split.csv")] {
        flow(&[
            "log-prob",
            "--model",
            &p(&format!("{model}.safetensors")),
            "--input",
            &p("x.idx"),
            "--out",
            &p(out),
        ]);
    }
    assert_eq!(
        std::fs::read(d.join("lp_m.csv")).expect("lp"),
        std::fs::read(d.join("lp_split.csv")).expect("lp"),
        "the resumed run differs from the straight one"
    );
    let (out, _) = flow(&[
        "log-prob",
        "--model",
        &p("m.safetensors"),
        "--input",
        &p("x.idx"),
    ]);
    let bpd = number_after(&out, "bits/dim");
    // The data take 2 levels of 4 per pixel: what was learned sits below the uniform
    // model's 2 bits and above nothing.
    assert!(bpd > 0.0 && bpd < 2.0, "{out}");
    let (info, _) = flow(&["inspect", "--model", &p("m.safetensors")]);
    assert!(info.contains("family: realnvp-image"), "{info}");
    assert!(
        info.contains("images: 4x4x1 (HxWxC), 4 pixel levels"),
        "{info}"
    );
}
