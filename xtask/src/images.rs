//! Image flows: `cargo xtask bench digits` (Glow against normflows' Glow on
//! scikit-learn's digits) and `cargo xtask fashion-mnist` (Glow on Fashion-MNIST).
//! Both drive the `flow` command as a user would and read its reports.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    flow, json_number, python_program,
    quality::{num, verdict},
    ratio, root, split_args, Result,
};

/// The Glow both image jobs train: the digits comparison's architecture and batch, as
/// the issue that set it gives them (Fashion-MNIST's 28×28 halves twice as well).
const GLOW_ARCH: [&str; 8] = [
    "--scales",
    "2",
    "--depth",
    "8",
    "--channels",
    "64",
    "--batch",
    "64",
];
/// The checks the digits comparison sets (reported, never asserted).
pub(crate) const DIGITS_SPEEDUP: f64 = 2.0;
/// Dequantisation draws of the test set a bits/dim averages on each side (the spread
/// of one draw, about 0.01 bits/dim on 297 images, is the size of the differences
/// compared).
pub(crate) const TEST_DRAWS: u64 = 10;

/// Where Debian's `dataset-fashion-mnist` puts the IDX files.
const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Runs `cmd`, passing its stderr through and keeping a copy; returns (stdout, stderr).
pub(crate) fn capture(mut cmd: Command) -> Result<(String, String)> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprint!("{stderr}");
    if !out.status.success() {
        return Err(format!("{shown} failed ({})", out.status));
    }
    Ok((stdout, stderr))
}

/// The number just before `label` in `text` (`… 10.7 steps/s`, `2.36 bits/dim`).
fn number_before(text: &str, label: &str) -> Option<f64> {
    let at = text.rfind(label)?;
    text[..at]
        .split(|c: char| c.is_whitespace() || c == '(')
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// `flow train` then `flow log-prob` on `test` and `flow sample` into `out`: returns
/// the test bits/dim, training steps/s (the validation passes left out) and training
/// seconds (with them). `device` (`--device D`, or empty) goes to all three commands.
pub(crate) fn train_and_score(
    features: &Option<String>,
    threads: usize,
    train: &[&str],
    device: &[&str],
    test: &str,
    out: &Path,
    draws: u64,
) -> Result<DigitsRun> {
    let p = |name: &str| out.join(name).to_string_lossy().into_owned();
    let model = p("model.safetensors");
    let mut args = vec!["train"];
    args.extend_from_slice(train);
    args.extend_from_slice(device);
    args.extend(["--out", &model]);
    let mut cmd = flow(features, &args);
    cmd.env("RAYON_NUM_THREADS", threads.to_string());
    let (_, log) = capture(cmd)?;
    // The rate of the training steps themselves: the peers' loops score no
    // validation set.
    let rate = number_before(&log, "steps/s without)").or_else(|| number_before(&log, "steps/s)"));
    let seconds = training_seconds(&log);
    // The mean over `draws` dequantisations of the test set (seeds 0, 1, …).
    let mut sum = Some(0.0);
    for seed in 0..draws.max(1) {
        let seed = seed.to_string();
        let mut args = vec![
            "log-prob", "--model", &model, "--input", test, "--seed", &seed,
        ];
        args.extend_from_slice(device);
        let (scores, _) = capture(flow(features, &args))?;
        print!("{scores}");
        sum = sum
            .zip(number_before(&scores, "bits/dim"))
            .map(|(s, b)| s + b);
    }
    let bpd = sum.map(|s| s / draws.max(1) as f64);
    let samples = p("samples.png");
    let mut args = vec!["sample", "--model", &model, "--n", "64", "--out", &samples];
    args.extend_from_slice(device);
    capture(flow(features, &args))?;
    Ok(DigitsRun { bpd, rate, seconds })
}

/// `flag VALUE` (or `flag=VALUE`) taken out of `args` before any `--`: its value, if
/// given, and the other arguments.
fn take_value(args: &[String], flag: &str) -> Result<(Option<String>, Vec<String>)> {
    let mut value = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            rest.push(a.clone());
            rest.extend(it.by_ref().cloned());
        } else if a == flag {
            value = Some(it.next().ok_or(format!("{flag} needs a value"))?.clone());
        } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            value = Some(v.to_string());
        } else {
            rest.push(a.clone());
        }
    }
    Ok((value, rest))
}

