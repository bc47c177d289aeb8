//! TarFlow's part of `cargo xtask bench digits`: TarFlow at its defaults against the
//! Glow of the same run (test bits/dim and training wall-clock) and against a PyTorch
//! TarFlow of the same architecture (`benches/pytorch_tarflow.py`, training steps/s),
//! on the same 8×8 digits, threads and steps.

use std::{path::Path, process::Command};

use crate::{
    images::{capture, train_and_score, DigitsOptions, DigitsRun, DIGITS_SPEEDUP, TEST_DRAWS},
    json_number, python_program,
    quality::{num, verdict},
    ratio, root, Result,
};

/// Training steps of TarFlow and its PyTorch reference unless `--tarflow-steps` says.
pub const DEFAULT_STEPS: usize = 1000;

/// TarFlow's batch unless told otherwise (its family's), given to the PyTorch reference
/// so that both train the same job.
const BATCH: usize = 64;

/// Trains and scores TarFlow (ours, then PyTorch's) and returns the report section;
/// `glow` is the Glow of the same run at seed 0, `test` the test rows, files go under
/// `out` (`tarflow/`, `pytorch_tarflow.json`).
pub fn digits(o: &DigitsOptions, glow: &DigitsRun, test: &str, out: &Path) -> Result<String> {
    let dir = out.join("tarflow");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let steps = o.tarflow_steps.to_string();
    let train = [
        "--data", "digits", "--flow", "tarflow", "--steps", &steps, "--seed", "0",
    ];
    let ours = train_and_score(&None, o.threads, &train, &[], test, &dir, TEST_DRAWS)?;

    let mut py = Command::new(python_program());
    py.current_dir(root())
        .arg("benches/pytorch_tarflow.py")
        .args(["--steps", &steps, "--threads", &o.threads.to_string()])
        .args(["--batch", &BATCH.to_string()]);
    let json = match capture(py) {
        Ok((json, _)) => json.lines().last().map(str::to_string),
        Err(e) => {
            eprintln!("xtask: PyTorch's TarFlow failed: {e}");
            None
        }
    };
    if let Some(json) = &json {
        std::fs::write(out.join("pytorch_tarflow.json"), json)
            .map_err(|e| format!("cannot write pytorch_tarflow.json: {e}"))?;
    }
    let theirs = DigitsRun {
        bpd: json
            .as_deref()
            .and_then(|j| json_number(j, "test_bpd_10draws")),
        rate: json.as_deref().and_then(|j| json_number(j, "steps_per_s")),
        seconds: json
            .as_deref()
            .and_then(|j| json_number(j, "train_seconds")),
    };
    Ok(report(&ours, glow, &theirs, o))
}

/// The TarFlow section: a table of the three models and the checks, PASS or FAIL.
pub fn report(ours: &DigitsRun, glow: &DigitsRun, torch: &DigitsRun, o: &DigitsOptions) -> String {
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("## TarFlow on scikit-learn's digits against Glow and PyTorch".into());
    line(String::new());
    line(format!(
        "The same data, test draws and threads ({}) as the Glow above. Ours: `flow train \
         --data digits --flow tarflow --steps {} --seed 0` (TarFlow's defaults: 2×2 patches, \
         4 blocks of 2 Transformer layers, width 64, 4 heads; Adam 1e-3 decayed 0.999 per \
         step, batch {BATCH}). PyTorch: `benches/pytorch_tarflow.py --steps {} --batch \
         {BATCH}`, the same architecture, optimiser and batch. Glow: seed 0 of the table \
         above ({} steps). Wall-clock is the training's, as `flow train` and the script \
         report it, our validation passes included. Steps/s are the training steps': \
         ours without the seconds `flow train` reports spending on its validation set \
         (the script scores none), PyTorch's without its first 20 steps.",
        o.threads, o.tarflow_steps, o.tarflow_steps, o.steps
    ));
    line(String::new());
    line("| model | steps | test bits/dim | training wall-clock (s) | training steps/s |".into());
    line("| --- | --- | --- | --- | --- |".into());
    for (name, steps, r) in [
        ("TarFlow, ours", o.tarflow_steps, ours),
        ("TarFlow, PyTorch", o.tarflow_steps, torch),
        ("Glow, ours", o.steps, glow),
    ] {
        line(format!(
            "| {name} | {steps} | {} | {} | {} |",
            num(r.bpd, 3),
            num(r.seconds, 1),
            num(r.rate, 2)
        ));
    }
    line(format!(
        "| TarFlow ours / PyTorch | | | | {} |",
        ratio(ours.rate, torch.rate)
    ));
    line(String::new());
    line("Checks:".into());
    line(String::new());
    line(match (ours.bpd, glow.bpd) {
        (Some(a), Some(b)) => format!(
            "- {} test bits/dim: TarFlow {a:.3} ≤ Glow {b:.3}",
            verdict(a <= b)
        ),
        _ => "- SKIP test bits/dim: TarFlow ≤ Glow (not measured)".into(),
    });
    line(match (ours.seconds, glow.seconds) {
        (Some(a), Some(b)) => format!(
            "- {} training wall-clock: TarFlow {a:.1} s ≤ Glow {b:.1} s",
            verdict(a <= b)
        ),
        _ => "- SKIP training wall-clock: TarFlow ≤ Glow (not measured)".into(),
    });
    line(match (ours.rate, torch.rate) {
        (Some(a), Some(b)) if b > 0.0 => format!(
            "- {} training rate: ours {:.2}× PyTorch's ≥ {DIGITS_SPEEDUP}×",
            verdict(a >= DIGITS_SPEEDUP * b),
            a / b
        ),
        _ => format!("- SKIP training rate ≥ {DIGITS_SPEEDUP}× PyTorch's (not measured)"),
    });
    line(String::new());
    line("Samples: `target/bench-digits/tarflow/samples.png`.".into());
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tarflow_report_judges_each_check() {
        let o = DigitsOptions::default();
        let run = |bpd: f64, seconds: f64, rate: f64| DigitsRun {
            bpd: Some(bpd),
            rate: Some(rate),
            seconds: Some(seconds),
        };
        let glow = run(2.35, 40.0, 75.0);
        let md = report(&run(2.30, 35.0, 30.0), &glow, &run(2.5, 100.0, 10.0), &o);
        assert!(
            md.contains("PASS test bits/dim: TarFlow 2.300 ≤ Glow 2.350"),
            "{md}"
        );
        assert!(
            md.contains("PASS training wall-clock: TarFlow 35.0 s ≤ Glow 40.0 s"),
            "{md}"
        );
        assert!(md.contains("PASS training rate: ours 3.00×"), "{md}");
        let md = report(&run(2.40, 50.0, 15.0), &glow, &run(2.5, 100.0, 10.0), &o);
        assert!(md.contains("FAIL test bits/dim"), "{md}");
        assert!(md.contains("FAIL training wall-clock"), "{md}");
        assert!(md.contains("FAIL training rate: ours 1.50×"), "{md}");
        let md = report(&run(2.40, 50.0, 15.0), &glow, &DigitsRun::default(), &o);
        assert!(md.contains("SKIP training rate"), "{md}");
    }
}
