//! Training rows read from a file as they are needed, for data larger than memory:
//! `.npy` arrays and uncompressed IDX files, whose rows have a fixed size and so lie
//! at offsets known from the header.
//!
//! The rows fall into chunks of `chunk_rows` consecutive rows. Each epoch visits the
//! chunks in an order seeded from `(seed, epoch)` and each chunk's rows in an order
//! seeded from `(seed, epoch, chunk)`; one chunk is held in memory at a time. With a
//! single chunk the order is the one a run holding every row in memory takes.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use flow_core::limits::{check_at_most, MAX_ROWS, MAX_TENSOR_ELEMENTS};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::{files::open_npy, Dataset, ImageDims, Moments};
use crate::{state::Fingerprint, DataError};

/// Rows per chunk unless told otherwise: a few MiB of images, and enough rows that a
/// batch draws from a well-mixed part of the file only within one chunk.
pub const DEFAULT_CHUNK_ROWS: usize = 8192;

/// The seed of epoch `epoch`'s order of the rows in a run seeded with `seed`.
pub(crate) fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `0..n` shuffled by a generator seeded with `seed`.
pub(crate) fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    order
}

/// The kind of a stored element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    U8,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::I64 | Self::F64 => 8,
        }
    }
}

/// A stored element type: its kind and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Element {
    kind: Kind,
    big_endian: bool,
}

impl Element {
    /// The element at the start of `b`, as f32.
    fn decode(self, b: &[u8]) -> f32 {
        macro_rules! read {
            ($t:ty, $n:expr) => {{
                let mut a = [0u8; $n];
                a.copy_from_slice(&b[..$n]);
                if self.big_endian {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }
            }};
        }
        match self.kind {
            Kind::U8 => f32::from(b[0]),
            Kind::I8 => f32::from(b[0] as i8),
            Kind::I16 => f32::from(read!(i16, 2)),
            Kind::I32 => read!(i32, 4) as f32,
            Kind::I64 => read!(i64, 8) as f32,
            Kind::F32 => read!(f32, 4),
            Kind::F64 => read!(f64, 8) as f32,
        }
    }
}

/// A data file whose rows are read a chunk at a time (see the module's description).
#[derive(Debug, Clone)]
pub struct StreamSource {
    path: PathBuf,
    name: String,
    data_offset: u64,
    rows: usize,
    /// Values per row in the file, context columns included.
    width: usize,
    element: Element,
    dims: Option<ImageDims>,
    context_dim: usize,
    chunk_rows: usize,
}

