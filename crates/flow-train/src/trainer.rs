use std::time::Instant;

use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow};
use flow_realnvp::ModelConfig;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{data::Dataset, Adam, DataError, Duration, Report, Reporter, TrainConfig, TrainError};

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
    /// Why training ended before `total_steps`, if it did.
    pub stopped: Option<String>,
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
}

impl std::fmt::Debug for Trained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trained")
            .field("model", &self.model)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// Fits a RealNVP model by maximum likelihood.
#[derive(Debug, Clone)]
pub struct Trainer {
    cfg: TrainConfig,
    device: Device,
    dtype: DType,
}

/// Deep copies of the variables' values.
fn snapshot(vars: &[Var]) -> candle::Result<Vec<Tensor>> {
    vars.iter().map(|v| v.as_tensor().copy()).collect()
}

fn restore(vars: &[Var], values: &[Tensor]) -> candle::Result<()> {
    vars.iter().zip(values).try_for_each(|(v, t)| v.set(t))
}

/// Mean negative log-likelihood of `x` in chunks, without keeping a gradient graph.
pub(crate) fn mean_nll(flow: &Flow, x: &Tensor) -> candle::Result<f64> {
    let n = x.dim(0)?;
    let mut total = 0.0;
    let chunk = 8192;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let lp = flow.log_prob(&x.narrow(0, start, len)?)?.detach();
        total += lp.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        start += len;
    }
    Ok(-total / n as f64)
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
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self, TrainError> {
        cfg.validate().map_err(TrainError::InvalidConfig)?;
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype: DType::F32,
        })
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
        if let Some(i) = data.values.iter().position(|v| !v.is_finite()) {
            return Err(
                DataError::new(what, Some(i / data.dim + 1), "NaN or infinite value").into(),
            );
        }
        Ok(())
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
        let cfg = &self.cfg;
        self.check_data(train, "training data")?;
        if let Some(v) = val {
            self.check_data(v, "validation data")?;
        }
        let model = ModelConfig::from_realnvp(&cfg.model).with_standardize(cfg.standardize);
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
        let flow = model.build(vb)?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .iter()
            .filter(|(name, _)| model.is_trainable(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let vars: Vec<Var> = vars.into_iter().map(|(_, v)| v).collect();
        let mut adam = Adam::new(vars.clone(), cfg.optimizer.clone())?;

        let x_train = train.to_tensor(&self.device)?.to_dtype(self.dtype)?;
        let x_val = val
            .map(|v| v.to_tensor(&self.device)?.to_dtype(self.dtype))
            .transpose()?;
        let n = train.len();
        let batch = cfg.batch_size.min(n);
        let total = self.total_steps(n);
        let mut order: Vec<usize> = (0..n).collect();
        let mut order_rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut order_rng);
        let mut pos = 0;

        let start = Instant::now();
        let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
        let mut since_best = 0;
        let mut stopped = None;
        let mut last_loss = f64::NAN;
        let mut last_good = snapshot(&vars)?;
        let mut steps_done = 0;
        reporter.start(total);
        for step in 0..total {
            if pos + batch > n {
                order.shuffle(&mut order_rng);
                pos = 0;
            }
            let idx: Vec<u32> = order[pos..pos + batch].iter().map(|&i| i as u32).collect();
            pos += batch;
            let idx = Tensor::from_vec(idx, batch, &self.device)?;
            let x = x_train.index_select(&idx, 0)?;
            let loss = flow.log_prob(&x)?.mean_all()?.neg()?;
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                restore(&vars, &last_good)?;
                stopped = Some(format!(
                    "loss became {loss_value} at step {}; kept the weights of the last finite step",
                    step + 1
                ));
                break;
            }
            last_good = snapshot(&vars)?;
            let grads = loss.backward()?;
            let mut grads: Vec<Option<Tensor>> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect();
            let mut sq = 0.0;
            for g in grads.iter().flatten() {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            let norm = sq.sqrt();
            if !norm.is_finite() {
                stopped = Some(format!(
                    "gradient became non-finite at step {}; kept the weights of the last finite step",
                    step + 1
                ));
                break;
            }
            if let Some(max) = cfg.clip_grad {
                if norm > max {
                    let f = max / norm;
                    for g in grads.iter_mut().flatten() {
                        *g = g.affine(f, 0.0)?;
                    }
                }
            }
            let lr = cfg.schedule.lr(cfg.optimizer.lr, step, total);
            adam.step(&grads, lr)?;
            last_loss = loss_value;
            steps_done = step + 1;

            let last = steps_done == total;
            let mut val_nll = None;
            if let Some(xv) = &x_val {
                if steps_done.is_multiple_of(cfg.val_every) || last {
                    let v = mean_nll(&flow, xv)?;
                    val_nll = Some(v);
                    if v.is_finite() && best.as_ref().is_none_or(|b| v < b.0) {
                        best = Some((v, steps_done, snapshot(&vars)?));
                        since_best = 0;
                    } else {
                        since_best += 1;
                    }
                }
            }
            if steps_done.is_multiple_of(cfg.report_every) || last || val_nll.is_some() {
                let elapsed = start.elapsed().as_secs_f64();
                let rate = steps_done as f64 / elapsed.max(1e-9);
                reporter.report(&Report {
                    step: steps_done,
                    total_steps: total,
                    loss: loss_value,
                    val_nll,
                    lr,
                    steps_per_sec: rate,
                    elapsed_secs: elapsed,
                    eta_secs: (total - steps_done) as f64 / rate.max(1e-9),
                });
            }
            if let Some(p) = cfg.patience {
                if since_best >= p {
                    stopped = Some(format!(
                        "early stop at step {steps_done}: no validation improvement in {p} evaluations"
                    ));
                    break;
                }
            }
        }
        if let Some(msg) = &stopped {
            reporter.message(msg);
        }
        if let Some((_, _, weights)) = &best {
            restore(&vars, weights)?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let summary = TrainSummary {
            steps: steps_done,
            total_steps: total,
            n_train: n,
            n_val: val.map_or(0, Dataset::len),
            final_loss: last_loss,
            best_val_nll: best.as_ref().map(|b| b.0),
            best_step: best.as_ref().map(|b| b.1),
            stopped,
            elapsed_secs: elapsed,
            steps_per_sec: steps_done as f64 / elapsed.max(1e-9),
        };
        reporter.finish(&summary);
        Ok(Trained {
            flow,
            varmap,
            model,
            config: cfg.clone(),
            summary,
        })
    }
}
