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
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Candle(#[from] candle::Error),
}
