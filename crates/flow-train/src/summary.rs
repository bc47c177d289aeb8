//! What a finished run's summary says in words.

use crate::TrainSummary;

impl TrainSummary {
    /// Why the run ended: early stopping, an interruption, a non-finite step, or the
    /// cap on its length.
    pub fn ending(&self) -> String {
        match &self.stopped {
            Some(reason) => reason.clone(),
            None => format!("reached the cap of {} steps", self.total_steps),
        }
    }

    /// Which weights the run returned: with a validation set, those of its best
    /// score; otherwise those it ended with.
    pub fn weights_kept(&self) -> String {
        match (self.best_val_nll, self.best_step, self.interrupted) {
            (Some(v), Some(at), false) => {
                format!("the weights of step {at}, the best validation NLL ({v:.4})")
            }
            (_, _, true) => format!("the weights of step {}, to continue from", self.steps),
            _ => match self.kept_step {
                Some(at) => format!("the weights of step {at}, the last finite one"),
                None => format!("the weights of the last step, {}", self.steps),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> TrainSummary {
        TrainSummary {
            steps: 300,
            total_steps: 1000,
            n_train: 900,
            n_val: 100,
            final_loss: 1.0,
            best_val_nll: Some(0.51234),
            best_step: Some(200),
            skipped: 0,
            stopped: Some(
                "early stop at step 300: no validation improvement in 1 evaluations".into(),
            ),
            kept_step: None,
            interrupted: false,
            elapsed_secs: 1.0,
            steps_per_sec: 300.0,
            validation_secs: 0.1,
            training_steps_per_sec: Some(333.3),
            low_memory: None,
            rivals: Vec::new(),
        }
    }

    #[test]
    fn says_why_a_run_ended_and_which_weights_it_kept() {
        let s = summary();
        assert_eq!(
            s.ending(),
            "early stop at step 300: no validation improvement in 1 evaluations"
        );
        assert_eq!(
            s.weights_kept(),
            "the weights of step 200, the best validation NLL (0.5123)"
        );
        let capped = TrainSummary {
            stopped: None,
            steps: 1000,
            best_val_nll: None,
            best_step: None,
            n_val: 0,
            ..summary()
        };
        assert_eq!(capped.ending(), "reached the cap of 1000 steps");
        assert_eq!(capped.weights_kept(), "the weights of the last step, 1000");
    }
}
