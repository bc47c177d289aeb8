use std::sync::atomic::AtomicBool;

use crate::{Replicas, TrainCheckpoint, TrainError};

/// Receives a resumable checkpoint (to save it, say with [`TrainCheckpoint::save`]); an
/// error stops the run.
pub type CheckpointSink<'a> = &'a mut dyn FnMut(&TrainCheckpoint) -> Result<(), TrainError>;

/// Optional steering of a training run beyond its configuration.
#[derive(Default)]
pub struct Control<'a> {
    /// Call `on_checkpoint` every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Receives resumable checkpoints (periodic ones); an error stops the run.
    pub on_checkpoint: Option<CheckpointSink<'a>>,
    /// Checked before every step: when set, the run stops and returns a resumable
    /// checkpoint (how interruption by a signal is handled).
    pub stop: Option<&'a AtomicBool>,
    /// Stop once this many steps are done, as an interruption would.
    pub stop_at: Option<usize>,
    /// Skip batches whose loss or gradient is not finite (counted) instead of stopping.
    pub skip_nonfinite: bool,
    /// Continue from this checkpoint instead of starting afresh.
    pub resume: Option<TrainCheckpoint>,
    /// Train as one of the processes of a data-parallel run.
    pub replicas: Option<Replicas>,
}

impl std::fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("checkpoint_every", &self.checkpoint_every)
            .field("stop_at", &self.stop_at)
            .field("skip_nonfinite", &self.skip_nonfinite)
            .field("resume", &self.resume.as_ref().map(|r| r.state.step))
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}
