//! Data files: CSV (comma separated, one sample per row, optional header line) and
//! NumPy `.npy` arrays of shape `(n, dim)`, told apart by their extension.

use std::{io::Read, path::Path};

use super::Dataset;
use crate::DataError;

/// Rows of CSV text, read a chunk at a time. The first line may be a header (any
/// non-numeric cell makes it one); after it every row must hold the same number of
/// finite numbers. Errors name the source and the line.
pub struct CsvChunks<R: Read> {
    rdr: csv::Reader<R>,
    name: String,
    record: csv::ByteRecord,
    /// The row width once known (a header's sets it too).
    dim: usize,
    rows: usize,
    chunk: usize,
    /// Values in the last chunk read (0 before the first).
    last: usize,
    done: bool,
    /// The header line's cells, once read, if the file has one.
    header: Option<Vec<String>>,
}

/// A CSV cell as text, trimmed of any Unicode whitespace (spreadsheets write
/// non-breaking spaces); `None` for bytes that are not UTF-8.
fn text(cell: &[u8]) -> Option<&str> {
    std::str::from_utf8(cell).ok().map(str::trim)
}

impl<R: Read> std::fmt::Debug for CsvChunks<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvChunks")
            .field("name", &self.name)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl<R: Read> CsvChunks<R> {
    /// Chunks of up to `chunk` rows from `reader`, called `source_name` in errors.
    pub fn new(reader: R, source_name: &str, chunk: usize) -> Self {
        let rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        Self {
            rdr,
            name: source_name.to_string(),
            record: csv::ByteRecord::new(),
            dim: 0,
            rows: 0,
            chunk: chunk.max(1),
            last: 0,
            done: false,
            header: None,
        }
    }

    /// The header line's cells (trimmed), once the chunk that starts after it was
    /// read; `None` before, or for a file without a header.
    pub fn header(&self) -> Option<&[String]> {
        self.header.as_deref()
    }

    fn err(&self, line: Option<usize>, msg: String) -> DataError {
        DataError::new(&self.name, line, msg)
    }

    /// The next chunk's values (row-major), empty at the end.
    fn read_chunk(&mut self) -> Result<Vec<f32>, DataError> {
        // Sized like the last chunk, which was held already; the first by a bound, since
        // one wide first row must not reserve chunk × width values.
        let mut values = Vec::with_capacity(match self.last {
            0 => self.chunk.saturating_mul(self.dim).min(1 << 16),
            last => last,
        });
        let mut taken = 0;
        while taken < self.chunk {
            match self.rdr.read_byte_record(&mut self.record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let line = e.position().map(|p| p.line() as usize);
                    return Err(self.err(line, format!("cannot read CSV: {e}")));
                }
            }
            let record = &self.record;
            let line = record
                .position()
                .map(|p| p.line() as usize)
                .unwrap_or(self.rows + 1);
            if record.iter().all(|c| text(c).is_some_and(str::is_empty)) {
                continue; // blank line
            }
            // Parsed straight into the chunk, taken back if the row is not all numbers.
            let start = values.len();
            let mut bad = None;
            for cell in record.iter() {
                match text(cell).and_then(|c| c.parse::<f32>().ok()) {
                    Some(v) => values.push(v),
                    None => {
                        bad = Some(cell);
                        break;
                    }
                }
            }
            if let Some(cell) = bad {
                values.truncate(start);
                if self.rows == 0 && self.dim == 0 {
                    // A header: remember its width and names, skip it.
                    self.dim = record.len();
                    let names = record
                        .iter()
                        .map(|c| String::from_utf8_lossy(c).trim().to_string());
                    self.header = Some(names.collect());
                    continue;
                }
                let cell: String = String::from_utf8_lossy(cell).chars().take(40).collect();
                return Err(self.err(Some(line), format!("`{cell}` is not a number")));
            }
            if self.dim == 0 {
                self.dim = record.len();
            } else if record.len() != self.dim {
                let msg = format!(
                    "{} columns, expected {} like the first row",
                    record.len(),
                    self.dim
                );
                return Err(self.err(Some(line), msg));
            }
            if let Some(j) = values[start..].iter().position(|v| !v.is_finite()) {
                let msg = format!(
                    "column {} is {}: values must be finite",
                    j + 1,
                    values[start + j]
                );
                return Err(self.err(Some(line), msg));
            }
            self.rows += 1;
            taken += 1;
        }
        self.last = values.len();
        Ok(values)
    }
}

