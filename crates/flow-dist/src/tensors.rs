//! Collectives over many tensors at once: one call for all of them, so that a
//! model's hundreds of gradients cost one round trip, not hundreds.

use candle::{Result, Tensor};

use crate::Collective;

/// The tensors laid end to end in one flat tensor (one dtype and device), and back.
fn flat(tensors: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(Tensor::flatten_all)
        .collect::<Result<_>>()?;
    Tensor::cat(&flat, 0)
}

fn split(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut start = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = flat.narrow(0, start, n)?.reshape(t.shape())?;
            start += n;
            Ok(part)
        })
        .collect()
}

/// Whether the tensors can travel in one flat tensor.
fn one_dtype(tensors: &[Tensor]) -> bool {
    tensors
        .windows(2)
        .all(|w| w[0].dtype() == w[1].dtype() && w[0].device().same_device(w[1].device()))
}

/// Each tensor summed over the ranks (as [`Collective::all_reduce_sum`]): in one call
/// when they share a dtype and device, else one call each.
pub fn all_reduce_tensors(c: &dyn Collective, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if c.world() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    if !one_dtype(tensors) {
        return tensors.iter().map(|t| c.all_reduce_sum(t)).collect();
    }
    split(&c.all_reduce_sum(&flat(tensors)?)?, tensors)
}

/// Rank `root`'s tensors on every rank (as [`Collective::broadcast`]), in one call
/// when they share a dtype and device.
pub fn broadcast_tensors(
    c: &dyn Collective,
    tensors: &[Tensor],
    root: usize,
) -> Result<Vec<Tensor>> {
    if c.world() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    if !one_dtype(tensors) {
        return tensors.iter().map(|t| c.broadcast(t, root)).collect();
    }
    split(&c.broadcast(&flat(tensors)?, root)?, tensors)
}
