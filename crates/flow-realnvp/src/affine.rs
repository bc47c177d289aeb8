use candle::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::Bijector;

use crate::{Conditioner, CouplingConfig, Mask, ScaleMap};

/// The RealNVP affine coupling layer.
///
/// With `a` the kept and `b` the transformed features (see [`Mask`]):
/// - forward (data → latent): `z_b = x_b ⊙ exp(s(x_a)) + t(x_a)`, `z_a = x_a`,
///   `log|det| = Σ s(x_a)`;
/// - inverse: `x_b = (z_b − t(z_a)) ⊙ exp(−s(z_a))`, `log|det| = −Σ s(z_a)`,
///
/// where `s` is the conditioner's raw output passed through the [`ScaleMap`]. With a
/// context dimension, the conditioner sees `[x_a | context]`.
#[derive(Debug, Clone)]
pub struct AffineCoupling {
    mask: Mask,
    conditioner: Conditioner,
    scale: ScaleMap,
    context_dim: usize,
}

impl AffineCoupling {
    /// Parameters are stored under `vb` as `s.*` and `t.*` (separate networks) or
    /// `net.*` (one joint network).
    pub fn new(cfg: &CouplingConfig, vb: VarBuilder) -> Result<Self> {
        let mask = Mask::new(cfg.mask.clone(), vb.device())?;
        let in_dim = mask.n_kept() + cfg.context_dim;
        let conditioner =
            Conditioner::new(&cfg.conditioner, in_dim, mask.n_transformed(), true, vb)?;
        Ok(Self {
            mask,
            conditioner,
            scale: cfg.scale,
            context_dim: cfg.context_dim,
        })
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// `(log-scale, shift)`, each `(batch, n_transformed)`.
    fn params(&self, kept: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let h = conditioner_input(kept, context, self.context_dim)?;
        let (s, t) = self.conditioner.params(&h)?;
        let Some(s) = s else {
            bail!("affine coupling without a scale network");
        };
        Ok((self.scale.log_scale(&s)?, t))
    }

    fn fwd(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (xa, xb) = self.mask.split_input(x)?;
        let (s, t) = self.params(&xa, context)?;
        let zb = xb.mul(&s.exp()?)?.add(&t)?;
        Ok((self.mask.merge(&xa, &zb)?, s.sum(1)?))
    }

    fn inv(&self, z: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (za, zb) = self.mask.split_input(z)?;
        let (s, t) = self.params(&za, context)?;
        let xb = zb.sub(&t)?.mul(&s.neg()?.exp()?)?;
        Ok((self.mask.merge(&za, &xb)?, s.sum(1)?.neg()?))
    }
}

/// `[kept | context]`, checking that a context is given exactly when one is expected.
pub(crate) fn conditioner_input(
    kept: &Tensor,
    context: Option<&Tensor>,
    context_dim: usize,
) -> Result<Tensor> {
    match (context, context_dim) {
        (None, 0) => Ok(kept.clone()),
        (None, d) => {
            bail!("this coupling layer is conditional: it needs a context of {d} features")
        }
        (Some(c), d) if c.dim(1)? == d && d > 0 => Tensor::cat(&[kept, c], 1),
        (Some(c), d) => bail!("context has {} features, the layer expects {d}", c.dim(1)?),
    }
}

impl Bijector for AffineCoupling {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.fwd(x, None)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inv(z, None)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.fwd(x, Some(context))
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inv(z, Some(context))
    }
}
