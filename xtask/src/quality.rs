//! `cargo xtask bench quality [--steps N] [--threads N]`: our flows against zuko's on
//! FFJORD's toy sets (held-out NLL, training rate) and the two directions of MAF and
//! IAF, in one run. Our side is the `quality-job` binary (`src/quality_job.rs`, built
//! in release with the `quality` feature), zuko's `benches/zuko_quality.py`; the
//! report goes to the terminal and `target/bench-quality/report.md`, and is a section
//! of BENCHMARKS.md when the whole `cargo xtask bench` runs.

use std::process::{Command, Stdio};

use crate::{cargo, json_number, python_program, ratio, root, Result};

/// FFJORD's toy sets, as our data sets name them.
const SETS: [&str; 4] = ["eight-gaussians", "checkerboard", "pinwheel", "spirals"];

/// The checks the comparison sets (reported, never asserted).
const NLL_MARGIN: f64 = 0.02;
const MEAN_GAP: f64 = 0.10;
const SPEEDUP: f64 = 3.0;

#[derive(Debug, Clone)]
pub struct Options {
    /// Training steps per set (2000 by default; fewer for a quick check).
    pub steps: usize,
    /// Threads for each side (PyTorch's `set_num_threads`, our `RAYON_NUM_THREADS`).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            steps: 2000,
            threads: 2,
        }
    }
}

pub fn parse(args: &[String]) -> Result<Options> {
    let d = Options::default();
    let (steps, threads) = crate::steps_and_threads(args, d.steps, d.threads, "bench quality")?;
    Ok(Options { steps, threads })
}

/// `cargo xtask bench quality`: runs both sides, prints the report and writes it.
pub fn command(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let md = run(&o)?;
    println!("{md}");
    println!(
        "wrote {}",
        root().join("target/bench-quality/report.md").display()
    );
    Ok(())
}

/// Runs our side, then zuko's, and returns the report (also written to
/// `target/bench-quality/`).
pub fn run(o: &Options) -> Result<String> {
    let out = root().join("target").join("bench-quality");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let steps = o.steps.to_string();
    let threads = o.threads.to_string();

    let mut ours = cargo();
    ours.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--features",
        "quality",
        "--bin",
        "quality-job",
        "--",
        "--steps",
        &steps,
        "--out",
    ])
    .arg(&out)
    .env("RAYON_NUM_THREADS", &threads);
    let ours = stdout_of(ours)?;
    write(&out.join("ours.json"), &ours)?;

    let data = out.join("data");
    let mut zuko = Command::new(python_program());
    zuko.current_dir(root())
        .arg("benches/zuko_quality.py")
        .args(["--threads", &threads, "--steps", &steps, "--data"])
        .arg(&data);
    let zuko = match stdout_of(zuko) {
        Ok(json) => {
            write(&out.join("zuko.json"), &json)?;
            Some(json)
        }
        Err(e) => {
            eprintln!("xtask: zuko's side failed: {e}");
            None
        }
    };
    let md = report(&ours, zuko.as_deref(), o);
    write(&out.join("report.md"), &md)?;
    Ok(md)
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The last line `cmd` prints, its progress shown as it goes (stderr passes through).
fn stdout_of(mut cmd: Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!("{shown} failed ({})", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .map(str::to_string)
        .ok_or_else(|| format!("{shown} printed nothing"))
}

/// `v` with `digits` decimals, or a dash when not measured.
pub fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn signed(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:+.3}"))
}

