//! # lego
//!
//! A from-scratch f32 tensor library with reverse-mode autodiff, and on it the LEGO early-exit
//! transformer (Layered Ensemble with Gradual Optimization).
//!
//! Read it bottom up, each layer using only those below it:
//!
//! - [`kernels`]: plain functions on `&[f32]` slices: the matrix product (through
//!   `matrixmultiply`), the SIMD inner loops, and the rule for when work is big enough to split
//!   across threads;
//! - [`tensor`]: the [`Tensor`] type, its storage and shape, and the autodiff tape walk
//!   ([`Tensor::backward`]);
//! - [`ops`]: one family of differentiable operations a file, each forward beside its backward;
//! - [`optim`]: AdamW, gradient clipping, the learning-rate schedule;
//! - [`nn`]: the modules of a Llama-style decoder (Linear, RmsNorm, Attention, SwiGLU MLP, Block);
//! - [`model`]: [`LegoTransformer`](model::LegoTransformer) with the spec's API, the split KV
//!   cache, the graph-free decoding engine, generation and TRUE early exit, checkpoints;
//! - [`train`]: the two training phases, hard examples, evaluation;
//! - [`data`]: text, document splits, tokenizers, batches, the synthetic corpus;
//! - [`io`]: JSON, safetensors and atomic writes;
//! - [`report`]: tables, CSV, the quality-versus-compute frontier and its SVG picture;
//! - [`cli`]: the command-line flags of the examples and benches.
//!
//! A token's path to its gradient: [`model::LegoTransformer::forward`] → [`nn::Block::forward`]
//! → the ops in [`ops`] → [`Tensor::backward`] in [`tensor::autograd`].
//!
//! **Start with the [`walkthrough`]** (`docs/walkthrough.md`): a guided reading from a token id
//! to the loss, the backward walk and the AdamW update, then LEGO's two phases, the split KV
//! caches and TRUE early exit, each stop naming the file and item to read. Its code blocks are
//! this crate's doctests, so they run under `cargo test`.

#![warn(missing_docs)]

pub mod cli;
pub mod data;
pub mod error;
pub mod io;
pub mod kernels;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod report;
pub mod tensor;
pub mod train;

/// The walkthrough, `docs/walkthrough.md`, included here so that `cargo test` runs its code
/// blocks and `cargo doc` renders it.
#[doc = include_str!("../docs/walkthrough.md")]
pub mod walkthrough {}

pub use error::{Error, Result};
pub use tensor::{Tensor, is_grad_enabled, no_grad};