impl<R: Read> Iterator for CsvChunks<R> {
    type Item = Result<Dataset, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_chunk() {
            Ok(values) if values.is_empty() => {
                self.done = true;
                (self.rows == 0).then(|| Err(self.err(None, "no data rows".into())))
            }
            Ok(values) => Some(Ok(Dataset::new(self.dim, values))),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Parses CSV text whole (see [`CsvChunks`]).
pub fn parse_csv(reader: impl Read, source_name: &str) -> Result<Dataset, DataError> {
    gather(CsvChunks::new(reader, source_name, 1 << 16))
}

/// One data set of every chunk.
fn gather(chunks: impl Iterator<Item = Result<Dataset, DataError>>) -> Result<Dataset, DataError> {
    let mut all = Dataset::default();
    for chunk in chunks {
        let chunk = chunk?;
        all.dim = chunk.dim;
        all.values.extend(chunk.values);
    }
    Ok(all)
}

/// Reads a CSV file (see [`CsvChunks`]).
pub fn load_csv(path: &Path) -> Result<Dataset, DataError> {
    gather(open_csv(path, 1 << 16)?)
}

/// An opened `.npy` array: its shape and its elements as f32 in storage order.
pub(crate) struct NpyArray {
    pub shape: Vec<usize>,
    /// Where the elements start in the file, in bytes.
    pub data_offset: u64,
    /// The element type as numpy writes it, without quotes: `<f4`, `|u1`, `>i2`.
    pub descr: String,
    pub values: Box<dyn Iterator<Item = std::io::Result<f32>>>,
}

/// Opens a `.npy` array from `reader`, whose whole length is `len` bytes, called
/// `name` in errors. Supported elements: f4, f8, i8, i4, i2, i1, u1 (either byte
/// order), C order (Fortran order only where at most one dimension exceeds 1, which
/// is the same layout).
///
/// npyz parses the header, but it trusts it: it allocates the header length the
/// file states (up to 4 GiB) and multiplies the shape without overflow checks. So
/// the preamble and the shape are checked against `len` here first (see
/// [`check_npy_header`]); after that every size is bounded by the file.
pub(crate) fn open_npy(
    mut reader: impl Read + 'static,
    len: u64,
    name: &str,
) -> Result<NpyArray, DataError> {
    let fail = |m: String| DataError::new(name, None, m);
    let truncated = |_| fail("truncated: the file ends inside the .npy header".into());
    // Magic (6 bytes) and version (2), then the header length: u16 in version 1,
    // u32 in versions 2 and 3.
    let mut head = vec![0u8; 8];
    reader.read_exact(&mut head).map_err(truncated)?;
    if &head[..6] != b"\x93NUMPY" {
        return Err(fail("not a .npy array: bad magic".into()));
    }
    let size_bytes = match head[6] {
        1 => 2,
        2 | 3 => 4,
        v => return Err(fail(format!("unsupported .npy format version {v}"))),
    };
    let mut size = [0u8; 4];
    reader
        .read_exact(&mut size[..size_bytes])
        .map_err(truncated)?;
    let header_len = u64::from(u32::from_le_bytes(size));
    head.extend_from_slice(&size[..size_bytes]);
    let prefix = head.len() as u64;
    let Some(data_bytes) = len
        .checked_sub(prefix)
        .and_then(|rest| rest.checked_sub(header_len))
    else {
        return Err(fail(format!(
            "truncated: the .npy header claims {header_len} bytes, the file holds {len} in all"
        )));
    };
    let start = head.len();
    let data_offset = prefix + header_len;
    head.resize(start + header_len as usize, 0);
    reader.read_exact(&mut head[start..]).map_err(truncated)?;
    check_npy_header(&head[start..], data_bytes).map_err(fail)?;

    let npy = npyz::NpyFile::new(std::io::Cursor::new(head).chain(reader))
        .map_err(|e| fail(format!("not a readable .npy array: {e}")))?;
    // The guard bounded every dimension by the file length.
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let count: usize = shape.iter().product();
    let dtype = npy.dtype();
    let item = dtype.num_bytes().unwrap_or(usize::MAX) as u64;
    if item.checked_mul(count as u64) != Some(data_bytes) {
        return Err(fail(format!(
            "shape {shape:?} of {item}-byte elements needs {} data bytes, the file holds {data_bytes}",
            (count as u64).saturating_mul(item)
        )));
    }
    if npy.order() != npyz::Order::C && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(fail("Fortran-ordered arrays are not supported".into()));
    }
    let descr = dtype.descr();
    let unsupported = |e: npyz::DTypeError| fail(format!("unsupported array: {e}"));
    fn widen<T: Into<f64>>(
        r: impl Iterator<Item = std::io::Result<T>> + 'static,
    ) -> Box<dyn Iterator<Item = std::io::Result<f32>>> {
        Box::new(r.map(|v| v.map(|v| v.into() as f32)))
    }
    // `descr()` is the Python literal, quotes included (`'<f4'`); past the quote
    // and the byte order mark comes the kind and size.
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.strip_suffix('\''))
        .unwrap_or(descr.as_str())
        .to_string();
    let values: Box<dyn Iterator<Item = std::io::Result<f32>>> = match descr.get(1..) {
        Some("f4") => Box::new(npy.data::<f32>().map_err(unsupported)?),
        Some("f8") => widen(npy.data::<f64>().map_err(unsupported)?),
        Some("i8") => Box::new(
            npy.data::<i64>()
                .map_err(unsupported)?
                .map(|v| v.map(|v| v as f32)),
        ),
        Some("i4") => widen(npy.data::<i32>().map_err(unsupported)?),
        Some("i2") => widen(npy.data::<i16>().map_err(unsupported)?),
        Some("i1") => widen(npy.data::<i8>().map_err(unsupported)?),
        Some("u1") => widen(npy.data::<u8>().map_err(unsupported)?),
        _ => {
            let descr: String = descr.chars().take(40).collect();
            return Err(fail(format!("unsupported array: element type `{descr}`")));
        }
    };
    Ok(NpyArray {
        shape,
        data_offset,
        descr,
        values,
    })
}

