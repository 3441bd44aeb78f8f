//! The crate's error type, for input that comes from outside the program.
//!
//! Files, flags, token ids, thresholds, configs and checkpoints can be wrong through no fault
//! of the code: those get an [`Error`] that says what was wrong and where. A broken internal
//! invariant (two tensors of mismatched shapes handed to an op by our own code) is a bug, and
//! panics with a message that names the op and the shapes instead.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong with input from outside the program.
#[derive(Debug)]
pub enum Error {
    /// Reading or writing a file failed.
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file was read but its contents are not what they should be (truncated, corrupt,
    /// of the wrong layout). `what` names the file and the problem.
    Format(String),
    /// A configuration (model config, training options) is inconsistent.
    Config(String),
    /// An argument is out of range: a token id, a threshold, a prompt length, a flag.
    Input(String),
    /// A number that must be finite is not (a NaN or infinite logit or confidence, which would
    /// otherwise be sampled from or routed on silently). Says where it appeared.
    NonFinite(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {}", path.display(), source),
            Error::Format(what) => write!(f, "bad file: {what}"),
            Error::Config(what) => write!(f, "bad config: {what}"),
            Error::Input(what) => write!(f, "bad input: {what}"),
            Error::NonFinite(what) => write!(f, "non-finite value: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
