use flow_models::{ModelConfig, Registry};
use serde::{Deserialize, Serialize};

use crate::{
    data::{check_val_fraction, DEFAULT_VAL_FRACTION},
    Schedule,
};

/// Optimizer steps at most unless told otherwise: the reference job's run.
pub const DEFAULT_STEPS: usize = 1000;

/// Optimizer steps at most for a conditional model unless told otherwise. Posterior
/// estimation wants longer runs than the reference job (on two moons at 10⁴ simulations
/// the best validation score comes after 1 000 to 2 000 steps); by 5 000 steps the default
/// schedule's learning rate has decayed below 1% of its start, and early stopping
/// usually ends the run before.
pub const CONDITIONAL_STEPS: usize = 5000;

/// Epochs a conditional model's run may take at most where they come to more steps
/// than [`CONDITIONAL_STEPS`] ([`conditional_steps_for`]).
pub const CONDITIONAL_EPOCHS: usize = 50;

/// The most steps of a conditional model's run on `rows` training rows in batches of
/// `batch` unless told otherwise: [`CONDITIONAL_STEPS`], or [`CONDITIONAL_EPOCHS`]
/// epochs where those are more (beyond 51 200 rows at the default batch). With
/// 10⁵ simulations a run of 5 000 steps sees 28 epochs and ends at the cap; 50 epochs,
/// with the decay stretched to match ([`Schedule::stretched`](crate::Schedule::stretched)),
/// scored 0.010 and 0.012 better by C2ST on two of the NPE tasks and the same on the
/// third (BENCHMARKS.md).
pub fn conditional_steps_for(rows: usize, batch: usize) -> usize {
    let per_epoch = rows.div_ceil(batch.max(1));
    CONDITIONAL_EPOCHS
        .saturating_mul(per_epoch)
        .max(CONDITIONAL_STEPS)
}

/// The smallest batch [`conditional_batch_for`] cuts a conditional model's batch to.
pub const CONDITIONAL_MIN_BATCH: usize = 64;

/// The batch of a conditional model's run on `rows` training rows unless told
/// otherwise: `batch`, halved until an epoch holds at least two batches, never below
/// [`CONDITIONAL_MIN_BATCH`] (nor above `batch`). At 900 training rows (10³
/// simulations) batches of 256 rather than 512 scored better held-out likelihoods on
/// all three NPE tasks over three seeds, and C2STs level or better, in less time
/// (BENCHMARKS.md); from 1 024 rows on the batch is `batch`.
pub fn conditional_batch_for(rows: usize, batch: usize) -> usize {
    let mut b = batch;
    while rows < 2 * b && b / 2 >= CONDITIONAL_MIN_BATCH {
        b /= 2;
    }
    b
}

/// Validation scores without improvement after which a run stops, unless
/// [`TrainConfig::patience`] says otherwise.
pub const DEFAULT_PATIENCE: usize = 20;

/// The fewest and most steps between validation scores unless told otherwise
/// ([`val_every_for`]).
pub const VAL_EVERY_RANGE: (usize, usize) = (10, 100);

/// Steps between validation scores for `rows` training rows in batches of `batch`: one
/// epoch, within [`VAL_EVERY_RANGE`]. Small data overfit within a few hundred steps,
/// so their best weights are chosen at a finer grain than large data's; the patience
/// then spans the same share of a run whatever its size.
pub fn val_every_for(rows: usize, batch: usize) -> usize {
    let (fewest, most) = VAL_EVERY_RANGE;
    rows.div_ceil(batch.max(1)).clamp(fewest, most)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Adam; a non-zero weight decay is added to the gradient (L2 penalty).
    #[default]
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
    /// Adamax (Kingma & Ba 2015, §7.1): Adam with the second moment replaced by an
    /// exponentially weighted infinity norm, `u = max(β₂·u, |g| + eps)`, and the step
    /// `lr / (1 − β₁ᵗ) · m / u`; a non-zero weight decay is an L2 penalty, as in Adam.
    Adamax,
}

/// Adam/AdamW/Adamax hyper-parameters (PyTorch's defaults, weight decay 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Duration {
    Steps(usize),
    /// Full passes over the training set.
    Epochs(usize),
}

