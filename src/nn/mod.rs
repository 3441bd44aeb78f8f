//! Neural-network modules: the pieces of a Llama-style decoder, built from [`ops`](crate::ops).
//!
//! Each module owns its parameters as leaf [`Tensor`](crate::Tensor)s and has a `forward` that
//! builds the autodiff graph (the training path). The decoding path, which must not allocate
//! or record anything per token, reads the same parameters through
//! [`model::decoder`](crate::model::decoder) instead.
//!
//! - [`Linear`]: `y = x·Wᵀ` (no bias), `W` stored `(out, in)`;
//! - [`RmsNorm`]: RMSNorm with a learned scale;
//! - [`Attention`]: multi-head self-attention with RoPE;
//! - [`SwiGluMlp`]: Llama's MLP, `w2·(silu(w1·x) ⊙ w3·x)`;
//! - [`Block`]: one pre-norm transformer layer, `x + attn(norm(x))` then `x + mlp(norm(x))`.
//!
//! A block's parameters are listed once, with their checkpoint names (Llama's conventions), in
//! [`Block::parameters_mut`]; the optimizer, checkpoints, freezing and deep copies all read that
//! list. `Block::new` takes the model's [`LegoConfig`](crate::model::LegoConfig), a plain set
//! of sizes, so that its numbers cannot be passed in the wrong order.

pub mod attention;
pub mod block;
pub mod linear;
pub mod mlp;
pub mod norm;

pub use attention::Attention;
pub use block::Block;
pub use linear::Linear;
pub use mlp::SwiGluMlp;
pub use norm::RmsNorm;
