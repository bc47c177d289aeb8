use std::{collections::HashMap, time::Instant};

use candle::{DType, Device, Tensor, TensorId, Var};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow};
use flow_models::{ModelConfig, Registry};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{
    batch_parts,
    data::{Dataset, Scan, StreamSource},
    fingerprint,
    state::StateGroup,
    Adam, Control, DataError, Duration, LayerwiseBackprop, LowMemory, Reconstruction, Replicas,
    Report, Reporter, TrainCheckpoint, TrainConfig, TrainError, TrainState,
};

mod replicated;
mod rows;
mod selection;

pub use selection::{fit_best_of, Candidate, Rival};

use rows::TrainRows;

/// What happened in a training run; saved with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: usize,
    pub total_steps: usize,
    pub n_train: usize,
    pub n_val: usize,
    /// NLL of the last training batch, nats per sample in data units.
    pub final_loss: f64,
    /// Best validation NLL and the step it was reached at; the saved weights are those.
    pub best_val_nll: Option<f64>,
    pub best_step: Option<usize>,
    /// Batches skipped for a non-finite loss or gradient.
    #[serde(default)]
    pub skipped: usize,
    /// Why training ended before `total_steps`, if it did.
    pub stopped: Option<String>,
    /// When a non-finite loss or gradient stopped the run: the step whose weights were
    /// kept, the last with a finite loss. The step the run started from when no step
    /// moved the weights to finite ones: the weights returned are then those the run
    /// began with (for a fresh run, untrained).
    #[serde(default)]
    pub kept_step: Option<usize>,
    /// Whether the run was interrupted (and can be resumed).
    #[serde(default)]
    pub interrupted: bool,
    pub elapsed_secs: f64,
    pub steps_per_sec: f64,
    /// Seconds of this call spent scoring the validation set.
    #[serde(default)]
    pub validation_secs: f64,
    /// This call's steps a second with those seconds left out: the rate of the
    /// training steps themselves, as a loop without validation measures it. `None`
    /// without validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_steps_per_sec: Option<f64>,
    /// With [`Trainer::with_low_memory`]: the layers recomputed and kept, and the
    /// reconstruction errors measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_memory: Option<Reconstruction>,
    /// The models trained beside this one and not kept ([`fit_best_of`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rivals: Vec<Rival>,
}

/// A trained model: the flow, its variables and configuration, and the run's summary.
pub struct Trained {
    pub flow: Flow,
    pub varmap: VarMap,
    pub model: ModelConfig,
    pub config: TrainConfig,
    pub summary: TrainSummary,
    /// The run's final state: the model's tensors as returned (with a validation set,
    /// the best weights) and what continuing the run needs. Saved, it resumes an
    /// interrupted run, or continues a finished one to more steps.
    pub checkpoint: TrainCheckpoint,
}

impl std::fmt::Debug for Trained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trained")
            .field("model", &self.model)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// Fits a model of any registered family by maximum likelihood.
#[derive(Debug, Clone)]
pub struct Trainer {
    cfg: TrainConfig,
    device: Device,
    dtype: DType,
    registry: Registry,
    /// The model's pixel levels, read once: `Some` for pixel data, dequantised.
    pixel_levels: Option<u32>,
    /// The noise added to dequantised pixel data ([`ModelConfig::noise_std`]).
    noise_std: f64,
    /// Gradients layer by layer, recomputing activations instead of keeping them.
    low_memory: Option<LowMemory>,
}

/// Deep copies of the variables' values.
fn snapshot(vars: &[Var]) -> candle::Result<Vec<Tensor>> {
    vars.iter().map(|v| v.as_tensor().copy()).collect()
}

/// Copies the variables' values into `saved`, a [`snapshot`] of them, without
/// allocating.
fn snapshot_into(saved: &[Tensor], vars: &[Var]) -> candle::Result<()> {
    use rayon::prelude::*;
    saved.par_iter().zip(vars).try_for_each(|(s, v)| {
        s.flatten_all()?
            .slice_set(&v.as_tensor().flatten_all()?, 0, 0)
    })
}

/// `‖g‖²` read in place from a contiguous f32/f64 CPU tensor; `None` for any other.
fn host_squared_norm(g: &Tensor) -> Option<f64> {
    use candle::{CpuStorage, Storage};
    let (storage, layout) = g.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()?) {
        (Storage::Cpu(CpuStorage::F32(v)), (a, b)) => Some(sum_of_squares(&v[a..b], f64::from)),
        (Storage::Cpu(CpuStorage::F64(v)), (a, b)) => Some(sum_of_squares(&v[a..b], |x| x)),
        _ => None,
    }
}

/// `Σ x²` in f64, in eight running sums so that the loop vectorises.
fn sum_of_squares<T: Copy>(v: &[T], to_f64: impl Fn(T) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| to_f64(x) * to_f64(x))
        .sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += to_f64(x) * to_f64(x);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// `Σ ‖g‖²` over the gradients: read in place where [`host_squared_norm`] can, the
/// rest summed on the device and read back once (one sync per step, not one per
/// tensor).
fn squared_norm(grads: &[Option<Tensor>], device: &Device) -> candle::Result<f64> {
    let mut host = 0.0;
    let mut rest = Tensor::zeros((), DType::F64, device)?;
    for g in grads.iter().flatten() {
        match host_squared_norm(g) {
            Some(sum) => host += sum,
            None => rest = (rest + g.sqr()?.sum_all()?.to_dtype(DType::F64)?)?,
        }
    }
    Ok(host + rest.to_scalar::<f64>()?)
}

fn restore(vars: &[Var], values: &[Tensor]) -> candle::Result<()> {
    vars.iter().zip(values).try_for_each(|(v, t)| v.set(t))
}

