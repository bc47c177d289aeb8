//! The training recipe by name, as `flow train` and the Python package take it: the
//! run's options (optimizer, schedule, batches, length) with their bounds and
//! messages, and [`train_config`], the whole configuration of a fresh run from a
//! family, the model options and the run options. Messages name an option as the
//! command line spells it (`--lr-decay`).

use flow_core::limits::MAX_SAMPLES;
use flow_models::{
    options::{count, default_weight_decay, real, ImageInfo, ModelOptions},
    Family, ModelConfig,
};

use crate::{data::check_val_fraction, Duration, OptimizerKind, Schedule, TrainConfig};

/// The optimizer an option names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerChoice {
    /// Adam (with a weight decay, AdamW).
    Adam,
    /// Adamax, its weight decay an L2 penalty.
    Adamax,
}

impl OptimizerChoice {
    pub const ALL: [OptimizerChoice; 2] = [Self::Adam, Self::Adamax];

    pub fn name(self) -> &'static str {
        match self {
            Self::Adam => "adam",
            Self::Adamax => "adamax",
        }
    }
}

/// The learning-rate schedule an option names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleChoice {
    Constant,
    Exp,
    Cosine,
}

impl ScheduleChoice {
    pub const ALL: [ScheduleChoice; 3] = [Self::Constant, Self::Exp, Self::Cosine];

    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Exp => "exp",
            Self::Cosine => "cosine",
        }
    }
}

/// The decay of the default schedule, the exponential one.
pub fn default_lr_decay() -> f64 {
    match Schedule::default() {
        Schedule::Exp { decay } => decay,
        _ => 1.0,
    }
}

/// An option that shapes the run rather than the model.
#[derive(Debug, Clone, Copy)]
pub enum RunOption {
    Lr(f64),
    Batch(usize),
    Optimizer(OptimizerChoice),
    WeightDecay(f64),
    Schedule(ScheduleChoice),
    LrDecay(f64),
    Warmup(usize),
    ClipGrad(f64),
    Seed(u64),
    ValEvery(usize),
    Patience(usize),
    ValFraction(f64),
}

/// The run options given for a run, each `None` unless given: [`TrainConfig`] holds
/// the defaults, and an option only overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOptions {
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub batch: Option<usize>,
    pub optimizer: Option<OptimizerChoice>,
    pub weight_decay: Option<f64>,
    pub schedule: Option<ScheduleChoice>,
    pub lr_decay: Option<f64>,
    pub warmup: Option<usize>,
    pub clip_grad: Option<f64>,
    pub seed: Option<u64>,
    pub val_every: Option<usize>,
    pub patience: Option<usize>,
    pub val_fraction: Option<f64>,
}

impl RunOptions {
    /// The run options given, in the order they apply (`--optimizer` before
    /// `--weight-decay`, `--schedule` before its parameters); `validation` says
    /// whether the run is given a validation set (without one, it holds out
    /// `val_fraction` of its rows).
    pub fn given(&self, validation: bool) -> Result<Vec<RunOption>, String> {
        if validation && self.val_fraction.is_some() {
            return Err("--val-fraction holds rows out when no --val file is given".into());
        }
        let none = !validation && self.val_fraction == Some(0.0);
        if none && (self.val_every.is_some() || self.patience.is_some()) {
            return Err(
                "--val-every and --patience score a validation set: give --val, or a --val-fraction above 0"
                    .into(),
            );
        }
        let options = [
            self.lr.map(RunOption::Lr),
            self.batch.map(RunOption::Batch),
            self.optimizer.map(RunOption::Optimizer),
            self.weight_decay.map(RunOption::WeightDecay),
            self.schedule.map(RunOption::Schedule),
            self.lr_decay.map(RunOption::LrDecay),
            self.warmup.map(RunOption::Warmup),
            self.clip_grad.map(RunOption::ClipGrad),
            self.seed.map(RunOption::Seed),
            self.val_every.map(RunOption::ValEvery),
            self.patience.map(RunOption::Patience),
            self.val_fraction.map(RunOption::ValFraction),
        ];
        Ok(options.into_iter().flatten().collect())
    }

    /// The run's length the options give, if they give one.
    pub fn duration(&self) -> Result<Option<Duration>, String> {
        Ok(match (self.steps, self.epochs) {
            (Some(_), Some(_)) => {
                return Err("--steps and --epochs both give the run's length: give one".into())
            }
            (_, Some(e)) => Some(Duration::Epochs(count("epochs", e, 1, usize::MAX)?)),
            (Some(s), None) => Some(Duration::Steps(count("steps", s, 1, usize::MAX)?)),
            (None, None) => None,
        })
    }
}