/// `defaults` (flag and value pairs) without the flags that `extra` gives, then
/// `extra`: the flags after `--` replace the job's own (`flow` takes each flag once).
fn overridden<'a>(defaults: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let given = |flag: &str| {
        extra
            .iter()
            .any(|e| *e == flag || e.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    };
    let mut out: Vec<&str> = defaults
        .chunks(2)
        .filter(|pair| !given(pair[0]))
        .flatten()
        .copied()
        .collect();
    out.extend_from_slice(extra);
    out
}

/// The seconds of `trained N steps in 37.2s (…)` in a `flow train` log.
fn training_seconds(log: &str) -> Option<f64> {
    let after = &log[log.rfind("steps in ")? + "steps in ".len()..];
    after[..after.find("s (")?].parse().ok()
}

#[derive(Debug, Clone)]
pub struct DigitsOptions {
    pub steps: usize,
    pub threads: usize,
    /// Model seeds per side (0, 1, …); the check compares the means.
    pub seeds: u64,
    /// Training steps of TarFlow and of its PyTorch reference.
    pub tarflow_steps: usize,
}

impl Default for DigitsOptions {
    fn default() -> Self {
        Self {
            steps: 3000,
            threads: 2,
            seeds: 1,
            tarflow_steps: crate::tarflow::DEFAULT_STEPS,
        }
    }
}

fn parse_digits(args: &[String]) -> Result<DigitsOptions> {
    let d = DigitsOptions::default();
    let (mut seeds, mut tarflow_steps, mut rest) = (d.seeds, d.tarflow_steps, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seeds" {
            seeds = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &u64| v > 0)
                .ok_or("--seeds needs a positive whole number")?;
        } else if a == "--tarflow-steps" {
            tarflow_steps = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
                .ok_or("--tarflow-steps needs a positive whole number")?;
        } else {
            rest.push(a.clone());
        }
    }
    let (steps, threads) = crate::steps_and_threads(
        &rest,
        d.steps,
        d.threads,
        "bench digits [--seeds N] [--tarflow-steps N]",
    )?;
    Ok(DigitsOptions {
        steps,
        threads,
        seeds,
        tarflow_steps,
    })
}

/// `cargo xtask bench digits`: runs both sides, prints the report and writes it.
pub fn digits_command(args: &[String]) -> Result<()> {
    let o = parse_digits(args)?;
    let md = digits(&o)?;
    println!("{md}");
    println!(
        "wrote {}",
        root().join("target/bench-digits/report.md").display()
    );
    Ok(())
}

/// One model seed's result on one side: test bits/dim, training steps/s and the
/// training's wall-clock seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct DigitsRun {
    pub bpd: Option<f64>,
    pub rate: Option<f64>,
    pub seconds: Option<f64>,
}

