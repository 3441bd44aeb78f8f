//! A linear layer without bias: `y = x·Wᵀ`, with `W` of shape `(out, in)` as PyTorch and Llama
//! checkpoints store it.

use rand::rngs::StdRng;

use crate::tensor::Tensor;

/// `y = x·Wᵀ`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight, `[out, in]`.
    pub weight: Tensor,
}

impl Linear {
    /// A layer from `inputs` to `outputs` features, weights drawn from a normal distribution
    /// with standard deviation `std`, truncated at ±2 std (the prototype's initialisation).
    pub fn new(inputs: usize, outputs: usize, std: f32, rng: &mut StdRng) -> Linear {
        Linear { weight: Tensor::trunc_normal(&[outputs, inputs], 0.0, std, rng).requires_grad() }
    }

    /// `x·Wᵀ` for `x` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul_t(&self.weight)
    }

    /// The number of input features.
    pub fn inputs(&self) -> usize {
        self.weight.dim(1)
    }

    /// The number of output features.
    pub fn outputs(&self) -> usize {
        self.weight.dim(0)
    }
}
