//! The learned exit gate: CALM's "classifier" confidence measure, `2D + 1` weights that decide
//! whether a token exits without running the exit head.
//!
//! **Why it exists.** The spec's confidence is the largest probability of the exit head's
//! softmax ([`ExitMeasure::MaxSoftmax`]). To know it, every token pays the exit head, a `V×D`
//! projection to the vocabulary; a token that then goes deep pays the deep head as well. With
//! a vocabulary of 4,096 and `D` = 256 that check costs about 1.3 layers (the prototype's
//! weakness 6), so early exit is slower than full depth until most tokens exit. CALM (Schuster
//! et al., 2022, "Confident Adaptive Language Modeling") lists three measures: the softmax
//! response (ours), the change of the hidden state, and a small **classifier** on the hidden
//! state trained to say "exit". This is the classifier, nearly as small as it can be:
//!
//! ```text
//! x̂ = rmsnorm(h) ⊙ γ                  the exit head's own norm (model.exit().norm), [D]
//! z = w·x̂ + q·(x̂ ⊙ x̂) + b             one logit: D linear weights, D square weights, a bias
//!   = Σᵢ x̂ᵢ (wᵢ + qᵢ x̂ᵢ) + b           (how it is computed: one pass, 2 multiply-adds each)
//! p_exit = sigmoid(z)                  the token exits when p_exit >= threshold
//! ```
//!
//! **Why the squares.** The softmax's confidence is not a linear function of `x̂`: the logits
//! `W x̂` are, and their spread (what the largest probability measures) grows with the square
//! of `x̂` along the head's directions. A purely linear gate (`D + 1` weights, `q = 0`) routed
//! 88.8 % of held-out tokens as the softmax does on `tests/exit_gate.rs`'s model and 75.9 % of
//! the validation tokens of the README's Shakespeare model; the squares, still one logistic
//! regression (convex, fitted by Newton's method), raise that to 90.5 % and 79.8 % for `D`
//! more multiply-adds, which next to the `V×D` exit head (`V` ≥ 256) is nothing.
//!
//! A token that goes deep now pays a norm and a `2D`-term dot product beyond full depth, never
//! a head; only a token that exits runs the exit head, and those logits are its output.
//!
//! **What it learns** (its [`GateKind`]). [`train_exit_gate`](crate::train::train_exit_gate) fits `w, q, b` by
//! logistic regression to imitate the spec's routing (label: max-softmax confidence at or
//! above the calibrated threshold), on the training split's exit states, right after phase 1.
//! Its own [`threshold`](ExitGate::threshold) is then calibrated on the validation split so
//! that the requested share of tokens exits. The gate is frozen from then on: the lower layers
//! and the exit head it reads are frozen in phase 2, so it stays valid in the extended model
//! (and [`extend`](super::LegoTransformer::extend) keeps it).
//! [`train_consistency_gate`](crate::train::train_consistency_gate) fits the same gate, after
//! phase 2, to another label: whether the exit's most likely token equals the deep model's
//! (CALM's consistency target). The arithmetic at decoding time is the same for both.
//!
//! **In checkpoints** (see [`crate::model::checkpoint`]): `exit_gate.weight` `[1, D]`,
//! `exit_gate.square_weight` `[1, D]`, `exit_gate.bias` `[1]`, and the threshold in the
//! metadata entry [`ExitGate::THRESHOLD_KEY`] (`exit_gate.threshold`, a decimal that reads
//! back to the same f32), its kind in [`ExitGate::KIND_KEY`] (`exit_gate.kind`: `imitation`
//! or `consistency`; a file without it holds an imitation gate). A checkpoint without them
//! loads as a model without a gate; one written by a linear gate (no `square_weight`) loads
//! with `q = 0`, the same gate.
//!
//! [`ExitMeasure::MaxSoftmax`]: super::ExitMeasure::MaxSoftmax

use super::config::check_threshold;
use super::early_exit::{ExitMeasure, ExitRule, UpperCacheFill};
use crate::error::{Error, Result};
use crate::kernels::simd;
use crate::nn::RmsNorm;
use crate::ops::unary::sigmoid;
use crate::tensor::Tensor;

