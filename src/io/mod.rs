//! Reading and writing files: checkpoints in the safetensors format, and the JSON they (and
//! our configs and reports) are written in.
//!
//! - [`json`]: a small JSON value type with a strict parser and a writer;
//! - [`safetensors`]: the safetensors format, F32 tensors plus string metadata, on top of
//!   [`json`] for its header;
//! - [`atomic`]: [`atomic::write_atomic`], which replaces a file so that a crash midway leaves
//!   the old one intact; every file this crate saves goes through it;
//! - [`output_dir`]: [`output_dir::prepare_output_dir`], which checks before a long run that
//!   its results can be written where they are to go.
//!
//! All are written by hand (the crate has no serde), and every read checks its input:
//! a corrupt or truncated file is an [`Error::Format`](crate::Error::Format) that names the
//! file and what is wrong with it, never a panic.

pub mod atomic;
pub mod json;
pub mod output_dir;
pub mod safetensors;