/// Mean negative log-likelihood of `x` (given its context, if any) in chunks, without
/// keeping a gradient graph.
pub(crate) fn mean_nll(flow: &Flow, x: &Tensor, context: Option<&Tensor>) -> candle::Result<f64> {
    let n = x.dim(0)?;
    let mut total = 0.0;
    let chunk = 8192;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let c = context.map(|c| c.narrow(0, start, len)).transpose()?;
        let lp = flow
            .log_prob_with_context(&x.narrow(0, start, len)?, c.as_ref())?
            .detach();
        total += lp.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        start += len;
    }
    Ok(-total / n as f64)
}

/// Uniform dequantisation of pixel values, whole numbers in `[0, levels)`:
/// `(pixel + u) / levels` with `u ~ U[0, 1)` per value, drawn from `seed`. The result
/// lies in `[0, 1)`; for a density `p` there, `log P(pixels) ≥ E_u[log p(x)] −
/// D·ln(levels)` (Theis et al. 2016), the bound that bits per dimension report.
///
/// With `noise_std` σ > 0 (a model's [`ModelConfig::noise_std`]), `σ·ε`,
/// `ε ~ N(0, I)` drawn next from the same generator, is added as well (noise
/// augmentation): the density is then that of the noised data, and the bound above
/// no longer holds.
pub fn dequantize(
    pixels: &Tensor,
    levels: u32,
    noise_std: f64,
    seed: u64,
) -> candle::Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = pixels.elem_count();
    let u: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let u = Tensor::from_vec(u, pixels.shape(), pixels.device())?.to_dtype(pixels.dtype())?;
    let x = (pixels + u)?.affine(1.0 / f64::from(levels), 0.0)?;
    if noise_std == 0.0 {
        return Ok(x);
    }
    let e = flow_core::sampling::randn(1, n, pixels.dtype(), pixels.device(), &mut rng)?;
    x + (e.reshape(pixels.shape())? * noise_std)?
}

/// The seed of step `step`'s dequantisation noise in a run seeded with `seed`; the
/// validation set's one draw uses `step = u64::MAX`.
fn noise_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_add(1)
}

impl Trainer {
    /// A trainer for models of the built-in families; the settings are checked here.
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self, TrainError> {
        Self::with_registry(cfg, device, Registry::builtin())
    }

