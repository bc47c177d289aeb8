//! Data-parallel training: the processes of one run, each a replica of the model.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use candle::{DType, Device, Tensor};
use flow_dist::{all_reduce_tensors, broadcast_tensors, checksum, Collective};

use crate::TrainError;

/// How often a debug build checks that the replicas hold the same weights, unless
/// told otherwise.
pub const DEBUG_CHECK_EVERY: usize = 100;

/// The processes of a data-parallel run ([`Control::replicas`](crate::Control)): each
/// computes the loss and gradients of its share of every batch (the batch's rows
/// split in rank order), the shares' gradients are summed over the processes, and
/// every process takes the same optimizer step, so that they train one model, the
/// model one process would train on the same batches, up to the order of float
/// additions. Every process must run the same training on the same data.
///
/// Before the first step every process takes rank 0's weights. Layers with batch
/// statistics (batch norm) sum them over the shares. A stop asked of any process (a
/// signal) stops them all after the same step. The caller saves and reports on rank
/// 0 only ([`Replicas::is_lead`]).
#[derive(Debug, Clone)]
pub struct Replicas {
    collective: Arc<dyn Collective>,
    check_every: Option<usize>,
    /// Nanoseconds spent in collective calls, waiting for the others included.
    waited: Arc<AtomicU64>,
}

impl Replicas {
    /// The replicas `collective` connects. Debug builds check every
    /// [`DEBUG_CHECK_EVERY`] steps that the replicas' weights are the same; release
    /// builds only where [`with_check_every`](Self::with_check_every) says.
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Self {
            collective,
            check_every: cfg!(debug_assertions).then_some(DEBUG_CHECK_EVERY),
            waited: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Checks every `every` steps (and before the first) that every replica holds
    /// rank 0's weights and buffers, bit for bit: a run whose replicas drifted apart
    /// fails with an error that says so. `None`: never.
    pub fn with_check_every(mut self, every: Option<usize>) -> Self {
        self.check_every = every.filter(|&n| n > 0);
        self
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world(&self) -> usize {
        self.collective.world()
    }

    /// Whether this process is rank 0, the one that saves and reports.
    pub fn is_lead(&self) -> bool {
        self.rank() == 0
    }

    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// Seconds this process has spent in collective calls so far: the sums of the
    /// gradients and the agreement on stopping, waiting for slower processes
    /// included.
    pub fn collective_secs(&self) -> f64 {
        Duration::from_nanos(self.waited.load(Ordering::Relaxed)).as_secs_f64()
    }

    /// The rows `start..start + len` of a batch of `batch` rows that this process
    /// computes: the batch cut into `world` consecutive runs, in rank order.
    pub fn share(&self, batch: usize) -> (usize, usize) {
        let (r, w) = (self.rank(), self.world());
        let (start, end) = (r * batch / w, (r + 1) * batch / w);
        (start, end - start)
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited.fetch_add(nanos, Ordering::Relaxed);
        out
    }

    /// The sum over the replicas of each of `values`, in f64.
    pub(crate) fn sum_values(&self, values: &[f64], device: &Device) -> candle::Result<Vec<f64>> {
        let t = Tensor::new(values, device)?;
        self.timed(|| self.collective.all_reduce_sum(&t))?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()
    }

    /// Each tensor summed over the replicas, in one call.
    pub(crate) fn sum_tensors(&self, tensors: &[Tensor]) -> candle::Result<Vec<Tensor>> {
        self.timed(|| all_reduce_tensors(self.collective.as_ref(), tensors))
    }

    /// Rank 0's tensors, on every replica.
    pub(crate) fn lead_values(&self, tensors: &[Tensor]) -> candle::Result<Vec<Tensor>> {
        self.timed(|| broadcast_tensors(self.collective.as_ref(), tensors, 0))
    }

    /// Whether `step` is one to check the replicas at.
    pub(crate) fn checks_at(&self, step: usize) -> bool {
        self.check_every.is_some_and(|n| step.is_multiple_of(n))
    }

    /// Fails on every replica unless all hold the same `tensors` as rank 0, bit for
    /// bit (by [`checksum`]).
    pub(crate) fn check_same(
        &self,
        tensors: &[Tensor],
        step: usize,
        device: &Device,
    ) -> Result<(), TrainError> {
        let mine = checksum(tensors)?;
        // The 64 bits as two exact f64 halves.
        let halves = [(mine >> 32) as f64, (mine & 0xffff_ffff) as f64];
        let lead = self.timed(|| self.collective.broadcast(&Tensor::new(&halves, device)?, 0))?;
        let differs = lead.to_vec1::<f64>()? != halves;
        let differing = self.sum_values(&[f64::from(u8::from(differs))], device)?[0];
        if differing > 0.0 {
            return Err(TrainError::InvalidConfig(format!(
                "the replicas' weights differ after step {step}: {differing} of {} processes hold other weights than rank 0 (are they all given the same data and settings?)",
                self.world()
            )));
        }
        Ok(())
    }
}