/// Everything a training run depends on. Saved with the model.
///
/// The defaults are the reference job: Adam at 1e-3 decayed by 0.999 per step, batch
/// 512, at most 1000 steps, data (and context) standardised; without a validation set
/// a tenth of the rows is held out for one, and training stops early after
/// [`DEFAULT_PATIENCE`] validation scores without improvement. Standardisation and
/// pixel levels are the model's ([`ModelConfig::standardize`],
/// [`ModelConfig::standardize_context`], [`ModelConfig::pixel_levels`]): the trainer
/// reads them from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredTrainConfig")]
pub struct TrainConfig {
    /// The model, of any registered family.
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub duration: Duration,
    pub batch_size: usize,
    /// Rescale gradients whose global L2 norm exceeds this.
    pub clip_grad: Option<f64>,
    /// Seeds initialisation and batch order.
    pub seed: u64,
    /// Score the validation set every this many steps (and at the end).
    pub val_every: usize,
    /// Stop after this many validation scores without improvement.
    pub patience: Option<usize>,
    /// Report progress every this many steps.
    pub report_every: usize,
    /// The share of the training rows held out (seeded by `seed`) to validate on when
    /// the run is given no validation set; 0 trains on every row.
    pub val_fraction: f64,
}

/// A [`TrainConfig`] as files hold it. Files written before the model owned its
/// standardisation and pixel levels hold them here too: a `standardize` here
/// standardises the model, and a `dequantize` repeats the image recipe's pixel levels,
/// which stay the model's.
#[derive(Deserialize)]
#[serde(default)]
struct StoredTrainConfig {
    /// (Files written before models were registry configurations hold a RealNVP
    /// description here; it is read as that model.)
    #[serde(deserialize_with = "model_or_realnvp")]
    model: ModelConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    duration: Duration,
    batch_size: usize,
    clip_grad: Option<f64>,
    seed: u64,
    val_every: usize,
    patience: Option<usize>,
    standardize: Option<bool>,
    report_every: usize,
    /// Files written before runs held out rows of their own trained on every row.
    val_fraction: f64,
}

impl Default for StoredTrainConfig {
    fn default() -> Self {
        let d = TrainConfig::default();
        Self {
            model: d.model,
            optimizer: d.optimizer,
            schedule: d.schedule,
            duration: d.duration,
            batch_size: d.batch_size,
            clip_grad: d.clip_grad,
            seed: d.seed,
            val_every: d.val_every,
            patience: d.patience,
            standardize: None,
            report_every: d.report_every,
            val_fraction: 0.0,
        }
    }
}

impl From<StoredTrainConfig> for TrainConfig {
    fn from(s: StoredTrainConfig) -> Self {
        let standardize = s.standardize.unwrap_or(s.model.standardize);
        Self {
            model: s.model.with_standardize(standardize),
            optimizer: s.optimizer,
            schedule: s.schedule,
            duration: s.duration,
            batch_size: s.batch_size,
            clip_grad: s.clip_grad,
            seed: s.seed,
            val_every: s.val_every,
            patience: s.patience,
            report_every: s.report_every,
            val_fraction: s.val_fraction,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::realnvp(&flow_realnvp::RealNvpConfig::default())
                .with_standardize(true),
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            duration: Duration::Steps(DEFAULT_STEPS),
            batch_size: 512,
            clip_grad: None,
            seed: 0,
            val_every: 100,
            patience: Some(DEFAULT_PATIENCE),
            report_every: 10,
            val_fraction: DEFAULT_VAL_FRACTION,
        }
    }
}

impl TrainConfig {
    /// The reference job's training settings for `model` (a [`ModelConfig`], or a
    /// family's description that converts into one, such as a `RealNvpConfig`), which
    /// standardises its data and its context, if any, unless it models pixels; a
    /// conditional model runs up to [`CONDITIONAL_STEPS`].
    pub fn new(model: impl Into<ModelConfig>) -> Self {
        let model = model.into();
        let standardize = model.pixel_levels().is_none();
        let steps = match model.context_dim {
            0 => DEFAULT_STEPS,
            _ => CONDITIONAL_STEPS,
        };
        Self {
            model,
            duration: Duration::Steps(steps),
            ..Self::default()
        }
        .with_standardize(standardize)
    }

    /// Whether the model standardises the data and, if it has one, the context (the
    /// statistics become part of it).
    pub fn with_standardize(mut self, standardize: bool) -> Self {
        self.model.standardize = standardize;
        self.model.standardize_context = standardize && self.model.context_dim > 0;
        self
    }

