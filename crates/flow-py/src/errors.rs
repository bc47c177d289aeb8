//! Library errors as Python exceptions: `OSError` for a file that cannot be read or
//! written, `ValueError` for everything else, each with the first line of the
//! library's message (the line the `flow` command prints).

use pyo3::{
    exceptions::{PyOSError, PyValueError},
    PyErr,
};

/// A failure, as the library reports it.
#[derive(Debug)]
pub enum Fail {
    /// Reading or writing a file.
    File(String),
    /// Anything the caller gave that does not work.
    Value(String),
}

/// The first non-empty line of `message`: candle appends a backtrace after a newline
/// when `RUST_BACKTRACE` is set.
fn first_line(message: &str) -> String {
    message
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .to_string()
}

impl Fail {
    pub fn into_py(self) -> PyErr {
        match self {
            Fail::File(m) => PyOSError::new_err(first_line(&m)),
            Fail::Value(m) => PyValueError::new_err(first_line(&m)),
        }
    }
}

impl From<String> for Fail {
    fn from(m: String) -> Self {
        Fail::Value(m)
    }
}

impl From<&str> for Fail {
    fn from(m: &str) -> Self {
        Fail::Value(m.to_string())
    }
}

impl From<flow_io::IoError> for Fail {
    fn from(e: flow_io::IoError) -> Self {
        match e {
            flow_io::IoError::Io { .. } => Fail::File(e.to_string()),
            other => Fail::Value(other.to_string()),
        }
    }
}

impl From<flow_train::TrainError> for Fail {
    fn from(e: flow_train::TrainError) -> Self {
        match e {
            flow_train::TrainError::Io(io) => io.into(),
            other => Fail::Value(other.to_string()),
        }
    }
}

impl From<flow_train::DataError> for Fail {
    fn from(e: flow_train::DataError) -> Self {
        Fail::Value(e.to_string())
    }
}

impl From<candle::Error> for Fail {
    fn from(e: candle::Error) -> Self {
        Fail::Value(e.to_string())
    }
}

pub fn value_error(message: impl Into<String>) -> PyErr {
    Fail::Value(message.into()).into_py()
}
