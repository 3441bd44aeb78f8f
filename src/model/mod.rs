//! The LEGO transformer: a Llama-style decoder whose layers are split at an exit layer.
//!
//! - [`config`]: [`LegoConfig`], checked when a model is built;
//! - [`transformer`]: [`LegoTransformer`], its parameters, and the training-path methods of
//!   the spec (`forward`, `get_hidden_states`, `forward_upper_layers`, `compute_confidence`,
//!   `extend`);
//! - [`cache`]: the split KV cache (lower layers / upper layers, a length per row and layer);
//! - [`decoder`]: [`Decoder`], the one graph-free inference engine on preallocated buffers,
//!   behind `forward_with_cache`, `forward_with_cache_partial`, generation, early exit and the
//!   teacher-forced evaluation;
//! - [`generate`]: sampling, [`GenerateOptions`] and the one generation loop (`generate`,
//!   `generate_with_early_exit`);
//! - [`early_exit`]: the routed step of TRUE early exit, its rule and statistics;
//! - [`speculative`]: lossless self-speculative decoding (the lower layers draft, the whole
//!   model checks, caches roll back past the first disagreement);
//! - [`exit_gate`]: [`ExitGate`], the learned exit decision (CALM's classifier) that spares a
//!   deep token the exit head;
//! - [`checkpoint`]: safetensors save / load; [`export`]: llama2.c's format, for an
//!   independent check of our forward pass.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod cost;
pub mod decoder;
pub mod decoder_layer;
pub mod early_exit;
pub mod exit_gate;
pub mod export;
pub mod generate;
pub mod speculative;
pub mod transformer;

pub use cache::KvCache;
pub use config::LegoConfig;
pub use decoder::{Decoder, Tokens};
pub use early_exit::{EarlyExitStats, ExitMeasure, ExitRule, TeacherForcedStats, UpperCacheFill};
pub use exit_gate::{ExitGate, GateKind};
pub use generate::{DecodeMode, GenerateOptions, Sampling, TokenEvent};
pub use speculative::{Speculation, SpeculationStats};
pub use transformer::{ExitHead, LegoTransformer};