impl RunOption {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lr(_) => "lr",
            Self::Batch(_) => "batch",
            Self::Optimizer(_) => "optimizer",
            Self::WeightDecay(_) => "weight-decay",
            Self::Schedule(_) => "schedule",
            Self::LrDecay(_) => "lr-decay",
            Self::Warmup(_) => "warmup",
            Self::ClipGrad(_) => "clip-grad",
            Self::Seed(_) => "seed",
            Self::ValEvery(_) => "val-every",
            Self::Patience(_) => "patience",
            Self::ValFraction(_) => "val-fraction",
        }
    }

    /// Sets what this option gives in `cfg`, checked.
    pub fn apply(self, cfg: &mut TrainConfig) -> Result<(), String> {
        let o = &mut cfg.optimizer;
        match self {
            Self::Lr(v) => o.lr = real("lr", v)?,
            Self::Batch(v) => cfg.batch_size = count("batch", v, 1, MAX_SAMPLES)?,
            Self::Optimizer(OptimizerChoice::Adamax) => o.kind = OptimizerKind::Adamax,
            Self::Optimizer(OptimizerChoice::Adam) => {
                if o.kind == OptimizerKind::Adamax {
                    o.kind = if o.weight_decay > 0.0 {
                        OptimizerKind::AdamW
                    } else {
                        OptimizerKind::Adam
                    };
                }
            }
            Self::WeightDecay(w) => {
                if w != 0.0 {
                    real("weight-decay", w)?;
                }
                o.weight_decay = w;
                if o.kind == OptimizerKind::Adam {
                    o.kind = OptimizerKind::AdamW;
                }
            }
            Self::Schedule(kind) => {
                cfg.schedule = match (kind, cfg.schedule) {
                    (ScheduleChoice::Constant, _) => Schedule::Constant,
                    (ScheduleChoice::Exp, s @ Schedule::Exp { .. }) => s,
                    (ScheduleChoice::Exp, _) => Schedule::Exp {
                        decay: default_lr_decay(),
                    },
                    (ScheduleChoice::Cosine, s @ Schedule::Cosine { .. }) => s,
                    (ScheduleChoice::Cosine, _) => Schedule::Cosine { warmup: 0 },
                }
            }
            Self::LrDecay(d) => match &mut cfg.schedule {
                Schedule::Exp { decay } => {
                    if real("lr-decay", d)? > 1.0 {
                        return Err(format!("--lr-decay must lie in (0, 1], got {d}"));
                    }
                    *decay = d;
                }
                _ => return Err("--lr-decay applies to --schedule exp".into()),
            },
            Self::Warmup(w) => match &mut cfg.schedule {
                Schedule::Cosine { warmup } => *warmup = w,
                _ => return Err("--warmup applies to --schedule cosine".into()),
            },
            Self::ClipGrad(c) => cfg.clip_grad = Some(real("clip-grad", c)?),
            Self::Seed(s) => cfg.seed = s,
            Self::ValEvery(v) => cfg.val_every = count("val-every", v, 1, usize::MAX)?,
            Self::Patience(p) => cfg.patience = (p > 0).then_some(p),
            Self::ValFraction(f) => {
                check_val_fraction(f).map_err(|e| format!("--val-fraction: {e}"))?;
                cfg.val_fraction = f;
            }
        }
        Ok(())
    }
}

/// The configuration of a fresh run of `flow` on data of `dim` features and
/// `context_dim` context features (images: `image`), named `what` in messages: every
/// value the family's or [`TrainConfig`]'s default unless an option gives it, each
/// checked here, before any work starts. `validation` says whether the run scores a
/// validation set.
#[allow(clippy::too_many_arguments)]
pub fn train_config(
    flow: &Family,
    what: &str,
    dim: usize,
    context_dim: usize,
    image: Option<ImageInfo>,
    model: &ModelOptions,
    run: &RunOptions,
    validation: bool,
) -> Result<TrainConfig, String> {
    model.check_apply(flow)?;
    let seed = run.seed.unwrap_or(TrainConfig::default().seed);
    let model = model.model(flow, what, dim, context_dim, image, seed)?;
    run_config(model, Some(flow), run, validation)
}

/// The training settings the family `flow` declares as its own (a decoupled weight
/// decay, a batch), set on `cfg` before any option given for the run.
pub fn apply_family_defaults(cfg: &mut TrainConfig, flow: &Family) {
    let decay = default_weight_decay(flow);
    if decay > 0.0 {
        cfg.optimizer.kind = OptimizerKind::AdamW;
        cfg.optimizer.weight_decay = decay;
    }
    if let Some(batch) = flow.batch() {
        cfg.batch_size = batch;
    }
}

