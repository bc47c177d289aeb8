//! A learned invertible linear map of the features, LU-parametrised: what mixes the
//! features between coupling layers, whose masks otherwise fix which features see
//! which.

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use flow_core::{limits, Bijector, LayerConfig};
use serde::{Deserialize, Serialize};

/// An [`LuLinear`] layer of `dim` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuLinearConfig {
    pub dim: usize,
}

impl LuLinearConfig {
    pub fn new(dim: usize) -> Self {
        Self { dim }
    }
}

impl LayerConfig for LuLinearConfig {
    /// The features against the model's, and the matrix within
    /// [`limits`](flow_core::limits). The map takes no context.
    fn check(&self, dim: usize, _context_dim: usize) -> std::result::Result<(), String> {
        if self.dim != dim {
            return Err(format!(
                "a linear layer of {} features in a model of {dim}",
                self.dim
            ));
        }
        if dim < 2 {
            return Err("a linear mixing layer needs at least 2 features".into());
        }
        limits::checked_product(
            "a linear layer's matrix",
            &[dim, dim],
            limits::MAX_TENSOR_ELEMENTS,
        )
        .map(|_| ())
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        Ok(Box::new(LuLinear::new(self, vb)?))
    }
}

/// `z = W·x + b` on rows `(batch, D)`, data to latent, with `W = L·U`:
/// - `L` unit lower triangular, its strict lower triangle the tensor `lower` `(D, D)`;
/// - `U` upper triangular, its strict upper triangle the tensor `upper` `(D, D)` and its
///   diagonal `exp(log_diag)` (`log_diag` `(D,)`), so `W` is invertible for every value
///   of the parameters;
/// - `b` the tensor `bias` `(D,)`.
///
/// `log|det ∂z/∂x| = Σ log_diag` for every row; the inverse `x = W⁻¹·(z − b)` has the
/// negated log-det, with `W⁻¹ = U⁻¹·L⁻¹` from the triangular factors (host LU,
/// differentiable). Only the named triangles of `lower` and `upper` are used. Every
/// tensor starts at zero: the layer starts as the identity.
#[derive(Debug, Clone)]
pub struct LuLinear {
    lower: Tensor,
    upper: Tensor,
    log_diag: Tensor,
    bias: Tensor,
    /// Constants (not stored): strictly lower, strictly upper, identity.
    lower_mask: Tensor,
    upper_mask: Tensor,
    eye: Tensor,
}

/// The `n×n` 0/1 matrix of the entries `(i, j)` that `keep` keeps.
fn mask(n: usize, keep: fn(usize, usize) -> bool, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f64> = (0..n * n)
        .map(|k| if keep(k / n, k % n) { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (n, n), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

impl LuLinear {
    /// Reads (or creates, as the identity) the tensors under `vb`.
    pub fn new(cfg: &LuLinearConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check(cfg.dim, 0).map_err(candle::Error::Msg)?;
        let d = cfg.dim;
        let zero = candle_nn::init::ZERO;
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        Ok(Self {
            lower: vb.get_with_hints((d, d), "lower", zero)?,
            upper: vb.get_with_hints((d, d), "upper", zero)?,
            log_diag: vb.get_with_hints(d, "log_diag", zero)?,
            bias: vb.get_with_hints(d, "bias", zero)?,
            lower_mask: mask(d, |i, j| i > j, dtype, &device)?,
            upper_mask: mask(d, |i, j| i < j, dtype, &device)?,
            eye: mask(d, |i, j| i == j, dtype, &device)?,
        })
    }

    /// `L` and `U`.
    fn factors(&self) -> Result<(Tensor, Tensor)> {
        let l = (self.lower.mul(&self.lower_mask)? + &self.eye)?;
        let diag = self
            .eye
            .broadcast_mul(&self.log_diag.exp()?.unsqueeze(0)?)?;
        let u = (self.upper.mul(&self.upper_mask)? + diag)?;
        Ok((l, u))
    }

    /// `W`, `(D, D)`.
    pub fn weight(&self) -> Result<Tensor> {
        let (l, u) = self.factors()?;
        l.matmul(&u)
    }

    /// `Σ log_diag` for each of `rows` rows, times `sign`.
    fn log_det(&self, rows: usize, sign: f64) -> Result<Tensor> {
        self.log_diag
            .sum_all()?
            .affine(sign, 0.0)?
            .broadcast_as(rows)?
            .contiguous()
    }
}

impl Bijector for LuLinear {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x.matmul(&self.weight()?.t()?)?.broadcast_add(&self.bias)?;
        Ok((z, self.log_det(x.dim(0)?, 1.0)?))
    }

    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let (l, u) = self.factors()?;
        let w_inv = crate::linalg::inverse(&u)?.matmul(&crate::linalg::inverse(&l)?)?;
        let x = z.broadcast_sub(&self.bias)?.matmul(&w_inv.t()?)?;
        Ok((x, self.log_det(z.dim(0)?, -1.0)?))
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;

    /// A layer with every tensor moved off zero, so it is not the identity.
    fn layer(d: usize) -> Result<LuLinear> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
        let layer = LuLinear::new(&LuLinearConfig::new(d), vb)?;
        for (k, var) in map.all_vars().iter().enumerate() {
            let n = var.elem_count();
            let v: Vec<f64> = (0..n)
                .map(|i| 0.3 * (((i * 7 + k * 3) % 11) as f64 / 5.0 - 1.0))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
        }
        Ok(layer)
    }

    #[test]
    fn it_starts_as_the_identity() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
        let layer = LuLinear::new(&LuLinearConfig::new(3), vb)?;
        let x = Tensor::from_vec(vec![0.5, -1.0, 2.0, 3.0, 0.0, -0.25], (2, 3), &Device::Cpu)?;
        let (z, log_det) = layer.forward(&x)?;
        assert_eq!(z.to_vec2::<f64>()?, x.to_vec2::<f64>()?);
        assert_eq!(log_det.to_vec1::<f64>()?, [0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn the_weight_is_its_factors_product_and_its_log_det_matches_the_determinant() -> Result<()> {
        let d = 4;
        let layer = layer(d)?;
        let w = layer.weight()?;
        let det = crate::linalg::log_abs_det(&w)?.to_scalar::<f64>()?;
        let x = Tensor::from_vec(
            (0..2 * d).map(|i| i as f64 * 0.1).collect(),
            (2, d),
            &Device::Cpu,
        )?;
        let (z, log_det) = layer.forward(&x)?;
        for v in log_det.to_vec1::<f64>()? {
            assert!(
                (v - det).abs() < 1e-12,
                "log-det {v} against log|det W| {det}"
            );
        }
        // z − b = W·x, row by row.
        let wx = x.matmul(&w.t()?)?;
        let zb = z.broadcast_sub(&layer.bias)?;
        let err = (wx - zb)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-12, "z − b against W·x: {err}");
        // Lower and upper triangles hold only what the masks keep.
        let l = layer.factors()?.0.to_vec2::<f64>()?;
        assert!((0..d).all(|i| l[i][i] == 1.0 && (i + 1..d).all(|j| l[i][j] == 0.0)));
        Ok(())
    }

    #[test]
    fn a_layer_of_the_wrong_size_or_one_feature_is_refused() {
        assert!(LuLinearConfig::new(3)
            .check(4, 0)
            .unwrap_err()
            .contains("of 4"));
        assert!(LuLinearConfig::new(1).check(1, 0).is_err());
    }
}
