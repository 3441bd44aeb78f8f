//! Writing a file so that a crash never leaves half of it behind.
//!
//! A checkpoint written in place and interrupted (killed, disk full, power cut) would leave a
//! truncated file where a good one used to be. [`write_atomic`] instead writes the new bytes
//! to a temporary file beside the target, flushes them to disk, and then renames the temporary
//! over the target. A rename within one directory is atomic on POSIX filesystems, so a reader
//! sees either the whole old file or the whole new one, never a mixture.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Counts temporary files made by this process, so two threads saving to the same target at
/// once do not share a temporary name.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path`, replacing any file there, atomically.
///
/// The steps: write to `<target name>.<pid>.<counter>.tmp` in the same directory (the same
/// filesystem, so the rename cannot turn into a copy), `fsync` it, rename it over `path`, and
/// then `fsync` the directory so that the rename itself survives a power cut (best effort:
/// not every platform can open a directory). If any step fails the temporary file is removed
/// and the old file at `path`, if there was one, is left as it was.
///
/// Errors are [`Error::Io`] naming `path`.
///
/// ```
/// let path = std::env::temp_dir().join(format!("lego-doc-atomic-{}.txt", std::process::id()));
/// lego::io::atomic::write_atomic(&path, b"hello").unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"hello");
/// std::fs::remove_file(&path).unwrap();
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_path(path)?;
    if let Err(e) = write_and_sync(&temp, bytes).and_then(|()| fs::rename(&temp, path)) {
        // Nothing useful can be done if the clean-up fails too (the temporary may not exist).
        let _ = fs::remove_file(&temp);
        return Err(Error::io(path, e));
    }
    sync_parent_directory(path);
    Ok(())
}

/// The temporary file's path: beside `path`, named after it, the process id and a counter.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let Some(name) = path.file_name() else {
        let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path does not name a file");
        return Err(Error::io(path, e));
    };
    let counter = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp_name = name.to_os_string();
    temp_name.push(format!(".{}.{counter}.tmp", std::process::id()));
    Ok(path.with_file_name(temp_name))
}

/// Creates `temp` (failing if it already exists), writes `bytes`, and flushes them to disk.
fn write_and_sync(temp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(temp)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Flushes the directory entry of `path` (the rename) to disk, where the platform allows it.
fn sync_parent_directory(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Opening a directory as a file works on Unix but not on Windows; either way the data is
    // already safe in the renamed file, so a failure here is not worth reporting.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test, removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lego-atomic-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writes_and_replaces_leaving_no_temporary() {
        let dir = TestDir::new("replace");
        let path = dir.0.join("model.safetensors");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        write_atomic(&path, b"").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert_eq!(dir.entries(), ["model.safetensors"]);
    }

    #[test]
    fn missing_directory_is_an_error_and_creates_nothing() {
        let dir = TestDir::new("missing");
        let path = dir.0.join("no-such-dir").join("out.bin");
        match write_atomic(&path, b"data") {
            Err(Error::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert!(dir.entries().is_empty());
    }

    #[test]
    fn failed_rename_keeps_the_old_target_and_removes_the_temporary() {
        // A non-empty directory cannot be replaced by a file, so the rename fails after the
        // temporary has been written: the temporary must be cleaned up and the target kept.
        let dir = TestDir::new("rename");
        let target = dir.0.join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"old").unwrap();
        assert!(matches!(write_atomic(&target, b"new"), Err(Error::Io { .. })));
        assert_eq!(dir.entries(), ["target"]);
        assert_eq!(fs::read(target.join("inside")).unwrap(), b"old");
    }

    #[test]
    fn path_without_a_file_name_is_an_error() {
        assert!(matches!(write_atomic(Path::new("/"), b"x"), Err(Error::Io { .. })));
    }

    #[test]
    fn temporary_names_are_beside_the_target_and_distinct() {
        let a = temp_path(Path::new("runs/ckpt.safetensors")).unwrap();
        let b = temp_path(Path::new("runs/ckpt.safetensors")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("runs")));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("ckpt.safetensors."));
        assert!(name.ends_with(".tmp"));
        assert!(name.contains(&std::process::id().to_string()));
    }
}
