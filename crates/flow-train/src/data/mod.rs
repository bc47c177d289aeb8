//! Training data: built-in 2-D generators and files.

mod files;
mod toy;

pub use files::{load_csv, load_npy, load_path, parse_csv};
pub use toy::{generate, Toy};

/// Rows of `dim` features, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub dim: usize,
    pub values: Vec<f32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(n, dim)` f32 tensor.
    pub fn to_tensor(&self, device: &candle::Device) -> candle::Result<candle::Tensor> {
        candle::Tensor::from_slice(&self.values, (self.len(), self.dim), device)
    }
}
