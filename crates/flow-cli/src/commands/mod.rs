//! One file per `flow` command.

mod codec;
mod convert;
mod data;
mod inspect;
mod log_prob;
mod plot;
mod sample;
mod train;

use std::path::Path;

use candle::{DType, Device, Tensor};
use flow_io::LoadedModel;
use flow_train::data::{load_path, Dataset};

use crate::{cli::Cli, cli::Command, CmdResult, Failure};

pub fn run(cli: Cli) -> CmdResult {
    match cli.command {
        Command::Data(a) => data::run(a),
        Command::Train(a) => train::run(*a),
        Command::LogProb(a) => log_prob::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Encode(a) => codec::run(a, codec::Direction::Encode),
        Command::Decode(a) => codec::run(a, codec::Direction::Decode),
        Command::Inspect(a) => inspect::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Import(a) => convert::import(a),
        Command::Export(a) => convert::export(a),
    }
}

pub fn device(spec: &str) -> Result<Device, Failure> {
    flow_core::parse_device(spec).map_err(Failure::from)
}

pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel, Failure> {
    Ok(flow_io::load_model(path, DType::F32, device)?)
}

/// Reads a data file whose width must be the model's.
pub fn load_input(path: &Path, dim: usize) -> Result<(Dataset, Tensor), Failure> {
    let data = load_path(path)?;
    if data.dim != dim {
        return Err(format!(
            "{}: {} values per row, but the model has {dim} features",
            path.display(),
            data.dim
        )
        .into());
    }
    let t = data.to_tensor(&Device::Cpu)?;
    Ok((data, t))
}

/// `(n, d)` tensor → row-major f32 values on the host.
pub fn host_values(t: &Tensor) -> Result<Vec<f32>, Failure> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
