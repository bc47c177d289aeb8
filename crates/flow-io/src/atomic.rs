use std::{
    fs,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use crate::IoError;

/// A file written in pieces and put in place atomically: the pieces go to a temporary
/// file beside `path`, which [`commit`](Self::commit) flushes to disk and renames over
/// `path`. Dropped without a commit (an error on the way), the temporary file is
/// removed and `path` is untouched.
#[derive(Debug)]
pub struct AtomicWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<fs::File>>,
}

impl AtomicWriter {
    pub fn create(path: &Path) -> Result<Self, IoError> {
        let io = |source| IoError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = fs::File::create(&tmp).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::new(file)),
        })
    }

    fn io(&self, source: std::io::Error) -> IoError {
        IoError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes).map_err(|e| IoError::Io {
                path: self.path.clone(),
                source: e,
            }),
            None => Err(self.io(std::io::Error::other("already committed"))),
        }
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<(), IoError> {
        let Some(file) = self.file.take() else {
            return Err(self.io(std::io::Error::other("already committed")));
        };
        let result = (|| {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&self.tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result.map_err(|e| self.io(e))
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it, flushed to
/// disk, then renamed over `path`. A reader sees the old file or the new one, never a
/// partial one; on error the old file is untouched and the temporary file removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let mut w = AtomicWriter::create(path)?;
    w.write(bytes)?;
    w.commit()
}
