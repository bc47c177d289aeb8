use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
};

use candle::{DType, Device, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, VarBuilder, VarMap};
use flow_core::Flow;
use flow_models::{ModelConfig, Registry};
use safetensors::{tensor::TensorView, SafeTensors};

use crate::{write_atomic, IoError};

/// The checkpoint format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Tensors whose names start with this belong to an application's state saved beside
/// the model (a training run's optimizer moments, say), not to the model; loaders of
/// models ignore them.
pub const STATE_PREFIX: &str = "train_state.";

const KEY_FORMAT: &str = "format";
const KEY_VERSION: &str = "format_version";
const KEY_CONFIG: &str = "model_config";
const KEY_SUMMARY: &str = "training_summary";
const FORMAT_NAME: &str = "flows";

/// The contents of a checkpoint file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: ModelConfig,
    /// The training summary, if the model was trained.
    pub summary: Option<serde_json::Value>,
    /// Other metadata entries, kept as they are (optimizer state and the like).
    pub extra: BTreeMap<String, String>,
    /// Every tensor, by name, on the CPU in the dtype it was stored in.
    pub tensors: HashMap<String, Tensor>,
}

/// Writes a checkpoint atomically. `extra` metadata entries may not reuse the keys the
/// format reserves.
pub fn save(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    summary: Option<&serde_json::Value>,
    extra: &BTreeMap<String, String>,
) -> Result<(), IoError> {
    write_atomic(path, &serialize(path, config, tensors, summary, extra)?)
}

/// The bytes [`save`] writes (errors name `path`).
pub(crate) fn serialize(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    summary: Option<&serde_json::Value>,
    extra: &BTreeMap<String, String>,
) -> Result<Vec<u8>, IoError> {
    let invalid = |message: String| IoError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert(KEY_FORMAT.into(), FORMAT_NAME.into());
    meta.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
    let cfg = serde_json::to_string(config).map_err(|e| invalid(e.to_string()))?;
    meta.insert(KEY_CONFIG.into(), cfg);
    if let Some(s) = summary {
        meta.insert(KEY_SUMMARY.into(), s.to_string());
    }
    for (k, v) in extra {
        if meta.insert(k.clone(), v.clone()).is_some() {
            return Err(invalid(format!("metadata key `{k}` is reserved")));
        }
    }
    let mut sorted: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .map_err(IoError::candle(path))?;
        sorted.push((name, t));
    }
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize(sorted.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| invalid(format!("cannot serialise: {e}")))
}