    /// A trainer for models of the families of `registry`.
    pub fn with_registry(
        cfg: TrainConfig,
        device: &Device,
        registry: Registry,
    ) -> Result<Self, TrainError> {
        cfg.validate_with(&registry)
            .map_err(TrainError::InvalidConfig)?;
        Ok(Self {
            pixel_levels: cfg.model.pixel_levels(),
            noise_std: cfg.model.noise_std(),
            cfg,
            device: device.clone(),
            dtype: DEFAULT_DTYPE,
            registry,
            low_memory: None,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Trains in `dtype` (f32 by default; f64 also works).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Computes gradients layer by layer, recomputing each layer's input from its
    /// output instead of keeping activations: memory that does not grow with depth,
    /// for some more compute (see [`LayerwiseBackprop`]). The gradients are standard
    /// backpropagation's up to rounding.
    pub fn with_low_memory(mut self, settings: LowMemory) -> Result<Self, TrainError> {
        settings.validate().map_err(TrainError::InvalidConfig)?;
        self.low_memory = Some(settings);
        Ok(self)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Total optimizer steps for `n` training samples.
    pub fn total_steps(&self, n: usize) -> usize {
        match self.cfg.duration {
            Duration::Steps(s) => s,
            Duration::Epochs(e) => e * n.div_ceil(self.cfg.batch_size.min(n).max(1)),
        }
    }

    /// Checks rows of `dim` features and `context_dim` context features, `n` of
    /// them, against the model.
    fn check_shape(
        &self,
        n: usize,
        dim: usize,
        context_dim: usize,
        what: &str,
    ) -> Result<(), TrainError> {
        if n == 0 {
            return Err(DataError::new(what, None, "no samples").into());
        }
        if dim != self.cfg.model.dim {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{dim} features per row, the model has {}",
                    self.cfg.model.dim
                ),
            )
            .into());
        }
        if context_dim != self.cfg.model.context_dim {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{context_dim} context features per row, the model takes {}",
                    self.cfg.model.context_dim
                ),
            )
            .into());
        }
        Ok(())
    }

    fn check_data(&self, data: &Dataset, what: &str) -> Result<(), TrainError> {
        self.check_shape(data.len(), data.dim, data.context_dim, what)?;
        if data.context.len() != data.len() * data.context_dim {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{} context values for {} rows of {} context features",
                    data.context.len(),
                    data.len(),
                    data.context_dim
                ),
            )
            .into());
        }
        if let Some(i) = data.values.iter().position(|v| !v.is_finite()) {
            return Err(
                DataError::new(what, Some(i / data.dim + 1), "NaN or infinite value").into(),
            );
        }
        if let Some(i) = data.context.iter().position(|v| !v.is_finite()) {
            let line = Some(i / data.context_dim + 1);
            return Err(DataError::new(what, line, "NaN or infinite context value").into());
        }
        let model = &self.cfg.model;
        if let Some(outside) = model.outside_bounds(&data.values) {
            return Err(DataError::new(what, None, outside.to_string()).into());
        }
        Ok(())
    }

    /// What to say before training on `train`: warnings for data that train a
    /// degenerate model (a constant column, fewer rows than a batch or than features),
    /// and an error where training cannot mean anything (fewer than 2 rows, every row
    /// the same point).
    /// `what` names the data in the messages.
    pub fn data_warnings(&self, train: &Dataset, what: &str) -> Result<Vec<String>, TrainError> {
        self.check_data(train, what)?;
        let (n, d) = (train.len(), train.dim);
        let error = |msg: String| TrainError::from(DataError::new(what, None, msg));
        if n < 2 {
            return Err(error(format!(
                "{n} row: a density cannot be fitted to a single point"
            )));
        }
        let mut warnings = Vec::new();
        // Dequantised pixels are never constant: the noise fills each pixel's level.
        if self.pixel_levels.is_none() {
            let values = train.values_f32();
            let constant: Vec<usize> = (0..d)
                .filter(|&j| {
                    let first = values[j];
                    values.iter().skip(j).step_by(d).all(|&v| v == first)
                })
                .collect();
            if constant.len() == d {
                return Err(error(format!(
                    "all {n} rows are the same point: there is no density to fit"
                )));
            }
            if !constant.is_empty() {
                let columns: Vec<String> = constant.iter().map(|j| (j + 1).to_string()).collect();
                let (noun, verb) = if columns.len() == 1 {
                    ("column", "is")
                } else {
                    ("columns", "are")
                };
                let standardised = if self.cfg.model.standardize {
                    "standardised with a standard deviation of 1 in place of 0, and "
                } else {
                    ""
                };
                warnings.push(format!(
                    "{what}: {noun} {} {verb} constant: {standardised}the density collapses onto the constant as training goes on",
                    columns.join(", ")
                ));
            }
        }
        if n <= d {
            warnings.push(format!(
                "{what}: {n} rows of {d} features lie in a subspace (fewer rows than features + 1), onto which the density can only collapse"
            ));
        }
        if n < self.cfg.batch_size {
            warnings.push(format!(
                "{what}: {n} rows, fewer than a batch of {}: every step trains on all {n}",
                self.cfg.batch_size
            ));
        }
        Ok(warnings)
    }

    /// Builds a fresh model and fits it to `train`, scoring `val` (if any) every
    /// `val_every` steps. With a validation set the returned weights are those with the
    /// best validation NLL. A non-finite loss or gradient stops the run and rolls back
    /// to the last weights that gave a finite loss; the summary says so.
    pub fn fit(
        &self,
        train: &Dataset,
        val: Option<&Dataset>,
        reporter: &mut dyn Reporter,
    ) -> Result<Trained, TrainError> {
        self.fit_with(train, val, reporter, Control::default())
    }

    /// [`fit`](Self::fit) with periodic checkpoints, interruption, skipping of
    /// non-finite batches and resumption (see [`Control`]). An interrupted run returns
    /// its current weights; [`Trained::checkpoint`] holds the state to continue from.
    ///
    /// A fresh model is initialised from the data first ([`Flow::initialize`], on the
    /// run's first batch); a resumed one never is. A checkpoint resumes under the
    /// settings it was written with, except the duration, which may grow: that
    /// continues a finished run to more steps.
    pub fn fit_with(
        &self,
        train: &Dataset,
        val: Option<&Dataset>,
        reporter: &mut dyn Reporter,
        mut control: Control,
    ) -> Result<Trained, TrainError> {
        let (train, held_out) = self.checked_split(train, val)?;
        let (train, val) = (train.as_ref(), val.or(held_out.as_ref()));
        let resume = control.resume.take();
        if let Some(r) = &resume {
            self.check_resume_on(r, train.len(), &fingerprint(train), None)?;
        }
        let run = Run::start(self, TrainData::Held(train), val, resume)?;
        self.run_loop(run, val, reporter, control)
    }

    /// [`fit_with`](Self::fit_with) on rows streamed from a file a chunk at a time:
    /// memory holds one chunk, not the file. The file is read once first, in chunks,
    /// to check its values and compute its fingerprint and standardisation statistics.
    /// The rows come in the order of [`StreamSource`]; with a chunk that holds the whole
    /// file, the run is the one [`fit_with`](Self::fit_with) makes on the same rows.
    /// Several processes ([`Control::replicas`]) are not supported.
    pub fn fit_stream(
        &self,
        train: &StreamSource,
        val: Option<&Dataset>,
        reporter: &mut dyn Reporter,
        mut control: Control,
    ) -> Result<Trained, TrainError> {
        if control.replicas.is_some() {
            return Err(TrainError::InvalidConfig(
                "streamed data train in one process".into(),
            ));
        }
        let what = "training data";
        self.check_shape(train.len(), train.dim(), train.context_dim(), what)?;
        if train.len() < 2 {
            let msg = "1 row: a density cannot be fitted to a single point";
            return Err(DataError::new(train.name(), None, msg).into());
        }
        if let Some(v) = val {
            self.check_data(v, "validation data")?;
            if let Some(levels) = self.pixel_levels {
                crate::data::check_pixels(v, levels, "validation data")?;
            }
        }
        if val.is_none() && self.cfg.val_fraction > 0.0 {
            return Err(TrainError::InvalidConfig(
                "streamed rows cannot be held out to validate on: give a validation set, or a validation fraction of 0".into(),
            ));
        }
        let scan = train.scan(self.cfg.model.standardize, self.pixel_levels)?;
        let resume = control.resume.take();
        if let Some(r) = &resume {
            self.check_resume_on(r, train.len(), &scan.fingerprint, Some(train.chunk_rows()))?;
        }
        let run = Run::start(self, TrainData::Streamed(train, &scan), val, resume)?;
        self.run_loop(run, val, reporter, control)
    }

    /// Takes `run` from where it stands to its end (see [`fit_with`](Self::fit_with)).
    fn run_loop(
        &self,
        mut run: Run<'_>,
        val: Option<&Dataset>,
        reporter: &mut dyn Reporter,
        mut control: Control,
    ) -> Result<Trained, TrainError> {
        if let Some(replicas) = control.replicas.take() {
            run.attach(replicas)?;
        }
        reporter.start(run.total);
        run.go_on(val, reporter, control)
    }

    /// [`held_out`](Self::held_out) on data checked whole first, so that a message
    /// names a row as the caller counts them, with rows enough left to train on.
    fn checked_split<'d>(
        &self,
        train: &'d Dataset,
        val: Option<&Dataset>,
    ) -> Result<(std::borrow::Cow<'d, Dataset>, Option<Dataset>), TrainError> {
        self.check_inputs(train, val)?;
        if val.is_none() {
            crate::data::check_rows_left(train.len(), self.cfg.val_fraction)
                .map_err(|msg| DataError::new("training data", None, msg))?;
        }
        Ok(self.held_out(train, val))
    }

    /// The rows to train on and the validation set: without one given, the configured
    /// share of `train` held out ([`hold_out`](crate::data::hold_out)).
    pub fn held_out<'d>(
        &self,
        train: &'d Dataset,
        val: Option<&Dataset>,
    ) -> (std::borrow::Cow<'d, Dataset>, Option<Dataset>) {
        if val.is_some() || self.cfg.val_fraction == 0.0 {
            return (std::borrow::Cow::Borrowed(train), None);
        }
        let (train, val) = crate::data::hold_out(train, self.cfg.val_fraction, self.cfg.seed);
        (std::borrow::Cow::Owned(train), val)
    }

    /// Checks the data a run is given: their shape against the model, finite values,
    /// and whole pixel levels for dequantised pixel data.
    fn check_inputs(&self, train: &Dataset, val: Option<&Dataset>) -> Result<(), TrainError> {
        self.check_data(train, "training data")?;
        if let Some(v) = val {
            self.check_data(v, "validation data")?;
        }
        if let Some(levels) = self.pixel_levels {
            crate::data::check_pixels(train, levels, "training data")?;
            if let Some(v) = val {
                crate::data::check_pixels(v, levels, "validation data")?;
            }
        }
        Ok(())
    }

    /// Builds the model with freshly initialised variables (seeded by the run), its
    /// standardisation, if any, set to the statistics of `train`.
    fn build_model(&self, train: &TrainData) -> Result<Model, TrainError> {
        let cfg = &self.cfg;
        let config = cfg.model.clone();
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, cfg.seed, self.dtype, &self.device);
        match train {
            TrainData::Held(d) => {
                crate::standardization::set_statistics(&config, d, &mut varmap, &vb)?;
            }
            TrainData::Streamed(_, scan) => {
                if config.bounds.is_some() {
                    return Err(TrainError::InvalidConfig(
                        "streamed data cannot be bounded: give no --bounds, or hold the rows in memory".into(),
                    ));
                }
                let missing =
                    || TrainError::InvalidConfig("the scan of the data holds no moments".into());
                if config.standardize {
                    let stats = scan.moments.clone().ok_or_else(missing)?;
                    crate::standardization::set_pair(&mut varmap, &vb, "standardize", stats)?;
                }
                if config.standardize_context {
                    let stats = scan.context_moments.clone().ok_or_else(missing)?;
                    crate::standardization::set_pair(
                        &mut varmap,
                        &vb,
                        "context_standardize",
                        stats,
                    )?;
                }
            }
        }
        let flow = config.build_with(&self.registry, vb)?;
        Ok(Model::new(config, varmap, flow)?)
    }

    /// A tensor of `data`'s rows, and one of its context if it has one, on the
    /// training device in the training dtype; rows held as bytes stay bytes (each
    /// batch becomes floats as it is drawn).
    fn tensors(&self, data: &Dataset) -> candle::Result<(Tensor, Option<Tensor>)> {
        let x = data.to_tensor(&self.device)?;
        let x = match x.dtype() {
            DType::U8 => x,
            _ => x.to_dtype(self.dtype)?,
        };
        let c = data
            .context_tensor(&self.device)?
            .map(|c| c.to_dtype(self.dtype))
            .transpose()?;
        Ok((x, c))
    }

    /// The validation set as tensors, pixel data dequantised once with noise of its
    /// own.
    fn validation_set(&self, val: &Dataset) -> candle::Result<(Tensor, Option<Tensor>)> {
        let (x, c) = self.tensors(val)?;
        let x = x.to_dtype(self.dtype)?;
        let x = match self.pixel_levels {
            Some(levels) => dequantize(
                &x,
                levels,
                self.noise_std,
                noise_seed(self.cfg.seed, u64::MAX),
            )?,
            None => x,
        };
        Ok((x, c))
    }

    /// Checks that `r` continues this trainer's run on `train`: the same settings but
    /// for a duration that may have grown, and the same data. [`fit_with`](Self::fit_with)
    /// checks it too; this tells before anything starts.
    /// `val` is the validation set the run is given, if any: without one, the rows
    /// the run holds out are set aside first, as [`fit_with`](Self::fit_with) does.
    pub fn check_resume(
        &self,
        r: &TrainCheckpoint,
        train: &Dataset,
        val: Option<&Dataset>,
    ) -> Result<(), TrainError> {
        let train = self.held_out(train, val).0;
        self.check_resume_on(r, train.len(), &fingerprint(&train), None)
    }

    /// Checks that `r` continues this trainer's run on `rows` rows of data with
    /// fingerprint `data_fingerprint`, streamed in chunks of `chunk_rows` rows or held
    /// in memory (`None`), any validation rows already held out.
    fn check_resume_on(
        &self,
        r: &TrainCheckpoint,
        rows: usize,
        data_fingerprint: &str,
        chunk_rows: Option<usize>,
    ) -> Result<(), TrainError> {
        let total = self.total_steps(rows);
        let same = TrainConfig {
            duration: self.cfg.duration,
            ..r.config.clone()
        };
        if same != self.cfg {
            return Err(TrainError::InvalidConfig(
                "the checkpoint was written by a run with other settings".into(),
            ));
        }
        if r.state.data_fingerprint != data_fingerprint {
            return Err(TrainError::InvalidConfig(
                "the training data differ from the data the checkpointed run used (the same file, and a validation file only where the run was given one, hold the same training rows)".into(),
            ));
        }
        let streamed = r.state.stream.map(|s| s.chunk_rows);
        if streamed != chunk_rows {
            let how = |c: Option<usize>| match c {
                Some(c) => format!("streamed in chunks of {c} rows"),
                None => "held in memory".to_string(),
            };
            return Err(TrainError::InvalidConfig(format!(
                "the checkpointed run's data were {}, these are {}",
                how(streamed),
                how(chunk_rows)
            )));
        }
        r.state
            .check_rows(rows)
            .map_err(TrainError::InvalidConfig)?;
        if total < r.state.step {
            return Err(TrainError::InvalidConfig(format!(
                "the checkpoint is at step {}, past the {total} steps asked for",
                r.state.step
            )));
        }
        Ok(())
    }
}

