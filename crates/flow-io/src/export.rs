//! Writing a model in another tool's layout.

use std::{collections::HashMap, path::Path};

use candle::Tensor;
use flow_models::ModelConfig;

use crate::{export_seed, export_zuko, IoError};

/// Tools whose layout a model can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The reference RealNVP code's state dict.
    Seed,
    /// zuko's `RealNVP`, `NSF` or `MAF`.
    Zuko,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Seed, Target::Zuko];

    pub fn name(self) -> &'static str {
        match self {
            Target::Seed => "seed",
            Target::Zuko => "zuko",
        }
    }
}

/// Writes `config`'s `tensors` in `target`'s layout to `path`, after checking that the
/// target can express the model; returns what loads the file there (zuko: the Python
/// that builds the flow whose `load_state_dict` takes it).
pub fn export(
    target: Target,
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<String, IoError> {
    if config.bounds.is_some() {
        return Err(IoError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "cannot export to {}: the model is confined to a box (--bounds), which that tool's flows have no layer for",
                target.name()
            ),
        });
    }
    match target {
        Target::Seed => {
            export_seed(path, config, tensors)?;
            Ok(format!(
                "model = stacked_NVP(...); model.load_state_dict(safetensors.torch.load_file({:?}))",
                path.display().to_string()
            ))
        }
        Target::Zuko => {
            let code = export_zuko(path, config, tensors)?;
            Ok(format!(
                "{code}\nflow.load_state_dict(safetensors.torch.load_file({:?}))",
                path.display().to_string()
            ))
        }
    }
}
