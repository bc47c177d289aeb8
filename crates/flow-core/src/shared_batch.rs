//! Batches split across processes: what a layer that uses a batch's statistics needs
//! in order to see the whole batch when each process holds a share of it.

use candle::{Result, Tensor};

/// Sums tensors over the processes that each hold a share of one batch (data-parallel
/// training), so that a layer computing statistics of the batch (batch norm) computes
/// those of the whole batch, on every process alike.
///
/// The sum is differentiable: the gradient that reaches each process's input is the
/// sum over the processes of the gradients reaching the output. The processes must
/// call [`sum`](SharedBatch::sum) in the same order with tensors of the same shape,
/// forwards and backwards: they run the same graph on their shares.
pub trait SharedBatch: Send + Sync + std::fmt::Debug {
    /// The element-wise sum of `t` over the processes, the same on each.
    fn sum(&self, t: &Tensor) -> Result<Tensor>;
}
