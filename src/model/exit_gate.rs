//! The learned exit gate: CALM's "classifier" confidence measure, `D + 1` weights that decide
//! whether a token exits without running the exit head.
//!
//! **Why it exists.** The spec's confidence is the largest probability of the exit head's
//! softmax ([`ExitMeasure::MaxSoftmax`]). To know it, every token pays the exit head, a `V×D`
//! projection to the vocabulary; a token that then goes deep pays the deep head as well. With
//! a vocabulary of 4,096 and `D` = 256 that check costs about 1.3 layers (the prototype's
//! weakness 6), so early exit is slower than full depth until most tokens exit. CALM (Schuster
//! et al., 2022, "Confident Adaptive Language Modeling") lists three measures: the softmax
//! response (ours), the change of the hidden state, and a small **classifier** on the hidden
//! state trained to say "exit". This is the classifier, as small as it can be:
//!
//! ```text
//! x̂ = rmsnorm(h) ⊙ γ            the exit head's own norm (model.exit().norm), [D]
//! z = w·x̂ + b                    one logit: D weights and a bias
//! p_exit = sigmoid(z)            the token exits when p_exit >= threshold
//! ```
//!
//! A token that goes deep now pays a norm and a `D`-term dot product beyond full depth, never
//! a head; only a token that exits runs the exit head, and those logits are its output.
//!
//! **What it learns.** [`train_exit_gate`](crate::train::train_exit_gate) fits `w, b` by
//! logistic regression to imitate the spec's routing (label: max-softmax confidence at or
//! above the calibrated threshold), on the training split's exit states, right after phase 1.
//! Its own [`threshold`](ExitGate::threshold) is then calibrated on the validation split so
//! that the requested share of tokens exits. The gate is frozen from then on: the lower layers
//! and the exit head it reads are frozen in phase 2, so it stays valid in the extended model
//! (and [`extend`](super::LegoTransformer::extend) keeps it).
//!
//! **In checkpoints** (see [`crate::model::checkpoint`]): `exit_gate.weight` `[1, D]`,
//! `exit_gate.bias` `[1]`, and the threshold in the metadata entry
//! [`ExitGate::THRESHOLD_KEY`] (`exit_gate.threshold`, a decimal that reads back to the same
//! f32). A checkpoint without them loads as a model without a gate.
//!
//! [`ExitMeasure::MaxSoftmax`]: super::ExitMeasure::MaxSoftmax

use super::config::check_threshold;
use super::early_exit::{ExitMeasure, ExitRule, UpperCacheFill};
use crate::error::{Error, Result};
use crate::kernels::simd;
use crate::nn::RmsNorm;
use crate::ops::unary::sigmoid;
use crate::tensor::Tensor;

/// A linear exit gate on the normalised exit hidden state (see the module doc).
#[derive(Clone, Debug)]
pub struct ExitGate {
    /// The weights `w`, `[1, D]` (frozen: no gradient).
    pub weight: Tensor,
    /// The bias `b`, `[1]` (frozen).
    pub bias: Tensor,
    /// A token exits when its `p_exit` is at least this (calibrated on the validation split).
    pub threshold: f32,
}

impl ExitGate {
    /// The checkpoint metadata key of the gate's threshold.
    pub const THRESHOLD_KEY: &'static str = "exit_gate.threshold";

    /// A gate from its `D` weights, bias and threshold (frozen). Weights or a bias that are not
    /// finite, or a threshold that is not a number >= 0, are an error.
    pub fn new(weight: Vec<f32>, bias: f32, threshold: f32) -> Result<ExitGate> {
        if let Some(i) = weight.iter().position(|w| !w.is_finite()) {
            return Err(Error::NonFinite(format!("exit gate: weight {i} is {}", weight[i])));
        }
        if !bias.is_finite() {
            return Err(Error::NonFinite(format!("exit gate: the bias is {bias}")));
        }
        check_threshold(threshold)?;
        let d = weight.len();
        Ok(ExitGate {
            weight: Tensor::from_vec(weight, &[1, d]),
            bias: Tensor::from_vec(vec![bias], &[1]),
            threshold,
        })
    }

    /// The width `D` it reads.
    pub fn dim(&self) -> usize {
        self.weight.numel()
    }

    /// The gate's logit `z = w·(rmsnorm(h) ⊙ γ) + b` for one exit hidden state `h` (`[D]`),
    /// with `norm` the exit head's RMSNorm. `normed` (`[D]`) is scratch and ends holding `x̂`.
    /// Allocates nothing: the decoder calls it once per row per step.
    pub fn logit(&self, norm: &RmsNorm, h: &[f32], normed: &mut [f32]) -> f32 {
        assert_eq!(
            h.len(),
            self.dim(),
            "ExitGate::logit: a hidden state of {} values for a gate of width {}",
            h.len(),
            self.dim()
        );
        simd::rmsnorm(h, &norm.weight.data(), norm.eps, normed);
        simd::dot(normed, &self.weight.data()) + self.bias.data()[0]
    }

    /// `p_exit = sigmoid(logit)`: what the routing compares with the threshold, and what the
    /// statistics report as the token's confidence. Calibration, the fake-early-exit
    /// evaluation and decoding all compute it this way (the decoder calls
    /// [`logit`](ExitGate::logit), checks that it is finite, then takes the same sigmoid), so a
    /// token scores the same in each, given the same hidden state.
    pub fn probability(&self, norm: &RmsNorm, h: &[f32], normed: &mut [f32]) -> f32 {
        sigmoid(self.logit(norm, h, normed))
    }

    /// The exit rule of this gate at its calibrated threshold, with `fill`.
    pub fn rule(&self, fill: UpperCacheFill) -> ExitRule {
        ExitRule { threshold: self.threshold, fill, measure: ExitMeasure::Gate }
    }

    /// A copy with its own buffers (frozen).
    pub fn deep_clone(&self) -> ExitGate {
        ExitGate {
            weight: Tensor::from_vec(self.weight.to_vec(), self.weight.shape()),
            bias: Tensor::from_vec(self.bias.to_vec(), self.bias.shape()),
            threshold: self.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probability_is_a_sigmoid_of_a_dot_product_with_the_normalised_state() {
        let norm = RmsNorm { weight: Tensor::from_vec(vec![1.0, 2.0], &[2]), eps: 0.0 };
        let gate = ExitGate::new(vec![0.5, -0.25], 0.1, 0.5).unwrap();
        let h = [3.0, 4.0];
        let mut normed = [0.0; 2];
        // rms = sqrt(12.5); x̂ = (3, 8) / rms.
        let rms = 12.5f32.sqrt();
        let z = 0.5 * 3.0 / rms - 0.25 * 8.0 / rms + 0.1;
        assert!((gate.logit(&norm, &h, &mut normed) - z).abs() < 1e-6);
        assert!((gate.probability(&norm, &h, &mut normed) - 1.0 / (1.0 + (-z).exp())).abs() < 1e-6);
        assert!(!gate.weight.requires_grad_flag() && !gate.bias.requires_grad_flag(), "a gate is frozen");
    }

    #[test]
    fn a_gate_with_a_non_finite_weight_or_a_bad_threshold_is_an_error() {
        assert!(matches!(ExitGate::new(vec![1.0, f32::NAN], 0.0, 0.5), Err(Error::NonFinite(_))));
        assert!(matches!(ExitGate::new(vec![1.0], f32::INFINITY, 0.5), Err(Error::NonFinite(_))));
        assert!(ExitGate::new(vec![1.0], 0.0, -0.1).unwrap_err().to_string().contains("threshold"));
    }
}