/// The variables of a variable map, locked.
fn lock(varmap: &VarMap) -> candle::Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    varmap
        .data()
        .lock()
        .map_err(|_| candle::Error::Msg("variable map poisoned".into()))
}

/// The training rows a run is given: held in memory, or streamed from a file (with
/// what a pass over it found).
#[derive(Clone, Copy)]
enum TrainData<'d> {
    Held(&'d Dataset),
    Streamed(&'d StreamSource, &'d Scan),
}

impl TrainData<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Held(d) => d.len(),
            Self::Streamed(s, _) => s.len(),
        }
    }
}

/// The dtype a [`Trainer`] trains in unless [`Trainer::with_dtype`] says otherwise.
pub const DEFAULT_DTYPE: DType = DType::F32;

/// A model in training: its configuration, variables and flow, and the trainable
/// variables with their names, sorted by name (the order of the optimizer's state).
struct Model {
    config: ModelConfig,
    varmap: VarMap,
    flow: Flow,
    names: Vec<String>,
    vars: Vec<Var>,
}

impl Model {
    /// `flow`, built from `config` with its variables in `varmap`: trainable are
    /// every variable except the buffers the flow declares.
    fn new(config: ModelConfig, varmap: VarMap, flow: Flow) -> candle::Result<Self> {
        let buffers: Vec<TensorId> = flow.buffers().iter().map(Tensor::id).collect();
        let mut named: Vec<(String, Var)> = lock(&varmap)?
            .iter()
            .filter(|(_, v)| !buffers.contains(&v.as_tensor().id()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, vars) = named.into_iter().unzip();
        Ok(Self {
            config,
            varmap,
            flow,
            names,
            vars,
        })
    }
}

/// How the loop of a run ended, where it ended before its last step.
#[derive(Default)]
struct Ending {
    /// Why it stopped early.
    stopped: Option<String>,
    /// After a non-finite step: the step whose weights were kept.
    kept_step: Option<usize>,
    interrupted: bool,
}

/// The outcome of one optimisation step.
enum Step {
    /// The step was taken (or, when non-finite batches are skipped, counted as
    /// skipped): the batch's loss and the learning rate.
    Taken { loss: f64, lr: f64 },
    /// The loss or gradient was not finite: the weights are back at the last finite
    /// step, and this says why the run stops.
    Diverged(String),
}

/// A run in progress: the model, the data on the device, and where the run stands.
struct Run<'a> {
    trainer: &'a Trainer,
    model: Model,
    /// The training rows and their context, drawn `batch` at a time in the epoch's
    /// order.
    rows: TrainRows<'a>,
    batch: usize,
    val: Option<(Tensor, Option<Tensor>)>,
    state: TrainState,
    adam: Adam,
    /// The weights of the best scheduled validation score so far.
    best: Option<Vec<Tensor>>,
    /// The score of the evaluation off the schedule at the run's last step, if any.
    final_val: Option<f64>,
    /// The weights of the last step with a finite loss, and that step: what a
    /// non-finite step rolls back to.
    last_good: Vec<Tensor>,
    last_good_step: usize,
    total: usize,
    /// Parts a batch's gradient is computed in.
    parts: usize,
    /// With low memory, the layer-by-layer backward pass and what it found.
    layerwise: Option<LayerwiseBackprop>,
    /// The other processes of a data-parallel run, if any.
    replicas: Option<Replicas>,
    /// When this call began, and the run's time and steps before it.
    start: Instant,
    elapsed_before: f64,
    steps_before: usize,
    /// Seconds of this call spent scoring the validation set.
    validation_secs: f64,
}

