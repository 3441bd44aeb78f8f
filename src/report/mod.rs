//! Reports: what a run measured, as text tables, JSON, CSV and an SVG picture.
//!
//! - [`table`]: [`Table`], Markdown tables whose columns line up, for stdout;
//! - [`csv`](mod@csv): [`Csv`], comma-separated rows with RFC 4180 quoting;
//! - [`frontier`]: test perplexity against inference cost for the static models and the
//!   early-exit sweeps, and where a point stands against the static frontier;
//! - [`svg`]: that frontier drawn as a hand-written SVG;
//! - [`experiment`]: the records and tables of the LEGO experiment
//!   (`examples/true_early_exit.rs`): `report.json` and `results.csv`.
//!
//! JSON goes through [`crate::io::json`], and every file through [`write_into`], which writes
//! it atomically ([`crate::io::atomic::write_atomic`]), so an interrupted run never leaves half
//! a report.

pub mod csv;
pub mod experiment;
pub mod frontier;
pub mod svg;
pub mod table;

pub use csv::Csv;
pub use experiment::ExperimentReport;
pub use frontier::{Frontier, FrontierPoint, PointKind, StaticLine};
pub use svg::{frontier_svg, write_frontier_svg};
pub use table::Table;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `dir/name` atomically, creating `dir` if needed; returns the path.
/// Errors are [`Error::Io`] naming the directory or the file.
pub fn write_into(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(name);
    crate::io::atomic::write_atomic(&path, bytes)?;
    Ok(path)
}
