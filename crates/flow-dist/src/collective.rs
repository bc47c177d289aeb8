use candle::{Result, Tensor};

/// The operations data-parallel training needs from a group of processes (ranks
/// `0..world`). Every rank calls the same operations in the same order, with tensors
/// of the same shape and dtype; a call returns once every rank has made it.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, in `0..world`.
    fn rank(&self) -> usize;

    /// The number of processes.
    fn world(&self) -> usize;

    /// The element-wise sum of `t` over the ranks, the same on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `t`, on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A world of one process: every operation returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root != 0 {
            return Err(candle::Error::Msg(format!(
                "broadcast from rank {root} in a world of one process"
            )));
        }
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
