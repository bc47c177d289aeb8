//! What a training run needs to continue exactly where it stopped.

use std::collections::HashMap;

use candle::Tensor;
use flow_realnvp::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::{data::Dataset, TrainConfig};

/// Prefix of the tensors that belong to the training state, not to the model.
pub const STATE_PREFIX: &str = flow_realnvp::TRAIN_STATE_PREFIX;

/// The scalar part of a run's state; the optimizer moments and best weights travel as
/// tensors named `train_state.adam.{m,v}.{var}` and `train_state.best.{var}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed (the schedule's position).
    pub step: usize,
    /// Adam's own step count (skipped batches do not advance it).
    pub adam_step: usize,
    /// Batch order: epoch `e` shuffles with a generator seeded from `(seed, e)`, and
    /// `pos` samples of it have been used.
    pub epoch: usize,
    pub pos: usize,
    pub best_val_nll: Option<f64>,
    pub best_step: Option<usize>,
    pub since_best: usize,
    pub last_loss: f64,
    pub skipped: usize,
    pub elapsed_secs: f64,
    /// Identifies the training data, so a run is only resumed on the same data.
    pub data_fingerprint: String,
}

/// A resumable checkpoint of a run: model weights plus training state.
#[derive(Debug, Clone)]
pub struct TrainCheckpoint {
    pub model: ModelConfig,
    pub config: TrainConfig,
    pub state: TrainState,
    /// Model tensors under their usual names, state tensors under [`STATE_PREFIX`].
    pub tensors: HashMap<String, Tensor>,
}

/// A stable 64-bit FNV-1a digest of the data's shape and values.
pub fn fingerprint(data: &Dataset) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&(data.dim as u64).to_le_bytes());
    eat(&(data.len() as u64).to_le_bytes());
    for v in &data.values {
        eat(&v.to_bits().to_le_bytes());
    }
    format!("{h:016x}")
}