/// Glow on the digits, ours then normflows', for each model seed, and the report
/// section. Seed 0's files are `ours/` and `normflows.json`, later seeds' carry the
/// seed in their names.
pub fn digits(o: &DigitsOptions) -> Result<String> {
    let out = root().join("target").join("bench-digits");
    let test = out.join("test.csv").to_string_lossy().into_owned();
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    capture(flow(
        &None,
        &["data", "digits", "--split", "test", "--out", &test],
    ))?;
    let steps = o.steps.to_string();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for seed in 0..o.seeds {
        let tag = |name: &str, ext: &str| match seed {
            0 => format!("{name}{ext}"),
            s => format!("{name}-seed{s}{ext}"),
        };
        let dir = out.join(tag("ours", ""));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let seed_arg = seed.to_string();
        // normflows trains on all 1 500 digits for the same steps: so do we.
        let mut train = vec![
            "--data",
            "digits",
            "--flow",
            "glow",
            "--steps",
            &steps,
            "--seed",
            &seed_arg,
            "--val-fraction",
            "0",
        ];
        train.extend_from_slice(&GLOW_ARCH);
        ours.push(train_and_score(
            &None,
            o.threads,
            &train,
            &[],
            &test,
            &dir,
            TEST_DRAWS,
        )?);

        let mut py = Command::new(python_program());
        py.current_dir(root())
            .arg("benches/normflows_glow_digits.py")
            .args(["--steps", &steps, "--threads", &o.threads.to_string()])
            .args(["--seed", &seed_arg])
            .arg("--samples")
            .arg(out.join(tag("normflows_samples", ".png")));
        let json = match capture(py) {
            Ok((json, _)) => json.lines().last().map(str::to_string),
            Err(e) => {
                eprintln!("xtask: normflows' side failed: {e}");
                None
            }
        };
        if let Some(json) = &json {
            std::fs::write(out.join(tag("normflows", ".json")), json)
                .map_err(|e| format!("cannot write normflows.json: {e}"))?;
        }
        theirs.push(DigitsRun {
            bpd: json
                .as_deref()
                .and_then(|j| json_number(j, "test_bpd_10draws")),
            rate: json.as_deref().and_then(|j| json_number(j, "steps_per_s")),
            seconds: json
                .as_deref()
                .and_then(|j| json_number(j, "train_seconds")),
        });
    }
    let mut md = digits_report(&ours, &theirs, o);
    md.push('\n');
    md.push_str(&crate::tarflow::digits(o, &ours[0], &test, &out)?);
    std::fs::write(out.join("report.md"), &md)
        .map_err(|e| format!("cannot write the report: {e}"))?;
    Ok(md)
}