impl<'a> Run<'a> {
    /// Builds the model, puts the data on the device and restores the state of
    /// `resume`, if given; a fresh model is initialised on the first batch.
    fn start(
        trainer: &'a Trainer,
        train: TrainData<'a>,
        val: Option<&Dataset>,
        mut resume: Option<TrainCheckpoint>,
    ) -> Result<Self, TrainError> {
        let cfg = &trainer.cfg;
        let n = train.len();
        let data_fingerprint = match train {
            TrainData::Held(d) => fingerprint(d),
            TrainData::Streamed(_, scan) => scan.fingerprint.clone(),
        };
        let total = trainer.total_steps(n);
        // A resumed run takes over the flow its checkpoint was checked with, if it was
        // built for this model, device and dtype; `restore` then sets every variable.
        let built = resume
            .as_mut()
            .and_then(|r| r.take_built(&cfg.model, trainer.dtype, &trainer.device));
        let model = match built {
            Some((flow, varmap)) => Model::new(cfg.model.clone(), varmap, flow)?,
            None => trainer.build_model(&train)?,
        };
        let adam = Adam::new(model.vars.clone(), cfg.optimizer.clone())?;
        let rows = match train {
            TrainData::Held(d) => {
                let (x, c) = trainer.tensors(d)?;
                let order = epoch_order(n, cfg.seed, 0);
                TrainRows::Held { x, c, order }
            }
            TrainData::Streamed(source, _) => TrainRows::streamed(source, cfg.seed, 0)?,
        };
        let val = val.map(|v| trainer.validation_set(v)).transpose()?;
        let state = TrainState {
            step: 0,
            adam_step: 0,
            epoch: 0,
            pos: 0,
            best_val_nll: None,
            best_step: None,
            since_best: 0,
            last_loss: f64::NAN,
            skipped: 0,
            elapsed_secs: 0.0,
            data_fingerprint,
            stream: rows.position(0),
        };
        let mut run = Self {
            trainer,
            model,
            rows,
            batch: cfg.batch_size.min(n),
            val,
            state,
            adam,
            best: None,
            final_val: None,
            last_good: Vec::new(),
            last_good_step: 0,
            total,
            parts: 1,
            layerwise: trainer.low_memory.map(LayerwiseBackprop::new),
            replicas: None,
            start: Instant::now(),
            elapsed_before: 0.0,
            steps_before: 0,
            validation_secs: 0.0,
        };
        match resume {
            Some(r) => run.restore(r)?,
            None => {
                let (x, c) = run.rows(0, 0)?;
                run.model.flow.initialize(&x, c.as_ref())?;
            }
        }
        run.start = Instant::now();
        run.elapsed_before = run.state.elapsed_secs;
        run.steps_before = run.state.step;
        run.last_good = snapshot(&run.model.vars)?;
        run.last_good_step = run.state.step;
        // Layers with a training mode (batch norm) train on batch statistics and are
        // scored, saved and returned in evaluation mode.
        run.model.flow.set_training(true);
        run.parts = batch_parts(run.batch, &run.model.flow, &trainer.device);
        Ok(run)
    }

