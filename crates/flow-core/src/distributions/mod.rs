//! Base distributions of flows.

mod diag_normal;
mod mixture;
mod standard_normal;

pub use diag_normal::DiagNormal;
pub use mixture::GaussianMixture;
pub use standard_normal::StandardNormal;

use candle::{Result, Tensor};
use rand::RngCore;

/// `ln(2π) / 2`
pub(crate) const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

/// A distribution over `R^dim` that can score and draw points.
///
/// Draws come from a host random number generator, so sampling is reproducible from a
/// seed on every device.
pub trait Distribution: Send + Sync + std::fmt::Debug {
    /// Number of features.
    fn dim(&self) -> usize;

    /// Log density of `x: (batch, dim)`, returned as `(batch,)`.
    fn log_prob(&self, x: &Tensor) -> Result<Tensor>;

    /// Draws `(n, dim)` points with the spread multiplied by `temperature`
    /// (`temperature = 1` is the distribution itself).
    fn sample_with_temperature(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor>;

    /// Draws `(n, dim)` points.
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        self.sample_with_temperature(n, 1.0, rng)
    }

    /// The distribution's non-trainable tensors (see
    /// [`Bijector::buffers`](crate::Bijector::buffers)).
    fn buffers(&self) -> Vec<Tensor> {
        Vec::new()
    }
}
