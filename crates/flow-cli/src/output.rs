//! Writing results, atomically, in the format the output file's extension names:
//! CSV at full f32 precision, NumPy `.npy` (little-endian f32), or a PNG picture; and
//! the checks every output passes before any work (its extension names its format —
//! `.safetensors` for a model, `.jsonl` for metrics too —, its folder takes a new file,
//! and it is none of the files the command reads).

use std::{fmt::Write as _, path::Path};

use crate::Failure;

/// The most rows a command generates (`flow sample --n`, `flow data --n`): without a
/// bound, a typo fills the disk.
pub use flow_core::limits::MAX_SAMPLES as MAX_ROWS;

/// The most points a PNG scatter draws (the points are held until the end).
pub const MAX_SCATTER: usize = 1 << 20;

/// The most images a PNG grid draws.
pub const MAX_GRID: usize = 1024;

/// `--n`, checked against [`MAX_ROWS`].
pub fn check_rows(n: usize) -> Result<usize, Failure> {
    match n {
        0 => Err("--n must be at least 1".into()),
        n if n > MAX_ROWS => Err(format!("--n {n}: at most {MAX_ROWS} rows").into()),
        n => Ok(n),
    }
}

/// A file format, named by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated text with a header line.
    Csv,
    /// A NumPy array of little-endian f32.
    Npy,
    /// A picture.
    Png,
    /// A model: its configuration and weights (safetensors).
    Safetensors,
    /// Training metrics, one JSON object per line.
    Jsonl,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Npy => "npy",
            Format::Png => "png",
            Format::Safetensors => "safetensors",
            Format::Jsonl => "jsonl",
        }
    }

    /// The format `path`'s extension names (any case), if it is one of `accepted`;
    /// otherwise an error naming `flag` and the accepted extensions.
    pub fn of(path: &Path, flag: &str, accepted: &[Format]) -> Result<Format, Failure> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if let Some(&f) = accepted
            .iter()
            .find(|f| ext.eq_ignore_ascii_case(f.extension()))
        {
            return Ok(f);
        }
        let names: Vec<String> = accepted
            .iter()
            .map(|f| format!(".{}", f.extension()))
            .collect();
        let names = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let what = if ext.is_empty() {
            "no extension".to_string()
        } else {
            format!("unknown extension `.{ext}`")
        };
        Err(format!(
            "{flag} {}: {what}; the extension names the format: {names}",
            path.display()
        )
        .into())
    }
}

/// Fails before any work starts if the output `out` (given by `flag`) is one of the
/// files the command reads or writes besides it, `others` (each with its flag): the
/// command would overwrite what it reads, or write two results over each other.
pub fn check_distinct(flag: &str, out: &Path, others: &[(&str, &Path)]) -> Result<(), Failure> {
    match others
        .iter()
        .find(|(_, other)| flow_io::same_file(out, other))
    {
        Some((other_flag, other)) => Err(format!(
            "{flag} {} is the file of {other_flag} {}: give {flag} another path",
            out.display(),
            other.display()
        )
        .into()),
        None => Ok(()),
    }
}

/// Fails before any work starts if `path` cannot be written to (a missing folder, or
/// one that takes no new file).
pub fn check_writable(path: &Path) -> Result<(), Failure> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{}: folder {} does not exist",
            path.display(),
            dir.display()
        )
        .into());
    }
    if path.is_dir() {
        return Err(format!("{}: is a folder", path.display()).into());
    }
    // The temporary file the result is written to beside `path`, made and removed: a
    // folder that takes no new file fails here, before the work, not after it.
    if let Err(e) = flow_io::AtomicWriter::create(path) {
        let why = match &e {
            flow_io::IoError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        return Err(format!(
            "{}: folder {} takes no new file: {why}",
            path.display(),
            dir.display()
        )
        .into());
    }
    Ok(())
}

/// How a [`RowWriter`] lays its rows out.
enum Layout {
    /// CSV text: f32 values in their shortest exact form, so reading them back gives
    /// the same bits.
    Csv,
    /// `.npy`: a header of `header_len` bytes, patched with the row count at commit,
    /// then the values. `column` writes shape `(rows,)` instead of `(rows, 1)`.
    Npy { header_len: usize, column: bool },
}

/// Rows of f32 values written a chunk at a time, as CSV or `.npy`, and put in place
/// atomically by [`commit`](Self::commit). Dropped without a commit, nothing is
/// written.
pub struct RowWriter {
    file: flow_io::AtomicWriter,
    layout: Layout,
    width: usize,
    rows: u64,
}

