//! Training data: built-in 2-D generators, files, and images.

mod files;
mod holdout;
mod images;
mod toy;

pub use files::{
    chunks, column_names, load_csv, load_npy, load_path, parse_csv, CsvChunks, NpyChunks,
};
pub use holdout::{check_val_fraction, held_out_rows, hold_out, DEFAULT_VAL_FRACTION};
pub use images::{
    check_pixels, digits, digits_labels, images_from_bytes, load_images, ImageDims, Images,
    DIGITS_LEVELS,
};
pub use toy::{generate, generate_labeled, Toy};

use crate::DataError;

/// Rows of `dim` features, row-major, and for a conditional flow a context of
/// `context_dim` features per row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub dim: usize,
    pub values: Vec<f32>,
    pub context_dim: usize,
    /// `(len, context_dim)`, row-major; empty without a context.
    pub context: Vec<f32>,
}

impl Dataset {
    /// Rows of `dim` features, without a context.
    pub fn new(dim: usize, values: Vec<f32>) -> Self {
        Self {
            dim,
            values,
            ..Self::default()
        }
    }

    /// Moves the last `context_dim` columns of every row into the context (the layout
    /// of conditional data files). `what` names the data in the error.
    pub fn split_context(self, context_dim: usize, what: &str) -> Result<Self, DataError> {
        if context_dim == 0 {
            return Ok(self);
        }
        let width = self.dim + self.context_dim;
        if self.context_dim > 0 || context_dim >= width {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{width} columns per row: too few for {context_dim} context columns and at least one feature"
                ),
            ));
        }
        let dim = width - context_dim;
        let mut values = Vec::with_capacity(self.len() * dim);
        let mut context = Vec::with_capacity(self.len() * context_dim);
        for row in self.values.chunks_exact(width) {
            values.extend_from_slice(&row[..dim]);
            context.extend_from_slice(&row[dim..]);
        }
        Ok(Self {
            dim,
            values,
            context_dim,
            context,
        })
    }

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

    /// `(n, context_dim)` f32 tensor, or `None` without a context.
    pub fn context_tensor(
        &self,
        device: &candle::Device,
    ) -> candle::Result<Option<candle::Tensor>> {
        if self.context_dim == 0 {
            return Ok(None);
        }
        let shape = (self.context.len() / self.context_dim, self.context_dim);
        candle::Tensor::from_slice(&self.context, shape, device).map(Some)
    }
}
