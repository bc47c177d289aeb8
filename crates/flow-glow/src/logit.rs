//! Logit preprocessing of dequantised pixels (RealNVP §4.1), and bits per dimension.

use candle::{Result, Tensor};
use flow_core::Bijector;
use serde::{Deserialize, Serialize};

fn default_alpha() -> f64 {
    0.05
}

/// A [`Logit`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogitConfig {
    /// Features per row.
    pub dim: usize,
    /// Keeps the logit's argument in `[α, 1 − α)`; RealNVP's 0.05 by default.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

impl LogitConfig {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            alpha: default_alpha(),
        }
    }

    flow_core::with_setters! { with_alpha: alpha: f64 }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dim == 0 {
            return Err("a logit layer needs at least one feature".into());
        }
        flow_core::limits::check_at_most("features", self.dim, flow_core::limits::MAX_DIM)?;
        if !(0.0..0.5).contains(&self.alpha) {
            return Err(format!(
                "logit alpha must lie in [0, 0.5), got {}",
                self.alpha
            ));
        }
        Ok(())
    }
}

/// Element-wise, data in `[0, 1)` to latent in ℝ:
///
/// `p = α + (1 − 2α)·x`, `y = logit(p) = log p − log(1 − p)`,
/// `log|det ∂y/∂x| = Σ_i [log(1 − 2α) − log p_i − log(1 − p_i)]`.
///
/// The inverse is `x = (σ(y) − α) / (1 − 2α)` with the negated log-det, computed
/// from `y` through `log σ(y) = −softplus(−y)` and `log(1 − σ(y)) = −softplus(y)` so
/// that it stays finite for large `|y|`. Data outside `[0, 1]` give NaN. No tensors.
#[derive(Debug, Clone, Copy)]
pub struct Logit {
    dim: usize,
    alpha: f64,
}

/// `log(1 + eˣ)`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

impl Logit {
    pub fn new(cfg: &LogitConfig) -> Result<Self> {
        cfg.validate().map_err(candle::Error::Msg)?;
        Ok(Self {
            dim: cfg.dim,
            alpha: cfg.alpha,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, d] if *d == self.dim => Ok(()),
            dims => candle::bail!("logit takes rows (batch, {}), got {dims:?}", self.dim),
        }
    }
}

impl Bijector for Logit {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check(x)?;
        let a = self.alpha;
        let p = x.affine(1.0 - 2.0 * a, a)?;
        let log_p = p.log()?;
        let log_q = p.affine(-1.0, 1.0)?.log()?;
        let y = (&log_p - &log_q)?;
        let log_det = (log_p + log_q)?
            .neg()?
            .affine(1.0, (1.0 - 2.0 * a).ln())?
            .sum(1)?;
        Ok((y, log_det))
    }

    fn inverse(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check(y)?;
        let a = self.alpha;
        let p = candle_nn::ops::sigmoid(y)?;
        let x = p.affine(1.0 / (1.0 - 2.0 * a), -a / (1.0 - 2.0 * a))?;
        // log σ(y) + log(1 − σ(y)) − log(1 − 2α), per element.
        let log_det = (softplus(&y.neg()?)? + softplus(y)?)?
            .neg()?
            .affine(1.0, -(1.0 - 2.0 * a).ln())?
            .sum(1)?;
        Ok((x, log_det))
    }
}

/// Bits per dimension of discrete data from a flow's density.
///
/// With pixels of `levels` values (256 for 8 bits), data dequantised and scaled as
/// `x = (pixel + u) / levels`, `u ~ U[0, 1)`, and `dim = D = C·H·W` features, the
/// density of the unscaled `pixel + u` is `p(x) / levelsᴰ`, so
///
/// `bits/dim = (−log p(x) + D·ln(levels)) / (D·ln 2)`,
///
/// `log_prob` being `log p(x)` in nats (per image, or a mean over images). It bounds
/// the discrete model's code length per pixel value from above.
pub fn bits_per_dim(log_prob: f64, dim: usize, levels: u32) -> f64 {
    let d = dim as f64;
    (-log_prob + d * f64::from(levels).ln()) / (d * std::f64::consts::LN_2)
}