/// The `.npy` header (magic, version 1.0, length, dictionary) of `rows` rows of
/// `width` f32 values (`column`: shape `(rows,)`), padded with spaces to `len` bytes
/// (at least its own length rounded up to 64, which numpy aligns to).
fn npy_header(rows: u64, width: usize, column: bool, len: Option<usize>) -> Vec<u8> {
    let shape = if column {
        format!("({rows},)")
    } else {
        format!("({rows}, {width})")
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6), version (2), length (2), the dictionary and a newline.
    let len = len.unwrap_or_else(|| (10 + dict.len() + 1).next_multiple_of(64));
    let text_len = len - 10;
    let mut head = b"\x93NUMPY\x01\x00".to_vec();
    head.extend_from_slice(&(text_len as u16).to_le_bytes());
    head.extend_from_slice(dict.as_bytes());
    head.resize(len - 1, b' ');
    head.push(b'\n');
    head
}

impl RowWriter {
    /// A table of rows of `header.len()` values: CSV with `header` as its first line,
    /// or `.npy` of shape `(rows, header.len())`.
    pub fn create(path: &Path, format: Format, header: &[String]) -> Result<Self, Failure> {
        Self::open(path, format, header, false)
    }

    /// One value per row: CSV with the one-cell header `name`, or `.npy` of shape
    /// `(rows,)`.
    pub fn column(path: &Path, format: Format, name: &str) -> Result<Self, Failure> {
        Self::open(path, format, &[name.to_string()], true)
    }

    fn open(path: &Path, format: Format, header: &[String], column: bool) -> Result<Self, Failure> {
        let width = header.len().max(1);
        let (layout, head) = match format {
            Format::Csv => (Layout::Csv, format!("{}\n", header.join(",")).into_bytes()),
            Format::Npy => {
                // Room for the longest row count; the real one is written at commit.
                let head = npy_header(u64::MAX, width, column, None);
                let header_len = head.len();
                (Layout::Npy { header_len, column }, head)
            }
            Format::Png | Format::Safetensors | Format::Jsonl => {
                return Err(format!(
                    "{}: a .{} file does not hold rows of values",
                    path.display(),
                    format.extension()
                )
                .into())
            }
        };
        let mut file = flow_io::AtomicWriter::create(path)?;
        file.write(&head)?;
        Ok(Self {
            file,
            layout,
            width,
            rows: 0,
        })
    }

    /// Appends rows (row-major, `width` values each).
    pub fn rows(&mut self, values: &[f32]) -> Result<(), Failure> {
        debug_assert_eq!(values.len() % self.width, 0);
        match self.layout {
            Layout::Csv => {
                let mut text = String::with_capacity(values.len() * 12);
                for row in values.chunks(self.width) {
                    for (j, v) in row.iter().enumerate() {
                        if j > 0 {
                            text.push(',');
                        }
                        let _ = write!(text, "{v}");
                    }
                    text.push('\n');
                }
                self.file.write(text.as_bytes())?;
            }
            Layout::Npy { .. } => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.file.write(&bytes)?;
            }
        }
        self.rows += (values.len() / self.width) as u64;
        Ok(())
    }

    /// Puts the file in place (a `.npy` file's header now holds the row count).
    pub fn commit(mut self) -> Result<(), Failure> {
        if let Layout::Npy { header_len, column } = self.layout {
            let head = npy_header(self.rows, self.width, column, Some(header_len));
            self.file.overwrite(0, &head)?;
        }
        Ok(self.file.commit()?)
    }
}

/// Writes rows of `header.len()` values whole (see [`RowWriter`]).
pub fn write_rows(
    path: &Path,
    format: Format,
    header: &[String],
    values: &[f32],
) -> Result<(), Failure> {
    let mut w = RowWriter::create(path, format, header)?;
    w.rows(values)?;
    w.commit()
}

/// `prefix0, prefix1, …`
pub fn header(prefix: &str, dim: usize) -> Vec<String> {
    (0..dim).map(|j| format!("{prefix}{j}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_keep_their_reserved_length() {
        let reserved = npy_header(u64::MAX, 5, false, None);
        assert_eq!(reserved.len() % 64, 0);
        let head = npy_header(3, 5, false, Some(reserved.len()));
        assert_eq!(head.len(), reserved.len());
        let text_len = u16::from_le_bytes([head[8], head[9]]) as usize;
        assert_eq!(10 + text_len, head.len());
        let text = std::str::from_utf8(&head[10..]).expect("ascii");
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }"));
        assert!(text.ends_with(" \n"));
        let column = npy_header(7, 1, true, None);
        assert!(std::str::from_utf8(&column[10..])
            .expect("ascii")
            .contains("'shape': (7,),"));
    }

    #[test]
    fn the_extension_names_the_format() {
        let all = [Format::Csv, Format::Npy, Format::Png];
        assert_eq!(
            Format::of(Path::new("a.NPY"), "--out", &all).ok(),
            Some(Format::Npy)
        );
        let e = Format::of(Path::new("a.txt"), "--out", &all[..2]).expect_err("txt");
        assert_eq!(
            e.message,
            "--out a.txt: unknown extension `.txt`; the extension names the format: .csv or .npy"
        );
        let e = Format::of(Path::new("a"), "--out", &all).expect_err("none");
        assert!(
            e.message
                .ends_with("no extension; the extension names the format: .csv, .npy or .png"),
            "{}",
            e.message
        );
    }
}
