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
//! - [`io`]: the safetensors checkpoint format.

pub mod data;
pub mod error;
pub mod io;
pub mod kernels;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{Tensor, is_grad_enabled, no_grad};
