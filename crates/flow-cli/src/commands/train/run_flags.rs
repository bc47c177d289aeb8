//! `flow train`'s run flags: the settings of the optimizer, the schedule and the
//! batches.

use flow_core::limits::MAX_SAMPLES;
use flow_train::{data::check_val_fraction, OptimizerKind, Schedule, TrainConfig};

use super::{count, default_lr_decay, real};
use crate::{
    cli::{OptimizerArg, ScheduleArg, TrainArgs},
    Failure,
};

/// A flag that shapes the run rather than the model.
#[derive(Debug, Clone, Copy)]
pub(super) enum RunFlag {
    Lr(f64),
    Batch(usize),
    Optimizer(OptimizerArg),
    WeightDecay(f64),
    Schedule(ScheduleArg),
    LrDecay(f64),
    Warmup(usize),
    ClipGrad(f64),
    Seed(u64),
    ValEvery(usize),
    Patience(usize),
    ValFraction(f64),
}

impl RunFlag {
    /// The run flags `a` gives, in the order they apply (`--optimizer` before
    /// `--weight-decay`, `--schedule` before its parameters).
    pub(super) fn given(a: &TrainArgs) -> Result<Vec<Self>, Failure> {
        if a.val.is_some() && a.val_fraction.is_some() {
            return Err("--val-fraction holds rows out when no --val file is given".into());
        }
        let no_validation = a.val.is_none() && a.val_fraction == Some(0.0);
        if no_validation && (a.val_every.is_some() || a.patience.is_some()) {
            return Err(
                "--val-every and --patience score a validation set: give --val, or a --val-fraction above 0"
                    .into(),
            );
        }
        let flags = [
            a.lr.map(Self::Lr),
            a.batch.map(Self::Batch),
            a.optimizer.map(Self::Optimizer),
            a.weight_decay.map(Self::WeightDecay),
            a.schedule.map(Self::Schedule),
            a.lr_decay.map(Self::LrDecay),
            a.warmup.map(Self::Warmup),
            a.clip_grad.map(Self::ClipGrad),
            a.seed.map(Self::Seed),
            a.val_every.map(Self::ValEvery),
            a.patience.map(Self::Patience),
            a.val_fraction.map(Self::ValFraction),
        ];
        Ok(flags.into_iter().flatten().collect())
    }

    pub(super) fn name(self) -> &'static str {
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

    /// Sets what this flag gives in `cfg`, checked.
    pub(super) fn apply(self, cfg: &mut TrainConfig) -> Result<(), Failure> {
        let o = &mut cfg.optimizer;
        match self {
            Self::Lr(v) => o.lr = real("lr", v)?,
            Self::Batch(v) => cfg.batch_size = count("batch", v, 1, MAX_SAMPLES)?,
            Self::Optimizer(OptimizerArg::Adamax) => o.kind = OptimizerKind::Adamax,
            Self::Optimizer(OptimizerArg::Adam) => {
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
                    (ScheduleArg::Constant, _) => Schedule::Constant,
                    (ScheduleArg::Exp, s @ Schedule::Exp { .. }) => s,
                    (ScheduleArg::Exp, _) => Schedule::Exp {
                        decay: default_lr_decay(),
                    },
                    (ScheduleArg::Cosine, s @ Schedule::Cosine { .. }) => s,
                    (ScheduleArg::Cosine, _) => Schedule::Cosine { warmup: 0 },
                }
            }
            Self::LrDecay(d) => match &mut cfg.schedule {
                Schedule::Exp { decay } => {
                    if real("lr-decay", d)? > 1.0 {
                        return Err(format!("--lr-decay must lie in (0, 1], got {d}").into());
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