/// Checks a `.npy` header text before npyz parses it: plain ASCII without escapes,
/// brackets nested at most 4 deep (numpy writes 2; this bounds the parser's
/// recursion), exactly one `shape` entry, and a shape whose non-zero dimensions
/// multiply to at most `data_bytes` (every element takes at least one byte). The
/// last check keeps npyz's unchecked products of the shape from overflowing.
fn check_npy_header(text: &[u8], data_bytes: u64) -> Result<(), String> {
    let bad = |why: &str| Err(format!("unsupported .npy header: {why}"));
    if !text.iter().all(|&b| b.is_ascii() && b != b'\\') {
        return bad("not plain ASCII");
    }
    let mut depth = 0usize;
    for &b in text {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > 4 {
            return bad("nested too deeply");
        }
    }
    // ASCII was checked above, so this cannot fail.
    let text = std::str::from_utf8(text).map_err(|e| e.to_string())?;
    let mut found = text.match_indices("shape");
    let (Some((at, _)), None) = (found.next(), found.next()) else {
        return bad("expected exactly one `shape` entry");
    };
    let rest = text[at + 5..].trim_start_matches(['\'', '"']).trim_start();
    let Some(rest) = rest.strip_prefix(':') else {
        return bad("unreadable shape");
    };
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix(['(', '[']) else {
        return bad("unreadable shape");
    };
    let Some(end) = rest.find([')', ']']) else {
        return bad("unreadable shape");
    };
    let mut elements: u64 = 1;
    for cell in rest[..end]
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        if !cell.bytes().all(|b| b.is_ascii_digit()) {
            return bad("unreadable shape");
        }
        let Ok(d) = cell.parse::<u64>() else {
            return bad("a dimension beyond 64 bits");
        };
        elements = elements.saturating_mul(d);
    }
    if elements > data_bytes {
        let shape = &rest[..end];
        return Err(format!(
            "the shape ({shape}) needs more elements than the file's {data_bytes} data bytes can hold"
        ));
    }
    Ok(())
}

