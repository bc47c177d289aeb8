//! Image data: `.npy` arrays of images, IDX files (the MNIST format), plain or
//! gzipped, and the built-in 8×8 digits.
//!
//! Every image becomes one row of C·H·W values in (C, H, W) order, the layout the
//! image flows work on.

use std::{io::Read, path::Path, sync::OnceLock};

use super::{files::open_npy, parse_csv, Dataset};
use crate::DataError;

/// Channels, height and width of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDims {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageDims {
    /// Values per image, C·H·W.
    #[allow(clippy::len_without_is_empty)] // a count of pixel values, not a container
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Images as rows of C·H·W pixel values in (C, H, W) order, and their dims when the
/// file records them.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub dims: Option<ImageDims>,
    pub data: Dataset,
}

/// Pixel levels of [`digits`]: values 0..=16.
pub const DIGITS_LEVELS: u32 = 17;

/// scikit-learn's digits as shipped: 1 797 lines of 64 pixels (8×8, row-major) and
/// the class label (0–9) last.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// The digits parsed once: images and labels.
fn digits_parsed() -> &'static (Images, Vec<u8>) {
    static DIGITS: OnceLock<(Images, Vec<u8>)> = OnceLock::new();
    DIGITS.get_or_init(|| {
        let csv = flate2::read::GzDecoder::new(DIGITS_CSV_GZ);
        // The file is part of the crate and the tests read it, so failing here is a
        // build defect, not bad input.
        let rows = parse_csv(csv, "digits").expect("the shipped digits file parses");
        assert_eq!(rows.dim, 65, "digits: 64 pixels and a label per line");
        let mut values = Vec::with_capacity(rows.len() * 64);
        let mut labels = Vec::with_capacity(rows.len());
        for row in rows.values.chunks_exact(65) {
            values.extend_from_slice(&row[..64]);
            labels.push(row[64] as u8);
        }
        let dims = ImageDims {
            channels: 1,
            height: 8,
            width: 8,
        };
        let images = Images {
            dims: Some(dims),
            data: Dataset::new(64, values),
        };
        (images, labels)
    })
}

/// scikit-learn's 8×8 digits: 1 797 images, 1 channel, pixel values 0..=16
/// ([`DIGITS_LEVELS`] levels), in the file's order.
pub fn digits() -> Images {
    digits_parsed().0.clone()
}

/// The class (0–9) of each of the [`digits`], in the same order.
pub fn digits_labels() -> Vec<u8> {
    digits_parsed().1.clone()
}

/// Checks that every value is a whole number in `[0, levels)`; the error, called
/// `what`, names the first offending row and column (1-based) and the value.
pub fn check_pixels(data: &Dataset, levels: u32, what: &str) -> Result<(), DataError> {
    let top = levels as f32;
    let bad = if data.holds_pixels() {
        // Bytes are whole numbers from 0: only the top can be exceeded.
        data.pixels.iter().position(|&b| u32::from(b) >= levels)
    } else {
        data.values
            .iter()
            .position(|&v| !(v >= 0.0 && v < top && v.fract() == 0.0))
    };
    match bad {
        None => Ok(()),
        Some(i) => {
            let dim = data.dim.max(1);
            let (row, col) = (i / dim + 1, i % dim + 1);
            Err(DataError::new(
                what,
                None,
                format!(
                    "row {row}, column {col}: {} is not a pixel value (whole numbers 0 to {})",
                    data.value(i),
                    i64::from(levels) - 1
                ),
            ))
        }
    }
}

/// Loads images, choosing the format by content and extension:
///
/// - `.npy` (or content starting with the npy magic): `(N, H, W)` (one channel) or
///   `(N, C, H, W)` arrays of uint8, int8/16/32/64, float32 or float64, and also
///   `(N, D)` rows, whose dims are `None`;
/// - IDX (the MNIST format; content starting with two zero bytes, or an extension
///   like `idx3-ubyte`): elements u8, i8, i16, i32, f32 or f64, 3 dims `N×H×W` or 4
///   dims `N×C×H×W`;
/// - `.csv`: CSV rows (see [`parse_csv`]), dims `None`;
/// - anything else is an error.
///
/// Any of these may be gzipped: gzip is recognised by its magic bytes, with or
/// without a `.gz` name. Every malformed file is an error naming it. Memory stays
/// within a small multiple of the (decompressed) file: sizes in headers are checked
/// against the bytes present before anything is allocated for them.
pub fn load_images(path: &Path) -> Result<Images, DataError> {
    let bytes = std::fs::read(path)
        .map_err(|e| DataError::new(path.display().to_string(), None, e.to_string()))?;
    images_from_bytes(bytes, path)
}

