//! Checking, before a long run, that its results can be written where they are to go.
//!
//! A run that trains for minutes and only then finds that `--out` names a file, or a directory
//! it may not write to, has wasted those minutes. [`prepare_output_dir`] makes the same checks
//! the final write would meet, at the start: it creates the directory and writes (then removes)
//! a small probe file in it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Creates the directory `dir` (and its parents) if it does not exist, and proves that files
/// can be written in it by creating, writing and removing a probe file
/// (`.lego-write-probe.<pid>`).
///
/// Errors are [`Error::Io`] naming the path concerned: `dir` (or one of its parents) is a file,
/// cannot be created, or does not let this process create a file; or the probe cannot be
/// removed again.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("lego-doc-out-{}", std::process::id()));
/// lego::io::output_dir::prepare_output_dir(&dir.join("run1")).unwrap();
/// assert!(dir.join("run1").is_dir());
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn prepare_output_dir(dir: &Path) -> Result<()> {
    // `create_dir_all` succeeds on an existing directory and fails (AlreadyExists) on a file,
    // which says "File exists": name the problem more plainly.
    if dir.exists() && !dir.is_dir() {
        let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a directory");
        return Err(Error::io(dir, e));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Only writing proves that writing works: permissions, a read-only mount, a full quota.
    let probe = dir.join(format!(".lego-write-probe.{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"lego"));
    if let Err(e) = written {
        let _ = fs::remove_file(&probe); // it may exist but be unwritable; nothing more to do
        return Err(Error::io(dir, e));
    }
    fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh directory for one test, removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lego-outdir-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn creates_nested_directories_and_leaves_no_probe() {
        let t = TestDir::new("nested");
        let out = t.0.join("a").join("b");
        prepare_output_dir(&out).unwrap();
        assert!(out.is_dir());
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "the probe is removed");
        // An existing directory, with files in it, is fine too and keeps its files.
        fs::write(out.join("report.json"), b"{}").unwrap();
        prepare_output_dir(&out).unwrap();
        assert_eq!(fs::read(out.join("report.json")).unwrap(), b"{}");
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_an_error_naming_it() {
        let t = TestDir::new("file");
        let file = t.0.join("results.csv");
        fs::write(&file, b"x").unwrap();
        for dir in [file.clone(), file.join("below")] {
            match prepare_output_dir(&dir) {
                Err(e @ Error::Io { .. }) => {
                    assert!(e.to_string().contains("results.csv"), "{e}");
                }
                other => panic!("{}: expected Error::Io, got {other:?}", dir.display()),
            }
        }
        assert!(prepare_output_dir(&file).unwrap_err().to_string().contains("not a directory"));
        assert_eq!(fs::read(&file).unwrap(), b"x", "the file is left alone");
    }

    #[test]
    #[cfg(unix)]
    fn a_read_only_directory_is_an_error() {
        use std::os::unix::fs::PermissionsExt;
        let t = TestDir::new("readonly");
        let out = t.0.join("out");
        fs::create_dir(&out).unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores permission bits: there the directory really is writable, and the check
        // rightly passes. Only an unprivileged user can see the refusal.
        if fs::write(out.join("root-check"), b"").is_ok() {
            eprintln!("skipped: running with privileges that ignore permission bits");
            return;
        }
        let e = prepare_output_dir(&out).unwrap_err();
        assert!(matches!(&e, Error::Io { path, .. } if *path == out), "{e:?}");
    }
}