/// Which of a run's settings were given for it, and so stand.
#[derive(Debug, Clone, Copy, Default)]
pub struct Given {
    /// `--steps` or `--epochs`.
    pub length: bool,
    /// The schedule or its decay.
    pub schedule: bool,
    pub lr: bool,
    pub batch: bool,
}

/// Fits a conditional model's run to its `rows` training rows, where the settings were
/// not given: the batch [`conditional_batch_for`](crate::conditional_batch_for) those
/// rows; the learning rate and its decay the family `flow` declares for that many
/// rows ([`ConditionalRate`](flow_core::ConditionalRate)); at most
/// [`conditional_steps_for`](crate::conditional_steps_for) steps, and where that
/// lengthens the run, the exponential schedule [`stretched`](Schedule::stretched) over
/// it. Other models are left as they are.
pub fn fit_conditional_run(
    cfg: &mut TrainConfig,
    rows: usize,
    flow: Option<&Family>,
    given: Given,
) {
    if cfg.model.context_dim == 0 {
        return;
    }
    if !given.batch {
        cfg.batch_size = crate::conditional_batch_for(rows, cfg.batch_size);
    }
    if let Some(rate) = flow.and_then(Family::conditional_lr).map(|r| r.at(rows)) {
        if !given.lr {
            cfg.optimizer.lr = rate.lr;
        }
        if !given.schedule {
            cfg.schedule = Schedule::Exp { decay: rate.decay };
        }
    }
    if given.length {
        return;
    }
    let steps = crate::conditional_steps_for(rows, cfg.batch_size);
    if steps > crate::CONDITIONAL_STEPS {
        cfg.duration = Duration::Steps(steps);
        if !given.schedule {
            cfg.schedule = cfg.schedule.stretched(steps);
        }
    }
}

/// The configuration of a fresh run that trains `model` (of the family `flow`, where
/// it has one) with the run options `run`, checked.
pub fn run_config(
    model: ModelConfig,
    flow: Option<&Family>,
    run: &RunOptions,
    validation: bool,
) -> Result<TrainConfig, String> {
    let standardize = model.standardize;
    let mut cfg = TrainConfig::new(model).with_standardize(standardize);
    if let Some(flow) = flow {
        apply_family_defaults(&mut cfg, flow);
    }
    if let Some(d) = run.duration()? {
        cfg.duration = d;
    }
    for option in run.given(validation)? {
        option.apply(&mut cfg)?;
    }
    cfg.validate()
        .map_err(|e| format!("invalid settings: {e}"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maf() -> Family {
        flow_models::options::family("maf").expect("maf")
    }

    #[test]
    fn run_options_set_the_run_and_bad_ones_are_named() {
        let run = RunOptions {
            steps: Some(7),
            lr: Some(5e-3),
            batch: Some(64),
            seed: Some(3),
            ..RunOptions::default()
        };
        let cfg = train_config(
            &maf(),
            "data",
            2,
            0,
            None,
            &ModelOptions::default(),
            &run,
            false,
        )
        .expect("a valid run");
        assert_eq!(cfg.duration, Duration::Steps(7));
        assert_eq!((cfg.optimizer.lr, cfg.batch_size, cfg.seed), (5e-3, 64, 3));
        assert!(cfg.model.standardize);
        let fails = |run: RunOptions, validation: bool| {
            train_config(
                &maf(),
                "data",
                2,
                0,
                None,
                &ModelOptions::default(),
                &run,
                validation,
            )
            .unwrap_err()
        };
        assert_eq!(
            fails(
                RunOptions {
                    lr: Some(-1.0),
                    ..RunOptions::default()
                },
                false
            ),
            format!(
                "--lr must be positive and finite in f32 (below {:e}), got -1",
                f32::MAX
            )
        );
        assert_eq!(
            fails(
                RunOptions {
                    steps: Some(0),
                    ..RunOptions::default()
                },
                false
            ),
            "--steps must be at least 1, got 0"
        );
        assert_eq!(
            fails(
                RunOptions {
                    patience: Some(2),
                    val_fraction: Some(0.0),
                    ..RunOptions::default()
                },
                false
            ),
            "--val-every and --patience score a validation set: give --val, or a --val-fraction above 0"
        );
        assert_eq!(
            fails(
                RunOptions {
                    val_fraction: Some(0.2),
                    ..RunOptions::default()
                },
                true
            ),
            "--val-fraction holds rows out when no --val file is given"
        );
        assert_eq!(
            fails(
                RunOptions {
                    val_fraction: Some(1.0),
                    ..RunOptions::default()
                },
                false
            ),
            format!("--val-fraction: {}", check_val_fraction(1.0).unwrap_err())
        );
        assert_eq!(
            fails(
                RunOptions {
                    warmup: Some(2),
                    ..RunOptions::default()
                },
                true
            ),
            "--warmup applies to --schedule cosine"
        );
    }
}
