/// A problem with input data, naming the source and, where it applies, the line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}{}: {message}", line.map(|l| format!(": line {l}")).unwrap_or_default())]
pub struct DataError {
    /// File path or data set name.
    pub source_name: String,
    /// 1-based line number.
    pub line: Option<usize>,
    pub message: String,
}

impl DataError {
    pub fn new(
        source_name: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            source_name: source_name.into(),
            line,
            message: message.into(),
        }
    }
}

/// Why training could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Settings out of range, or a checkpoint that does not continue this run.
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Data(#[from] DataError),
    /// Reading or writing a checkpoint (the error names the file).
    #[error(transparent)]
    Io(#[from] flow_io::IoError),
    /// A file that is a valid checkpoint but holds no training state, or a broken one.
    #[error("{path}: {message}")]
    NotResumable {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Candle(#[from] candle::Error),
}
