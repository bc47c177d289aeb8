//! Data files: CSV (comma separated, one sample per row, optional header line) and
//! NumPy `.npy` arrays of shape `(n, dim)`.

use std::{io::Read, path::Path};

use super::Dataset;
use crate::DataError;

/// Rows of CSV text, read a chunk at a time. The first line may be a header (any
/// non-numeric cell makes it one); after it every row must hold the same number of
/// finite numbers. Errors name the source and the line.
pub struct CsvChunks<R: Read> {
    rdr: csv::Reader<R>,
    name: String,
    record: csv::StringRecord,
    /// The row width once known (a header's sets it too).
    dim: usize,
    rows: usize,
    chunk: usize,
    done: bool,
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
            record: csv::StringRecord::new(),
            dim: 0,
            rows: 0,
            chunk: chunk.max(1),
            done: false,
        }
    }

    fn err(&self, line: Option<usize>, msg: String) -> DataError {
        DataError::new(&self.name, line, msg)
    }

    /// The next chunk's values (row-major), empty at the end.
    fn read_chunk(&mut self) -> Result<Vec<f32>, DataError> {
        let mut values = Vec::new();
        let mut taken = 0;
        while taken < self.chunk {
            match self.rdr.read_record(&mut self.record) {
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
            if record.iter().all(|c| c.is_empty()) {
                continue; // blank line
            }
            let parsed: Vec<Result<f32, &str>> = record
                .iter()
                .map(|c| c.parse::<f32>().map_err(|_| c))
                .collect();
            if self.rows == 0 && self.dim == 0 && parsed.iter().any(|p| p.is_err()) {
                // A header: remember its width, skip it.
                self.dim = record.len();
                continue;
            }
            if let Some(Err(cell)) = parsed.iter().find(|p| p.is_err()) {
                let cell: String = cell.chars().take(40).collect();
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
            for (j, p) in parsed.into_iter().enumerate() {
                let v = p.unwrap_or(f32::NAN);
                if !v.is_finite() {
                    let msg = format!("column {} is {v}: values must be finite", j + 1);
                    return Err(self.err(Some(line), msg));
                }
                values.push(v);
            }
            self.rows += 1;
            taken += 1;
        }
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
    gather(chunks(path, 1 << 16)?)
}

/// Rows of a `.npy` array of shape `(n, dim)` (or `(n,)`, one feature), C order, of
/// floats or integers, read a chunk at a time as f32.
pub struct NpyChunks {
    values: Box<dyn Iterator<Item = std::io::Result<f32>>>,
    name: String,
    dim: usize,
    rows: usize,
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
        let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
            .map_err(|e| fail(format!("not a readable .npy array: {e}")))?;
        let (n, dim) = match *npy.shape() {
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
        if npy.order() != npyz::Order::C && dim > 1 {
            return Err(fail("Fortran-ordered arrays are not supported".into()));
        }
        let descr = npy.dtype().descr();
        let unsupported = |e: npyz::DTypeError| fail(format!("unsupported array: {e}"));
        let values: Box<dyn Iterator<Item = std::io::Result<f32>>> = match &descr[1..] {
            "f4" => Box::new(npy.data::<f32>().map_err(unsupported)?),
            "f8" => Box::new(
                npy.data::<f64>()
                    .map_err(unsupported)?
                    .map(|v| v.map(|v| v as f32)),
            ),
            "i8" => Box::new(
                npy.data::<i64>()
                    .map_err(unsupported)?
                    .map(|v| v.map(|v| v as f32)),
            ),
            "i4" => Box::new(
                npy.data::<i32>()
                    .map_err(unsupported)?
                    .map(|v| v.map(|v| v as f32)),
            ),
            "u1" => Box::new(
                npy.data::<u8>()
                    .map_err(unsupported)?
                    .map(|v| v.map(f32::from)),
            ),
            other => return Err(fail(format!("unsupported array: element type `{other}`"))),
        };
        Ok(Self {
            values,
            name,
            dim: dim as usize,
            rows: 0,
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
        let mut values = Vec::with_capacity(self.chunk * self.dim);
        for v in self.values.by_ref().take(self.chunk * self.dim) {
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

/// A data file's rows, a chunk of up to `rows` at a time: `.npy` files by their
/// extension, anything else as CSV. Memory does not grow with the file.
pub fn chunks(
    path: &Path,
    rows: usize,
) -> Result<Box<dyn Iterator<Item = Result<Dataset, DataError>>>, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("npy") => Ok(Box::new(NpyChunks::open(path, rows)?)),
        _ => {
            let name = path.display().to_string();
            let file = std::fs::File::open(path)
                .map_err(|e| DataError::new(&name, None, e.to_string()))?;
            Ok(Box::new(CsvChunks::new(
                std::io::BufReader::new(file),
                &name,
                rows,
            )))
        }
    }
}

/// Reads `.npy` files by their extension, anything else as CSV.
pub fn load_path(path: &Path) -> Result<Dataset, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("npy") => load_npy(path),
        _ => load_csv(path),
    }
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
