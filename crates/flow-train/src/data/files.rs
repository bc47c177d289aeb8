//! Data files: CSV (comma separated, one sample per row, optional header line) and
//! NumPy `.npy` arrays of shape `(n, dim)`.

use std::{io::Read, path::Path};

use super::Dataset;
use crate::DataError;

/// Parses CSV text. The first line may be a header (any non-numeric cell makes it
/// one); after it every row must hold the same number of finite numbers.
pub fn parse_csv(reader: impl Read, source_name: &str) -> Result<Dataset, DataError> {
    let err = |line: Option<usize>, msg: String| DataError::new(source_name, line, msg);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let mut dim = 0;
    let mut values = Vec::new();
    let mut rows = 0usize;
    let mut record = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize);
                return Err(err(line, format!("cannot read CSV: {e}")));
            }
        }
        let line = record
            .position()
            .map(|p| p.line() as usize)
            .unwrap_or(rows + 1);
        if record.iter().all(|c| c.is_empty()) {
            continue; // blank line
        }
        let parsed: Vec<Result<f32, &str>> = record
            .iter()
            .map(|c| c.parse::<f32>().map_err(|_| c))
            .collect();
        if rows == 0 && dim == 0 && parsed.iter().any(|p| p.is_err()) {
            // A header: remember its width, skip it.
            dim = record.len();
            continue;
        }
        if let Some(Err(cell)) = parsed.iter().find(|p| p.is_err()) {
            let cell: String = cell.chars().take(40).collect();
            return Err(err(Some(line), format!("`{cell}` is not a number")));
        }
        if dim == 0 {
            dim = record.len();
        } else if record.len() != dim {
            return Err(err(
                Some(line),
                format!(
                    "{} columns, expected {dim} like the first row",
                    record.len()
                ),
            ));
        }
        for (j, p) in parsed.into_iter().enumerate() {
            let v = p.unwrap_or(f32::NAN);
            if !v.is_finite() {
                return Err(err(
                    Some(line),
                    format!("column {} is {v}: values must be finite", j + 1),
                ));
            }
            values.push(v);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(err(None, "no data rows".into()));
    }
    Ok(Dataset::new(dim, values))
}

/// Reads a CSV file (see [`parse_csv`]).
pub fn load_csv(path: &Path) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| DataError::new(&name, None, e.to_string()))?;
    parse_csv(std::io::BufReader::new(file), &name)
}

/// Reads a `.npy` array of shape `(n, dim)` (or `(n,)`, read as one feature).
pub fn load_npy(path: &Path) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let fail = |m: String| DataError::new(&name, None, m);
    let t = candle::Tensor::read_npy(path)
        .map_err(|e| fail(format!("not a readable .npy array: {e}")))?;
    let t = match t.rank() {
        1 => t.unsqueeze(1),
        2 => Ok(t),
        r => {
            return Err(fail(format!(
                "expected a 2-D array (samples, features), got {r} dimensions"
            )))
        }
    }
    .map_err(|e| fail(e.to_string()))?;
    let (n, dim) = t.dims2().map_err(|e| fail(e.to_string()))?;
    if n == 0 || dim == 0 {
        return Err(fail("the array is empty".into()));
    }
    let values = t
        .to_dtype(candle::DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| fail(format!("unsupported array: {e}")))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(fail(format!(
            "row {} holds a NaN or infinite value",
            i / dim + 1
        )));
    }
    Ok(Dataset::new(dim, values))
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