    flow_core::with_setters! {
        with_optimizer: optimizer: OptimizerConfig,
        with_schedule: schedule: Schedule,
        with_duration: duration: Duration,
        with_batch_size: batch_size: usize,
        with_clip_grad: clip_grad: Option<f64>,
        with_seed: seed: u64,
        with_val_every: val_every: usize,
        with_patience: patience: Option<usize>,
        with_report_every: report_every: usize,
        with_val_fraction: val_fraction: f64,
    }

    /// Checks every setting, naming the first that is out of range, with the built-in
    /// layer families.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_with(&Registry::builtin())
    }

    /// Checks every setting, the model against the families of `registry`.
    pub fn validate_with(&self, registry: &Registry) -> Result<(), String> {
        self.model.validate_with(registry)?;
        if self.model.layers.is_empty() {
            return Err("a model to train needs at least one layer".into());
        }
        match self.duration {
            Duration::Steps(0) => return Err("`steps` must be at least 1".into()),
            Duration::Epochs(0) => return Err("`epochs` must be at least 1".into()),
            _ => {}
        }
        if self.batch_size == 0 {
            return Err("`batch` must be at least 1".into());
        }
        let o = &self.optimizer;
        if !positive_f32(o.lr) {
            return Err(format!(
                "`lr` must be positive and finite in f32, got {}",
                o.lr
            ));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return Err("Adam betas must lie in [0, 1)".into());
        }
        if !(o.weight_decay == 0.0 || positive_f32(o.weight_decay)) {
            return Err(format!(
                "`weight_decay` must be 0, or positive and finite in f32, got {}",
                o.weight_decay
            ));
        }
        if let Schedule::Exp { decay } = self.schedule {
            if !(decay.is_finite() && decay > 0.0 && decay <= 1.0) {
                return Err(format!("`lr-decay` must lie in (0, 1], got {decay}"));
            }
        }
        if let Some(c) = self.clip_grad {
            if !positive_f32(c) {
                return Err(format!(
                    "`clip-grad` must be positive and finite in f32, got {c}"
                ));
            }
        }
        if self.val_every == 0 || self.report_every == 0 {
            return Err("`val_every` and `report_every` must be at least 1".into());
        }
        let levels = self.model.pixel_levels();
        if levels.is_some_and(|l| l < 2) {
            return Err("dequantisation needs at least 2 pixel levels".into());
        }
        if levels.is_some() && self.model.standardize {
            return Err("dequantised pixel data are not standardised".into());
        }
        if levels.is_some() && self.model.bounds.is_some() {
            return Err("pixel data have their own range: bounds do not apply".into());
        }
        check_val_fraction(self.val_fraction)?;
        Ok(())
    }
}

pub use flow_core::limits::positive_f32;

