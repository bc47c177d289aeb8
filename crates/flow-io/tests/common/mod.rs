//! Helpers shared by the import tests: fixtures, temporary files, raw state dicts and
//! imports that must fail on one line naming a tensor.

#![allow(dead_code)]

use std::{collections::HashMap, path::PathBuf};

use anyhow::{ensure, Context, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow};
use flow_io::{import_bytes, ImportOptions, Source};
use flow_models::ModelConfig;
use safetensors::tensor::TensorView;

/// A fixture file of `tests/fixtures/interop`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/interop")
        .join(name)
}

/// A file in this test process's own temporary folder.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-import-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

/// `max |a − b|`, in f64.
pub fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// `imported` written as a model file `name` in the temporary folder; its path.
pub fn save_imported(imported: &flow_io::Imported, name: &str) -> Result<PathBuf> {
    let path = tmp(name);
    flow_io::save(
        &path,
        &imported.config,
        &imported.tensors,
        None,
        &Default::default(),
    )?;
    Ok(path)
}

/// A raw tensor: dtype, shape, little-endian bytes.
pub type Raw = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// The fixture `{stem}.safetensors` as raw tensors.
pub fn raw(stem: &str) -> Result<HashMap<String, Raw>> {
    let bytes = std::fs::read(fixture(&format!("{stem}.safetensors")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect())
}

/// `tensors` as a safetensors file's bytes.
pub fn serialize(tensors: &HashMap<String, Raw>) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| Ok((k.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Imports `tensors` as `source`: `Ok(None)` if they import, `Ok(Some(message))` for an
/// error on one line naming a tensor (in backticks), an error otherwise.
pub fn import_raw(
    source: Source,
    tensors: &HashMap<String, Raw>,
    what: &str,
) -> Result<Option<String>> {
    let bytes = serialize(tensors)?;
    let path = PathBuf::from(format!("{what}.safetensors"));
    match import_bytes(source, &path, &bytes, &ImportOptions::default()) {
        Ok(_) => Ok(None),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{what}: {msg}");
            ensure!(
                !msg.contains('\n') && msg.contains('`'),
                "{what}: the error does not name a tensor on one line: {msg}"
            );
            Ok(Some(msg))
        }
    }
}

/// `config` built over exactly `tensors` in `dtype`: every variable must be one of them.
/// It is built a second time over the set values, so that construction-time checks (an
/// autoregressive layer's masks against its order) see them, as loading a checkpoint
/// does.
pub fn build(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<Flow> {
    let varmap = VarMap::new();
    drop(config.build(seeded_var_builder(&varmap, 0, dtype, &Device::Cpu))?);
    let vars = varmap.data().lock().expect("lock").clone();
    ensure!(
        vars.len() == tensors.len(),
        "{} variables, {} tensors",
        vars.len(),
        tensors.len()
    );
    for (name, var) in &vars {
        let t = tensors
            .get(name)
            .with_context(|| format!("no tensor {name}"))?;
        var.set(&t.to_dtype(dtype)?)?;
    }
    Ok(config.build(seeded_var_builder(&varmap, 0, dtype, &Device::Cpu))?)
}
