//! What the unit tests of several ops share.

use candle::{DType, Tensor};

/// The largest absolute difference between `a` and `b`, in f64.
pub(crate) fn gap(a: &Tensor, b: &Tensor) -> candle::Result<f64> {
    (a - b)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}
