use std::{
    fs,
    io::{BufWriter, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use crate::IoError;

/// The temporary files of the writers alive in this process, so that a signal handler
/// can remove them ([`remove_temp_files`]): a process killed by a signal runs no
/// destructors.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The live temporary files; a writer that panicked while holding the list left it
/// whole (every change is one push or one removal), so a poisoned lock is still good.
fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(tmp: &Path) {
    let mut live = live();
    if let Some(i) = live.iter().position(|p| p == tmp) {
        live.swap_remove(i);
    }
}

/// Removes the temporary files of every [`AtomicWriter`] not yet committed or dropped,
/// and keeps any new one from being created: for a signal handler that ends the
/// process next. The targets are untouched.
pub fn remove_temp_files() {
    let mut live = live();
    for tmp in live.drain(..) {
        let _ = fs::remove_file(tmp);
    }
    // Held until the process ends: a writer created after this point would otherwise
    // leave its file behind.
    std::mem::forget(live);
}

/// Whether `a` and `b` name one file: the same name, the same absolute path (`./a` and
/// `a`), or, where both exist, the same file behind links and `..`. An output that is
/// one of a command's inputs would overwrite what it reads.
pub fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || matches!((std::path::absolute(a), std::path::absolute(b)), (Ok(x), Ok(y)) if x == y)
        || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A file written in pieces and put in place atomically: the pieces go to a temporary
/// file beside `path`, which [`commit`](Self::commit) flushes to disk and renames over
/// `path`. Dropped without a commit (an error on the way), the temporary file is
/// removed and `path` is untouched; [`remove_temp_files`] removes it on a signal.
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
        // Created and listed under the lock, so a signal handler sees every file.
        let file = {
            let mut live = live();
            let file = fs::File::create(&tmp).map_err(io)?;
            live.push(tmp.clone());
            file
        };
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

    fn open(&mut self) -> Result<&mut BufWriter<fs::File>, IoError> {
        match self.file.as_mut() {
            Some(f) => Ok(f),
            None => Err(IoError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("already committed"),
            }),
        }
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        let path = self.path.clone();
        self.open()?
            .write_all(bytes)
            .map_err(|source| IoError::Io { path, source })
    }

    /// Replaces the bytes at `offset` (within what was written) with `bytes`; later
    /// writes append again. For a header whose contents are known only at the end.
    pub fn overwrite(&mut self, offset: u64, bytes: &[u8]) -> Result<(), IoError> {
        let path = self.path.clone();
        let file = self.open()?;
        let result = (|| {
            let end = file.seek(SeekFrom::End(0))?;
            if offset.saturating_add(bytes.len() as u64) > end {
                return Err(std::io::Error::other("overwrite past the end of the file"));
            }
            file.seek(SeekFrom::Start(offset))?;
            file.write_all(bytes)?;
            file.seek(SeekFrom::End(0)).map(|_| ())
        })();
        result.map_err(|source| IoError::Io { path, source })
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
        forget(&self.tmp);
        result.map_err(|e| self.io(e))
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
            forget(&self.tmp);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flows-atomic-{name}-{}", std::process::id()));
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn overwrite_patches_a_header_and_appending_goes_on() {
        let d = dir("overwrite");
        let path = d.join("f.bin");
        let mut w = AtomicWriter::create(&path).expect("create");
        w.write(b"????-body").expect("write");
        w.overwrite(0, b"HEAD").expect("overwrite");
        w.write(b"-tail").expect("write");
        let e = w.overwrite(12, b"xxxxxxxxx").expect_err("past the end");
        assert!(e.to_string().contains("past the end"), "{e}");
        w.commit().expect("commit");
        assert_eq!(fs::read(&path).expect("read"), b"HEAD-body-tail");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn live_temporary_files_are_listed_until_committed_or_dropped() {
        let d = dir("live");
        let (a, b) = (d.join("a.csv"), d.join("b.csv"));
        let wa = AtomicWriter::create(&a).expect("create");
        let wb = AtomicWriter::create(&b).expect("create");
        let listed = |w: &AtomicWriter| live().contains(&w.tmp);
        assert!(listed(&wa) && listed(&wb));
        let tmp_b = wb.tmp.clone();
        drop(wb);
        assert!(!live().contains(&tmp_b) && !tmp_b.exists());
        let tmp_a = wa.tmp.clone();
        wa.commit().expect("commit");
        assert!(!live().contains(&tmp_a) && !tmp_a.exists() && a.exists());
        let _ = fs::remove_dir_all(&d);
    }
}
