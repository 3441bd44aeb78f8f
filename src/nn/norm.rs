//! RMSNorm as a module: the fused [`Tensor::rms_norm`] op with its learned scale.

use crate::tensor::Tensor;

/// RMSNorm over the last axis with a learned per-feature scale (initialised to 1).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// The scale, `[dim]`.
    pub weight: Tensor,
    /// Added to the mean square before the square root.
    pub eps: f32,
}

impl RmsNorm {
    /// A norm over `dim` features with scale 1.
    pub fn new(dim: usize, eps: f32) -> RmsNorm {
        RmsNorm { weight: Tensor::ones(&[dim]).requires_grad(), eps }
    }

    /// Normalises `x` (`[..., dim]`).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm(&self.weight, self.eps)
    }
}
