//! A sum over the ranks that gradients flow through: what a layer needs to compute a
//! whole batch's statistics when each rank holds a share of the batch.

use std::sync::Arc;

use candle::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use flow_core::SharedBatch;

use crate::Collective;

/// The element-wise sum of `t` over the ranks, differentiable: every rank's loss
/// depends on the sum, so the gradient reaching each rank's `t` is the sum over the
/// ranks of the gradients reaching the sum. Every rank calls it in the same order,
/// and the backward pass calls the collective in the same order too.
pub fn replicated_sum(c: &Arc<dyn Collective>, t: &Tensor) -> Result<Tensor> {
    if c.world() == 1 {
        return Ok(t.clone());
    }
    // A fresh tensor, contiguous from its start, which the op returns as its value.
    let total = c.all_reduce_sum(&t.detach())?.affine(1.0, 0.0)?;
    t.apply_op2(&total, SumOverRanks(c.clone()))
}

/// The op of [`replicated_sum`]: its value is its second argument (the sum, computed
/// beforehand), its gradient to the first the sum of the gradient over the ranks.
struct SumOverRanks(Arc<dyn Collective>);

/// `storage` as a tensor's own, when `layout` covers it from its start.
fn whole<S: BackendStorage>(storage: &S, layout: &Layout) -> Result<(S, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        return Err(candle::Error::Msg(
            "sum over ranks: the sum is not a fresh tensor".into(),
        ));
    }
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

impl CustomOp2 for SumOverRanks {
    fn name(&self) -> &'static str {
        "sum-over-ranks"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        total: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        whole(total, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        total: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        whole(total, layout)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.all_reduce_sum(grad)?), None))
    }
}

/// [`SharedBatch`] over a collective's ranks: what a data-parallel trainer hands the
/// layers that use batch statistics ([`flow_core::Flow::share_batch`]).
#[derive(Debug, Clone)]
pub struct ReplicaSum(pub Arc<dyn Collective>);

impl SharedBatch for ReplicaSum {
    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        replicated_sum(&self.0, t)
    }
}
