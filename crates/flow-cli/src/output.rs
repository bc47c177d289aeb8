//! Writing results: CSV at full f32 precision, atomically.

use std::{fmt::Write as _, path::Path};

use crate::Failure;

/// Fails before any work starts if `path` cannot be written to (missing folder).
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
    Ok(())
}

/// A CSV file written a chunk of rows at a time and put in place atomically by
/// [`commit`](Self::commit). f32 values are printed in their shortest exact form, so
/// reading them back gives the same bits.
pub struct CsvWriter {
    file: flow_io::AtomicWriter,
    width: usize,
}

impl CsvWriter {
    /// A file of rows of `header.len()` values.
    pub fn create(path: &Path, header: &[String]) -> Result<Self, Failure> {
        let mut file = flow_io::AtomicWriter::create(path)?;
        file.write(format!("{}\n", header.join(",")).as_bytes())?;
        Ok(Self {
            file,
            width: header.len().max(1),
        })
    }

    /// Appends rows (row-major).
    pub fn rows(&mut self, values: &[f32]) -> Result<(), Failure> {
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
        Ok(())
    }

    pub fn commit(self) -> Result<(), Failure> {
        Ok(self.file.commit()?)
    }
}

/// Writes rows of `header.len()` values with a header line (see [`CsvWriter`]).
pub fn write_csv(path: &Path, header: &[String], values: &[f32]) -> Result<(), Failure> {
    let mut w = CsvWriter::create(path, header)?;
    w.rows(values)?;
    w.commit()
}

/// `prefix0, prefix1, …`
pub fn header(prefix: &str, dim: usize) -> Vec<String> {
    (0..dim).map(|j| format!("{prefix}{j}")).collect()
}
