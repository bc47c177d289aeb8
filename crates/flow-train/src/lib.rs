//! Training for `flows`: a [`Trainer`] driven by a serde [`TrainConfig`], the Adam/AdamW
//! optimizer, learning-rate schedules, progress reporting and data sets (built-in 2-D
//! generators, CSV and `.npy` files).

mod config;
mod control;
pub mod data;
mod error;
mod gradient;
mod low_memory;
mod optim;
pub mod recipe;
mod replicas;
mod report;
mod schedule;
mod standardization;
mod state;
mod summary;
mod trainer;

pub use config::{
    conditional_batch_for, conditional_steps_for, positive_f32, val_every_for, Duration,
    OptimizerConfig, OptimizerKind, TrainConfig, CONDITIONAL_EPOCHS, CONDITIONAL_MIN_BATCH,
    CONDITIONAL_STEPS, DEFAULT_PATIENCE, DEFAULT_STEPS, VAL_EVERY_RANGE,
};
pub use control::{CheckpointSink, Control};
pub use error::{DataError, TrainError};
pub use gradient::{batch_parts, nll_and_gradients, parts_of, MIN_PART_ROWS};
pub use low_memory::{
    LayerwiseBackprop, LowMemory, Reconstruction, DEFAULT_RECONSTRUCTION_TOLERANCE,
};
pub use optim::Adam;
pub use replicas::{Replicas, DEBUG_CHECK_EVERY};
pub use report::{format_report, JsonlReporter, PlainReporter, Report, Reporter};
pub use schedule::Schedule;
pub use state::{
    fingerprint, Fingerprint, StreamPosition, TrainCheckpoint, TrainState, STATE_PREFIX,
};
pub use trainer::{
    dequantize, fit_best_of, Candidate, Rival, TrainSummary, Trained, Trainer, DEFAULT_DTYPE,
};
