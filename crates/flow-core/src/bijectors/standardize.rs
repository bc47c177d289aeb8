use candle::{bail, Result, Tensor};

use super::Bijector;

/// The fixed affine map `z = (x − mean) / std`, per feature.
///
/// Its log-det is the constant `−Σ log std`. Placed at the front of a flow it lets the
/// flow work in standardised units while `log_prob` stays in the data's own units.
#[derive(Debug, Clone)]
pub struct Standardize {
    /// `(1, dim)`
    mean: Tensor,
    /// `(1, dim)`
    std: Tensor,
    /// `−Σ log std`, a scalar.
    log_det: f64,
}

impl Standardize {
    /// `mean` and `std` are `(dim,)`; every `std` must be positive and finite.
    pub fn new(mean: &Tensor, std: &Tensor) -> Result<Self> {
        let stds = std.to_dtype(candle::DType::F64)?.to_vec1::<f64>()?;
        if stds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("standardisation needs positive finite standard deviations, got {stds:?}");
        }
        if mean.dims() != std.dims() {
            bail!("mean {:?} and std {:?} differ in shape", mean.dims(), std.dims());
        }
        let log_det = -stds.iter().map(|s| s.ln()).sum::<f64>();
        Ok(Self {
            mean: mean.unsqueeze(0)?,
            std: std.unsqueeze(0)?,
            log_det,
        })
    }

    /// `(dim,)`
    pub fn mean(&self) -> Result<Tensor> {
        self.mean.squeeze(0)
    }

    /// `(dim,)`
    pub fn std(&self) -> Result<Tensor> {
        self.std.squeeze(0)
    }

    fn constant(&self, x: &Tensor, value: f64) -> Result<Tensor> {
        Tensor::full(value, x.dim(0)?, x.device())?.to_dtype(x.dtype())
    }
}

impl Bijector for Standardize {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        Ok((z, self.constant(x, self.log_det)?))
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = z.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?;
        Ok((x, self.constant(z, -self.log_det)?))
    }
}
