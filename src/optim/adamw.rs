//! AdamW (Loshchilov & Hutter 2019), exactly as `torch.optim.AdamW` computes it.
//!
//! For each parameter `θ` with gradient `g` at step `t` (counting from 1):
//!
//! ```text
//! θ ← θ·(1 − lr·λ)                      decoupled weight decay (not added to g)
//! m ← β₁·m + (1 − β₁)·g                  running mean of the gradient
//! v ← β₂·v + (1 − β₂)·g²                 running mean of its square
//! θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! The `1 − βᵗ` factors undo the bias of `m` and `v` towards their zero start. Parameters
//! that do not require a gradient (frozen) or got none are skipped, and keep their moments.
//! The update itself is one fused pass per parameter ([`simd::adamw_update`]).

use rayon::prelude::*;

use crate::kernels::parallel::worth_splitting;
use crate::kernels::simd::{self, AdamWStep};
use crate::tensor::Tensor;

/// AdamW's hyper-parameters. The defaults are PyTorch's, except `weight_decay`, whose
/// PyTorch default 0.01 is kept too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the running mean of the gradient.
    pub beta1: f32,
    /// Decay of the running mean of its square.
    pub beta2: f32,
    /// Added to the denominator, against division by zero.
    pub eps: f32,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The AdamW optimizer over a fixed list of parameters.
pub struct AdamW {
    params: Vec<Tensor>,
    /// Hyper-parameters; `config.lr` may be changed between steps (a schedule does).
    pub config: AdamWConfig,
    /// First moments, one buffer per parameter (allocated at its first update).
    m: Vec<Vec<f32>>,
    /// Second moments.
    v: Vec<Vec<f32>>,
    /// Steps taken so far.
    step: u64,
}

impl AdamW {
    /// An optimizer for `params` (leaves; those with `requires_grad` off are skipped).
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> AdamW {
        let n = params.len();
        AdamW { params, config, m: vec![Vec::new(); n], v: vec![Vec::new(); n], step: 0 }
    }

    /// The parameters it updates.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        self.params.iter().for_each(Tensor::zero_grad);
    }

    /// Updates every parameter that requires a gradient and has one.
    pub fn step(&mut self) {
        self.step += 1;
        let c = self.config;
        let h = AdamWStep {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
        };
        for ((p, m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
            if !p.requires_grad_flag() {
                continue;
            }
            p.with_grad(|g| {
                let Some(g) = g else { return };
                if m.is_empty() {
                    *m = vec![0.0; g.len()];
                    *v = vec![0.0; g.len()];
                }
                p.update_data(|theta| update(theta, g, m, v, &h));
            });
        }
    }

    /// The optimizer's state, for checkpoints: (step, first moments, second moments), one
    /// moment buffer per parameter (empty if it was never updated).
    pub fn state(&self) -> (u64, &[Vec<f32>], &[Vec<f32>]) {
        (self.step, &self.m, &self.v)
    }

    /// Restores a state saved by [`state`](AdamW::state). Returns an error message if the
    /// buffers do not fit the parameters.
    pub fn set_state(&mut self, step: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> crate::Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            return Err(crate::Error::Format(format!(
                "optimizer state has {} / {} moment buffers for {} parameters",
                m.len(),
                v.len(),
                self.params.len()
            )));
        }
        for (i, p) in self.params.iter().enumerate() {
            for (name, buf) in [("first", &m[i]), ("second", &v[i])] {
                if !buf.is_empty() && buf.len() != p.numel() {
                    return Err(crate::Error::Format(format!(
                        "optimizer state: {name} moment of parameter {i} has {} values, the parameter {}",
                        buf.len(),
                        p.numel()
                    )));
                }
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

/// One parameter's update, split into chunks over threads when it is large. Each element's
/// update is independent, so the split does not change the result.
fn update(theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    const CHUNK: usize = 1 << 14;
    if worth_splitting(theta.len() * 8) {
        theta
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((t, g), m), v)| simd::adamw_update(t, g, m, v, h));
    } else {
        simd::adamw_update(theta, g, m, v, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_by_hand() {
        // At step 1, m̂ = g and v̂ = g², so the step is lr·g/(|g| + ε) ≈ lr·sign(g).
        let w = Tensor::from_vec(vec![1.0, -2.0], &[2]).requires_grad();
        let mut opt =
            AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() });
        w.mul_scalar(3.0).sum_all().backward();
        opt.step();
        let got = w.to_vec();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 2.1).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn frozen_parameters_are_skipped() {
        let a = Tensor::ones(&[3]).requires_grad();
        let b = Tensor::ones(&[3]).requires_grad();
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], AdamWConfig::default());
        a.mul(&b).sum_all().backward();
        b.set_requires_grad(false);
        opt.step();
        assert_ne!(a.to_vec(), vec![1.0; 3]);
        assert_eq!(b.to_vec(), vec![1.0; 3]);
    }
}
