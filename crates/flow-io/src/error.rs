use std::path::PathBuf;

/// Why a checkpoint or weights file could not be read or written. Every variant names
/// the file, and the tensor where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file ({reason})")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{path}: not a flows checkpoint (metadata `{key}` missing); use `flow import` for other tools' weights")]
    MissingMetadata { path: PathBuf, key: &'static str },
    #[error("{path}: invalid model configuration: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{path}: checkpoint format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor `{name}`")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected a float type")]
    BadDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` holds NaN or infinite values")]
    NonFinite { path: PathBuf, name: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Candle {
        path: PathBuf,
        #[source]
        source: candle::Error,
    },
}

impl IoError {
    pub(crate) fn candle(path: &std::path::Path) -> impl FnOnce(candle::Error) -> Self + '_ {
        move |source| Self::Candle {
            path: path.to_path_buf(),
            source,
        }
    }
}