/// [`load_images`], the rows held as bytes ([`Dataset::pixels`]) when every value is a
/// whole number from 0 to 255, as in 8-bit image files: a quarter of the memory, and
/// no copy in floats on the way.
pub fn load_pixel_images(path: &Path) -> Result<Images, DataError> {
    let bytes = std::fs::read(path)
        .map_err(|e| DataError::new(path.display().to_string(), None, e.to_string()))?;
    read_images(bytes, path, Rows::Pixels)
}

/// [`load_images`] on the bytes of a file already read: `path` names it in errors, and
/// its extension counts as there.
pub fn images_from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Images, DataError> {
    read_images(bytes, path, Rows::Values)
}

/// How loaded rows are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// As `f32` values.
    Values,
    /// As bytes when every value is one.
    Pixels,
}

fn read_images(mut bytes: Vec<u8>, path: &Path, rows: Rows) -> Result<Images, DataError> {
    let name = path.display().to_string();
    let fail = |m: String| DataError::new(&name, None, m);
    if bytes.starts_with(&[0x1f, 0x8b]) {
        // Multi-member, like gzip itself: concatenated .gz files are one stream.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes.as_slice())
            .read_to_end(&mut plain)
            .map_err(|e| fail(format!("corrupt gzip data: {e}")))?;
        bytes = plain;
    }
    // The extension of the data inside: `x.npy.gz` is an .npy file.
    let inner = path
        .file_name()
        .map(|f| f.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let inner = inner.strip_suffix(".gz").unwrap_or(&inner);
    let ext = inner.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let named_idx = inner.ends_with("ubyte") || ext.starts_with("idx");
    if bytes.starts_with(b"\x93NUMPY") || ext == "npy" {
        npy_images(bytes, &name, rows)
    } else if bytes.starts_with(&[0, 0]) || named_idx {
        // Text never starts with two NUL bytes, so this cannot steal a CSV file.
        idx_images(&bytes, &name, rows)
    } else if ext == "csv" {
        let data = parse_csv(bytes.as_slice(), &name)?;
        let data = match rows {
            Rows::Values => data,
            Rows::Pixels => data.into_pixels(),
        };
        Ok(Images { dims: None, data })
    } else {
        let what = if ext.is_empty() {
            "no extension".to_string()
        } else {
            format!("unknown extension `.{ext}`")
        };
        Err(fail(format!(
            "{what}: image files are .csv, .npy or IDX (optionally gzipped)"
        )))
    }
}

/// Images from the bytes of a `.npy` file (see [`load_images`]).
fn npy_images(bytes: Vec<u8>, name: &str, rows: Rows) -> Result<Images, DataError> {
    let fail = |m: String| DataError::new(name, None, m);
    let len = bytes.len() as u64;
    let array = open_npy(std::io::Cursor::new(bytes), len, name)?;
    let (n, dims) = match *array.shape {
        [n, d] => (
            n,
            ImageDims {
                channels: 1,
                height: 1,
                width: d,
            },
        ),
        [n, h, w] => (
            n,
            ImageDims {
                channels: 1,
                height: h,
                width: w,
            },
        ),
        [n, c, h, w] => (
            n,
            ImageDims {
                channels: c,
                height: h,
                width: w,
            },
        ),
        ref s => {
            return Err(fail(format!(
                "expected images (N, H, W) or (N, C, H, W), or rows (N, D); got {} dimensions",
                s.len()
            )))
        }
    };
    let recorded = (array.shape.len() > 2).then_some(dims);
    let data = gather(array.values, n, dims.len(), name, rows)?;
    Ok(Images {
        dims: recorded,
        data,
    })
}

/// Reads `n` rows of `dim` values, all finite, held as `rows` says: as bytes until a
/// value is not one (then all as `f32`). The element count was checked against the
/// file's length, so the allocation is bounded by the file.
fn gather(
    values: impl Iterator<Item = std::io::Result<f32>>,
    n: usize,
    dim: usize,
    name: &str,
    rows: Rows,
) -> Result<Dataset, DataError> {
    let fail = |m: String| DataError::new(name, None, m);
    if n == 0 || dim == 0 {
        return Err(fail("no images: the array is empty".into()));
    }
    let mut floats = Vec::new();
    let mut bytes = Vec::new();
    match rows {
        Rows::Values => floats.reserve_exact(n * dim),
        Rows::Pixels => bytes.reserve_exact(n * dim),
    }
    for v in values {
        let v = v.map_err(|e| fail(format!("cannot read the array: {e}")))?;
        let read = floats.len() + bytes.len();
        if !v.is_finite() {
            let (row, col) = (read / dim + 1, read % dim + 1);
            return Err(fail(format!(
                "row {row}, column {col} is {v}: values must be finite"
            )));
        }
        if floats.is_empty() && rows == Rows::Pixels {
            if (0.0..=255.0).contains(&v) && v.fract() == 0.0 {
                bytes.push(v as u8);
                continue;
            }
            floats.reserve_exact(n * dim);
            floats.extend(bytes.drain(..).map(f32::from));
            bytes.shrink_to_fit();
        }
        floats.push(v);
    }
    let read = floats.len() + bytes.len();
    if read != n * dim {
        return Err(fail(format!(
            "the array ends after {read} of {} values",
            n * dim
        )));
    }
    Ok(if floats.is_empty() {
        Dataset::from_pixels(dim, bytes)
    } else {
        Dataset::new(dim, floats)
    })
}

/// Images from the bytes of an IDX file: magic `00 00 tt nn` (element type `tt`,
/// `nn` dimensions), `nn` big-endian u32 sizes, then the elements, big-endian.
fn idx_images(bytes: &[u8], name: &str, rows: Rows) -> Result<Images, DataError> {
    let fail = |m: String| DataError::new(name, None, m);
    let Some(magic) = bytes.get(..4) else {
        return Err(fail(format!(
            "truncated IDX file: {} bytes, no header",
            bytes.len()
        )));
    };
    if magic[..2] != [0, 0] {
        return Err(fail(format!(
            "not an IDX file: bad magic {:02x} {:02x} {:02x} {:02x}",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    let size = match magic[2] {
        0x08 | 0x09 => 1,
        0x0b => 2,
        0x0c | 0x0d => 4,
        0x0e => 8,
        t => return Err(fail(format!("unknown IDX element type 0x{t:02x}"))),
    };
    let rank = usize::from(magic[3]);
    if rank != 3 && rank != 4 {
        return Err(fail(format!(
            "IDX file of {rank} dimensions: images need 3 (N×H×W) or 4 (N×C×H×W)"
        )));
    }
    let header = 4 + 4 * rank;
    let Some(size_bytes) = bytes.get(4..header) else {
        return Err(fail(format!(
            "truncated IDX file: {} bytes, the header needs {header}",
            bytes.len()
        )));
    };
    let shape: Vec<u64> = size_bytes
        .chunks_exact(4)
        .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    // In u64 with overflow checks: four u32 sizes can exceed 64 bits.
    let need = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d));
    let have = (bytes.len() - header) as u64;
    if need != Some(have) {
        let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(fail(format!(
            "IDX dims {shape:?} of {size}-byte elements need {need} data bytes, the file holds {have}"
        )));
    }
    // Every size is now bounded by the file's length.
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let (n, dims) = match *shape {
        [n, h, w] => (
            n,
            ImageDims {
                channels: 1,
                height: h,
                width: w,
            },
        ),
        // The rank was checked to be 3 or 4; a 4-D file is N×C×H×W like .npy.
        _ => (
            shape[0],
            ImageDims {
                channels: shape[1],
                height: shape[2],
                width: shape[3],
            },
        ),
    };
    let body = &bytes[header..];
    let elements = body.chunks_exact(size);
    let decode: Box<dyn Iterator<Item = f32> + '_> = match magic[2] {
        0x08 => Box::new(body.iter().map(|&b| f32::from(b))),
        0x09 => Box::new(body.iter().map(|&b| f32::from(b as i8))),
        0x0b => Box::new(elements.map(|b| f32::from(i16::from_be_bytes([b[0], b[1]])))),
        0x0c => Box::new(elements.map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f32)),
        0x0d => Box::new(elements.map(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        _ => Box::new(elements.map(|b| {
            let mut e = [0u8; 8];
            e.copy_from_slice(b);
            f64::from_be_bytes(e) as f32
        })),
    };
    let data = gather(decode.map(Ok), n, dims.len(), name, rows)?;
    Ok(Images {
        dims: Some(dims),
        data,
    })
}
