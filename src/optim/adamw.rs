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
//!
//! As in PyTorch, `t` is counted **per parameter**: it is the number of updates that
//! parameter has had, not the number of times [`AdamW::step`] was called. The two differ for a
//! parameter that joins late (frozen at first, then unfrozen): its moments start at zero when
//! it joins, so its bias correction must start at `t = 1` too. With a global count its first
//! update would be corrected as if its moments had been averaging for `t` steps: with the
//! default betas the step comes out 0.64 times the right size at `t = 3`, and 3.2 times it for
//! a large `t` (`m̂/√v̂ = 0.1·g / √(0.001·g²)`).

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
    /// Per parameter, the updates it has had: its `t` (0 until its first update).
    param_steps: Vec<u64>,
    /// Calls of [`AdamW::step`] so far (what a learning-rate schedule counts).
    step: u64,
}

impl AdamW {
    /// An optimizer for `params` (leaves; those with `requires_grad` off are skipped).
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> AdamW {
        let n = params.len();
        AdamW {
            params,
            config,
            m: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            param_steps: vec![0; n],
            step: 0,
        }
    }

    /// The parameters it updates.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The number of times [`step`](AdamW::step) has been called (a schedule's step count).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Per parameter, the number of updates it has had: the `t` of its bias correction.
    pub fn param_steps(&self) -> &[u64] {
        &self.param_steps
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        self.params.iter().for_each(Tensor::zero_grad);
    }

    /// Updates every parameter that requires a gradient and has one, each with its own step
    /// count `t` (see the module doc).
    pub fn step(&mut self) {
        self.step += 1;
        let c = self.config;
        let params = self.params.iter().zip(&mut self.m).zip(&mut self.v).zip(&mut self.param_steps);
        for (((p, m), v), t) in params {
            if !p.requires_grad_flag() {
                continue;
            }
            p.with_grad(|g| {
                let Some(g) = g else { return };
                if m.is_empty() {
                    // First update: the moments start at zero, and t at 1.
                    *m = vec![0.0; g.len()];
                    *v = vec![0.0; g.len()];
                }
                *t += 1;
                let h = AdamWStep {
                    lr: c.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                    step: *t,
                };
                p.update_data(|theta| update(theta, g, m, v, &h));
            });
        }
    }

    /// The optimizer's state, for checkpoints.
    pub fn state(&self) -> AdamWState<'_> {
        AdamWState { step: self.step, param_steps: &self.param_steps, m: &self.m, v: &self.v }
    }

    /// Restores a state saved by [`state`](AdamW::state): the call count `step`, and per
    /// parameter its update count and moments. Errors ([`Error::Format`](crate::Error::Format))
    /// if there is not one of each per parameter, if a moment's length is not its parameter's,
    /// or if a parameter's moments and step count disagree (moments are allocated at the
    /// first update: empty exactly when the count is 0).
    pub fn set_state(
        &mut self,
        step: u64,
        param_steps: Vec<u64>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) -> crate::Result<()> {
        let n = self.params.len();
        if m.len() != n || v.len() != n || param_steps.len() != n {
            return Err(crate::Error::Format(format!(
                "optimizer state has {} / {} moment buffers and {} step counts for {n} parameters",
                m.len(),
                v.len(),
                param_steps.len(),
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
                if buf.is_empty() != (param_steps[i] == 0) {
                    return Err(crate::Error::Format(format!(
                        "optimizer state: parameter {i} has {} updates but {} {name} moment",
                        param_steps[i],
                        if buf.is_empty() { "no" } else { "a" },
                    )));
                }
            }
        }
        self.step = step;
        self.param_steps = param_steps;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

/// A view of an [`AdamW`]'s state (see [`AdamW::state`]), one entry per parameter in the
/// optimizer's order.
#[derive(Clone, Copy, Debug)]
pub struct AdamWState<'a> {
    /// Calls of [`AdamW::step`].
    pub step: u64,
    /// Updates each parameter has had (its bias-correction `t`; 0: never updated).
    pub param_steps: &'a [u64],
    /// First moments (empty: never updated).
    pub m: &'a [Vec<f32>],
    /// Second moments (empty: never updated).
    pub v: &'a [Vec<f32>],
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
    fn a_parameter_that_joins_later_starts_its_own_bias_correction() {
        // `b` is frozen for two steps, then unfrozen. PyTorch counts steps per parameter, so
        // b's first update is a first step (t = 1): lr·g/(|g| + ε) ≈ lr·sign(g), as for a fresh
        // optimizer. With a global count (t = 3) it would be about lr·0.64 instead.
        let config = AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() };
        let a = Tensor::ones(&[2]).requires_grad();
        let b = Tensor::from_vec(vec![1.0, -2.0], &[2]).requires_grad();
        b.set_requires_grad(false);
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], config);
        for _ in 0..2 {
            opt.zero_grad();
            a.mul_scalar(3.0).sum_all().backward();
            opt.step();
        }
        assert_eq!(opt.param_steps(), [2, 0]);
        b.set_requires_grad(true);
        opt.zero_grad();
        a.add(&b).mul_scalar(3.0).sum_all().backward();
        opt.step();
        assert_eq!((opt.step_count(), opt.param_steps()), (3, &[3, 1][..]));
        let got = b.to_vec();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 2.1).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn set_state_refuses_counts_that_disagree_with_the_moments() {
        let w = Tensor::ones(&[2]).requires_grad();
        let mut opt = AdamW::new(vec![w], AdamWConfig::default());
        let err = opt.set_state(1, vec![0], vec![vec![0.0; 2]], vec![vec![0.0; 2]]).unwrap_err();
        assert!(err.to_string().contains("parameter 0 has 0 updates but a first moment"), "{err}");
        let err = opt.set_state(1, vec![1], vec![vec![]], vec![vec![]]).unwrap_err();
        assert!(err.to_string().contains("has 1 updates but no first moment"), "{err}");
        let err = opt.set_state(1, vec![], vec![vec![]], vec![vec![]]).unwrap_err();
        assert!(err.to_string().contains("0 step counts for 1 parameters"), "{err}");
        opt.set_state(5, vec![3], vec![vec![0.0; 2]], vec![vec![0.0; 2]]).unwrap();
        assert_eq!((opt.step_count(), opt.param_steps()), (5, &[3][..]));
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