/// Rows of a `.npy` array of shape `(n, dim)` (or `(n,)`, one feature), C order, of
/// floats or integers, read a chunk at a time as f32.
pub struct NpyChunks {
    values: Box<dyn Iterator<Item = std::io::Result<f32>>>,
    name: String,
    dim: usize,
    rows: usize,
    /// Rows the array holds, to size the chunks' buffers by what remains.
    total: usize,
    chunk: usize,
    done: bool,
}

impl std::fmt::Debug for NpyChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpyChunks")
            .field("name", &self.name)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl NpyChunks {
    pub fn open(path: &Path, chunk: usize) -> Result<Self, DataError> {
        let name = path.display().to_string();
        let fail = |m: String| DataError::new(&name, None, m);
        let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        let array = open_npy(std::io::BufReader::new(file), len, &name)?;
        let (n, dim) = match *array.shape {
            [n] => (n, 1),
            [n, d] => (n, d),
            ref s => {
                return Err(fail(format!(
                    "expected a 2-D array (samples, features), got {} dimensions",
                    s.len()
                )))
            }
        };
        if n == 0 || dim == 0 {
            return Err(fail("the array is empty".into()));
        }
        Ok(Self {
            values: array.values,
            name,
            dim,
            rows: 0,
            total: n,
            chunk: chunk.max(1),
            done: false,
        })
    }
}

impl Iterator for NpyChunks {
    type Item = Result<Dataset, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // Sized by the rows left, not the chunk: one wide row with a large chunk
        // must not reserve chunk × dim values.
        let rows = self.chunk.min(self.total.saturating_sub(self.rows));
        let mut values = Vec::with_capacity(rows * self.dim);
        for v in self
            .values
            .by_ref()
            .take(self.chunk.saturating_mul(self.dim))
        {
            let fail = |m: String| DataError::new(&self.name, None, m);
            match v {
                Ok(v) if v.is_finite() => values.push(v),
                Ok(_) => {
                    self.done = true;
                    let row = self.rows + values.len() / self.dim + 1;
                    return Some(Err(fail(format!(
                        "row {row} holds a NaN or infinite value"
                    ))));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(fail(format!("cannot read the array: {e}"))));
                }
            }
        }
        if values.is_empty() {
            self.done = true;
            return None;
        }
        if values.len() % self.dim != 0 {
            self.done = true;
            let fail = DataError::new(&self.name, None, "the array ends inside a row");
            return Some(Err(fail));
        }
        self.rows += values.len() / self.dim;
        Some(Ok(Dataset::new(self.dim, values)))
    }
}

/// Reads a `.npy` array whole (see [`NpyChunks`]).
pub fn load_npy(path: &Path) -> Result<Dataset, DataError> {
    gather(NpyChunks::open(path, 1 << 16)?)
}

/// The kinds of data file, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Csv,
    Npy,
}

/// What `path`'s extension says it holds: `.csv` or `.npy` (any case); anything else
/// is an error naming the file.
fn file_kind(path: &Path) -> Result<FileKind, DataError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "csv" => Ok(FileKind::Csv),
        "npy" => Ok(FileKind::Npy),
        _ => {
            let what = if ext.is_empty() {
                "no extension".to_string()
            } else {
                format!("unknown extension `.{ext}`")
            };
            Err(DataError::new(
                path.display().to_string(),
                None,
                format!("{what}: data files are .csv or .npy"),
            ))
        }
    }
}

