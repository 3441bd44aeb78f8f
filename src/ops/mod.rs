//! Differentiable operations on [`Tensor`](crate::Tensor)s, one family a file.
//!
//! Each op computes its output with the [`kernels`](crate::kernels) and, when a gradient is
//! wanted, records a closure that computes the gradients of its inputs from the gradient of its
//! output. The closure sits right below the forward code, with the derivation in a comment, so
//! that the two can be read (and checked) together.
//!
//! Closures save what the backward needs as shared buffers (`Arc<Vec<f32>>`), never as
//! `Tensor`s, so that dropping a graph never recurses.
//!
//! | file | ops |
//! |---|---|
//! | [`matmul`] | `matmul`, `matmul_t` (x·Wᵀ), batched and broadcast |
//! | [`binary`] | `add`, `sub`, `mul`, `div` with broadcasting |
//! | [`unary`] | scalar ops, `exp`, `log`, `silu`, `relu`, `tanh`, `sqr`, `sqrt`, `neg` |
//! | [`reduce`] | `sum_all`, `mean_all`, `sum_axis`, `mean_axis` |
//! | [`layout`] | `reshape`, `permute`, `transpose`, `narrow`, `cat` |
//! | [`embedding`] | the table lookup and its scatter-add backward |
//! | [`rmsnorm`] | RMSNorm with a learned scale, fused |
//! | [`swiglu`] | `silu(a)·b`, fused |
//! | [`rope`] | rotary position embedding at an absolute offset |
//! | [`softmax`] | `softmax`, `log_softmax` over the last axis |
//! | [`attention`] | causal scaled-dot-product attention, with a cached prefix |
//! | [`cross_entropy`] | cross-entropy from logits, optionally weighted per token |
//! | [`select`] | `max`, `argmax`, `top_k` (no gradient) |

pub mod attention;
pub mod binary;
pub mod cross_entropy;
pub mod embedding;
pub mod layout;
pub mod matmul;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod select;
pub mod softmax;
pub mod swiglu;
pub mod unary;

#[cfg(test)]
pub(crate) mod gradcheck;
