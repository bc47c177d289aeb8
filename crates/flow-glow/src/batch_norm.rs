//! The batch-normalisation flow layer (RealNVP §3.7).

use std::sync::Arc;

use candle::{Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{Bijector, SharedBatch};
use serde::{Deserialize, Serialize};

use crate::actnorm::channel_moments;
use crate::{
    shape::{assign, per_row},
    ImageShape,
};

fn default_momentum() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}

/// A [`BatchNorm`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchNormConfig {
    /// The images it normalises per channel; flat data of `D` features is
    /// [`ImageShape::flat`]`(D)` (per-feature statistics).
    pub shape: ImageShape,
    /// Weight of a new batch in the running averages:
    /// `running = (1 − momentum)·running + momentum·batch`.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Added to the variance before its square root.
    #[serde(default = "default_eps")]
    pub eps: f64,
}

impl BatchNormConfig {
    pub fn new(shape: ImageShape) -> Self {
        Self {
            shape,
            momentum: default_momentum(),
            eps: default_eps(),
        }
    }

    flow_core::with_setters! {
        with_momentum: momentum: f64,
        with_eps: eps: f64,
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.shape.validate()?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(format!(
                "batch-norm momentum must lie in [0, 1], got {}",
                self.momentum
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("batch-norm eps must be positive, got {}", self.eps));
        }
        Ok(())
    }
}

/// Batch normalisation as a bijection, data to latent, per channel:
///
/// `z = (x − μ) / sqrt(σ² + eps) · exp(γ) + β`,
/// `log|det ∂z/∂x| = H·W·Σ_c (γ_c − ½·log(σ_c² + eps))`,
///
/// where `(μ, σ²)` are the statistics the map used. In training mode
/// ([`Bijector::set_training`]`(true)`) `forward` uses the batch's own per-channel mean
/// and (population) variance over the batch and the pixels — gradients flow through
/// them — and moves the running averages towards them; in evaluation mode (the default,
/// so that a built or loaded model is a fixed bijection) it uses the running averages.
/// `inverse` always uses the running averages: it inverts the evaluation-mode map.
///
/// When each process of a data-parallel run holds a share of the batch
/// ([`Bijector::share_batch`]), the training-mode statistics are those of the whole
/// batch, summed over the shares: every process computes the same map.
///
/// Tensors: `log_gamma` and `beta` (`(C,)`, trainable, starting at 0: the identity on
/// standardised data), `running_mean` and `running_var` (`(C,)`, starting at 0 and 1;
/// buffers, updated in place by training-mode forward passes and saved with the
/// weights).
#[derive(Debug)]
pub struct BatchNorm {
    shape: ImageShape,
    momentum: f64,
    eps: f64,
    log_gamma: Tensor,
    beta: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    shared: Option<Arc<dyn SharedBatch>>,
}