/// A [`ModelConfig`], or the RealNVP description that training configurations held
/// before models were registry configurations.
fn model_or_realnvp<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ModelConfig, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    match serde_json::from_value::<ModelConfig>(value.clone()) {
        Ok(model) => Ok(model),
        Err(e) => match serde_json::from_value::<flow_realnvp::RealNvpConfig>(value) {
            Ok(realnvp) => Ok(ModelConfig::realnvp(&realnvp)),
            Err(_) => Err(serde::de::Error::custom(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_comes_once_an_epoch_within_its_range() {
        // 900 rows in batches of 64: 15 steps an epoch (the last batch short).
        assert_eq!(val_every_for(900, 64), 15);
        assert_eq!(val_every_for(896, 64), 14);
        // A few steps an epoch, and hundreds: held to the range.
        assert_eq!(val_every_for(900, 512), VAL_EVERY_RANGE.0);
        assert_eq!(val_every_for(90_000, 512), VAL_EVERY_RANGE.1);
        assert_eq!(val_every_for(9_000, 512), 18);
    }

    #[test]
    fn a_conditional_model_runs_longer_by_default() {
        let plain = flow_realnvp::RealNvpConfig::new(2);
        let conditional = plain.clone().with_context_dim(1);
        assert_eq!(
            TrainConfig::new(plain).duration,
            Duration::Steps(DEFAULT_STEPS)
        );
        assert_eq!(
            TrainConfig::new(conditional).duration,
            Duration::Steps(CONDITIONAL_STEPS)
        );
        const { assert!(CONDITIONAL_STEPS > DEFAULT_STEPS) };
    }

    #[test]
    fn a_conditional_batch_is_halved_until_an_epoch_holds_two() {
        // 10³ simulations less a tenth held out: 256; 10⁴ and 10⁵: as given.
        assert_eq!(conditional_batch_for(900, 512), 256);
        assert_eq!(conditional_batch_for(1_024, 512), 512);
        assert_eq!(conditional_batch_for(1_023, 512), 256);
        assert_eq!(conditional_batch_for(9_000, 512), 512);
        assert_eq!(conditional_batch_for(90_000, 512), 512);
        // Never below the floor, nor a batch already below it changed.
        assert_eq!(conditional_batch_for(300, 512), 128);
        assert_eq!(conditional_batch_for(10, 512), CONDITIONAL_MIN_BATCH);
        assert_eq!(conditional_batch_for(10, 16), 16);
        assert_eq!(conditional_batch_for(0, 0), 0);
    }

    #[test]
    fn a_conditional_run_on_many_rows_runs_for_epochs() {
        // 10³ and 10⁴ simulations less a tenth held out: the cap.
        assert_eq!(conditional_steps_for(900, 512), CONDITIONAL_STEPS);
        assert_eq!(conditional_steps_for(9000, 512), CONDITIONAL_STEPS);
        // 10⁵: 176 steps an epoch.
        assert_eq!(conditional_steps_for(90_000, 512), 176 * CONDITIONAL_EPOCHS);
        assert_eq!(conditional_steps_for(usize::MAX, 1), usize::MAX);
    }

    #[test]
    fn reads_the_training_configurations_of_older_files() {
        // As `flow train` wrote it before models were registry configurations.
        let old = r#"{"model":{"dim":2,"layers":2,"hidden":4,"hidden_layers":1,"activation":"leaky-relu","coupling":"affine","scale":{"kind":"soft-clamp","clamp":3.0},"mask":"halves","nets":"separate","zero_init":false,"context_dim":0},"optimizer":{"kind":"adam","lr":0.001,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weight_decay":0.0},"schedule":{"kind":"exp","decay":0.999},"duration":{"steps":2},"batch_size":512,"clip_grad":null,"seed":0,"val_every":100,"patience":null,"standardize":true,"report_every":10}"#;
        let cfg: TrainConfig = serde_json::from_str(old).expect("old configuration");
        let want = flow_realnvp::RealNvpConfig::new(2)
            .with_layers(2)
            .with_hidden(4);
        // The run's `standardize` was the model's standardisation.
        assert_eq!(
            cfg.model,
            ModelConfig::realnvp(&want).with_standardize(true)
        );
        assert_eq!(cfg.duration, Duration::Steps(2));
        let again: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("json")).expect("read");
        assert_eq!(again, cfg);
        let unstandardised = old.replace(r#""standardize":true"#, r#""standardize":false"#);
        let cfg: TrainConfig = serde_json::from_str(&unstandardised).expect("old configuration");
        assert_eq!(cfg.model, ModelConfig::realnvp(&want));
    }

    #[test]
    fn the_model_owns_standardisation_and_pixel_levels_in_older_files_too() {
        // As `flow train` wrote an image run before the model owned both: the run's
        // own `standardize` and `dequantize` beside the model's recipe.
        let old = r#"{"model":{"dim":4,"context_dim":0,"standardize":false,"layers":[],"base":{"kind":"standard-normal"},"recipe":{"family":"glow","pixel_levels":4}},"optimizer":{"kind":"adam","lr":0.001,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weight_decay":0.0},"schedule":{"kind":"exp","decay":0.999},"duration":{"steps":2},"batch_size":512,"clip_grad":null,"seed":0,"val_every":100,"patience":null,"standardize":false,"report_every":10,"dequantize":4}"#;
        let cfg: TrainConfig = serde_json::from_str(old).expect("old configuration");
        assert_eq!(cfg.model.pixel_levels(), Some(4));
        assert!(!cfg.model.standardize);
        let json = serde_json::to_string(&cfg).expect("json");
        assert!(
            !json.contains("dequantize") && !json.contains(r#""standardize":false,"report"#),
            "{json}"
        );
        let again: TrainConfig = serde_json::from_str(&json).expect("read");
        assert_eq!(again, cfg);
        // A model of pixels is not standardised by default; any other is.
        assert!(!TrainConfig::new(cfg.model.clone()).model.standardize);
        let model = ModelConfig::realnvp(&flow_realnvp::RealNvpConfig::new(2));
        assert!(TrainConfig::new(model).model.standardize);
    }
}
