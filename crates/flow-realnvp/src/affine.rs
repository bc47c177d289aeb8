use candle::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::Bijector;

use crate::fused::{AffineUpdate, LogDet};
use crate::{fusion_enabled, Conditioner, CouplingConfig, Mask, ScaleMap};

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

    /// The conditioner's raw log-scale (before the [`ScaleMap`]) and shift, each
    /// `(batch, n_transformed)`.
    fn raw_params(&self, kept: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let h = conditioner_input(kept, context, self.context_dim)?;
        let (s, t) = self.conditioner.params(&h)?;
        let Some(s) = s else {
            bail!("affine coupling without a scale network");
        };
        Ok((s, t))
    }

    /// Whether the element-wise part runs as the fused ops (f32/f64 on the CPU, fusion
    /// on).
    fn fused(x: &Tensor) -> bool {
        x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && fusion_enabled()
    }

    /// `(y, log|det|)` for the forward (`inverse = false`) or inverse map.
    fn apply(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let xa = self.mask.kept_input(x)?;
        let (s, t) = self.raw_params(&xa, context)?;
        if Self::fused(x) {
            let update = AffineUpdate {
                transformed: self.mask.transformed().to_vec(),
                scale: self.scale,
                inverse,
            };
            let s = s.contiguous()?;
            let y = x.contiguous()?.apply_op3(&s, &t.contiguous()?, update)?;
            let log_det = s.apply_op1(LogDet {
                scale: self.scale,
                inverse,
            })?;
            return Ok((y, log_det));
        }
        self.apply_reference(x, &xa, &s, &t, inverse)
    }

    /// The element-wise part from plain candle ops: the reference the fused ops are
    /// tested against.
    fn apply_reference(
        &self,
        x: &Tensor,
        xa: &Tensor,
        s: &Tensor,
        t: &Tensor,
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (_, xb) = self.mask.split_input(x)?;
        let s = self.scale.log_scale(s)?;
        if inverse {
            let yb = xb.sub(t)?.mul(&s.neg()?.exp()?)?;
            Ok((self.mask.merge(xa, &yb)?, s.sum(1)?.neg()?))
        } else {
            let yb = xb.mul(&s.exp()?)?.add(t)?;
            Ok((self.mask.merge(xa, &yb)?, s.sum(1)?))
        }
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
        self.apply(x, None, false)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(z, None, true)
    }
    fn forward_with_context(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(x, Some(context), false)
    }
    fn inverse_with_context(&self, z: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.apply(z, Some(context), true)
    }
}
