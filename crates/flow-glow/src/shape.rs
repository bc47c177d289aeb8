//! Helpers every layer of this crate uses at its edges; the image shape itself is
//! [`flow_core::ImageShape`].

use candle::{Result, Tensor};

/// A per-image log-determinant, the same for every row: `total` (a scalar) as `(batch,)`.
pub(crate) fn per_row(total: &Tensor, batch: usize) -> Result<Tensor> {
    total.broadcast_as(batch)?.contiguous()
}

/// Writes `value` into `dst` in place, keeping `dst`'s storage (and so the variable, or
/// the buffer, a checkpoint and an optimizer see). `value` is detached first: a written
/// state is a new starting point, not a function of the batch it came from.
pub(crate) fn assign(dst: &Tensor, value: &Tensor) -> Result<()> {
    let value = value
        .detach()
        .to_dtype(dst.dtype())?
        .to_device(dst.device())?
        .reshape(dst.shape())?
        .contiguous()?;
    if dst.is_variable() {
        // A variable handed out by a VarBuilder shares its storage with the VarMap's
        // `Var`: `from_tensor` wraps that same storage, and `set` copies into it.
        candle::Var::from_tensor(dst)?.set(&value)
    } else {
        // Tensors read from a file (not variables) are written through their storage.
        dst.slice_set(&value, 0, 0)
    }
}