/// What an exit gate was trained to predict (the label of its logistic regression).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GateKind {
    /// The spec's routing: the exit head's max-softmax confidence at or above its calibrated
    /// threshold. Trained after phase 1 (needs only the shallow model).
    #[default]
    Imitation,
    /// CALM's consistency: the exit head's most likely token equals the deep model's. Trained
    /// after phase 2 (needs the deep model).
    Consistency,
}

impl GateKind {
    /// The name used in checkpoints and reports: `imitation` or `consistency`.
    pub fn name(self) -> &'static str {
        match self {
            GateKind::Imitation => "imitation",
            GateKind::Consistency => "consistency",
        }
    }

    /// The kind named `name` (as [`name`](GateKind::name) writes it); anything else is an error.
    pub fn parse(name: &str) -> Result<GateKind> {
        match name {
            "imitation" => Ok(GateKind::Imitation),
            "consistency" => Ok(GateKind::Consistency),
            other => {
                Err(Error::Input(format!("exit gate kind '{other}': expected 'imitation' or 'consistency'")))
            }
        }
    }
}

/// An exit gate on the normalised exit hidden state, linear in `x̂` and in its squares (see
/// the module doc).
#[derive(Clone, Debug)]
pub struct ExitGate {
    /// The linear weights `w`, `[1, D]` (frozen: no gradient).
    pub weight: Tensor,
    /// The weights `q` of the squares `x̂ᵢ²`, `[1, D]` (frozen; zeros for a linear gate).
    pub square_weight: Tensor,
    /// The bias `b`, `[1]` (frozen).
    pub bias: Tensor,
    /// A token exits when its `p_exit` is at least this (calibrated on the validation split).
    pub threshold: f32,
    /// What it was trained to predict (routing does not depend on it).
    pub kind: GateKind,
}

impl ExitGate {
    /// The checkpoint metadata key of the gate's threshold.
    pub const THRESHOLD_KEY: &'static str = "exit_gate.threshold";
    /// The checkpoint metadata key of the gate's [`GateKind`].
    pub const KIND_KEY: &'static str = "exit_gate.kind";

    /// A gate from its `D` linear weights, `D` square weights, bias and threshold (frozen), of
    /// kind [`GateKind::Imitation`] (set [`kind`](ExitGate::kind) for another).
    /// Weights or a bias that are not finite, weight vectors of different lengths, or a
    /// threshold that is not a number >= 0, are an error.
    pub fn new(weight: Vec<f32>, square_weight: Vec<f32>, bias: f32, threshold: f32) -> Result<ExitGate> {
        if let Some(i) = weight.iter().position(|w| !w.is_finite()) {
            return Err(Error::NonFinite(format!("exit gate: weight {i} is {}", weight[i])));
        }
        if let Some(i) = square_weight.iter().position(|w| !w.is_finite()) {
            return Err(Error::NonFinite(format!("exit gate: square weight {i} is {}", square_weight[i])));
        }
        if square_weight.len() != weight.len() {
            return Err(Error::Input(format!(
                "exit gate: {} linear weights but {} square weights",
                weight.len(),
                square_weight.len()
            )));
        }
        if !bias.is_finite() {
            return Err(Error::NonFinite(format!("exit gate: the bias is {bias}")));
        }
        check_threshold(threshold)?;
        let d = weight.len();
        Ok(ExitGate {
            weight: Tensor::from_vec(weight, &[1, d]),
            square_weight: Tensor::from_vec(square_weight, &[1, d]),
            bias: Tensor::from_vec(vec![bias], &[1]),
            threshold,
            kind: GateKind::Imitation,
        })
    }

    /// A linear gate (`q = 0`): `z = w·x̂ + b`.
    pub fn linear(weight: Vec<f32>, bias: f32, threshold: f32) -> Result<ExitGate> {
        let d = weight.len();
        ExitGate::new(weight, vec![0.0; d], bias, threshold)
    }

    /// The width `D` it reads.
    pub fn dim(&self) -> usize {
        self.weight.numel()
    }