/// The mean of the values, when every run has one.
fn mean_of(runs: &[DigitsRun], value: impl Fn(&DigitsRun) -> Option<f64>) -> Option<f64> {
    let values: Option<Vec<f64>> = runs.iter().map(value).collect();
    values
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// The digits section: the table (a row per seed and side, and the means) and the
/// checks, PASS or FAIL per line.
pub fn digits_report(ours: &[DigitsRun], theirs: &[DigitsRun], o: &DigitsOptions) -> String {
    let (bpd, rate) = (mean_of(ours, |r| r.bpd), mean_of(ours, |r| r.rate));
    let (their_bpd, their_rate) = (mean_of(theirs, |r| r.bpd), mean_of(theirs, |r| r.rate));
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("## Glow on scikit-learn's digits against normflows".into());
    line(String::new());
    line(format!(
        "8×8 digits, 17 pixel levels, uniform dequantisation; trained on the first 1 500 \
         images, tested on the last 297 (each model's bits/dim is the mean over \
         {TEST_DRAWS} dequantisations of the test set). Ours: `flow train --data digits \
         --flow glow {} --steps {} --seed S` (its defaults for Glow: Adam 1e-3 decayed \
         0.999 per step, decoupled weight decay 0.1), then `flow log-prob --seed 0…{}` on the test rows. normflows: \
         `benches/normflows_glow_digits.py --seed S`, its multi-scale Glow of the same \
         shape (L = 2, K = 8, 64 hidden channels), Adamax 1e-3, batch 64, the same steps. \
         Model seeds S = {} on each side; {} threads each side, CPU. bits/dim = \
         (−log p(x) + D·ln 17) / (D·ln 2). Steps/s are the training steps': ours without \
         the seconds `flow train` reports spending on its validation set (normflows' \
         script scores none), normflows' without its first steps.",
        GLOW_ARCH.join(" "),
        o.steps,
        TEST_DRAWS - 1,
        match o.seeds {
            0 | 1 => "0".to_string(),
            n => format!("0…{}", n - 1),
        },
        o.threads
    ));
    line(String::new());
    line("| | seed | test bits/dim | training steps/s |".into());
    line("| --- | --- | --- | --- |".into());
    for (side, runs) in [("ours", ours), ("normflows", theirs)] {
        for (seed, r) in runs.iter().enumerate() {
            line(format!(
                "| {side} | {seed} | {} | {} |",
                num(r.bpd, 3),
                num(r.rate, 1)
            ));
        }
    }
    if ours.len() > 1 {
        line(format!(
            "| ours | mean | {} | {} |",
            num(bpd, 3),
            num(rate, 1)
        ));
        line(format!(
            "| normflows | mean | {} | {} |",
            num(their_bpd, 3),
            num(their_rate, 1)
        ));
    }
    line(format!(
        "| ours / normflows | | | {} |",
        ratio(rate, their_rate)
    ));
    line(String::new());
    line("Checks:".into());
    line(String::new());
    let what = if ours.len() > 1 { " (means)" } else { "" };
    line(match (bpd, their_bpd) {
        (Some(a), Some(b)) => format!(
            "- {} test bits/dim{what}: ours {a:.3} ≤ normflows {b:.3}",
            verdict(a <= b)
        ),
        _ => "- SKIP test bits/dim: ours ≤ normflows (not measured)".into(),
    });
    line(match (rate, their_rate) {
        (Some(a), Some(b)) if b > 0.0 => format!(
            "- {} training rate{what}: ours {:.2}× normflows' ≥ {DIGITS_SPEEDUP}×",
            verdict(a >= DIGITS_SPEEDUP * b),
            a / b
        ),
        _ => format!("- SKIP training rate ≥ {DIGITS_SPEEDUP}× normflows' (not measured)"),
    });
    line(String::new());
    line(
        "Samples (seed 0): `target/bench-digits/ours/samples.png` and \
         `target/bench-digits/normflows_samples.png`."
            .into(),
    );
    md
}

/// `cargo xtask fashion-mnist [--features F] [-- FLOW TRAIN ARGS]`: Glow on
/// Fashion-MNIST (60 000 training and 10 000 test images, 28×28, 256 levels) from
/// Debian's `dataset-fashion-mnist` (or the folder `FASHION_MNIST_DIR` names), into
/// `runs/fashion-mnist/`: test bits/dim and a grid of 64 samples.
pub fn fashion_mnist(args: &[String]) -> Result<()> {
    // `--device D` trains, scores and samples on D; `cuda` and `metal` build `flow`
    // with that feature unless `--features` says otherwise.
    let (device, rest) = take_value(args, "--device")?;
    let (features, extra) = split_args(&rest)?;
    let features = match (&features, device.as_deref()) {
        (None, Some(d @ ("cuda" | "metal"))) => Some(d.to_string()),
        _ => features,
    };
    let device_args: Vec<&str> = match &device {
        Some(d) => vec!["--device", d],
        None => Vec::new(),
    };
    let dir = std::env::var("FASHION_MNIST_DIR").unwrap_or_else(|_| FASHION_MNIST_DIR.into());
    let file = |name: &str| -> Result<String> {
        let p = PathBuf::from(&dir).join(name);
        if p.exists() {
            Ok(p.to_string_lossy().into_owned())
        } else {
            Err(format!(
                "{} not found: install Debian's dataset-fashion-mnist or set FASHION_MNIST_DIR",
                p.display()
            ))
        }
    };
    let (train_file, test_file) = (
        file("train-images-idx3-ubyte.gz")?,
        file("t10k-images-idx3-ubyte.gz")?,
    );
    let out = root().join("runs").join("fashion-mnist");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let metrics = out.join("metrics.jsonl").to_string_lossy().into_owned();
    let mut defaults = vec!["--data", &train_file, "--flow", "glow"];
    defaults.extend_from_slice(&GLOW_ARCH);
    defaults.extend_from_slice(&["--steps", "2000", "--metrics", &metrics]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let train = overridden(&defaults, &extra);
    let threads = crate::threads();
    let run = train_and_score(
        &features,
        threads,
        &train,
        &device_args,
        &test_file,
        &out,
        1,
    )?;
    println!(
        "Fashion-MNIST: test bits/dim {} ({} training steps/s); model, samples.png and metrics in {}",
        num(run.bpd, 3),
        num(run.rate, 2),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_taken_before_the_separator_only() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (device, rest) = take_value(
            &args(&["--device", "cuda", "--", "--device", "cpu"]),
            "--device",
        )
        .unwrap();
        assert_eq!(device.as_deref(), Some("cuda"));
        assert_eq!(rest, args(&["--", "--device", "cpu"]));
        let (device, rest) =
            take_value(&args(&["--features", "cuda", "--device=metal"]), "--device").unwrap();
        assert_eq!(device.as_deref(), Some("metal"));
        assert_eq!(rest, args(&["--features", "cuda"]));
        assert!(take_value(&args(&["--device"]), "--device").is_err());
    }

    #[test]
    fn flags_after_the_separator_replace_the_jobs_own() {
        let defaults = ["--flow", "glow", "--steps", "2000", "--batch", "64"];
        assert_eq!(
            overridden(&defaults, &["--steps", "5", "--batch=32", "--seed", "1"]),
            [
                "--flow",
                "glow",
                "--steps",
                "5",
                "--batch=32",
                "--seed",
                "1"
            ]
        );
        assert_eq!(overridden(&defaults, &[]), defaults);
        // A flag that only begins like one of the job's is not it.
        assert_eq!(
            overridden(&defaults, &["--steps-extra", "1"]),
            [
                "--flow",
                "glow",
                "--steps",
                "2000",
                "--batch",
                "64",
                "--steps-extra",
                "1"
            ]
        );
    }

    #[test]
    fn numbers_are_read_from_flow_reports() {
        let train = "step 10/10\ntrained 10 steps in 1.0s (10.7 steps/s), last batch NLL -5\n";
        assert_eq!(number_before(train, "steps/s)"), Some(10.7));
        let validated = "trained 300 steps in 7.4s (40.5 steps/s), 0.62s of it validating (44.2 steps/s without), last batch NLL 114.4 nats\n";
        assert_eq!(number_before(validated, "steps/s)"), Some(40.5));
        assert_eq!(number_before(validated, "steps/s without)"), Some(44.2));
        assert_eq!(training_seconds(validated), Some(7.4));
        let lp = "297 rows  mean log-prob -120.0 nats  NLL 120.0 nats  2.7046 bits/dim\n";
        assert_eq!(number_before(lp, "bits/dim"), Some(2.7046));
        assert_eq!(number_before("nothing here", "bits/dim"), None);
        let log = "trained 300 steps in 340.9s (0.9 steps/s), last batch NLL 108.1 nats (2.43 bits/dim)\n";
        assert_eq!(training_seconds(log), Some(340.9));
        assert_eq!(training_seconds("nothing here"), None);
    }

    #[test]
    fn the_digits_report_judges_each_check() {
        let o = DigitsOptions::default();
        let run = |bpd: f64, rate: f64| DigitsRun {
            bpd: Some(bpd),
            rate: Some(rate),
            seconds: None,
        };
        let theirs = [run(2.35, 19.0)];
        let md = digits_report(&[run(2.30, 40.0)], &theirs, &o);
        assert!(
            md.contains("PASS test bits/dim: ours 2.300 ≤ normflows 2.350"),
            "{md}"
        );
        assert!(md.contains("PASS training rate: ours 2.11×"), "{md}");
        let md = digits_report(&[run(2.40, 10.0)], &theirs, &o);
        assert!(md.contains("FAIL test bits/dim"), "{md}");
        assert!(md.contains("FAIL training rate: ours 0.53×"), "{md}");
        let md = digits_report(&[run(2.40, 10.0)], &[DigitsRun::default()], &o);
        assert!(md.contains("SKIP test bits/dim"), "{md}");
        // Several seeds: the means are compared, not the best or the first.
        let o = DigitsOptions { seeds: 2, ..o };
        let md = digits_report(
            &[run(2.30, 40.0), run(2.42, 40.0)],
            &[run(2.35, 19.0), run(2.36, 21.0)],
            &o,
        );
        assert!(
            md.contains("FAIL test bits/dim (means): ours 2.360 ≤ normflows 2.355"),
            "{md}"
        );
        assert!(md.contains("| normflows | mean | 2.355 | 20.0 |"), "{md}");
    }
}
