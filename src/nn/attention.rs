//! Multi-head causal self-attention with rotary position embeddings.
//!
//! ```text
//! x [B, T, D] ─ wq ─► q [B, T, H, hd] ─ RoPE(pos) ─┐
//!             ─ wk ─► k [B, T, H, hd] ─ RoPE(pos) ─┼─ causal attention ─► [B, T, H, hd]
//!             ─ wv ─► v [B, T, H, hd] ─────────────┘        ─ reshape [B, T, D] ─ wo ─► out
//! ```
//!
//! `D = H·hd`: each head attends with its own `hd`-wide slice of q, k and v. Positions are
//! absolute (`offset + t`), so the same weights serve a full sequence and a continuation.

use std::sync::Arc;

use rand::rngs::StdRng;

use super::Linear;
use crate::tensor::Tensor;

/// The attention sub-layer of a block.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Query projection `[D, D]`.
    pub wq: Linear,
    /// Key projection `[D, D]`.
    pub wk: Linear,
    /// Value projection `[D, D]`.
    pub wv: Linear,
    /// Output projection `[D, D]`.
    pub wo: Linear,
    /// Number of heads H.
    pub heads: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
}

impl Attention {
    /// Random projections with standard deviation `std`.
    pub fn new(dim: usize, heads: usize, rope_theta: f32, std: f32, rng: &mut StdRng) -> Attention {
        Attention {
            wq: Linear::new(dim, dim, std, rng),
            wk: Linear::new(dim, dim, std, rng),
            wv: Linear::new(dim, dim, std, rng),
            wo: Linear::new(dim, dim, std, rng),
            heads,
            rope_theta,
        }
    }

    /// Self-attention over `x` (`[B, T, D]`) whose first token is at absolute position
    /// `offset`; each token sees itself and the tokens before it.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Tensor {
        self.forward_masked(x, offset, None)
    }

    /// The same, each token seeing only the tokens before it that `visible` (`[B, T]`) marks,
    /// and itself ([`Tensor::attention_masked`]).
    pub fn forward_masked(&self, x: &Tensor, offset: usize, visible: Option<&Arc<[bool]>>) -> Tensor {
        let (b, t, d) = (x.dim(0), x.dim(1), x.dim(2));
        let hd = d / self.heads;
        let split = |y: Tensor| y.reshape(&[b, t, self.heads, hd]); // [B, T, H, hd]
        let q = split(self.wq.forward(x)).rope(offset, self.rope_theta);
        let k = split(self.wk.forward(x)).rope(offset, self.rope_theta);
        let v = split(self.wv.forward(x));
        let o = Tensor::attention_masked(&q, &k, &v, visible).reshape(&[b, t, d]); // heads side by side again
        self.wo.forward(&o)
    }
}
