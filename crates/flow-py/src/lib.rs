//! `flows`, the Python package: a thin face over the library. Models are built from
//! the same options as `flow train` (`flow_models::options`, `flow_train::recipe`),
//! trained by `flow_train`, saved and read as the same safetensors files by `flow_io`,
//! which also imports and exports other tools' weights. Errors carry the library's
//! one-line messages: `ValueError` for bad input, `OSError` for files that cannot be
//! read or written.

mod arrays;
mod errors;
mod model;
mod training;

use std::path::PathBuf;

use flow_io::{ImportOptions, Source};
use pyo3::{prelude::*, types::PyDict};

use crate::{
    errors::{value_error, Fail},
    model::Flow,
};

/// Training and evaluation allocate and free the same large buffers step after step;
/// mimalloc keeps them for the next step instead of returning them to the system.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Reads a model saved by `Flow.save` or `flow train`.
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<Flow> {
    py.detach(|| Flow::load(&path)).map_err(Fail::into_py)
}

/// Converts another tool's weights (a PyTorch state dict saved with
/// `safetensors.torch.save_file`) into a model, as `flow import` does. `source` is
/// `seed`, `normflows`, `nflows`, `zuko` or `freia`; the assumptions are the settings
/// the weights cannot carry: `activation`, `clamp`, `tail_bound`. Each assumed
/// default is reported as a warning.
#[pyfunction]
#[pyo3(signature = (source, path, **assumptions))]
fn import_weights(
    py: Python<'_>,
    source: &str,
    path: PathBuf,
    assumptions: Option<&Bound<'_, PyDict>>,
) -> PyResult<Flow> {
    let source = Source::from_name(source).ok_or_else(|| {
        let names: Vec<&str> = Source::ALL.iter().map(|s| s.name()).collect();
        value_error(format!(
            "invalid value '{source}' for '--from' [possible values: {}]",
            names.join(", ")
        ))
    })?;
    let mut opts = ImportOptions::default();
    if let Some(given) = assumptions {
        for (key, value) in given.iter() {
            let key: String = key.extract()?;
            match key.as_str() {
                "activation" => {
                    let name: String = value.extract()?;
                    opts.activation = Some(arrays::activation(&name)?);
                }
                "clamp" => opts.clamp = Some(value.extract()?),
                "tail_bound" => opts.tail_bound = Some(value.extract()?),
                other => {
                    return Err(value_error(format!(
                        "unknown assumption `{other}`: the weights' settings are activation, clamp and tail_bound"
                    )))
                }
            }
        }
    }
    opts.check().map_err(value_error)?;
    let (flow, assumed) = py
        .detach(|| Flow::import(source, &path, &opts))
        .map_err(Fail::into_py)?;
    for assumption in assumed {
        let warning = py.get_type::<pyo3::exceptions::PyUserWarning>();
        PyErr::warn(
            py,
            &warning,
            &std::ffi::CString::new(assumption).unwrap_or_default(),
            1,
        )?;
    }
    Ok(flow)
}

#[pymodule]
fn flows(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the `flow` binary does first thing: candle's element-wise pool stays off the
    // cores the compute pool needs, and this (the main) thread computes as one of the
    // pool's threads instead of competing with them.
    flow_nn::pin_thread_count();
    flow_nn::retain_freed_memory();
    flow_core::join_cpu_pool();
    m.add_class::<Flow>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(import_weights, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
