//! One transformer layer, pre-norm as in Llama:
//!
//! ```text
//! h = x + attention(attention_norm(x))
//! y = h + mlp(ffn_norm(h))
//! ```
//!
//! The residual stream `x → h → y` carries the token's representation through the layers;
//! each sub-layer reads a normalised copy and adds its contribution.

use rand::rngs::StdRng;

use super::{Attention, RmsNorm, SwiGluMlp};
use crate::tensor::Tensor;

/// A pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    /// Norm before attention.
    pub attention_norm: RmsNorm,
    /// Multi-head self-attention with RoPE.
    pub attention: Attention,
    /// Norm before the MLP.
    pub ffn_norm: RmsNorm,
    /// SwiGLU MLP.
    pub feed_forward: SwiGluMlp,
}

impl Block {
    /// A block with random projections (standard deviation `std`) and unit norms.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        heads: usize,
        hidden: usize,
        rope_theta: f32,
        eps: f32,
        std: f32,
        rng: &mut StdRng,
    ) -> Block {
        Block {
            attention_norm: RmsNorm::new(dim, eps),
            attention: Attention::new(dim, heads, rope_theta, std, rng),
            ffn_norm: RmsNorm::new(dim, eps),
            feed_forward: SwiGluMlp::new(dim, hidden, std, rng),
        }
    }

    /// The layer applied to `x` (`[B, T, D]`, first token at absolute position `offset`).
    pub fn forward(&self, x: &Tensor, offset: usize) -> Tensor {
        let h = x.add(&self.attention.forward(&self.attention_norm.forward(x), offset));
        h.add(&self.feed_forward.forward(&self.ffn_norm.forward(&h)))
    }

    /// The block's parameters with their Llama checkpoint names under `prefix`
    /// (e.g. `layers.3`).
    pub fn named_params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let a = &self.attention;
        let f = &self.feed_forward;
        [
            ("attention_norm.weight", &self.attention_norm.weight),
            ("attention.wq.weight", &a.wq.weight),
            ("attention.wk.weight", &a.wk.weight),
            ("attention.wv.weight", &a.wv.weight),
            ("attention.wo.weight", &a.wo.weight),
            ("ffn_norm.weight", &self.ffn_norm.weight),
            ("feed_forward.w1.weight", &f.w1.weight),
            ("feed_forward.w2.weight", &f.w2.weight),
            ("feed_forward.w3.weight", &f.w3.weight),
        ]
        .into_iter()
        .map(|(name, t)| (format!("{prefix}.{name}"), t.clone()))
        .collect()
    }

    /// A deep copy (new buffers), for growing a model by stacking.
    pub fn deep_clone(&self) -> Block {
        let mut b = self.clone();
        for t in [
            &mut b.attention_norm.weight,
            &mut b.attention.wq.weight,
            &mut b.attention.wk.weight,
            &mut b.attention.wv.weight,
            &mut b.attention.wo.weight,
            &mut b.ffn_norm.weight,
            &mut b.feed_forward.w1.weight,
            &mut b.feed_forward.w2.weight,
            &mut b.feed_forward.w3.weight,
        ] {
            *t = t.deep_clone();
        }
        b
    }
}
