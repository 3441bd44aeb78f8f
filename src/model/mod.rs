//! The LEGO transformer: a Llama-style decoder whose layers are split at an exit layer.
//!
//! - [`config`]: [`LegoConfig`], checked when a model is built;
//! - [`transformer`]: [`LegoTransformer`], its parameters, and the training-path methods of
//!   the spec (`forward`, `get_hidden_states`, `forward_upper_layers`, `compute_confidence`,
//!   `extend`);
//! - [`cache`]: the split KV cache (lower layers / upper layers, a length per row and layer);
//! - [`decode`]: the graph-free inference engine on preallocated buffers, behind
//!   `forward_with_cache`, `forward_with_cache_partial` and generation;
//! - [`generate`]: sampling and `generate`;
//! - [`checkpoint`]: safetensors save / load; [`export`]: llama2.c's format, for an
//!   independent check of our forward pass.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod decode;
pub mod early_exit;
pub mod export;
pub mod generate;
pub mod transformer;

pub use cache::KvCache;
pub use config::LegoConfig;
pub use early_exit::{EarlyExitStats, TeacherForcedStats, UpperCacheFill};
pub use generate::Sampling;
pub use transformer::{ExitHead, LegoTransformer};