    /// Continues from `r`: its weights, optimizer moments, best weights and state.
    fn restore(&mut self, r: TrainCheckpoint) -> Result<(), TrainError> {
        let (dtype, device) = (self.trainer.dtype, &self.trainer.device);
        for (name, var) in lock(&self.model.varmap)?.iter() {
            var.set(&r.resumed_weight(name, dtype, device)?)?;
        }
        let names = &self.model.names;
        let m = r.group(StateGroup::AdamM, names, dtype, device)?;
        let v = r.group(StateGroup::AdamV, names, dtype, device)?;
        self.adam.set_state(r.state.adam_step, m, v)?;
        if r.state.best_val_nll.is_some() {
            self.best = Some(r.group(StateGroup::Best, names, dtype, device)?);
        }
        self.rows.begin_epoch(self.trainer.cfg.seed, r.state.epoch);
        if r.state.stream != self.rows.position(r.state.pos) {
            return Err(TrainError::InvalidConfig(format!(
                "the checkpoint's place in the data ({:?}) is not where row {} of epoch {} lies ({:?})",
                r.state.stream,
                r.state.pos,
                r.state.epoch,
                self.rows.position(r.state.pos)
            )));
        }
        self.state = r.state;
        Ok(())
    }

    /// The batch of `step`: `batch` rows of the epoch's order from `from`
    /// (dequantised with that step's noise for pixel data).
    fn rows(&mut self, from: usize, step: usize) -> Result<(Tensor, Option<Tensor>), TrainError> {
        let trainer = self.trainer;
        let (x, c) = self
            .rows
            .take(from, self.batch, trainer.dtype, &trainer.device)?;
        let x = x.to_dtype(trainer.dtype)?;
        let x = match trainer.pixel_levels {
            Some(levels) => dequantize(
                &x,
                levels,
                trainer.noise_std,
                noise_seed(trainer.cfg.seed, step as u64),
            )?,
            None => x,
        };
        Ok((x, c))
    }

    /// One optimisation step on the next batch. A non-finite loss or gradient is
    /// counted and skipped when `skip_nonfinite`; otherwise it rolls the weights back
    /// to the last finite step and ends the run.
    fn step(&mut self, skip_nonfinite: bool) -> Result<Step, TrainError> {
        let trainer = self.trainer;
        let cfg = &trainer.cfg;
        let n = self.rows.len();
        let st = &mut self.state;
        if st.pos + self.batch > n {
            st.epoch += 1;
            st.pos = 0;
            self.rows.begin_epoch(cfg.seed, st.epoch);
        }
        let (x, c) = self.rows(self.state.pos, self.state.step)?;
        let (loss, grads) = self.gradients(&x, c.as_ref())?;
        let st = &mut self.state;
        st.pos += self.batch;
        st.stream = self.rows.position(st.pos);
        let vars = &self.model.vars;
        let mut norm = f64::NAN;
        if let Some(g) = &grads {
            norm = squared_norm(g, &self.trainer.device)?.sqrt();
        }
        let lr = cfg.schedule.lr(cfg.optimizer.lr, st.step, self.total);
        match grads {
            Some(mut g) if norm.is_finite() => {
                snapshot_into(&self.last_good, vars)?;
                self.last_good_step = st.step;
                if let Some(max) = cfg.clip_grad {
                    if norm > max {
                        for t in g.iter_mut().flatten() {
                            *t = t.affine(max / norm, 0.0)?;
                        }
                    }
                }
                self.adam.step(&g, lr)?;
                st.adam_step = self.adam.step_count();
                st.last_loss = loss;
            }
            _ if skip_nonfinite => st.skipped += 1,
            _ => {
                restore(vars, &self.last_good)?;
                let what = if loss.is_finite() { "gradient" } else { "loss" };
                return Ok(Step::Diverged(format!(
                    "the {what} became non-finite at step {}; kept the weights of the last finite step",
                    st.step + 1
                )));
            }
        }
        st.step += 1;
        Ok(Step::Taken { loss, lr })
    }

    /// Takes the run from where it stands to its end, reporting to `reporter`.
    fn go_on(
        mut self,
        val: Option<&Dataset>,
        reporter: &mut dyn Reporter,
        mut control: Control,
    ) -> Result<Trained, TrainError> {
        let mut end = Ending::default();
        while self.state.step < self.total {
            if let Some(halt) = self.halt(&control)? {
                end = halt;
                break;
            }
            if let Some(ending) = self.advance(reporter, &mut control)? {
                end = ending;
                break;
            }
        }
        self.finish(end, val.map_or(0, Dataset::len), reporter)
    }

    /// The ending of an interrupted run, when `control` asks the run to stop before
    /// its next step.
    fn halt(&self, control: &Control) -> Result<Option<Ending>, TrainError> {
        let step = self.state.step;
        let halt =
            self.agree_to_stop(control.stop)? || control.stop_at.is_some_and(|at| step >= at);
        Ok(halt.then(|| Ending {
            interrupted: true,
            stopped: Some(format!("interrupted after step {step}")),
            kept_step: None,
        }))
    }

