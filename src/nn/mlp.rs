//! Llama's feed-forward network: `w2 · (silu(w1·x) ⊙ w3·x)` (SwiGLU, Shazeer 2020).
//!
//! `w1` computes a gate, `w3` a value; the gate, passed through SiLU, scales the value
//! element by element, and `w2` projects back to the model width.

use rand::rngs::StdRng;

use super::Linear;
use crate::tensor::Tensor;

/// The SwiGLU MLP sub-layer of a block.
#[derive(Clone, Debug)]
pub struct SwiGluMlp {
    /// Gate projection `[F, D]`.
    pub w1: Linear,
    /// Down projection `[D, F]`.
    pub w2: Linear,
    /// Value projection `[F, D]`.
    pub w3: Linear,
}

impl SwiGluMlp {
    /// Random projections between `dim` and `hidden` features, standard deviation `std`.
    pub fn new(dim: usize, hidden: usize, std: f32, rng: &mut StdRng) -> SwiGluMlp {
        SwiGluMlp {
            w1: Linear::new(dim, hidden, std, rng),
            w2: Linear::new(hidden, dim, std, rng),
            w3: Linear::new(dim, hidden, std, rng),
        }
    }

    /// `w2·(silu(w1·x) ⊙ w3·x)` for `x` of shape `[..., D]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.w2.forward(&Tensor::swiglu(&self.w1.forward(x), &self.w3.forward(x)))
    }
}