impl StreamSource {
    /// Opens `path`, an uncompressed `.npy` array or IDX file, to stream in chunks of
    /// `chunk_rows` rows; only its header is read. `images` accepts image arrays
    /// (`N×H×W`, `N×C×H×W`) besides rows (`N`, `N×D`). The last `context_dim` columns
    /// of every row are its context.
    pub fn open(
        path: &Path,
        chunk_rows: usize,
        images: bool,
        context_dim: usize,
    ) -> Result<Self, DataError> {
        let name = path.display().to_string();
        let fail = |m: String| DataError::new(&name, None, m);
        let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
        let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        let mut magic = [0u8; 6];
        let got = file.read(&mut magic).map_err(|e| fail(e.to_string()))?;
        let magic = &magic[..got];
        let lower = name.to_ascii_lowercase();
        let (data_offset, shape, element) = if magic.starts_with(&[0x1f, 0x8b]) {
            return Err(fail(
                "gzipped: streaming reads rows at their offsets, which compressed data lack; decompress it first (gunzip -k)".into(),
            ));
        } else if magic.starts_with(b"\x93NUMPY") || lower.ends_with(".npy") {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| fail(e.to_string()))?;
            npy_layout(file, len, &name)?
        } else if magic.starts_with(&[0, 0]) || lower.ends_with("ubyte") || lower.contains(".idx") {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| fail(e.to_string()))?;
            idx_layout(file, len, &name)?
        } else {
            return Err(fail(
                "cannot be streamed: streaming reads .npy and uncompressed IDX files, whose rows have a fixed size (CSV rows do not)".into(),
            ));
        };
        let (rows, width, dims) = match *shape {
            [n] => (n, 1, None),
            [n, d] => (n, d, None),
            [n, h, w] if images => (n, h * w, Some(image(1, h, w))),
            [n, c, h, w] if images => (n, c * h * w, Some(image(c, h, w))),
            ref s => {
                return Err(fail(format!(
                    "expected rows (N, D){}; got {} dimensions",
                    if images { " or images" } else { "" },
                    s.len()
                )))
            }
        };
        if rows == 0 || width == 0 {
            return Err(fail("the array is empty".into()));
        }
        check_at_most("rows in the file", rows, MAX_ROWS).map_err(fail)?;
        if context_dim >= width {
            return Err(fail(format!(
                "{width} columns per row: too few for {context_dim} context columns and at least one feature"
            )));
        }
        let source = Self {
            path: path.to_path_buf(),
            name: name.clone(),
            data_offset,
            rows,
            width,
            element,
            dims,
            context_dim,
            chunk_rows: 1,
        };
        source.with_chunk_rows(chunk_rows)
    }

    /// The same file in chunks of `chunk_rows` rows: at least 1, and a chunk's values
    /// within the limit of one tensor.
    pub fn with_chunk_rows(mut self, chunk_rows: usize) -> Result<Self, DataError> {
        let fail = |m: String| DataError::new(&self.name, None, m);
        if chunk_rows == 0 {
            return Err(fail("a chunk must hold at least 1 row, got 0".into()));
        }
        check_at_most("rows per chunk", chunk_rows, MAX_ROWS).map_err(fail)?;
        let values = chunk_rows.min(self.rows).saturating_mul(self.width);
        check_at_most("values per chunk", values, MAX_TENSOR_ELEMENTS).map_err(fail)?;
        self.chunk_rows = chunk_rows;
        Ok(self)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows in the file.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Features per row (the context not counted).
    pub fn dim(&self) -> usize {
        self.width - self.context_dim
    }

    pub fn context_dim(&self) -> usize {
        self.context_dim
    }

    /// The images' shape, if the file records it.
    pub fn dims(&self) -> Option<ImageDims> {
        self.dims
    }

    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Chunks in the file: the last may be shorter.
    pub fn chunks(&self) -> usize {
        self.rows.div_ceil(self.chunk_rows)
    }

    /// Rows in chunk `chunk` (in file order).
    pub fn chunk_len(&self, chunk: usize) -> usize {
        self.chunk_rows.min(self.rows - chunk * self.chunk_rows)
    }

    /// Epoch `epoch`'s order of the chunks.
    pub fn chunk_order(&self, seed: u64, epoch: usize) -> Vec<usize> {
        let mix = epoch_seed(seed, epoch).rotate_left(29) ^ 0x5851_F42D_4C95_7F2D;
        shuffled(self.chunks(), mix)
    }

    /// Epoch `epoch`'s order of the rows of chunk `chunk`, as indices into the chunk.
    /// Chunk 0's seed is the epoch's own: one chunk is shuffled as rows in memory are.
    pub fn row_order(&self, seed: u64, epoch: usize, chunk: usize) -> Vec<usize> {
        let mix = epoch_seed(seed, epoch) ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        shuffled(self.chunk_len(chunk), mix)
    }

    /// Opens the file for reading chunks.
    pub fn reader(&self) -> Result<ChunkReader<'_>, DataError> {
        let file =
            File::open(&self.path).map_err(|e| DataError::new(&self.name, None, e.to_string()))?;
        Ok(ChunkReader {
            source: self,
            file,
            bytes: Vec::new(),
        })
    }

    /// Reads every chunk in file order, one at a time: checks the values (finite; with
    /// `levels`, whole pixel values below it) and returns the data's
    /// [`fingerprint`](crate::fingerprint), with `standardize` the mean and standard
    /// deviation of the features, and those of the context when there is one, each
    /// the numbers the same rows held in memory give.
    pub fn scan(&self, standardize: bool, levels: Option<u32>) -> Result<Scan, DataError> {
        let mut reader = self.reader()?;
        let mut fingerprint = Fingerprint::new(self.dim(), self.rows);
        let mut moments = Moments::new(self.rows, self.dim());
        let mut context_moments = Moments::new(self.rows, self.context_dim);
        let context = self.context_dim > 0;
        for chunk in 0..self.chunks() {
            let data = reader.read(chunk)?;
            if let Some(levels) = levels {
                self.check_pixels(&data, levels, chunk)?;
            }
            fingerprint.add_rows(&data);
            if standardize {
                moments.add_to_mean(&data.values_f32());
            }
            if context {
                context_moments.add_to_mean(&data.context);
            }
        }
        if context {
            fingerprint.start_context(self.context_dim);
        }
        if standardize || context {
            for chunk in 0..self.chunks() {
                let data = reader.read(chunk)?;
                fingerprint.add_context(&data.context);
                if standardize {
                    moments.add_to_variance(&data.values_f32());
                }
                if context {
                    context_moments.add_to_variance(&data.context);
                }
            }
        }
        Ok(Scan {
            fingerprint: fingerprint.finish(),
            moments: standardize.then(|| moments.finish()),
            context_moments: context.then(|| context_moments.finish()),
        })
    }

    fn check_pixels(&self, data: &Dataset, levels: u32, chunk: usize) -> Result<(), DataError> {
        let values = data.values_f32();
        let top = levels as f32;
        let Some(i) = values
            .iter()
            .position(|&v| !(v >= 0.0 && v < top && v.fract() == 0.0))
        else {
            return Ok(());
        };
        let row = chunk * self.chunk_rows + i / data.dim + 1;
        Err(DataError::new(
            &self.name,
            None,
            format!(
                "row {row}, column {}: {} is not a pixel value (whole numbers 0 to {})",
                i % data.dim + 1,
                values[i],
                i64::from(levels) - 1
            ),
        ))
    }
}

