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

/// Writes rows of `dim` values with a header line. f32 values are printed in their
/// shortest exact form, so reading them back gives the same bits.
pub fn write_csv(
    path: &Path,
    header: &[String],
    values: &[f32],
    dim: usize,
) -> Result<(), Failure> {
    let mut text = String::with_capacity(values.len() * 12 + 64);
    text.push_str(&header.join(","));
    text.push('\n');
    for row in values.chunks(dim.max(1)) {
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                text.push(',');
            }
            let _ = write!(text, "{v}");
        }
        text.push('\n');
    }
    flow_io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// `prefix0, prefix1, …`
pub fn header(prefix: &str, dim: usize) -> Vec<String> {
    (0..dim).map(|j| format!("{prefix}{j}")).collect()
}
