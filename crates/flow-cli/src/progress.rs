//! Training progress on a terminal: a live bar.

use flow_train::{format_report, Report, Reporter, TrainSummary};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Default)]
pub struct BarReporter {
    bar: Option<ProgressBar>,
    best_val: Option<f64>,
}

impl Reporter for BarReporter {
    fn start(&mut self, total_steps: usize) {
        let bar = ProgressBar::new(total_steps as u64);
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        self.bar = Some(bar);
    }

    fn report(&mut self, r: &Report) {
        if let Some(v) = r.val_nll {
            self.best_val = Some(self.best_val.map_or(v, |b: f64| b.min(v)));
        }
        if let Some(bar) = &self.bar {
            bar.set_position(r.step as u64);
            let mut msg = format!("loss {:.4}  {:.1} steps/s", r.loss, r.steps_per_sec);
            if let Some(v) = self.best_val {
                msg.push_str(&format!("  best val_nll {v:.4}"));
            }
            bar.set_message(msg);
            if r.val_nll.is_some() {
                bar.println(format_report(r));
            }
        }
    }

    fn message(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn finish(&mut self, _summary: &TrainSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
