//! Activation normalisation (Kingma & Dhariwal 2018, Glow §3.1).

use candle::{Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::Bijector;
use flow_kernels::actnorm::actnorm;
use serde::{Deserialize, Serialize};

use crate::{
    shape::{assign, per_row},
    ImageShape,
};

fn default_eps() -> f64 {
    1e-6
}

/// An [`ActNorm`] layer: its image shape, and the `eps` added to the standard deviation
/// in the data-dependent initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActNormConfig {
    pub shape: ImageShape,
    #[serde(default = "default_eps")]
    pub eps: f64,
}

impl ActNormConfig {
    pub fn new(shape: ImageShape) -> Self {
        Self {
            shape,
            eps: default_eps(),
        }
    }

    flow_core::with_setters! { with_eps: eps: f64 }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.shape.validate()?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("actnorm eps must be positive, got {}", self.eps));
        }
        Ok(())
    }
}

/// A per-channel affine map, data to latent
/// `z[c, h, w] = (x[c, h, w] + b[c]) · exp(s[c])`, on rows `(batch, C·H·W)`.
///
/// `log|det ∂z/∂x| = H·W·Σ_c s[c]`, the same for every row; the inverse is
/// `x = z · exp(−s) − b` with the negated log-det.
///
/// Tensors (both `(C,)`, trainable): `bias` (`b`) and `log_scale` (`s`), created as
/// zeros (the identity). [`Bijector::initialize`] sets them from a batch so that the
/// layer's outputs have zero mean and unit variance per channel on it: `b = −mean`,
/// `s = −log(std + eps)`, written in place into the variables. Being ordinary
/// parameters, the initialised values are saved with the weights; a trainer
/// initialises only fresh models, so a loaded one keeps them.
///
/// The map runs as one fused op with its own backward where
/// [`fused`](flow_kernels::fused) allows [`Op::ActNorm`](flow_kernels::Op::ActNorm),
/// else as candle's broadcast ops.
#[derive(Debug, Clone)]
pub struct ActNorm {
    shape: ImageShape,
    eps: f64,
    bias: Tensor,
    log_scale: Tensor,
}

impl ActNorm {
    /// Reads (or creates) `bias` and `log_scale` under `vb`.
    pub fn new(cfg: &ActNormConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        let c = cfg.shape.channels;
        Ok(Self {
            shape: cfg.shape,
            eps: cfg.eps,
            bias: vb.get_with_hints(c, "bias", candle_nn::init::ZERO)?,
            log_scale: vb.get_with_hints(c, "log_scale", candle_nn::init::ZERO)?,
        })
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// `b`, `(C,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// `s`, `(C,)`.
    pub fn log_scale(&self) -> &Tensor {
        &self.log_scale
    }

    fn log_det(&self, batch: usize, sign: f64) -> Result<Tensor> {
        let total = self
            .log_scale
            .sum_all()?
            .affine(sign * self.shape.pixels() as f64, 0.0)?;
        per_row(&total, batch)
    }
}

impl Bijector for ActNorm {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let img = self.shape.to_image(x, "actnorm")?;
        let z = actnorm(&img, &self.bias, &self.log_scale, false)?;
        Ok((ImageShape::to_rows(&z)?, self.log_det(x.dim(0)?, 1.0)?))
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let img = self.shape.to_image(z, "actnorm")?;
        let x = actnorm(&img, &self.bias, &self.log_scale, true)?;
        Ok((ImageShape::to_rows(&x)?, self.log_det(z.dim(0)?, -1.0)?))
    }

    /// `b = −mean`, `s = −log(std + eps)` per channel over the batch and the pixels
    /// (the population standard deviation), so that the outputs on `x` have zero mean
    /// and (up to `eps`) unit variance per channel.
    fn initialize(&self, x: &Tensor, _context: Option<&Tensor>) -> Result<()> {
        let (mean, var) = channel_moments(&self.shape.to_image(&x.detach(), "actnorm")?)?;
        assign(&self.bias, &mean.neg()?)?;
        assign(
            &self.log_scale,
            &var.sqrt()?.affine(1.0, self.eps)?.log()?.neg()?,
        )
    }
}

/// Per-channel mean and population variance of images `(batch, C, H, W)`, over the batch
/// and the pixels: two `(C,)` tensors.
pub(crate) fn channel_moments(img: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = img.dim(1)?;
    // (C, batch·H·W): one row per channel.
    let rows = img.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
    let mean = rows.mean(1)?;
    let var = rows.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
    Ok((mean, var))
}
