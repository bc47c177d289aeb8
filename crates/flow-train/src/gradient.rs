//! A batch's loss and gradients, with the batch split across the CPU's threads.
//!
//! On small batches a training step spends much of its time in work that does not
//! grow with the batch: building the graph, walking it backwards, launching each
//! kernel. Split over threads within each op, that work stays serial; split by rows,
//! each thread builds and walks the graph of its own part, so all of it runs in
//! parallel.

use candle::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use flow_core::Flow;
use rayon::prelude::*;

/// Rows below which a part of a batch is not worth a thread of its own.
pub const MIN_PART_ROWS: usize = 32;

/// Parts a batch of `batch` rows is split into for [`nll_and_gradients`]: on the CPU,
/// [`parts_of`] the batch on rayon's threads. A single part:
/// - on other devices, which run one queue of kernels;
/// - for flows with a layer that uses the whole batch's statistics;
/// - while candle runs element-wise ops on a pool of its own, which serves one caller
///   at a time while the others spin ([`flow_kernels::pin_thread_count`] sets that
///   pool to the calling thread, as the `flow` binary does).
pub fn batch_parts(batch: usize, flow: &Flow, device: &Device) -> usize {
    // Asking for the pool's size creates the pool, as candle's first element-wise op
    // would.
    let own_pool = candle::utils::barrier_pool().n_workers() > 0;
    if !device.is_cpu() || flow.batch_statistics() || own_pool {
        return 1;
    }
    parts_of(batch, rayon::current_num_threads())
}

/// Parts of a batch of `batch` rows on `threads` threads: one per thread, each of at
/// least [`MIN_PART_ROWS`] rows, and at least one.
pub fn parts_of(batch: usize, threads: usize) -> usize {
    threads.min(batch / MIN_PART_ROWS).max(1)
}

/// The mean negative log-likelihood of the batch `x` (given its context, if any) and,
/// when it is finite, the gradient of that mean for each of `vars` (`None` for a
/// variable it does not depend on).
///
/// With `parts > 1` the rows are split into that many consecutive ranges, evaluated
/// and differentiated in parallel, each part's loss its rows' NLL summed and divided
/// by the whole batch's size; losses and gradients are then added up part by part, in
/// order. That is the same sum as a single pass, grouped differently, so the result
/// agrees with `parts = 1` up to rounding and, like the kernels it runs, depends only
/// on the inputs, `parts` and the thread count.
pub fn nll_and_gradients(
    flow: &Flow,
    vars: &[Var],
    x: &Tensor,
    context: Option<&Tensor>,
    parts: usize,
) -> Result<(f64, Option<Vec<Option<Tensor>>>)> {
    share_nll_and_gradients(flow, vars, x, context, parts, Share::whole(x.dim(0)?))
}

/// Which part of a batch a process computes ([`share_nll_and_gradients`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Share {
    /// The rows of the whole batch, by which every part's NLL is divided.
    pub rows: usize,
    /// Differentiate even a non-finite loss: a process whose share diverged still
    /// takes part in the collectives the backward pass makes (sums over the shares of
    /// layers with batch statistics), which the others wait for.
    pub always_differentiate: bool,
}

impl Share {
    fn whole(rows: usize) -> Self {
        Self {
            rows,
            always_differentiate: false,
        }
    }
}

/// [`nll_and_gradients`] of `x`, a share of a batch of `share.rows` rows: the share's
/// NLL summed and divided by the whole batch's size, and its gradient, so that the
/// shares' losses and gradients add up to the whole batch's.
pub(crate) fn share_nll_and_gradients(
    flow: &Flow,
    vars: &[Var],
    x: &Tensor,
    context: Option<&Tensor>,
    parts: usize,
    share: Share,
) -> Result<(f64, Option<Vec<Option<Tensor>>>)> {
    let results = by_parts(x, context, parts, |x, c| {
        let loss = flow
            .log_prob_with_context(x, c)?
            .sum_all()?
            .affine(-1.0 / share.rows as f64, 0.0)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = (value.is_finite() || share.always_differentiate)
            .then(|| loss.backward())
            .transpose()?;
        Ok((value, grads))
    })?;
    add_up(vars, &results, share.always_differentiate)
}

/// `part` on each of `parts` consecutive ranges of the rows of `x` (and of its context),
/// in parallel when there are several, each with its kernels planned for its thread
/// alone; the results in the rows' order.
pub(crate) fn by_parts<T: Send>(
    x: &Tensor,
    context: Option<&Tensor>,
    parts: usize,
    part: impl Fn(&Tensor, Option<&Tensor>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let batch = x.dim(0)?;
    let parts = parts.clamp(1, batch.max(1));
    let run = |i: usize| -> Result<T> {
        let (start, end) = (i * batch / parts, (i + 1) * batch / parts);
        let x = x.narrow(0, start, end - start)?;
        let c = context
            .map(|c| c.narrow(0, start, end - start))
            .transpose()?;
        part(&x, c.as_ref())
    };
    if parts == 1 {
        return Ok(vec![run(0)?]);
    }
    // Every thread has a part: the kernels of each plan for its thread alone.
    (0..parts)
        .into_par_iter()
        .map(|i| flow_kernels::on_this_thread(|| run(i)))
        .collect()
}

/// The parts' losses added up and, when the sum is finite or `even_nonfinite`, each
/// variable's gradients added up in the parts' order (`None` for a variable no part
/// depends on).
pub(crate) fn add_up(
    vars: &[Var],
    results: &[(f64, Option<GradStore>)],
    even_nonfinite: bool,
) -> Result<(f64, Option<Vec<Option<Tensor>>>)> {
    let nll: f64 = results.iter().map(|(v, _)| v).sum();
    if !nll.is_finite() && !even_nonfinite {
        return Ok((nll, None));
    }
    let stores: Vec<&GradStore> = results.iter().filter_map(|(_, g)| g.as_ref()).collect();
    let grads = vars
        .par_iter()
        .map(|v| {
            let mut each = stores.iter().filter_map(|g| g.get(v.as_tensor()));
            let Some(first) = each.next() else {
                return Ok(None);
            };
            each.try_fold(first.clone(), |sum, g| sum + g).map(Some)
        })
        .collect::<Result<_>>()?;
    Ok((nll, Some(grads)))
}
