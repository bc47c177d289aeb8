use serde::{Deserialize, Serialize};

/// Learning rate as a function of the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// `lr · decay^step`: exponential decay applied after every step.
    Exp {
        decay: f64,
    },
    /// Linear warm-up over `warmup` steps, then a half cosine from `lr` to 0 over the
    /// remaining steps.
    Cosine {
        warmup: usize,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Self::Exp { decay: 0.999 }
    }
}

impl Schedule {
    /// The schedule for a run of at most `steps` steps where it was planned for
    /// [`CONDITIONAL_STEPS`](crate::CONDITIONAL_STEPS): an exponential decay stretched
    /// so that the rate falls as far by the end; others as they are.
    pub fn stretched(self, steps: usize) -> Self {
        match self {
            Self::Exp { decay } => Self::Exp {
                decay: decay.powf(crate::CONDITIONAL_STEPS as f64 / steps.max(1) as f64),
            },
            other => other,
        }
    }

    /// The learning rate of step `step` (0-based) out of `total` steps.
    pub fn lr(&self, base: f64, step: usize, total: usize) -> f64 {
        match *self {
            Self::Constant => base,
            Self::Exp { decay } => base * decay.powi(step.min(i32::MAX as usize) as i32),
            Self::Cosine { warmup } => {
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = ((step - warmup) as f64 / span).min(1.0);
                    0.5 * base * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let e = Schedule::Exp { decay: 0.999 };
        assert_eq!(e.lr(1e-3, 0, 10), 1e-3);
        assert!((e.lr(1e-3, 1000, 1000) - 1e-3 * 0.999f64.powi(1000)).abs() < 1e-15);
        let c = Schedule::Cosine { warmup: 10 };
        assert!((c.lr(1.0, 4, 110) - 0.5).abs() < 1e-12);
        assert!((c.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(c.lr(1.0, 109, 110) < 1e-3);
        assert_eq!(Schedule::Constant.lr(0.1, 500, 10), 0.1);
    }
}