/// What a pass over a streamed file found (see [`StreamSource::scan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    pub fingerprint: String,
    /// Per-feature mean and standard deviation, when asked for.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    /// Per-context-column mean and standard deviation, when rows have a context.
    pub context_moments: Option<(Vec<f32>, Vec<f32>)>,
}

/// An open streamed file, reading one chunk at a time.
#[derive(Debug)]
pub struct ChunkReader<'a> {
    source: &'a StreamSource,
    file: File,
    /// The last chunk's bytes, kept to be reused.
    bytes: Vec<u8>,
}

impl ChunkReader<'_> {
    /// The rows of chunk `chunk` in file order: bytes when the file stores bytes and
    /// there is no context, else `f32` values (and the context split off).
    pub fn read(&mut self, chunk: usize) -> Result<Dataset, DataError> {
        let s = self.source;
        let first = chunk * s.chunk_rows;
        let rows = s.chunk_len(chunk);
        let size = s.element.kind.size();
        let row_bytes = (s.width * size) as u64;
        let fail = |m: String| DataError::new(&s.name, None, m);
        self.bytes.resize(rows * s.width * size, 0);
        self.file
            .seek(SeekFrom::Start(s.data_offset + first as u64 * row_bytes))
            .and_then(|_| self.file.read_exact(&mut self.bytes))
            .map_err(|e| {
                fail(format!(
                    "cannot read rows {} to {}: {e}",
                    first + 1,
                    first + rows
                ))
            })?;
        if s.element.kind == Kind::U8 && s.context_dim == 0 {
            return Ok(Dataset::from_pixels(s.width, self.bytes.clone()));
        }
        let values: Vec<f32> = self
            .bytes
            .chunks_exact(size)
            .map(|b| s.element.decode(b))
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(fail(format!(
                "row {} holds a NaN or infinite value",
                first + i / s.width + 1
            )));
        }
        Dataset::new(s.width, values).split_context(s.context_dim, &s.name)
    }
}

fn image(channels: usize, height: usize, width: usize) -> ImageDims {
    ImageDims {
        channels,
        height,
        width,
    }
}

/// The data offset, shape and element type of a `.npy` file of `len` bytes (whose
/// sizes [`open_npy`] checks against the file).
fn npy_layout(file: File, len: u64, name: &str) -> Result<(u64, Vec<usize>, Element), DataError> {
    let array = open_npy(std::io::BufReader::new(file), len, name)?;
    let descr = array.descr.as_bytes();
    let kind = match descr.get(1..) {
        Some(b"u1") => Kind::U8,
        Some(b"i1") => Kind::I8,
        Some(b"i2") => Kind::I16,
        Some(b"i4") => Kind::I32,
        Some(b"i8") => Kind::I64,
        Some(b"f4") => Kind::F32,
        Some(b"f8") => Kind::F64,
        _ => {
            return Err(DataError::new(
                name,
                None,
                format!("unsupported array: element type `{}`", array.descr),
            ))
        }
    };
    let big_endian = descr.first() == Some(&b'>');
    Ok((array.data_offset, array.shape, Element { kind, big_endian }))
}

/// The data offset, shape and element type of an IDX file of `len` bytes, its sizes
/// checked against the file.
fn idx_layout(
    mut file: File,
    len: u64,
    name: &str,
) -> Result<(u64, Vec<usize>, Element), DataError> {
    let fail = |m: String| DataError::new(name, None, m);
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|_| fail(format!("truncated IDX file: {len} bytes, no header")))?;
    if magic[..2] != [0, 0] {
        return Err(fail("not an IDX file: bad magic".into()));
    }
    let kind = match magic[2] {
        0x08 => Kind::U8,
        0x09 => Kind::I8,
        0x0b => Kind::I16,
        0x0c => Kind::I32,
        0x0d => Kind::F32,
        0x0e => Kind::F64,
        t => return Err(fail(format!("unknown IDX element type 0x{t:02x}"))),
    };
    let rank = usize::from(magic[3]);
    if !(1..=4).contains(&rank) {
        return Err(fail(format!("IDX file of {rank} dimensions")));
    }
    let header = 4 + 4 * rank as u64;
    let mut sizes = vec![0u8; 4 * rank];
    file.read_exact(&mut sizes).map_err(|_| {
        fail(format!(
            "truncated IDX file: {len} bytes, the header needs {header}"
        ))
    })?;
    let shape: Vec<u64> = sizes
        .chunks_exact(4)
        .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    let need = shape
        .iter()
        .try_fold(kind.size() as u64, |acc, &d| acc.checked_mul(d));
    let have = len - header.min(len);
    if need != Some(have) {
        let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(fail(format!(
            "IDX dims {shape:?} of {}-byte elements need {need} data bytes, the file holds {have}",
            kind.size()
        )));
    }
    // Every size is now bounded by the file's length.
    let shape = shape.iter().map(|&d| d as usize).collect();
    Ok((
        header,
        shape,
        Element {
            kind,
            big_endian: true,
        },
    ))
}