    /// The next step and what follows it: the validation score where it is due, the
    /// report, a periodic checkpoint. `Some` says why the run ends there.
    fn advance(
        &mut self,
        reporter: &mut dyn Reporter,
        control: &mut Control,
    ) -> Result<Option<Ending>, TrainError> {
        let (loss, lr) = match self.step(control.skip_nonfinite)? {
            Step::Taken { loss, lr } => (loss, lr),
            Step::Diverged(reason) => {
                return Ok(Some(Ending {
                    kept_step: Some(self.last_good_step),
                    stopped: Some(reason),
                    interrupted: false,
                }))
            }
        };
        self.check_replicas()?;
        let val_nll = self.validate()?;
        self.report(reporter, loss, lr, val_nll);
        self.save_periodic(control)?;
        Ok(self.out_of_patience().map(|reason| Ending {
            stopped: Some(reason),
            ..Ending::default()
        }))
    }

    /// Scores the validation set where the schedule says so, and after the last step;
    /// a scheduled score that beats the best keeps the weights as the best.
    fn validate(&mut self) -> Result<Option<f64>, TrainError> {
        let step = self.state.step;
        let last = step == self.total;
        let scheduled = step.is_multiple_of(self.trainer.cfg.val_every);
        let Some((x, c)) = &self.val else {
            return Ok(None);
        };
        if !(scheduled || last) {
            return Ok(None);
        }
        let scoring = Instant::now();
        let flow = &mut self.model.flow;
        flow.set_training(false);
        let v = mean_nll(flow, x, c.as_ref())?;
        flow.set_training(true);
        let v = self.agree_on_score(v)?;
        self.validation_secs += scoring.elapsed().as_secs_f64();
        let st = &mut self.state;
        // An evaluation off the schedule (the end of a run whose length is not a
        // multiple of `val_every`) chooses the returned weights but leaves the state
        // alone, so that a run continued past this end evaluates exactly as one that
        // never stopped here.
        if !scheduled {
            self.final_val = Some(v);
        } else if v.is_finite() && st.best_val_nll.is_none_or(|b| v < b) {
            st.best_val_nll = Some(v);
            st.best_step = Some(st.step);
            self.best = Some(snapshot(&self.model.vars)?);
            st.since_best = 0;
        } else {
            st.since_best += 1;
        }
        Ok(Some(v))
    }

    /// Steps per second in this call so far.
    fn rate(&self) -> f64 {
        self.rate_over(self.start.elapsed().as_secs_f64())
    }

    /// [`rate`](Self::rate) without the seconds spent validating; `None` without a
    /// validation set.
    fn training_rate(&self) -> Option<f64> {
        let seconds = self.start.elapsed().as_secs_f64() - self.validation_secs;
        self.val.is_some().then(|| self.rate_over(seconds))
    }

    /// This call's steps over `seconds`.
    fn rate_over(&self, seconds: f64) -> f64 {
        (self.state.step - self.steps_before) as f64 / seconds.max(1e-9)
    }

    /// Tells `reporter` of the step just taken, every `report_every` steps, at a
    /// validation score and at the last step.
    fn report(&mut self, reporter: &mut dyn Reporter, loss: f64, lr: f64, val_nll: Option<f64>) {
        self.state.elapsed_secs = self.elapsed_before + self.start.elapsed().as_secs_f64();
        let st = &self.state;
        let last = st.step == self.total;
        if st.step.is_multiple_of(self.trainer.cfg.report_every) || last || val_nll.is_some() {
            let rate = self.rate();
            reporter.report(&Report {
                step: st.step,
                total_steps: self.total,
                loss,
                val_nll,
                lr,
                skipped: st.skipped,
                steps_per_sec: rate,
                elapsed_secs: st.elapsed_secs,
                eta_secs: (self.total - st.step) as f64 / rate.max(1e-9),
            });
        }
    }

    /// Hands `control` a checkpoint every `checkpoint_every` steps, but at the last.
    fn save_periodic(&self, control: &mut Control) -> Result<(), TrainError> {
        if let (Some(every), Some(save)) =
            (control.checkpoint_every, control.on_checkpoint.as_mut())
        {
            let step = self.state.step;
            if step.is_multiple_of(every) && step != self.total {
                save(&self.checkpoint()?)?;
            }
        }
        Ok(())
    }

    /// Why the run stops early, when `patience` evaluations brought no improvement.
    fn out_of_patience(&self) -> Option<String> {
        let p = self.trainer.cfg.patience?;
        (self.state.since_best >= p).then(|| {
            format!(
                "early stop at step {}: no validation improvement in {p} evaluations",
                self.state.step
            )
        })
    }

    /// A resumable checkpoint of the current state.
    fn checkpoint(&self) -> Result<TrainCheckpoint, TrainError> {
        let tensors: HashMap<String, Tensor> = lock(&self.model.varmap)?
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<candle::Result<_>>()?;
        let mut checkpoint = TrainCheckpoint {
            model: self.model.config.clone(),
            config: self.trainer.cfg.clone(),
            state: self.state.clone(),
            tensors,
            built: None,
        };
        let names = &self.model.names;
        let (m, v) = self.adam.moments();
        checkpoint.insert_group(StateGroup::AdamM, names, m)?;
        checkpoint.insert_group(StateGroup::AdamV, names, v)?;
        if let Some(best) = &self.best {
            checkpoint.insert_group(StateGroup::Best, names, best)?;
        }
        Ok(checkpoint)
    }

