//! Invertible maps with tractable log-determinants.

mod bijector;
mod bounded;
mod chain;
mod context_standardize;
mod inverse;
mod permute;
mod reverse;
mod stage;
mod standardize;

pub use bijector::{recompute_by_inverse, Bijector};
pub use bounded::{Bound, Bounded};
pub use chain::Chain;
pub use context_standardize::ContextStandardize;
pub use inverse::Inverse;
pub use permute::Permute;
pub use reverse::Reverse;
pub use stage::{stages_of, Stage};
pub use standardize::Standardize;

use candle::{Result, Tensor};

/// A `(batch,)` tensor of zeros matching the batch size, dtype and device of `x`.
pub(crate) fn zero_log_det(x: &Tensor) -> Result<Tensor> {
    Tensor::zeros(x.dim(0)?, x.dtype(), x.device())
}
