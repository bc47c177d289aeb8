//! Training data: built-in 2-D generators, files, and images.

mod files;
mod holdout;
mod images;
mod moments;
mod stream;
mod toy;

pub use files::{
    chunks, column_names, load_csv, load_npy, load_path, parse_csv, CsvChunks, NpyChunks,
};
pub use holdout::{
    check_rows_left, check_val_fraction, held_out_rows, hold_out, DEFAULT_VAL_FRACTION,
};
pub use images::{
    check_pixels, digits, digits_labels, images_from_bytes, load_images, load_pixel_images,
    ImageDims, Images, DIGITS_LEVELS,
};
pub use moments::Moments;
pub(crate) use stream::{epoch_seed, shuffled};
pub use stream::{ChunkReader, Scan, StreamSource, DEFAULT_CHUNK_ROWS};
pub use toy::{generate, generate_labeled, Toy};

use crate::DataError;

/// Rows of `dim` features, row-major, and for a conditional flow a context of
/// `context_dim` features per row.
///
/// The rows are `values`, or, for pixel data, `pixels`: one byte per value, a quarter
/// of the memory (the trainer keeps them so and turns each batch into floats as it
/// dequantises it). [`Dataset::from_pixels`] and [`Dataset::into_pixels`] make such a
/// set; the one field in use holds the rows and the other is empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub dim: usize,
    pub values: Vec<f32>,
    /// The rows as bytes, in place of `values`.
    pub pixels: Vec<u8>,
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

    /// Rows of `dim` pixel values held as bytes, without a context.
    pub fn from_pixels(dim: usize, pixels: Vec<u8>) -> Self {
        Self {
            dim,
            pixels,
            ..Self::default()
        }
    }

    /// The rows as bytes when every value is a whole number from 0 to 255 (and there
    /// is no context); otherwise the set as it is.
    pub fn into_pixels(self) -> Self {
        let bytes = self.context_dim == 0
            && self
                .values
                .iter()
                .all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0);
        if !bytes || self.values.is_empty() {
            return self;
        }
        let pixels = self.values.iter().map(|&v| v as u8).collect();
        Self::from_pixels(self.dim, pixels)
    }

    /// Whether the rows are held as bytes.
    pub fn holds_pixels(&self) -> bool {
        !self.pixels.is_empty()
    }

    /// The rows as `f32` values: `values`, or the bytes widened (a copy).
    pub fn values_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.holds_pixels() {
            self.pixels.iter().map(|&b| f32::from(b)).collect()
        } else {
            std::borrow::Cow::Borrowed(&self.values)
        }
    }

    /// The value at `i` in the row-major rows.
    pub fn value(&self, i: usize) -> f32 {
        if self.holds_pixels() {
            f32::from(self.pixels[i])
        } else {
            self.values[i]
        }
    }

    /// The set with its rows as `f32` values.
    pub fn into_values(self) -> Self {
        if !self.holds_pixels() {
            return self;
        }
        Self {
            values: self.values_f32().into_owned(),
            pixels: Vec::new(),
            ..self
        }
    }

    /// Moves the last `context_dim` columns of every row into the context (the layout
    /// of conditional data files). `what` names the data in the error.
    pub fn split_context(self, context_dim: usize, what: &str) -> Result<Self, DataError> {
        if context_dim == 0 {
            return Ok(self);
        }
        let data = self.into_values();
        let width = data.dim + data.context_dim;
        if data.context_dim > 0 || context_dim >= width {
            return Err(DataError::new(
                what,
                None,
                format!(
                    "{width} columns per row: too few for {context_dim} context columns and at least one feature"
                ),
            ));
        }
        let dim = width - context_dim;
        let mut values = Vec::with_capacity(data.len() * dim);
        let mut context = Vec::with_capacity(data.len() * context_dim);
        for row in data.values.chunks_exact(width) {
            values.extend_from_slice(&row[..dim]);
            context.extend_from_slice(&row[dim..]);
        }
        Ok(Self {
            dim,
            values,
            pixels: Vec::new(),
            context_dim,
            context,
        })
    }

    pub fn len(&self) -> usize {
        let values = self.values.len().max(self.pixels.len());
        values.checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(n, dim)` tensor: f32, or u8 for rows held as bytes.
    pub fn to_tensor(&self, device: &candle::Device) -> candle::Result<candle::Tensor> {
        let shape = (self.len(), self.dim);
        if self.holds_pixels() {
            candle::Tensor::from_slice(&self.pixels, shape, device)
        } else {
            candle::Tensor::from_slice(&self.values, shape, device)
        }
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