    /// Ends the run: the final checkpoint, the weights returned (with a validation
    /// set, the best scored, unless the run was interrupted) and the summary.
    fn finish(
        mut self,
        end: Ending,
        n_val: usize,
        reporter: &mut dyn Reporter,
    ) -> Result<Trained, TrainError> {
        self.model.flow.set_training(false);
        if let Some(msg) = &end.stopped {
            reporter.message(msg);
        }
        let mut checkpoint = self.checkpoint()?;
        let st = &self.state;
        // The final weights stand when their (off-schedule) score beats the best.
        let (mut best_val_nll, mut best_step) = (st.best_val_nll, st.best_step);
        if let Some(v) = self.final_val.filter(|v| v.is_finite()) {
            if best_val_nll.is_none_or(|b| v < b) {
                self.best = None;
                (best_val_nll, best_step) = (Some(v), Some(st.step));
            }
        }
        if let (false, Some(weights)) = (end.interrupted, &self.best) {
            // The model becomes the best weights; the weights training stopped at stay
            // in the state, for continuing.
            checkpoint.keep_best_as_model(&self.model.names, weights)?;
            restore(&self.model.vars, weights)?;
        }
        let summary = TrainSummary {
            steps: st.step,
            total_steps: self.total,
            n_train: self.rows.len(),
            n_val,
            final_loss: st.last_loss,
            best_val_nll,
            best_step,
            skipped: st.skipped,
            stopped: end.stopped,
            kept_step: end.kept_step,
            interrupted: end.interrupted,
            elapsed_secs: st.elapsed_secs,
            steps_per_sec: self.rate(),
            validation_secs: self.validation_secs,
            training_steps_per_sec: self.training_rate(),
            low_memory: self.layerwise.as_ref().map(|l| l.report().clone()),
            rivals: Vec::new(),
        };
        reporter.finish(&summary);
        Ok(Trained {
            flow: self.model.flow,
            varmap: self.model.varmap,
            model: self.model.config,
            config: self.trainer.cfg.clone(),
            summary,
            checkpoint,
        })
    }
}

/// The order in which epoch `epoch` visits the `n` samples: a shuffle seeded from
/// `(seed, epoch)` alone, so any point of a run can be reproduced.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    crate::data::shuffled(n, crate::data::epoch_seed(seed, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        data::{generate, Toy},
        OptimizerConfig,
    };

    struct Silent;
    impl Reporter for Silent {
        fn report(&mut self, _: &Report) {}
    }

    fn small(lr: f64, steps: usize) -> TrainConfig {
        let model = flow_realnvp::RealNvpConfig::new(2)
            .with_layers(2)
            .with_hidden(8);
        TrainConfig::new(model)
            .with_optimizer(OptimizerConfig {
                lr,
                ..OptimizerConfig::default()
            })
            .with_duration(Duration::Steps(steps))
    }

    #[test]
    fn a_run_that_diverges_at_once_says_it_kept_the_weights_it_started_with(
    ) -> Result<(), TrainError> {
        let train = generate(Toy::Moons, 200, None, 1)?;
        // Adam moves every weight by about the learning rate: after the first step at
        // 1e30 the loss overflows, and the only finite weights are the initial ones.
        let t = Trainer::new(small(1e30, 20), &Device::Cpu)?.fit(&train, None, &mut Silent)?;
        assert_eq!(t.summary.kept_step, Some(0), "{:?}", t.summary);
        let reason = t.summary.stopped.unwrap_or_default();
        assert!(
            reason.contains("the loss became non-finite at step"),
            "{reason}"
        );
        // A healthy run stops for no such reason.
        let t = Trainer::new(small(1e-3, 3), &Device::Cpu)?.fit(&train, None, &mut Silent)?;
        assert_eq!((t.summary.kept_step, t.summary.steps), (None, 3));
        Ok(())
    }

    #[test]
    fn degenerate_data_are_refused_or_warned_about() -> Result<(), TrainError> {
        let trainer = Trainer::new(small(1e-3, 3), &Device::Cpu)?;
        let error = |values: Vec<f32>| match trainer.data_warnings(&Dataset::new(2, values), "d") {
            Err(e) => e.to_string(),
            Ok(w) => panic!("accepted, with warnings {w:?}"),
        };
        assert_eq!(
            error(vec![1.0, 2.0]),
            "d: 1 row: a density cannot be fitted to a single point"
        );
        assert_eq!(
            error(vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]),
            "d: all 3 rows are the same point: there is no density to fit"
        );
        let warnings =
            trainer.data_warnings(&Dataset::new(2, vec![1.0, 5.0, 2.0, 5.0, 3.0, 5.0]), "d")?;
        assert_eq!(
            warnings,
            [
                "d: column 2 is constant: standardised with a standard deviation of 1 in place of 0, and the density collapses onto the constant as training goes on",
                "d: 3 rows, fewer than a batch of 512: every step trains on all 3",
            ]
        );
        let moons = generate(Toy::Moons, 600, None, 2)?;
        assert!(trainer.data_warnings(&moons, "moons")?.is_empty());
        Ok(())
    }

    #[test]
    fn squared_norm_reads_every_layout_and_dtype() -> candle::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, -2.0, 3.0], [0.5, 0.0, -1.5]], &dev)?;
        let grads = [
            Some(a.clone()),                     // contiguous f32: 16.5
            Some(a.t()?),                        // strided: the same 16.5
            Some(a.narrow(1, 1, 2)?),            // offset and strided: 4 + 9 + 0 + 2.25
            None,                                // a variable without a gradient
            Some(a.to_dtype(DType::F64)?),       // f64: 16.5
            Some(a.to_dtype(DType::BF16)?),      // through tensor ops: 16.5
            Some(Tensor::new(&[2.0f64], &dev)?), // 4
            // Longer than the eight running sums: 1² + … + 21² = 3311, in both dtypes.
            Some(Tensor::arange(1f32, 22., &dev)?),
            Some(Tensor::arange(1f64, 22., &dev)?),
        ];
        let want = 16.5 * 4.0 + 15.25 + 4.0 + 2.0 * 3311.0;
        let got = squared_norm(&grads, &dev)?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }
}
