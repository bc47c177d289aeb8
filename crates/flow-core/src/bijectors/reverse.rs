use candle::{Device, Result, Tensor};

use super::{Bijector, Permute};

/// Reverses the order of the features. Log-det 0. Its own inverse.
#[derive(Debug, Clone)]
pub struct Reverse(Permute);

impl Reverse {
    pub fn new(dim: usize, device: &Device) -> Result<Self> {
        Ok(Self(Permute::new((0..dim).rev().collect(), device)?))
    }
}

impl Bijector for Reverse {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.forward(x)
    }
    fn inverse(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.0.inverse(z)
    }
}