pub fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The report: both sections' tables and the checks, PASS or FAIL per line.
pub fn report(ours: &str, zuko: Option<&str>, o: &Options) -> String {
    let mine = |key: &str| json_number(ours, key);
    let theirs = |key: &str| zuko.and_then(|j| json_number(j, key));
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("## Density quality: FFJORD's toy sets against zuko".into());
    line(String::new());
    line(format!(
        "Ours: `flow train --flow nsf` at its defaults (5 spline couplings, conditioners \
         of one hidden layer of 512 ReLU units, 8 bins, tail bound 3, last layers starting at zero, data standardised) \
         through the library. zuko {}: `NSF(2, transforms=5, hidden_features=(512,))` \
         (8 bins; on 2 features its layers are autoregressive, which also gives the first \
         feature an unconditional spline) on the same points, standardised the same way, \
         its NLL moved back to the data's units (plus Σ log σ). Each set: 20 000 training \
         points (seed 1), 5 000 held-out (seed 2), {} steps, batch 512, Adam at 1e-3 \
         (ours decayed 0.999 per step, our trainer's default schedule; zuko's constant, \
         as its examples train); {} threads each side, CPU. NLL in nats per point on the held-out \
         points; the entropy is the lowest NLL reachable (`Toy::entropy`); gaps are NLL \
         minus entropy.",
        zuko.and_then(|j| {
            let at = j.find("\"zuko\": \"")? + 9;
            j[at..].split('"').next().map(|v| v.to_string())
        })
        .unwrap_or_default(),
        o.steps,
        o.threads
    ));
    line(String::new());
    line(
        "| set | entropy | ours | gap | zuko | gap | ours − zuko | ours, steps/s | zuko, steps/s | ours / zuko |"
            .into(),
    );
    line("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into());
    let mut checks = Vec::new();
    let mut gaps = Vec::new();
    for set in SETS {
        let entropy = mine(&format!("{set}_entropy"));
        let (a, b) = (mine(&format!("{set}_nll")), theirs(&format!("{set}_nll")));
        let (ra, rb) = (
            mine(&format!("{set}_steps_per_s")),
            theirs(&format!("{set}_steps_per_s")),
        );
        let gap = |v: Option<f64>| Some(v? - entropy?);
        let diff = a.zip(b).map(|(a, b)| a - b);
        line(format!(
            "| {set} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(entropy, 3),
            num(a, 3),
            signed(gap(a)),
            num(b, 3),
            signed(gap(b)),
            signed(diff),
            num(ra, 1),
            num(rb, 1),
            ratio(ra, rb)
        ));
        gaps.push(gap(a));
        checks.push(match (a, b) {
            (Some(a), Some(b)) => format!(
                "{} {set}: ours {a:.3} ≤ zuko {b:.3} + {NLL_MARGIN}",
                verdict(a <= b + NLL_MARGIN)
            ),
            _ => format!("SKIP {set}: ours ≤ zuko + {NLL_MARGIN} (not measured)"),
        });
    }
    let gaps: Option<Vec<f64>> = gaps.into_iter().collect();
    checks.push(match gaps {
        Some(g) => {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            format!(
                "{} mean gap of ours to the entropies {mean:.3} ≤ {MEAN_GAP}",
                verdict(mean <= MEAN_GAP)
            )
        }
        None => format!("SKIP mean gap to the entropies ≤ {MEAN_GAP} (not measured)"),
    });
    for set in SETS {
        let (ra, rb) = (
            mine(&format!("{set}_steps_per_s")),
            theirs(&format!("{set}_steps_per_s")),
        );
        checks.push(match (ra, rb) {
            (Some(a), Some(b)) if b > 0.0 => format!(
                "{} {set}: our training rate {:.2}× zuko's ≥ {SPEEDUP}×",
                verdict(a >= SPEEDUP * b),
                a / b
            ),
            _ => format!("SKIP {set}: our training rate ≥ {SPEEDUP}× zuko's (not measured)"),
        });
    }
    line(String::new());
    line("Checks:".into());
    line(String::new());
    for c in &checks {
        line(format!("- {c}"));
    }
    if zuko.is_none() {
        line(String::new());
        line(format!(
            "zuko's side was not measured: `{} benches/zuko_quality.py` failed \
             (`pip install torch zuko`; `FLOWS_PYTHON` names the interpreter).",
            python_program()
        ));
    }

    line(String::new());
    line("## Autoregressive directions: MAF and IAF against zuko".into());
    line(String::new());
    let (dim, points) = (
        mine("ar_dim").unwrap_or(8.0),
        mine("ar_points").unwrap_or(1e5),
    );
    line(format!(
        "{dim} features, {points} points per call, untrained weights, no gradients \
         kept (zuko under `torch.no_grad()`); the median of 5 calls after a warm-up, \
         {} threads each side, CPU. MAF: 5 layers of MADE networks with two hidden \
         layers of 64 ReLU units (ours `MafConfig` defaults, zuko \
         `MAF({dim}, transforms=5, hidden_features=(64, 64))`). IAF: ours \
         `MafConfig::with_inverse(true)`; zuko the same MAF with its transformation \
         inverted, `Flow(LazyInverse(maf.transform), maf.base)`. The one-pass \
         directions evaluate each layer's network once, the others {dim} times.",
        o.threads
    ));
    line(String::new());
    line("| job | passes per layer | ours, s | zuko, s | ours, points/s | zuko, points/s | ours / zuko |".into());
    line("| --- | --- | --- | --- | --- | --- | --- |".into());
    for (what, key, passes) in [
        ("MAF log-prob", "maf_log_prob_s", "1".to_string()),
        ("IAF sampling", "iaf_sample_s", "1".to_string()),
        ("MAF sampling", "maf_sample_s", format!("{dim}")),
        ("IAF log-prob", "iaf_log_prob_s", format!("{dim}")),
    ] {
        let (a, b) = (mine(key), theirs(key));
        let rate = |s: Option<f64>| s.map(|s| points / s);
        line(format!(
            "| {what} | {passes} | {} | {} | {} | {} | {} |",
            num(a, 4),
            num(b, 4),
            num(rate(a), 0),
            num(rate(b), 0),
            ratio(rate(a), rate(b))
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_judges_each_check() {
        let ours = r#"{"threads": 2, "steps": 10, "eight-gaussians_nll": 2.90, "eight-gaussians_steps_per_s": 400, "eight-gaussians_entropy": 2.832, "checkerboard_nll": 3.60, "checkerboard_steps_per_s": 100, "checkerboard_entropy": 3.466, "pinwheel_nll": 2.40, "pinwheel_steps_per_s": 400, "pinwheel_entropy": 2.318, "spirals_nll": 2.705, "spirals_steps_per_s": 400, "spirals_entropy": 2.645, "maf_log_prob_s": 0.01, "maf_sample_s": 0.1, "iaf_log_prob_s": 0.1, "iaf_sample_s": 0.01, "ar_dim": 8, "ar_points": 100000}"#;
        let zuko = r#"{"threads": 2, "torch": "2.15.0", "zuko": "1.6.0", "eight-gaussians_nll": 2.95, "eight-gaussians_steps_per_s": 100, "checkerboard_nll": 3.50, "checkerboard_steps_per_s": 100, "pinwheel_nll": 2.41, "pinwheel_steps_per_s": 100, "spirals_nll": null, "spirals_steps_per_s": 100, "maf_log_prob_s": 0.02}"#;
        let md = report(ours, Some(zuko), &Options::default());
        assert!(md.contains("PASS eight-gaussians: ours 2.900 ≤ zuko 2.950"));
        assert!(md.contains("FAIL checkerboard: ours 3.600 ≤ zuko 3.500"));
        assert!(md.contains("PASS pinwheel: ours 2.400 ≤ zuko 2.410"));
        assert!(md.contains("SKIP spirals: ours ≤ zuko"));
        // Gaps 0.068, 0.134, 0.082, 0.060: mean 0.086.
        assert!(md.contains("PASS mean gap of ours to the entropies 0.086"));
        assert!(md.contains("PASS eight-gaussians: our training rate 4.00×"));
        assert!(md.contains("FAIL checkerboard: our training rate 1.00×"));
        assert!(md.contains("| MAF log-prob | 1 | 0.0100 | 0.0200 |"));
        assert!(md.contains("zuko 1.6.0:"));
        let alone = report(ours, None, &Options::default());
        assert!(alone.contains("SKIP eight-gaussians"));
        assert!(alone.contains("PASS mean gap"));
    }

    #[test]
    fn options_parse() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&args("--steps 200 --threads 4")).unwrap_or_default();
        assert_eq!((o.steps, o.threads), (200, 4));
        let err = |s: &str| parse(&args(s)).map(|_| ()).unwrap_err();
        assert_eq!(err("--steps 0"), "--steps needs a positive whole number");
        assert!(
            err("--fast").starts_with("unexpected argument `--fast` (bench quality"),
            "{}",
            err("--fast")
        );
        assert_eq!(parse(&[]).map(|o| o.steps), Ok(2000));
    }
}
