use candle::{Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::Bijector;

use crate::{affine::conditioner_input, Conditioner, CouplingConfig, Mask};

/// The NICE additive coupling layer: `z_b = x_b + t(x_a)`, `z_a = x_a`; log-det 0.
///
/// Volume preserving; its shift network is stored under `t.*` (or `net.*` when the
/// conditioner is joint).
#[derive(Debug, Clone)]
pub struct AdditiveCoupling {
    mask: Mask,
    conditioner: Conditioner,
    context_dim: usize,
}

impl AdditiveCoupling {
    pub fn new(cfg: &CouplingConfig, vb: VarBuilder) -> Result<Self> {
        let mask = Mask::new(cfg.mask.clone(), vb.device())?;
        let in_dim = mask.n_kept() + cfg.context_dim;
        let conditioner =
            Conditioner::new(&cfg.conditioner, in_dim, mask.n_transformed(), false, vb)?;
        Ok(Self {
            mask,
            conditioner,
            context_dim: cfg.context_dim,
        })
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// `sign = 1` adds the shift (forward), `-1` subtracts it (inverse).
    fn shift(&self, x: &Tensor, context: Option<&Tensor>, sign: f64) -> Result<(Tensor, Tensor)> {
        let (xa, xb) = self.mask.split_input(x)?;
        let h = conditioner_input(&xa, context, self.context_dim)?;
        let (_, t) = self.conditioner.params(&h)?;
        let yb = (xb + t.affine(sign, 0.0)?)?;
        let log_det = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        Ok((self.mask.merge(&xa, &yb)?, log_det))
    }
}

impl Bijector for AdditiveCoupling {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shift(x, None, 1.0)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shift(z, None, -1.0)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shift(x, Some(context), 1.0)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.shift(z, Some(context), -1.0)
    }
}
