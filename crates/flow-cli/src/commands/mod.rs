//! One file per `flow` command.

mod codec;
mod convert;
mod data;
mod dequantized;
mod export;
mod inspect;
mod log_prob;
mod plot;
mod sample;
pub(crate) mod train;

use std::path::Path;

use candle::{DType, Device, Tensor};
use flow_io::LoadedModel;
use flow_train::data::{chunks, load_path, Dataset};

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
        Command::Export(a) => export::run(a),
    }
}

pub fn device(spec: &str) -> Result<Device, Failure> {
    flow_core::parse_device(spec).map_err(Failure::from)
}

pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel, Failure> {
    Ok(flow_io::load_model(path, DType::F32, device)?)
}

/// Rows per chunk of the commands that read or write data: their memory does not grow
/// with the number of rows.
pub const CHUNK_ROWS: usize = 16_384;

/// Rows per chunk for an image model with `dim` pixels per image: about 256k input
/// values, since its convolutions hold tens of values per pixel and channel.
pub fn image_chunk_rows(dim: usize) -> usize {
    ((1 << 18) / dim.max(1)).clamp(1, CHUNK_ROWS)
}

/// What a model reads from a data file: its features, then (a conditional model) its
/// context features, row by row.
pub struct Input {
    pub data: Dataset,
    pub x: Tensor,
    pub context: Option<Tensor>,
}

/// Checks a chunk of a data file against the model's `dim` features and `context_dim`
/// context features, and splits it.
fn split(path: &Path, data: Dataset, dim: usize, context_dim: usize) -> Result<Input, Failure> {
    if data.dim != dim + context_dim {
        let layout = if context_dim > 0 {
            format!("{dim} features, then {context_dim} context features")
        } else {
            format!("{dim} features")
        };
        return Err(format!(
            "{}: {} values per row, but the model has {layout}",
            path.display(),
            data.dim
        )
        .into());
    }
    let data = data.split_context(context_dim, &path.display().to_string())?;
    let x = data.to_tensor(&Device::Cpu)?;
    let context = data.context_tensor(&Device::Cpu)?;
    Ok(Input { data, x, context })
}

/// A data file whose rows hold `dim` features followed by `context_dim` context
/// features, read [`CHUNK_ROWS`] rows at a time.
pub fn input_chunks(
    path: &Path,
    dim: usize,
    context_dim: usize,
) -> Result<impl Iterator<Item = Result<Input, Failure>> + '_, Failure> {
    Ok(chunks(path, CHUNK_ROWS)?
        .map(move |c| split(path, c.map_err(Failure::from)?, dim, context_dim)))
}

/// The whole of a data file, as [`input_chunks`] reads it.
pub fn load_input(path: &Path, dim: usize, context_dim: usize) -> Result<Input, Failure> {
    split(path, load_path(path)?, dim, context_dim)
}

/// Checks that the data rows of `data`, rows `first_row..` of `what`, lie inside the
/// model's bounds, if it has any.
pub fn check_bounds(
    config: &flow_models::ModelConfig,
    data: &Dataset,
    first_row: usize,
    what: &str,
) -> Result<(), Failure> {
    match config.outside_bounds(&data.values) {
        Some(mut outside) => {
            outside.row += first_row;
            Err(format!("{what}: {outside}").into())
        }
        None => Ok(()),
    }
}

/// The process's peak resident memory (Linux; `None` elsewhere).
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A condition given on the command line, comma-separated, as a `(1, context_dim)`
/// tensor on `device`; checked against the model.
pub fn parse_context(
    text: Option<&str>,
    context_dim: usize,
    device: &Device,
) -> Result<Option<Tensor>, Failure> {
    let Some(text) = text else {
        if context_dim > 0 {
            return Err(format!(
                "the model is conditional on {context_dim} context features: give --context"
            )
            .into());
        }
        return Ok(None);
    };
    if context_dim == 0 {
        return Err("--context: the model is not conditional".into());
    }
    let values = text
        .split(',')
        .map(|v| {
            let v = v.trim();
            v.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("--context: `{v}` is not a finite number"))
        })
        .collect::<Result<Vec<f32>, String>>()?;
    if values.len() != context_dim {
        return Err(format!(
            "--context has {} values, the model takes {context_dim}",
            values.len()
        )
        .into());
    }
    Ok(Some(Tensor::from_vec(values, (1, context_dim), device)?))
}

/// `(n, d)` tensor → row-major f32 values on the host.
pub fn host_values(t: &Tensor) -> Result<Vec<f32>, Failure> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Rows of `values` (`dim` per row) followed by the context columns of `data` (if
/// any): the layout conditional data files have.
pub fn with_context(values: Vec<f32>, dim: usize, data: &Dataset) -> Vec<f32> {
    let c = data.context_dim;
    if c == 0 {
        return values;
    }
    values
        .chunks_exact(dim)
        .zip(data.context.chunks_exact(c))
        .flat_map(|(x, c)| x.iter().chain(c).copied())
        .collect()
}