impl BatchNorm {
    /// Reads (or creates) its tensors under `vb`; the layer starts in evaluation mode.
    pub fn new(cfg: &BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        let c = cfg.shape.channels;
        Ok(Self {
            shape: cfg.shape,
            momentum: cfg.momentum,
            eps: cfg.eps,
            log_gamma: vb.get_with_hints(c, "log_gamma", candle_nn::init::ZERO)?,
            beta: vb.get_with_hints(c, "beta", candle_nn::init::ZERO)?,
            running_mean: vb.get_with_hints(c, "running_mean", candle_nn::init::ZERO)?,
            running_var: vb.get_with_hints(c, "running_var", candle_nn::init::ONE)?,
            training: false,
            shared: None,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// `(running_mean, running_var)`, each `(C,)`.
    pub fn running_stats(&self) -> (&Tensor, &Tensor) {
        (&self.running_mean, &self.running_var)
    }

    fn per_channel(&self, t: &Tensor) -> Result<Tensor> {
        t.reshape((1, self.shape.channels, 1, 1))
    }

    /// `sign·H·W·Σ(γ − ½ log(σ² + eps))` for every row.
    fn log_det(&self, var: &Tensor, batch: usize, sign: f64) -> Result<Tensor> {
        let per_channel =
            (&self.log_gamma - var.affine(1.0, self.eps)?.log()?.affine(0.5, 0.0)?)?;
        let total = per_channel
            .sum_all()?
            .affine(sign * self.shape.pixels() as f64, 0.0)?;
        per_row(&total, batch)
    }

    /// Moves the running averages towards the batch's `(mean, var)`.
    fn update_running(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        let m = self.momentum;
        let blend = |running: &Tensor, batch: &Tensor| -> Result<Tensor> {
            running.affine(1.0 - m, 0.0)? + batch.detach().affine(m, 0.0)?
        };
        assign(&self.running_mean, &blend(&self.running_mean, mean)?)?;
        assign(&self.running_var, &blend(&self.running_var, var)?)
    }
}

/// [`channel_moments`] of a batch whose rows are shared out between processes: the
/// per-channel mean and (population) variance of all the shares, in two sums over
/// them as the whole batch would take them (the mean first, then the squared
/// deviations from it).
fn shared_channel_moments(img: &Tensor, shared: &dyn SharedBatch) -> Result<(Tensor, Tensor)> {
    let c = img.dim(1)?;
    let rows = img.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
    let count = Tensor::full(rows.dim(1)? as f64, 1, img.device())?.to_dtype(img.dtype())?;
    // One sum for the channels' totals and the number of values behind them.
    let totals = shared.sum(&Tensor::cat(&[rows.sum(1)?, count], 0)?)?;
    let n = totals.narrow(0, c, 1)?;
    let mean = totals.narrow(0, 0, c)?.broadcast_div(&n)?;
    let deviations = rows.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.sum(1)?;
    let var = shared.sum(&deviations)?.broadcast_div(&n)?;
    Ok((mean, var))
}

impl Bijector for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (z, log_det, _) = self.forward_recorded(x, None, true)?;
        Ok((z, log_det))
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inverse_recorded(z, None, &[])
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn batch_statistics(&self) -> bool {
        self.training
    }

    fn share_batch(&mut self, shared: Option<Arc<dyn SharedBatch>>) {
        self.shared = shared;
    }

    /// `running_mean` and `running_var`.
    fn buffers(&self) -> Vec<Tensor> {
        vec![self.running_mean.clone(), self.running_var.clone()]
    }

    /// A training-mode pass records the batch's statistics, and its inverse uses them.
    fn recomputable(&self) -> bool {
        true
    }

    /// In training mode, records the batch's `[mean, var]` (per channel) and moves the
    /// running averages towards them when `update`; in evaluation mode, records nothing.
    fn forward_recorded(
        &self,
        x: &Tensor,
        _context: Option<&Tensor>,
        update: bool,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let img = self.shape.to_image(x, "batch-norm")?;
        let (mean, var, record) = if self.is_training() {
            let (mean, var) = match &self.shared {
                Some(shared) => shared_channel_moments(&img, shared.as_ref())?,
                None => channel_moments(&img)?,
            };
            if update {
                self.update_running(&mean, &var)?;
            }
            let record = vec![mean.detach(), var.detach()];
            (mean, var, record)
        } else {
            // The running statistics are buffers: constants to the gradient.
            let stats = (self.running_mean.detach(), self.running_var.detach());
            (stats.0, stats.1, Vec::new())
        };
        // exp(γ) / sqrt(σ² + eps), per channel.
        let gain = (self.log_gamma.exp()? / var.affine(1.0, self.eps)?.sqrt()?)?;
        let z = img
            .broadcast_sub(&self.per_channel(&mean)?)?
            .broadcast_mul(&self.per_channel(&gain)?)?
            .broadcast_add(&self.per_channel(&self.beta)?)?;
        let log_det = self.log_det(&var, x.dim(0)?, 1.0)?;
        Ok((ImageShape::to_rows(&z)?, log_det, record))
    }

    /// With the `[mean, var]` a training-mode pass recorded, the inverse of that pass;
    /// with no record, of the evaluation-mode map (the running averages).
    fn inverse_recorded(
        &self,
        z: &Tensor,
        _context: Option<&Tensor>,
        record: &[Tensor],
    ) -> Result<(Tensor, Tensor)> {
        let img = self.shape.to_image(z, "batch-norm")?;
        let (mean, var) = match record {
            [mean, var] => (mean.detach(), var.detach()),
            [] => (self.running_mean.detach(), self.running_var.detach()),
            _ => candle::bail!(
                "batch-norm: a record of {} tensors, expected [mean, var]",
                record.len()
            ),
        };
        // sqrt(σ² + eps) / exp(γ), per channel.
        let spread = (var.affine(1.0, self.eps)?.sqrt()? * self.log_gamma.neg()?.exp()?)?;
        let x = img
            .broadcast_sub(&self.per_channel(&self.beta)?)?
            .broadcast_mul(&self.per_channel(&spread)?)?
            .broadcast_add(&self.per_channel(&mean)?)?;
        Ok((
            ImageShape::to_rows(&x)?,
            self.log_det(&var, z.dim(0)?, -1.0)?,
        ))
    }
}
