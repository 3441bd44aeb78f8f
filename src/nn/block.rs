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
use crate::model::LegoConfig;
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
    /// A block of a model with this `config` (width, heads, MLP width, RoPE base, norm ε):
    /// unit norms, and projections drawn by `rng` from a normal distribution of standard
    /// deviation `1/√dim` truncated at ±2 std, in the order wq, wk, wv, wo, w1, w2, w3.
    pub fn new(config: &LegoConfig, rng: &mut StdRng) -> Block {
        let c = config;
        let std = 1.0 / (c.dim as f32).sqrt();
        Block {
            attention_norm: RmsNorm::new(c.dim, c.norm_eps),
            attention: Attention::new(c.dim, c.num_heads, c.rope_theta, std, rng),
            ffn_norm: RmsNorm::new(c.dim, c.norm_eps),
            feed_forward: SwiGluMlp::new(c.dim, c.ffn_hidden, std, rng),
        }
    }

    /// The layer applied to `x` (`[B, T, D]`, first token at absolute position `offset`).
    pub fn forward(&self, x: &Tensor, offset: usize) -> Tensor {
        self.forward_masked(x, offset, None)
    }

    /// The same, its attention seeing only the earlier tokens that `visible` (`[B, T]`) marks
    /// ([`Attention::forward_masked`](super::Attention::forward_masked)).
    pub fn forward_masked(
        &self,
        x: &Tensor,
        offset: usize,
        visible: Option<&std::sync::Arc<[bool]>>,
    ) -> Tensor {
        let attention = self.attention.forward_masked(&self.attention_norm.forward(x), offset, visible);
        let h = x.add(&attention); // [B, T, D]
        h.add(&self.feed_forward.forward(&self.ffn_norm.forward(&h))) // [B, T, D]
    }

    /// **The** list of the block's parameters, each with its Llama checkpoint name relative to
    /// the block, in checkpoint order. Everything that walks a block's weights (the
    /// optimizer through [`named_params`](Block::named_params), checkpoints, freezing,
    /// [`deep_clone`](Block::deep_clone)) reads this one list, so a new weight is added here
    /// and nowhere else.
    pub fn parameters_mut(&mut self) -> [(&'static str, &mut Tensor); 9] {
        let (a, f) = (&mut self.attention, &mut self.feed_forward);
        [
            ("attention_norm.weight", &mut self.attention_norm.weight),
            ("attention.wq.weight", &mut a.wq.weight),
            ("attention.wk.weight", &mut a.wk.weight),
            ("attention.wv.weight", &mut a.wv.weight),
            ("attention.wo.weight", &mut a.wo.weight),
            ("ffn_norm.weight", &mut self.ffn_norm.weight),
            ("feed_forward.w1.weight", &mut f.w1.weight),
            ("feed_forward.w2.weight", &mut f.w2.weight),
            ("feed_forward.w3.weight", &mut f.w3.weight),
        ]
    }

    /// The block's parameters with their names relative to the block (e.g.
    /// `attention.wq.weight`), in checkpoint order. The tensors are shared handles of the
    /// block's own (freezing one freezes the block's).
    pub fn parameters(&self) -> Vec<(&'static str, Tensor)> {
        // A clone of a block shares its tensors (each is an `Arc`), so the clone's list is
        // this block's list.
        self.clone().parameters_mut().into_iter().map(|(name, t)| (name, t.clone())).collect()
    }

    /// The block's parameters with their full checkpoint names under `prefix`
    /// (e.g. `layers.3.attention.wq.weight` for the prefix `layers.3`).
    pub fn named_params(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.parameters().into_iter().map(|(name, t)| (format!("{prefix}.{name}"), t)).collect()
    }

    /// Freezes (`false`) or unfreezes (`true`) every parameter of the block.
    pub fn set_requires_grad(&self, on: bool) {
        self.parameters().iter().for_each(|(_, t)| t.set_requires_grad(on));
    }

    /// A deep copy (new buffers), for growing a model by stacking.
    pub fn deep_clone(&self) -> Block {
        let mut b = self.clone();
        for (_, t) in b.parameters_mut() {
            *t = t.deep_clone();
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_is_listed_once_with_its_shape() {
        let c = LegoConfig::new(11, 8, 2, 2, 12, 16);
        let block = Block::new(&c, &mut Tensor::rng(1));
        let list = block.parameters();
        let names: Vec<&str> = list.iter().map(|(n, _)| *n).collect();
        let shapes: Vec<&[usize]> = list.iter().map(|(_, t)| t.shape()).collect();
        let (d, f) = (&[8, 8][..], &[12, 8][..]);
        assert_eq!(shapes, [&[8][..], d, d, d, d, &[8], f, &[8, 12], f]);
        // Distinct names and distinct tensors.
        for (i, (n, t)) in list.iter().enumerate() {
            assert!(list[i + 1..].iter().all(|(m, u)| m != n && u.id() != t.id()), "{n} listed twice");
        }
        // Every tensor the block holds is in the list (its parameter count adds up).
        let (d, h) = (c.dim, c.ffn_hidden);
        assert_eq!(list.iter().map(|(_, t)| t.numel()).sum::<usize>(), 2 * d + 4 * d * d + 3 * d * h);
        assert_eq!(names[1], "attention.wq.weight");
    }

    #[test]
    fn deep_clone_copies_every_parameter_and_freezing_reaches_them_all() {
        let block = Block::new(&LegoConfig::new(11, 8, 2, 2, 12, 16), &mut Tensor::rng(2));
        let copy = block.deep_clone();
        for ((name, a), (_, b)) in block.parameters().iter().zip(copy.parameters()) {
            assert_ne!(a.id(), b.id(), "{name} is shared");
            assert_eq!(a.to_vec(), b.to_vec(), "{name} differs");
        }
        copy.set_requires_grad(false);
        assert!(copy.parameters().iter().all(|(_, t)| !t.requires_grad_flag()));
        assert!(block.parameters().iter().all(|(_, t)| t.requires_grad_flag()));
    }
}
