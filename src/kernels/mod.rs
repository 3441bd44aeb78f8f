//! Kernels: plain functions over `&[f32]` slices, with no autodiff and no `Tensor`.
//!
//! Everything that touches numbers in bulk ends here. The ops in [`crate::ops`] describe *what*
//! is computed and how its gradient flows; the kernels say *how* it is computed fast:
//!
//! - [`gemm`]: the matrix product through `matrixmultiply::sgemm`, split in row blocks over
//!   rayon's pool when it is large, and a small-M path for decoding;
//! - [`simd`]: the hot inner loops `sgemm` does not cover (dot products, softmax, RMSNorm, the
//!   AdamW update), with a portable scalar reference and AVX2 / AVX-512 versions;
//! - [`parallel`]: when a loop is worth splitting across threads;
//! - [`matvec`]: the decode step's products `x·Wᵀ` for a few rows, split over the team;
//! - [`roofline`]: the read bandwidth that bounds decoding, measured;
//! - [`team`]: a team of threads that stays awake between the small products of a decode step.

pub mod gemm;
pub mod matvec;
pub mod parallel;
pub mod roofline;
pub mod simd;
pub mod team;
