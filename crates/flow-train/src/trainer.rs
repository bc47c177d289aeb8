use std::{collections::HashMap, sync::atomic::Ordering, time::Instant};

use candle::{DType, Device, Tensor, TensorId, Var};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow};
use flow_models::{ModelConfig, Registry};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{
    batch_parts, data::Dataset, fingerprint, nll_and_gradients, state::StateGroup, Adam, Control,
    DataError, Duration, Report, Reporter, TrainCheckpoint, TrainConfig, TrainError, TrainState,
};

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
pub fn dequantize(pixels: &Tensor, levels: u32, seed: u64) -> candle::Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let u: Vec<f32> = (0..pixels.elem_count())
        .map(|_| rng.random::<f32>())
        .collect();
    let u = Tensor::from_vec(u, pixels.shape(), pixels.device())?.to_dtype(pixels.dtype())?;
    (pixels + u)?.affine(1.0 / f64::from(levels), 0.0)
}

/// The seed of step `step`'s dequantisation noise in a run seeded with `seed`; the
/// validation set's one draw uses `step = u64::MAX`.
fn noise_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_add(1)
}

/// Per-feature mean and (population) standard deviation; constant features get 1.
fn moments(data: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let (n, d) = (data.len() as f64, data.dim);
    let mut mean = vec![0f64; d];
    for row in data.values.chunks(d) {
        row.iter()
            .zip(&mut mean)
            .for_each(|(v, m)| *m += *v as f64 / n);
    }
    let mut var = vec![0f64; d];
    for row in data.values.chunks(d) {
        for j in 0..d {
            var[j] += (row[j] as f64 - mean[j]).powi(2) / n;
        }
    }
    let std = var
        .iter()
        .map(|v| {
            if v.sqrt() > 1e-12 {
                v.sqrt() as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean.iter().map(|m| *m as f32).collect(), std)
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
            cfg,
            device: device.clone(),
            dtype: DType::F32,
            registry,
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

    fn check_data(&self, data: &Dataset, what: &str) -> Result<(), TrainError> {
        if data.is_empty() {
            return Err(DataError::new(what, None, "no samples").into());
        }
        if data.dim != self.cfg.model.dim {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{} features per row, the model has {}",
                    data.dim, self.cfg.model.dim
                ),
            )
            .into());
        }
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
        if data.context_dim != self.cfg.model.context_dim {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{} context features per row, the model takes {}",
                    data.context_dim, self.cfg.model.context_dim
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
        if self.cfg.dequantize.is_none() {
            let constant: Vec<usize> = (0..d)
                .filter(|&j| {
                    let first = train.values[j];
                    train.values.iter().skip(j).step_by(d).all(|&v| v == first)
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
                let standardised = if self.cfg.standardize {
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
        let cfg = &self.cfg;
        self.check_data(train, "training data")?;
        if let Some(v) = val {
            self.check_data(v, "validation data")?;
        }
        if let Some(levels) = cfg.dequantize {
            crate::data::check_pixels(train, levels, "training data")?;
            if let Some(v) = val {
                crate::data::check_pixels(v, levels, "validation data")?;
            }
        }
        let data_fingerprint = fingerprint(train);
        let resume = control.resume.take();
        let total = self.total_steps(train.len());
        if let Some(r) = &resume {
            self.check_resume(r, train)?;
        }
        let model = cfg.model.clone().with_standardize(cfg.standardize);
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, cfg.seed, self.dtype, &self.device);
        if cfg.standardize {
            let (mean, std) = moments(train);
            let vb = vb.pp("standardize");
            let mean = Tensor::new(mean.as_slice(), &self.device)?.to_dtype(self.dtype)?;
            let std = Tensor::new(std.as_slice(), &self.device)?.to_dtype(self.dtype)?;
            // Created through the builder so the names are registered, then set.
            vb.get_with_hints(mean.dims(), "mean", candle_nn::init::ZERO)?;
            vb.get_with_hints(std.dims(), "std", candle_nn::init::ONE)?;
            varmap.set_one("standardize.mean", &mean)?;
            varmap.set_one("standardize.std", &std)?;
        }
        let mut flow = model.build_with(&self.registry, vb)?;
        // Trainable: every variable the model created except the buffers it declares.
        let buffers: Vec<TensorId> = flow.buffers().iter().map(Tensor::id).collect();
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .iter()
            .filter(|(_, v)| !buffers.contains(&v.as_tensor().id()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
        let mut adam = Adam::new(vars.clone(), cfg.optimizer.clone())?;

        let n = train.len();
        let batch = cfg.batch_size.min(n);
        let mut st = TrainState {
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
        };
        let mut best_weights: Option<Vec<Tensor>> = None;
        let x_train = train.to_tensor(&self.device)?.to_dtype(self.dtype)?;
        let c_train = train
            .context_tensor(&self.device)?
            .map(|c| c.to_dtype(self.dtype))
            .transpose()?;
        let x_val = val
            .map(|v| {
                let x = v.to_tensor(&self.device)?.to_dtype(self.dtype)?;
                match cfg.dequantize {
                    Some(levels) => dequantize(&x, levels, noise_seed(cfg.seed, u64::MAX)),
                    None => Ok(x),
                }
            })
            .transpose()?;
        let c_val = match val {
            Some(v) => v
                .context_tensor(&self.device)?
                .map(|c| c.to_dtype(self.dtype))
                .transpose()?,
            None => None,
        };
        let mut order = epoch_order(n, cfg.seed, st.epoch);
        // The batch of `step` (dequantised with that step's noise for pixel data).
        let rows = |order: &[usize],
                    from: usize,
                    step: usize|
         -> candle::Result<(Tensor, Option<Tensor>)> {
            let idx: Vec<u32> = order[from..from + batch]
                .iter()
                .map(|&i| i as u32)
                .collect();
            let idx = Tensor::from_vec(idx, batch, &self.device)?;
            let c = c_train
                .as_ref()
                .map(|c| c.index_select(&idx, 0))
                .transpose()?;
            let x = x_train.index_select(&idx, 0)?;
            let x = match cfg.dequantize {
                Some(levels) => dequantize(&x, levels, noise_seed(cfg.seed, step as u64))?,
                None => x,
            };
            Ok((x, c))
        };
        match resume {
            Some(r) => {
                for (name, var) in varmap
                    .data()
                    .lock()
                    .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
                    .iter()
                {
                    var.set(&r.resumed_weight(name, self.dtype, &self.device)?)?;
                }
                let m = r.group(StateGroup::AdamM, &names, self.dtype, &self.device)?;
                let v = r.group(StateGroup::AdamV, &names, self.dtype, &self.device)?;
                adam.set_state(r.state.adam_step, m, v)?;
                if r.state.best_val_nll.is_some() {
                    best_weights =
                        Some(r.group(StateGroup::Best, &names, self.dtype, &self.device)?);
                }
                st = r.state;
                order = epoch_order(n, cfg.seed, st.epoch);
            }
            None => {
                let (x, c) = rows(&order, 0, 0)?;
                flow.initialize(&x, c.as_ref())?;
            }
        }

        let mut final_val: Option<f64> = None;
        let start = Instant::now();
        let elapsed_before = st.elapsed_secs;
        let steps_before = st.step;
        let mut stopped = None;
        let mut kept_step = None;
        let mut interrupted = false;
        let last_good = snapshot(&vars)?;
        // The step whose weights `last_good` holds.
        let mut last_good_step = st.step;
        // Layers with a training mode (batch norm) train on batch statistics and are
        // scored, saved and returned in evaluation mode.
        flow.set_training(true);
        let parts = batch_parts(batch, &flow, &self.device);
        reporter.start(total);
        while st.step < total {
            let halt = control.stop.is_some_and(|s| s.load(Ordering::SeqCst))
                || control.stop_at.is_some_and(|at| st.step >= at);
            if halt {
                interrupted = true;
                stopped = Some(format!("interrupted after step {}", st.step));
                break;
            }
            if st.pos + batch > n {
                st.epoch += 1;
                st.pos = 0;
                order = epoch_order(n, cfg.seed, st.epoch);
            }
            let (x, c) = rows(&order, st.pos, st.step)?;
            st.pos += batch;
            let (loss_value, grads) = nll_and_gradients(&flow, &vars, &x, c.as_ref(), parts)?;
            let mut norm = f64::NAN;
            if let Some(g) = &grads {
                norm = squared_norm(g, &self.device)?.sqrt();
            }
            let lr = cfg.schedule.lr(cfg.optimizer.lr, st.step, total);
            match grads {
                Some(mut g) if norm.is_finite() => {
                    snapshot_into(&last_good, &vars)?;
                    last_good_step = st.step;
                    if let Some(max) = cfg.clip_grad {
                        if norm > max {
                            for t in g.iter_mut().flatten() {
                                *t = t.affine(max / norm, 0.0)?;
                            }
                        }
                    }
                    adam.step(&g, lr)?;
                    st.adam_step = adam.step_count();
                    st.last_loss = loss_value;
                }
                _ if control.skip_nonfinite => st.skipped += 1,
                _ => {
                    restore(&vars, &last_good)?;
                    kept_step = Some(last_good_step);
                    let what = if loss_value.is_finite() {
                        "gradient"
                    } else {
                        "loss"
                    };
                    stopped = Some(format!(
                        "the {what} became non-finite at step {}; kept the weights of the last finite step",
                        st.step + 1
                    ));
                    break;
                }
            }
            st.step += 1;

            let last = st.step == total;
            let scheduled = st.step.is_multiple_of(cfg.val_every);
            let mut val_nll = None;
            if let Some(xv) = &x_val {
                if scheduled || last {
                    flow.set_training(false);
                    let v = mean_nll(&flow, xv, c_val.as_ref())?;
                    flow.set_training(true);
                    val_nll = Some(v);
                    // An evaluation off the schedule (the end of a run whose length is
                    // not a multiple of `val_every`) chooses the returned weights but
                    // leaves the state alone, so that a run continued past this end
                    // evaluates exactly as one that never stopped here.
                    if !scheduled {
                        final_val = Some(v);
                    } else if v.is_finite() && st.best_val_nll.is_none_or(|b| v < b) {
                        st.best_val_nll = Some(v);
                        st.best_step = Some(st.step);
                        best_weights = Some(snapshot(&vars)?);
                        st.since_best = 0;
                    } else {
                        st.since_best += 1;
                    }
                }
            }
            st.elapsed_secs = elapsed_before + start.elapsed().as_secs_f64();
            if st.step.is_multiple_of(cfg.report_every) || last || val_nll.is_some() {
                let rate =
                    (st.step - steps_before) as f64 / start.elapsed().as_secs_f64().max(1e-9);
                reporter.report(&Report {
                    step: st.step,
                    total_steps: total,
                    loss: loss_value,
                    val_nll,
                    lr,
                    skipped: st.skipped,
                    steps_per_sec: rate,
                    elapsed_secs: st.elapsed_secs,
                    eta_secs: (total - st.step) as f64 / rate.max(1e-9),
                });
            }
            if let (Some(every), Some(save)) =
                (control.checkpoint_every, control.on_checkpoint.as_mut())
            {
                if st.step.is_multiple_of(every) && !last {
                    let ck = self.checkpoint(
                        &model,
                        &varmap,
                        &names,
                        &adam,
                        best_weights.as_deref(),
                        &st,
                    )?;
                    save(&ck)?;
                }
            }
            if let Some(p) = cfg.patience {
                if st.since_best >= p {
                    stopped = Some(format!(
                        "early stop at step {}: no validation improvement in {p} evaluations",
                        st.step
                    ));
                    break;
                }
            }
        }
        flow.set_training(false);
        if let Some(msg) = &stopped {
            reporter.message(msg);
        }
        let mut checkpoint =
            self.checkpoint(&model, &varmap, &names, &adam, best_weights.as_deref(), &st)?;
        // The final weights stand when their (off-schedule) score beats the best.
        let (mut best_val_nll, mut best_step) = (st.best_val_nll, st.best_step);
        if let Some(v) = final_val.filter(|v| v.is_finite()) {
            if best_val_nll.is_none_or(|b| v < b) {
                best_weights = None;
                (best_val_nll, best_step) = (Some(v), Some(st.step));
            }
        }
        if let (false, Some(weights)) = (interrupted, &best_weights) {
            // The model becomes the best weights; the weights training stopped at stay
            // in the state, for continuing.
            checkpoint.keep_best_as_model(&names, weights)?;
            restore(&vars, weights)?;
        }
        let run_secs = start.elapsed().as_secs_f64();
        let summary = TrainSummary {
            steps: st.step,
            total_steps: total,
            n_train: n,
            n_val: val.map_or(0, Dataset::len),
            final_loss: st.last_loss,
            best_val_nll,
            best_step,
            skipped: st.skipped,
            stopped,
            kept_step,
            interrupted,
            elapsed_secs: st.elapsed_secs,
            steps_per_sec: (st.step - steps_before) as f64 / run_secs.max(1e-9),
        };
        reporter.finish(&summary);
        Ok(Trained {
            flow,
            varmap,
            model,
            config: cfg.clone(),
            summary,
            checkpoint,
        })
    }

    /// Checks that `r` continues this trainer's run on `train`: the same settings but
    /// for a duration that may have grown, and the same data. [`fit_with`](Self::fit_with)
    /// checks it too; this tells before anything starts.
    pub fn check_resume(&self, r: &TrainCheckpoint, train: &Dataset) -> Result<(), TrainError> {
        let total = self.total_steps(train.len());
        let same = TrainConfig {
            duration: self.cfg.duration,
            ..r.config.clone()
        };
        if same != self.cfg {
            return Err(TrainError::InvalidConfig(
                "the checkpoint was written by a run with other settings".into(),
            ));
        }
        if r.state.data_fingerprint != fingerprint(train) {
            return Err(TrainError::InvalidConfig(
                "the training data differ from the data the checkpointed run used".into(),
            ));
        }
        if total < r.state.step {
            return Err(TrainError::InvalidConfig(format!(
                "the checkpoint is at step {}, past the {total} steps asked for",
                r.state.step
            )));
        }
        Ok(())
    }

    /// A resumable checkpoint of the current state.
    fn checkpoint(
        &self,
        model: &ModelConfig,
        varmap: &VarMap,
        names: &[String],
        adam: &Adam,
        best: Option<&[Tensor]>,
        state: &TrainState,
    ) -> Result<TrainCheckpoint, TrainError> {
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<candle::Result<_>>()?;
        let mut checkpoint = TrainCheckpoint {
            model: model.clone(),
            config: self.cfg.clone(),
            state: state.clone(),
            tensors,
        };
        let (m, v) = adam.moments();
        checkpoint.insert_group(StateGroup::AdamM, names, m)?;
        checkpoint.insert_group(StateGroup::AdamV, names, v)?;
        if let Some(best) = best {
            checkpoint.insert_group(StateGroup::Best, names, best)?;
        }
        Ok(checkpoint)
    }
}

/// The order in which epoch `epoch` visits the `n` samples: a shuffle seeded from
/// `(seed, epoch)` alone, so any point of a run can be reproduced.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mix = seed
        ^ (epoch as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut StdRng::seed_from_u64(mix));
    order
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