/// Reads the header and tensors of `bytes` (already read from `path`).
pub(crate) fn parse_safetensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<SafeTensors<'a>, IoError> {
    SafeTensors::deserialize(bytes).map_err(|e| IoError::NotSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, IoError> {
    std::fs::read(path).map_err(|source| IoError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Converts one stored tensor to a candle tensor on the CPU (f16/bf16/f32/f64 only).
pub(crate) fn to_tensor(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor, IoError> {
    use candle::safetensors::Load;
    match view.dtype() {
        safetensors::Dtype::F16
        | safetensors::Dtype::BF16
        | safetensors::Dtype::F32
        | safetensors::Dtype::F64 => view.load(&Device::Cpu).map_err(IoError::candle(path)),
        other => Err(IoError::BadDtype {
            path: path.to_path_buf(),
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Reads a checkpoint: its metadata and all its tensors.
pub fn load(path: &Path) -> Result<Checkpoint, IoError> {
    load_bytes(path, &read_file(path)?)
}

/// Parses checkpoint `bytes` (errors name `path`).
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint, IoError> {
    let st = parse_safetensors(path, bytes)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| IoError::NotSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    let mut take = |key: &'static str| {
        meta.remove(key).ok_or(IoError::MissingMetadata {
            path: path.to_path_buf(),
            key,
        })
    };
    let format = take(KEY_FORMAT)?;
    if format != FORMAT_NAME {
        return Err(IoError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("format is `{format}`, expected `{FORMAT_NAME}`"),
        });
    }
    let version = take(KEY_VERSION)?;
    if version.trim() != FORMAT_VERSION.to_string() {
        return Err(IoError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let config: ModelConfig =
        serde_json::from_str(&take(KEY_CONFIG)?).map_err(|e| IoError::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let summary = meta
        .remove(KEY_SUMMARY)
        .and_then(|s| serde_json::from_str(&s).ok());
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = to_tensor(path, &name, &view)?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint {
        config,
        summary,
        extra: meta,
        tensors,
    })
}

/// A model rebuilt from a checkpoint, with its tensors held as trainable variables.
pub struct LoadedModel {
    pub flow: Flow,
    pub varmap: VarMap,
    pub checkpoint: Checkpoint,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("flow", &self.flow)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

/// Rebuilds the flow of `checkpoint` (read from `path`) on `device` in `dtype`, after
/// checking that its tensors are exactly those the configuration needs, with the right
/// shapes and finite values. Layers of the built-in families only; see
/// [`build_checked_with`].
pub fn build_checked(
    path: &Path,
    checkpoint: Checkpoint,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, IoError> {
    build_checked_with(path, checkpoint, &Registry::builtin(), dtype, device)
}

/// [`build_checked`] with the layer families of `registry`. The flow is built once,
/// over the checkpoint's values: the layers' own checks at construction (positive
/// standard deviations, say) see the real weights.
pub fn build_checked_with(
    path: &Path,
    checkpoint: Checkpoint,
    registry: &Registry,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, IoError> {
    // Sizes and settings first, before anything is allocated.
    checkpoint
        .config
        .validate_with(registry)
        .map_err(|reason| IoError::BadConfig {
            path: path.to_path_buf(),
            reason,
        })?;
    let varmap = VarMap::new();
    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = FromCheckpoint {
        tensors: checkpoint.tensors.clone(),
        varmap: varmap.clone(),
        asked: asked.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = checkpoint.config.build_with(registry, vb);
    let asked = asked
        .lock()
        .map_err(|_| IoError::Invalid {
            path: path.to_path_buf(),
            message: "variable list poisoned".into(),
        })?
        .clone();
    // The tensors first: a missing or broken one is why a build over it fails.
    for (name, dims) in &asked {
        check_tensor(path, &checkpoint.tensors, name, dims)?;
    }
    let flow = built.map_err(|e| IoError::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // A build that stopped early asked for only some of the tensors: the others are
    // known unexpected only after a whole build.
    let mut names: Vec<&String> = checkpoint.tensors.keys().collect();
    names.sort();
    let model_tensor = |n: &&String| !n.starts_with(STATE_PREFIX);
    if let Some(name) = names
        .into_iter()
        .filter(model_tensor)
        .find(|n| !asked.contains_key(*n))
    {
        return Err(IoError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    Ok(LoadedModel {
        flow,
        varmap,
        checkpoint,
    })
}

/// Checks the checkpoint's tensor `name` against the shape `dims` the model asked for:
/// present, of that shape, and finite.
fn check_tensor(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
) -> Result<(), IoError> {
    let Some(t) = tensors.get(name) else {
        return Err(IoError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    };
    if t.dims() != dims {
        return Err(IoError::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: dims.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    let finite = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .map_err(IoError::candle(path))?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(IoError::NonFinite {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Variables made from a checkpoint's tensors as the model asks for them, each asked
/// name and shape noted for the checks after the build. A tensor that is missing or of
/// another shape is stood in for by zeros, so that the build goes on; the checks then
/// refuse the checkpoint.
struct FromCheckpoint {
    tensors: HashMap<String, Tensor>,
    varmap: VarMap,
    asked: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for FromCheckpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle::Result<Tensor> {
        let poisoned = || candle::Error::Msg("variable map poisoned".into());
        let mut vars = self.varmap.data().lock().map_err(|_| poisoned())?;
        if let Some(existing) = vars.get(name) {
            if existing.shape() != &s {
                candle::bail!("shape mismatch on {name}: {s:?} <> {:?}", existing.shape());
            }
            return Ok(existing.as_tensor().clone());
        }
        self.asked
            .lock()
            .map_err(|_| poisoned())?
            .insert(name.to_string(), s.dims().to_vec());
        // A copy: the variable trains in place, and the checkpoint keeps what it read.
        let value = match self.tensors.get(name) {
            Some(t) if t.shape() == &s => t.to_dtype(dtype)?.to_device(dev)?.copy()?,
            _ => Tensor::zeros(s, dtype, dev)?,
        };
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle::Result<Tensor> {
        self.varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("variable map poisoned".into()))?
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle::Error::CannotFindTensor { path: name.into() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Reads a checkpoint and rebuilds its flow on `device` in `dtype`.
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel, IoError> {
    let checkpoint = load(path)?;
    build_checked(path, checkpoint, dtype, device)
}