fn open_csv(
    path: &Path,
    rows: usize,
) -> Result<CsvChunks<std::io::BufReader<std::fs::File>>, DataError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| DataError::new(&name, None, e.to_string()))?;
    Ok(CsvChunks::new(std::io::BufReader::new(file), &name, rows))
}

/// A data file's rows, a chunk of up to `rows` at a time: `.csv` or `.npy`, by the
/// extension. Memory does not grow with the file.
pub fn chunks(
    path: &Path,
    rows: usize,
) -> Result<Box<dyn Iterator<Item = Result<Dataset, DataError>>>, DataError> {
    match file_kind(path)? {
        FileKind::Npy => Ok(Box::new(NpyChunks::open(path, rows)?)),
        FileKind::Csv => Ok(Box::new(open_csv(path, rows)?)),
    }
}

/// Reads a `.csv` or `.npy` file whole, by its extension.
pub fn load_path(path: &Path) -> Result<Dataset, DataError> {
    match file_kind(path)? {
        FileKind::Npy => load_npy(path),
        FileKind::Csv => load_csv(path),
    }
}

/// The column names of a data file: a CSV file's header line, if it has one (`None`
/// for `.npy` files and CSV files that start with numbers). Reads the header and the
/// first row only.
pub fn column_names(path: &Path) -> Result<Option<Vec<String>>, DataError> {
    if file_kind(path)? == FileKind::Npy {
        return Ok(None);
    }
    let mut csv = open_csv(path, 1)?;
    csv.next().transpose()?;
    Ok(csv.header.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Dataset, DataError> {
        parse_csv(s.as_bytes(), "t.csv")
    }

    #[test]
    fn reads_rows_with_and_without_header() {
        let d = parse("x,y\n1,2\n3.5, -4e-3\n").unwrap();
        assert_eq!((d.dim, d.len()), (2, 2));
        assert_eq!(d.values, vec![1.0, 2.0, 3.5, -4e-3]);
        assert_eq!(parse("1,2\n3,4").unwrap().len(), 2);
    }

    #[test]
    fn the_header_is_kept() {
        let mut c = CsvChunks::new("theta0, theta1 ,x\n1,2,3\n".as_bytes(), "t.csv", 1);
        assert_eq!(c.header(), None);
        c.next().expect("a chunk").expect("rows");
        assert_eq!(c.header().expect("header"), ["theta0", "theta1", "x"]);
        let mut plain = CsvChunks::new("1,2\n".as_bytes(), "t.csv", 1);
        plain.next().expect("a chunk").expect("rows");
        assert_eq!(plain.header(), None);
    }

    #[test]
    fn the_extension_picks_the_reader() {
        let dir = std::env::temp_dir().join(format!("flows-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let csv = dir.join("d.CSV");
        std::fs::write(&csv, "a,b\n1,2\n").expect("write");
        assert_eq!(load_path(&csv).expect("csv").values, [1.0, 2.0]);
        assert_eq!(
            column_names(&csv).expect("names"),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        for (name, want) in [
            (
                "d.txt",
                "d.txt: unknown extension `.txt`: data files are .csv or .npy",
            ),
            ("d", "d: no extension: data files are .csv or .npy"),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, "a,b\n1,2\n").expect("write");
            let e = load_path(&p).expect_err(name).to_string();
            assert!(e.ends_with(want), "{e}");
            assert!(chunks(&p, 1).is_err() && column_names(&p).is_err());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("", "no data rows"),
            ("x,y\n", "no data rows"),
            ("1,2\n3\n", "line 2"),
            ("1,2\n3,abc\n", "line 2"),
            ("1,2\nx,y\n", "line 2"),
            ("1,2\n3,NaN\n", "line 2"),
            ("1,2\n4,5\ninf,1\n", "line 3"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("t.csv"), "{e}");
        }
    }
}
