use candle::{DType, Device, Result, Tensor};
use rand::RngCore;

use super::{Distribution, HALF_LN_2PI};
use crate::sampling::randn;

/// The standard normal `N(0, I)` on `R^dim`. It has no parameters.
#[derive(Debug, Clone)]
pub struct StandardNormal {
    dim: usize,
    dtype: DType,
    device: Device,
}

impl StandardNormal {
    pub fn new(dim: usize, dtype: DType, device: &Device) -> Self {
        Self {
            dim,
            dtype,
            device: device.clone(),
        }
    }
}

impl Distribution for StandardNormal {
    fn dim(&self) -> usize {
        self.dim
    }

    fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        // −|x|²/2 − d·ln(2π)/2
        let sq = x.sqr()?.sum(1)?;
        sq.affine(-0.5, -(self.dim as f64) * HALF_LN_2PI)
    }

    fn sample_with_temperature(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        let eps = randn(n, self.dim, self.dtype, &self.device, rng)?;
        if temperature == 1.0 {
            Ok(eps)
        } else {
            eps.affine(temperature, 0.0)
        }
    }
}
