//! Checkpoints and weight import for `flows`.
//!
//! A checkpoint is a single `.safetensors` file: the model's tensors, and in the header
//! metadata a format version, the full [`ModelConfig`](flow_models::ModelConfig) and an
//! optional training summary, so a model is rebuilt from the file alone. Writes are
//! atomic: a temporary file in the same folder, renamed over the target.

mod atomic;
mod checkpoint;
mod error;
mod export;
pub mod import;
mod scores;

pub use atomic::{remove_temp_files, same_file, write_atomic, AtomicWriter};
pub use checkpoint::{
    build_checked, build_checked_with, load, load_bytes, load_model, save, Checkpoint, LoadedModel,
    FORMAT_VERSION, STATE_PREFIX,
};
pub use error::IoError;
pub use export::{export, Target};
pub use import::{
    export_seed, export_zuko, import, import_bytes, Assumption, ImportOptions, Imported, Source,
};
pub use scores::check_scores;