    /// The gate's logit `z = w·x̂ + q·(x̂ ⊙ x̂) + b`, `x̂ = rmsnorm(h) ⊙ γ`, for one exit hidden
    /// state `h` (`[D]`), with `norm` the exit head's RMSNorm. `normed` (`[D]`) is scratch and
    /// ends holding `x̂`. Allocates nothing: the decoder calls it once per row per step.
    pub fn logit(&self, norm: &RmsNorm, h: &[f32], normed: &mut [f32]) -> f32 {
        assert_eq!(
            h.len(),
            self.dim(),
            "ExitGate::logit: a hidden state of {} values for a gate of width {}",
            h.len(),
            self.dim()
        );
        simd::rmsnorm(h, &norm.weight.data(), norm.eps, normed);
        self.logit_of_normed(normed)
    }

    /// The logit of an already normalised state `x̂` (`[D]`): `Σᵢ x̂ᵢ (wᵢ + qᵢ x̂ᵢ) + b`, summed
    /// in order. Training reports its agreement through this too, so every path scores a
    /// token with the same arithmetic.
    pub fn logit_of_normed(&self, normed: &[f32]) -> f32 {
        assert_eq!(
            normed.len(),
            self.dim(),
            "ExitGate::logit_of_normed: a state of {} values for a gate of width {}",
            normed.len(),
            self.dim()
        );
        let (w, q) = (self.weight.data(), self.square_weight.data());
        let sum: f32 = normed.iter().zip(w.iter().zip(q.iter())).map(|(&x, (&w, &q))| x * (w + q * x)).sum();
        sum + self.bias.data()[0]
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
            square_weight: Tensor::from_vec(self.square_weight.to_vec(), self.square_weight.shape()),
            bias: Tensor::from_vec(self.bias.to_vec(), self.bias.shape()),
            threshold: self.threshold,
            kind: self.kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probability_is_a_sigmoid_of_the_normalised_state_and_its_squares() {
        let norm = RmsNorm { weight: Tensor::from_vec(vec![1.0, 2.0], &[2]), eps: 0.0 };
        let gate = ExitGate::new(vec![0.5, -0.25], vec![0.2, 0.1], 0.1, 0.5).unwrap();
        let h = [3.0, 4.0];
        let mut normed = [0.0; 2];
        // rms = sqrt(12.5); x̂ = (3, 8) / rms.
        let rms = 12.5f32.sqrt();
        let (x0, x1) = (3.0 / rms, 8.0 / rms);
        let z = 0.5 * x0 - 0.25 * x1 + 0.2 * x0 * x0 + 0.1 * x1 * x1 + 0.1;
        assert!((gate.logit(&norm, &h, &mut normed) - z).abs() < 1e-6);
        assert!((gate.probability(&norm, &h, &mut normed) - 1.0 / (1.0 + (-z).exp())).abs() < 1e-6);
        assert!(!gate.weight.requires_grad_flag() && !gate.bias.requires_grad_flag(), "a gate is frozen");
        assert!(!gate.square_weight.requires_grad_flag(), "a gate is frozen");
        // A linear gate is the same with q = 0.
        let linear = ExitGate::linear(vec![0.5, -0.25], 0.1, 0.5).unwrap();
        let z = 0.5 * x0 - 0.25 * x1 + 0.1;
        assert!((linear.logit(&norm, &h, &mut normed) - z).abs() < 1e-6);
    }

    #[test]
    fn a_gate_with_a_non_finite_weight_or_a_bad_threshold_is_an_error() {
        assert!(matches!(ExitGate::linear(vec![1.0, f32::NAN], 0.0, 0.5), Err(Error::NonFinite(_))));
        assert!(matches!(ExitGate::new(vec![1.0], vec![f32::NAN], 0.0, 0.5), Err(Error::NonFinite(_))));
        assert!(matches!(ExitGate::linear(vec![1.0], f32::INFINITY, 0.5), Err(Error::NonFinite(_))));
        assert!(ExitGate::linear(vec![1.0], 0.0, -0.1).unwrap_err().to_string().contains("threshold"));
        let err = ExitGate::new(vec![1.0, 2.0], vec![0.0], 0.0, 0.5).unwrap_err().to_string();
        assert!(err.contains("2 linear weights but 1 square weights"), "{err}");
    }
}
