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
    /// The `(dim,)` tensors it was built from: its buffers.
    given: [Tensor; 2],
}

impl Standardize {
    /// `mean` and `std` are `(dim,)`; every `std` must be positive and finite.
    pub fn new(mean: &Tensor, std: &Tensor) -> Result<Self> {
        let stds = std.to_dtype(candle::DType::F64)?.to_vec1::<f64>()?;
        if stds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("standardisation needs positive finite standard deviations, got {stds:?}");
        }
        if mean.dims() != std.dims() {
            bail!(
                "mean {:?} and std {:?} differ in shape",
                mean.dims(),
                std.dims()
            );
        }
        Ok(Self {
            mean: mean.unsqueeze(0)?,
            std: std.unsqueeze(0)?,
            given: [mean.clone(), std.clone()],
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

    /// `sign · Σ log std` for every row of `x`, as `(batch,)`. Read from the tensor at
    /// each call, so values loaded into it later are honoured.
    fn log_det(&self, x: &Tensor, sign: f64) -> Result<Tensor> {
        let total = self.std.log()?.sum_all()?.affine(sign, 0.0)?;
        total
            .to_dtype(x.dtype())?
            .broadcast_as(x.dim(0)?)?
            .contiguous()
    }
}

impl Bijector for Standardize {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        Ok((z, self.log_det(x, -1.0)?))
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = z.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?;
        Ok((x, self.log_det(z, 1.0)?))
    }
    /// The statistics are fixed: set from the training data, never trained.
    fn buffers(&self) -> Vec<Tensor> {
        self.given.to_vec()
    }
}
