use std::io::Write;

use serde::Serialize;

use crate::TrainSummary;

/// Progress of a training run at one step.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Training negative log-likelihood of the last batch (nats per sample).
    pub loss: f64,
    /// Validation NLL, when it was scored at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_nll: Option<f64>,
    pub lr: f64,
    /// Batches skipped so far for a non-finite loss or gradient.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: usize,
    pub steps_per_sec: f64,
    pub elapsed_secs: f64,
    pub eta_secs: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Receives progress from a [`Trainer`](crate::Trainer).
pub trait Reporter {
    fn start(&mut self, total_steps: usize) {
        let _ = total_steps;
    }
    fn report(&mut self, report: &Report);
    /// A message worth showing (validation improvements, early stopping, warnings).
    fn message(&mut self, message: &str) {
        let _ = message;
    }
    fn finish(&mut self, summary: &TrainSummary) {
        let _ = summary;
    }
}

/// Forwards to every reporter in turn.
impl Reporter for Vec<Box<dyn Reporter>> {
    fn start(&mut self, total_steps: usize) {
        self.iter_mut().for_each(|r| r.start(total_steps));
    }
    fn report(&mut self, report: &Report) {
        self.iter_mut().for_each(|r| r.report(report));
    }
    fn message(&mut self, message: &str) {
        self.iter_mut().for_each(|r| r.message(message));
    }
    fn finish(&mut self, summary: &TrainSummary) {
        self.iter_mut().for_each(|r| r.finish(summary));
    }
}

/// Plain text lines, for logs and pipes: one every `every` steps, plus every report
/// that carries a validation score.
#[derive(Debug)]
pub struct PlainReporter<W: Write> {
    out: W,
    every: usize,
}

impl<W: Write> PlainReporter<W> {
    pub fn new(out: W, every: usize) -> Self {
        Self {
            out,
            every: every.max(1),
        }
    }
}

/// One line describing `r`.
pub fn format_report(r: &Report) -> String {
    let mut line = format!(
        "step {:>6}/{}  loss {:.4}  lr {:.2e}  {:.1} steps/s",
        r.step, r.total_steps, r.loss, r.lr, r.steps_per_sec
    );
    if let Some(v) = r.val_nll {
        line.push_str(&format!("  val_nll {v:.4}"));
    }
    if r.skipped > 0 {
        line.push_str(&format!("  skipped {}", r.skipped));
    }
    line
}

impl<W: Write> Reporter for PlainReporter<W> {
    fn report(&mut self, report: &Report) {
        let due = report.step.is_multiple_of(self.every) || report.step == report.total_steps;
        if due || report.val_nll.is_some() {
            let _ = writeln!(self.out, "{}", format_report(report));
        }
    }
    fn message(&mut self, message: &str) {
        let _ = writeln!(self.out, "{message}");
    }
}

/// One JSON object per report, one per line.
#[derive(Debug)]
pub struct JsonlReporter<W: Write> {
    out: W,
}

impl<W: Write> JsonlReporter<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write> Reporter for JsonlReporter<W> {
    fn report(&mut self, report: &Report) {
        if let Ok(line) = serde_json::to_string(report) {
            let _ = writeln!(self.out, "{line}");
        }
    }
    fn finish(&mut self, _summary: &TrainSummary) {
        let _ = self.out.flush();
    }
}
