//! Training the exit gate ([`ExitGate`]): right after phase 1, to imitate the spec's routing;
//! or after phase 2, to predict where the exit agrees with the deep model (the consistency
//! gate, below).
//!
//! ```text
//! training split   lower layers (frozen, graph-free, once) ─► h ─┬─ x̂ = rmsnorm(h) ⊙ γ_exit; (x̂, x̂ ⊙ x̂)  features  [N, 2D]
//!                                                                 └─ max softmax(exit head(h)) >= t       labels    [N]
//! fit              w, q, b by logistic regression (Newton's method on 2D + 1 parameters)
//! validation split p_exit = sigmoid(w·x̂ + q·(x̂ ⊙ x̂) + b) of every token ─► threshold: the requested share exits
//! ```
//!
//! The label is the spec's decision (`t` is the calibrated max-softmax threshold), so the gate
//! learns to route as the softmax would, from the exit state alone, without the `V×D` exit
//! head. Its own threshold is then calibrated like the spec's, as an exact quantile, on the
//! **validation** split (the weights never saw it), so that `1 − hard_ratio` of its tokens
//! exit. The lower layers and the exit head are frozen from phase 1 on, so the features are
//! computed once and the gate stays valid through phase 2.
//!
//! **The consistency gate** ([`train_consistency_gate`], CALM's other classifier target) is the
//! same regression with another label: whether the exit head's most likely token equals the
//! deep model's (`argmax exit(h) == argmax deep(h)`), on the training split through the whole
//! phase-2 model, so it is trained after phase 2. The spec's routing asks "is the shallow
//! model sure?"; this one asks "would going deep change the answer?". A token on which both
//! models are unsure but agree (frequent in greedy generation, where the text is the model's
//! own) exits under this gate and not under the softmax's. Its threshold is calibrated the same
//! way, so at one hard ratio both gates exit the same share of validation tokens; which one
//! gives the better quality for that compute is measured, not assumed (the main example keeps
//! the one with the better validation frontier).
//!
//! **The fit.** With `x̃ = (x̂, x̂ ⊙ x̂, 1)` and `θ = (w, q, b)` (the squares are just more
//! features: the logit stays linear in `θ`), `zᵢ = θ·x̃ᵢ`, `pᵢ = σ(zᵢ)` and labels
//! `yᵢ ∈ {0, 1}`, the loss is the mean binary cross-entropy plus an L2 penalty on the weights
//! (`w` and `q`, written `w` below; not the bias):
//!
//! ```text
//! L(θ) = (1/N) Σᵢ [−yᵢ log pᵢ − (1 − yᵢ) log(1 − pᵢ)] + (λ/2)‖w‖²
//!      = (1/N) Σᵢ [softplus(zᵢ) − yᵢ zᵢ]            + (λ/2)‖w‖²    (log σ(z) = −softplus(−z), softplus(z) − softplus(−z) = z)
//! ∂L/∂zᵢ = (1/N)(σ(zᵢ) − yᵢ) = (1/N)(pᵢ − yᵢ)                       (softplus′ = σ)
//! ∇L   = (1/N) Σᵢ (pᵢ − yᵢ) x̃ᵢ + λ (w, 0)
//! ∇²L  = (1/N) Σᵢ pᵢ(1 − pᵢ) x̃ᵢ x̃ᵢᵀ + λ diag(1, …, 1, 0)            (σ′ = p(1 − p))
//! ```
//!
//! `L` is convex, and with `λ > 0` the Hessian is positive definite, so Newton's method
//! `θ ← θ − (∇²L)⁻¹ ∇L` (logistic regression's classic "iteratively reweighted least squares")
//! converges in a handful of steps; halving the step while the loss does not fall guards the
//! first ones. With `k = 2D + 1` parameters, each step costs one pass over the `N × k` features
//! for the gradient and one `k × N × k` product for the Hessian, then a `k³/3` Cholesky solve. Everything is
//! deterministic: same data, same gate.

use super::hard_examples::{check_exit_logits, check_ratio, quantile_threshold};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::{gemm, simd};
use crate::model::config::check_threshold;
use crate::model::{ExitGate, ExitRule, GateKind, LegoTransformer, UpperCacheFill};
use crate::ops::select::argmax;
use crate::ops::unary::sigmoid;

/// How [`train_exit_gate`] fits the gate.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitGateOptions {
    /// The L2 penalty `λ` on the weights (not the bias); keeps the fit bounded when the two
    /// classes are (nearly) separable.
    pub l2: f64,
    /// The most Newton steps.
    pub max_iterations: usize,
    /// Stop when half the squared Newton decrement, `∇Lᵀ(∇²L)⁻¹∇L / 2` (what the next full
    /// step would take off the quadratic model of the loss), is below this.
    pub tolerance: f64,
    /// Fit on at most about this many training tokens: whole batches, evenly spaced over the
    /// split (a logistic regression of `2D + 1` parameters needs far fewer tokens than a split
    /// holds, and the features of every token would take `N·(2D + 1)` floats).
    pub max_train_tokens: usize,
}

impl Default for ExitGateOptions {
    fn default() -> Self {
        ExitGateOptions { l2: 1e-4, max_iterations: 25, tolerance: 1e-9, max_train_tokens: 100_000 }
    }
}

/// How often a gate routes tokens as its reference does: the spec's max-softmax confidence
/// at its threshold (an imitation gate, and [`gate_agreement`]), or the tokens whose exit
/// argmax equals the deep model's (a consistency gate).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GateAgreement {
    /// Tokens compared.
    pub tokens: usize,
    /// The share routed the same way (both exit, or both go deep).
    pub agreement: f64,
    /// The share that exits by the gate (`p_exit >= ` the gate's threshold).
    pub gate_exit_share: f64,
    /// The share the reference labels "exit": `max softmax >= ` its threshold, or the exit's
    /// argmax equal to the deep one.
    pub reference_exit_share: f64,
}

/// Training labels that are all the same, so no gate can be fitted to them: how many tokens,
/// and whether every one of them is labelled "exit" (else every one "go deep").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneClass {
    /// Training tokens labelled.
    pub tokens: usize,
    /// `true`: every token's label is "exit"; `false`: every token's is "go deep".
    pub exits: bool,
}

/// A fitted gate and its report, or the one label every training token had (nothing to fit).
pub type GateFit = std::result::Result<(ExitGate, ExitGateReport), OneClass>;

/// What [`train_exit_gate`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExitGateReport {
    /// Training tokens the gate was fitted on.
    pub train_tokens: usize,
    /// The share of them labelled "exit" (max softmax at or above the threshold; for a
    /// consistency gate, the exit's argmax equal to the deep model's).
    pub train_exit_labels: f64,
    /// Newton steps taken.
    pub iterations: usize,
    /// The final training loss (mean binary cross-entropy, penalty included).
    pub train_loss: f64,
    /// Agreement with the labels on the training tokens, at the calibrated threshold.
    pub train_agreement: f64,
    /// Agreement with the labels on the validation tokens (held out from the fit), at the
    /// calibrated threshold; `gate_exit_share` is the calibration's result.
    pub validation: GateAgreement,
}

/// Trains the model's exit gate (see the module doc): fits it on the `train` batches to imitate
/// routing by max-softmax confidence against `softmax_threshold`, then sets its threshold so
/// that `1 − hard_ratio` of the `val` tokens exit. Returns the gate (not yet in the model: set
/// `model.exit_gate = Some(gate)`) and the report.
///
/// Errors: a threshold or ratio out of range, no tokens, non-finite exit logits, or training
/// tokens that all route one way at `softmax_threshold` (nothing to learn).
pub fn train_exit_gate(
    model: &LegoTransformer,
    train: &[Batch],
    val: &[Batch],
    softmax_threshold: f32,
    hard_ratio: f32,
    options: &ExitGateOptions,
) -> Result<(ExitGate, ExitGateReport)> {
    check_threshold(softmax_threshold)?;
    let labels = |batches: &[Batch], what: &str, each: &mut dyn FnMut(&[f32], bool)| {
        exit_states(model, batches, what, |h, confidence| each(h, confidence >= softmax_threshold))
    };
    let what = "train_exit_gate";
    match fit_gate(model, train, val, hard_ratio, options, GateKind::Imitation, what, labels)? {
        Ok(fitted) => Ok(fitted),
        Err(OneClass { tokens, exits }) => Err(Error::Input(format!(
            "{what}: all {tokens} training tokens are labelled '{}' at the softmax threshold {softmax_threshold}: there is nothing for a gate to learn",
            if exits { "exit" } else { "go deep" }
        ))),
    }
}

/// Trains a **consistency** gate for a phase-2 model (see the module doc): fits it on the
/// `train` batches to predict whether the exit head's most likely token equals the deep
/// model's, then sets its threshold so that `1 − hard_ratio` of the `val` tokens exit.
/// Returns the gate (`kind` [`GateKind::Consistency`]; set `model.exit_gate = Some(gate)` to
/// route by it) and the report, whose agreement is with those labels.
///
/// Returns `Ok(Err(OneClass))` when the two heads agree on every training token (or on none):
/// no gate can tell the tokens apart. That is a real outcome, not a fault: a phase 2 grown with
/// [`ExtendInit::Identity`](crate::model::transformer::ExtendInit::Identity) whose early
/// stopping kept its starting weights has deep logits equal to the exit's on every token. The
/// caller then keeps the gate it has.
///
/// Errors: a model with no layer above its exit, a ratio out of range, no tokens, non-finite
/// logits.
pub fn train_consistency_gate(
    model: &LegoTransformer,
    train: &[Batch],
    val: &[Batch],
    hard_ratio: f32,
    options: &ExitGateOptions,
) -> Result<GateFit> {
    if model.config.exit_layer >= model.layers.len() {
        return Err(Error::Input(format!(
            "train_consistency_gate: the model has {} layers and exits after {}: there is no deep model to agree with (train it after phase 2)",
            model.layers.len(),
            model.config.exit_layer
        )));
    }
    let labels = |batches: &[Batch], what: &str, each: &mut dyn FnMut(&[f32], bool)| {
        consistency_states(model, batches, what, each)
    };
    fit_gate(model, train, val, hard_ratio, options, GateKind::Consistency, "train_consistency_gate", labels)
}

/// The part both gates share: features `x̃ = (x̂, x̂ ⊙ x̂, 1)` of evenly spaced training
/// batches with the labels `labels` gives (`labels(batches, what, each)` calls
/// `each(exit state, exits)` for every token in order), the logistic fit, then the threshold
/// calibrated on `val` and the report; or, when every training label is the same, which one
/// (there is nothing to fit).
#[allow(clippy::too_many_arguments)]
fn fit_gate(
    model: &LegoTransformer,
    train: &[Batch],
    val: &[Batch],
    hard_ratio: f32,
    options: &ExitGateOptions,
    kind: GateKind,
    what: &str,
    labels: impl Fn(&[Batch], &str, &mut dyn FnMut(&[f32], bool)) -> Result<()>,
) -> Result<GateFit> {
    check_ratio(hard_ratio)?;
    if !(options.l2.is_finite() && options.l2 > 0.0) {
        return Err(Error::Input(format!("{what}: the L2 penalty must be > 0, got {}", options.l2)));
    }
    let d = model.config.dim;
    let norm = &model.exit().norm;
    let norm_weight = norm.weight.data();

    // Features x̃ = (x̂, x̂ ⊙ x̂, 1) and labels, from evenly spaced training batches.
    let k = 2 * d + 1;
    let chosen = spaced_batches(train, options.max_train_tokens);
    let mut x = Vec::new(); // [N, 2D + 1]
    let mut y = Vec::new(); // [N]
    labels(&chosen, what, &mut |h, exits| {
        let at = x.len();
        x.resize(at + k, 1.0);
        let (linear, squares) = x[at..at + 2 * d].split_at_mut(d);
        simd::rmsnorm(h, &norm_weight, norm.eps, linear);
        squares.iter_mut().zip(linear.iter()).for_each(|(s, &v)| *s = v * v);
        y.push(exits);
    })?;
    let exits = y.iter().filter(|&&e| e).count();
    if y.is_empty() {
        return Err(Error::Input(format!("{what}: no training tokens")));
    }
    if exits == 0 || exits == y.len() {
        return Ok(Err(OneClass { tokens: y.len(), exits: exits > 0 }));
    }
    let (theta, iterations, train_loss) = fit_logistic(&x, &y, k, options);

    // The gate, its threshold calibrated on validation.
    let weight: Vec<f32> = theta[..d].iter().map(|&t| t as f32).collect();
    let square_weight: Vec<f32> = theta[d..2 * d].iter().map(|&t| t as f32).collect();
    let mut gate = ExitGate::new(weight, square_weight, theta[2 * d] as f32, 0.0)?;
    gate.kind = kind;
    let mut p_val = Vec::new();
    let mut labels_val = Vec::new();
    let mut normed = vec![0.0; d];
    labels(val, &format!("{what} (validation)"), &mut |h, exits| {
        p_val.push(gate.probability(norm, h, &mut normed));
        labels_val.push(exits);
    })?;
    if p_val.is_empty() {
        return Err(Error::Input(format!("{what}: no validation tokens")));
    }
    if let Some(p) = p_val.iter().find(|p| !p.is_finite()) {
        return Err(Error::NonFinite(format!("{what}: a validation token's gate score is {p}")));
    }
    gate.threshold = quantile_threshold(&mut p_val.clone(), hard_ratio);

    let validation = agreement(p_val.iter().map(|&p| p >= gate.threshold), labels_val.iter().copied());
    let p_train = x.chunks_exact(k).map(|xi| sigmoid(gate.logit_of_normed(&xi[..d])) >= gate.threshold);
    let train_agreement = agreement(p_train, y.iter().copied()).agreement;
    let report = ExitGateReport {
        train_tokens: y.len(),
        train_exit_labels: exits as f64 / y.len() as f64,
        iterations,
        train_loss,
        train_agreement,
        validation,
    };
    Ok(Ok((gate, report)))
}

/// Where a gate puts `model` on the validation frontier: for each of `hard_ratios`, the gate's
/// threshold calibrated on `val` to that share of deep tokens, then the routed perplexity of
/// TRUE early exit (teacher-forced, [`UpperCacheFill::Skip`]) over `sequences`; returns the
/// mean of those perplexities. At a given ratio two gates exit (nearly) the same share of
/// tokens, so their compute is the same and the lower mean is the better frontier: this is how
/// the main example chooses between an imitation and a consistency gate.
///
/// Errors: no ratios, or those of [`compute_gate_threshold`] and
/// [`LegoTransformer::evaluate_with_early_exit`].
///
/// [`UpperCacheFill::Skip`]: crate::model::UpperCacheFill::Skip
pub fn validation_frontier_ppl(
    model: &LegoTransformer,
    gate: &ExitGate,
    val: &[Batch],
    sequences: &[Vec<usize>],
    hard_ratios: &[f32],
) -> Result<f64> {
    if hard_ratios.is_empty() {
        return Err(Error::Input("validation_frontier_ppl: no hard ratios to measure at".into()));
    }
    let mut routed = model.clone();
    routed.exit_gate = Some(gate.clone());
    let mut sum = 0.0;
    for &ratio in hard_ratios {
        let threshold = compute_gate_threshold(&routed, val, ratio)?;
        let rule = ExitRule::gate(threshold, UpperCacheFill::Skip);
        sum += routed.evaluate_with_early_exit(sequences, &rule)?.ppl;
    }
    Ok(sum / hard_ratios.len() as f64)
}

/// The threshold on the model's exit-gate probability under which `hard_ratio` of the tokens
/// of `batches` fall (so that about `1 − hard_ratio` of them exit): the gate's counterpart of
/// [`compute_confidence_threshold`](super::compute_confidence_threshold), an exact quantile.
/// An error if the model has no gate, or on non-finite scores.
pub fn compute_gate_threshold(model: &LegoTransformer, batches: &[Batch], hard_ratio: f32) -> Result<f32> {
    check_ratio(hard_ratio)?;
    let gate = model
        .exit_gate
        .as_ref()
        .ok_or_else(|| Error::Input("compute_gate_threshold: the model has no exit gate".into()))?;
    let norm = &model.exit().norm;
    let mut normed = vec![0.0; model.config.dim];
    let mut p = Vec::new();
    exit_states(model, batches, "compute_gate_threshold", |h, _| {
        p.push(gate.probability(norm, h, &mut normed))
    })?;
    if p.is_empty() {
        return Err(Error::Input("compute_gate_threshold: no tokens in the batches".into()));
    }
    if let Some(bad) = p.iter().find(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!("compute_gate_threshold: a token's gate score is {bad}")));
    }
    Ok(quantile_threshold(&mut p, hard_ratio))
}

/// How the model's exit gate (at its own threshold) and the max-softmax confidence (at
/// `softmax_threshold`) route the tokens of `batches`: agreement and exit shares. An error if
/// the model has no gate, or on non-finite exit logits or gate scores.
pub fn gate_agreement(
    model: &LegoTransformer,
    batches: &[Batch],
    softmax_threshold: f32,
) -> Result<GateAgreement> {
    check_threshold(softmax_threshold)?;
    let gate = model
        .exit_gate
        .as_ref()
        .ok_or_else(|| Error::Input("gate_agreement: the model has no exit gate".into()))?;
    let norm = &model.exit().norm;
    let mut normed = vec![0.0; model.config.dim];
    let (mut by_gate, mut by_softmax) = (Vec::new(), Vec::new());
    let mut bad = None;
    exit_states(model, batches, "gate_agreement", |h, confidence| {
        let p = gate.probability(norm, h, &mut normed);
        bad = bad.or((!p.is_finite()).then_some(p));
        by_gate.push(p >= gate.threshold);
        by_softmax.push(confidence >= softmax_threshold);
    })?;
    if let Some(p) = bad {
        return Err(Error::NonFinite(format!("gate_agreement: a token's gate score is {p}")));
    }
    if by_gate.is_empty() {
        return Err(Error::Input("gate_agreement: no tokens in the batches".into()));
    }
    Ok(agreement(by_gate.into_iter(), by_softmax.into_iter()))
}

/// Agreement and exit shares of two routings of the same tokens (`true`: exits): the gate's
/// and its reference's.
fn agreement(gate: impl Iterator<Item = bool>, reference: impl Iterator<Item = bool>) -> GateAgreement {
    let (mut n, mut same, mut g, mut s) = (0usize, 0usize, 0usize, 0usize);
    for (a, b) in gate.zip(reference) {
        n += 1;
        same += (a == b) as usize;
        g += a as usize;
        s += b as usize;
    }
    let share = |k: usize| k as f64 / n.max(1) as f64;
    GateAgreement {
        tokens: n,
        agreement: share(same),
        gate_exit_share: share(g),
        reference_exit_share: share(s),
    }
}

/// Whole batches, evenly spaced over `batches`, holding about `max_tokens` tokens (all of them
/// if they hold fewer).
fn spaced_batches(batches: &[Batch], max_tokens: usize) -> Vec<Batch> {
    let total: usize = batches.iter().map(|b| b.x.len()).sum();
    if total <= max_tokens || batches.is_empty() {
        return batches.to_vec();
    }
    let per_batch = total.div_ceil(batches.len());
    let k = max_tokens.div_ceil(per_batch).clamp(1, batches.len());
    (0..k).map(|i| batches[i * batches.len() / k].clone()).collect()
}

/// Runs the lower layers (no graph) and the exit head on each batch, and hands `each` every
/// token's exit hidden state (`[D]`) and max-softmax confidence, in order. Exit logits that
/// are not finite are an error naming the batch and token.
fn exit_states(
    model: &LegoTransformer,
    batches: &[Batch],
    what: &str,
    mut each: impl FnMut(&[f32], f32),
) -> Result<()> {
    let (v, d) = (model.config.vocab_size, model.config.dim);
    for (i, b) in batches.iter().enumerate() {
        let h = crate::no_grad(|| model.get_hidden_states(&b.x, b.batch))?;
        let (confidence, logits) = model.compute_confidence(&h);
        check_exit_logits(&logits.data(), v, b.seq, i, what)?;
        for (row, &c) in h.data().chunks_exact(d).zip(&confidence) {
            each(row, c);
        }
    }
    Ok(())
}

/// Runs the lower layers (no graph), the exit head and the upper layers with the deep head on
/// each batch, and hands `each` every token's exit hidden state (`[D]`) and whether the two
/// heads' most likely tokens are the same, in order. Logits that are not finite are an error.
fn consistency_states(
    model: &LegoTransformer,
    batches: &[Batch],
    what: &str,
    each: &mut dyn FnMut(&[f32], bool),
) -> Result<()> {
    let (v, d, exit) = (model.config.vocab_size, model.config.dim, model.config.exit_layer);
    for (i, b) in batches.iter().enumerate() {
        let h = crate::no_grad(|| model.get_hidden_states(&b.x, b.batch))?;
        let (_, exit_logits) = model.compute_confidence(&h);
        let deep_logits = crate::no_grad(|| model.forward_upper_layers(&h, exit));
        let (exit_logits, deep_logits) = (exit_logits.data(), deep_logits.data());
        check_exit_logits(&exit_logits, v, b.seq, i, what)?;
        if let Some(at) = deep_logits.iter().position(|z| !z.is_finite()) {
            return Err(Error::NonFinite(format!(
                "{what}: the deep head's logit for id {} is {} at batch {i}, token {}",
                at % v,
                deep_logits[at],
                at / v
            )));
        }
        let rows = exit_logits.chunks_exact(v).zip(deep_logits.chunks_exact(v));
        for (row, (e, g)) in h.data().chunks_exact(d).zip(rows) {
            each(row, argmax(e) == argmax(g));
        }
    }
    Ok(())
}

/// Rows of features handled by one Hessian product (bounds the scratch to `CHUNK × k`).
const CHUNK: usize = 4096;

/// Logistic regression by Newton's method (see the module doc) on features `x` (`[N, k]`, the
/// last column all ones: the bias) and labels `y`. Returns `θ`, the steps taken and the final
/// loss.
fn fit_logistic(x: &[f32], y: &[bool], k: usize, options: &ExitGateOptions) -> (Vec<f64>, usize, f64) {
    let n = y.len();
    assert_eq!(x.len(), n * k, "fit_logistic: {} feature values for {n} rows of {k}", x.len());
    let lambda = options.l2;
    let mut theta = vec![0.0f64; k];
    let mut z = vec![0.0f64; n];
    let mut loss = loss_at(x, y, k, &theta, lambda, &mut z);
    let mut iterations = 0;
    let mut hessian32 = vec![0.0f32; k * k];
    let mut scaled = vec![0.0f32; CHUNK.min(n) * k];
    for _ in 0..options.max_iterations {
        iterations += 1;
        // The gradient, (1/N) Σ (pᵢ − yᵢ) x̃ᵢ + λ(w, 0), summed in f64 (z holds θ·x̃ᵢ).
        let mut grad = vec![0.0f64; k];
        for ((xi, &yi), &zi) in x.chunks_exact(k).zip(y).zip(&z) {
            let r = sigmoid64(zi) - yi as u8 as f64;
            grad.iter_mut().zip(xi).for_each(|(g, &xv)| *g += r * xv as f64);
        }
        // The Hessian's data term, Σ pᵢ(1 − pᵢ) x̃ᵢ x̃ᵢᵀ = X̃ᵀ·(S X̃): a chunk of rows at a time,
        // S X̃ (each row scaled by its sᵢ) into `scaled`, then one product accumulated into H.
        hessian32.fill(0.0);
        for (c, (xc, zc)) in x.chunks(CHUNK * k).zip(z.chunks(CHUNK)).enumerate() {
            let rows = zc.len();
            for ((out, xi), &zi) in scaled.chunks_exact_mut(k).zip(xc.chunks_exact(k)).zip(zc) {
                let p = sigmoid64(zi);
                let s = (p * (1.0 - p)) as f32;
                out.iter_mut().zip(xi).for_each(|(o, &xv)| *o = s * xv);
            }
            // H (k×k) += X̃_cᵀ (k×rows, X̃_c read transposed: strides 1, k) · (S X̃)_c (rows×k).
            let beta = if c == 0 { 0.0 } else { 1.0 };
            gemm::sgemm(k, rows, k, 1.0, xc, 1, k, &scaled, k, 1, beta, &mut hessian32, k);
        }
        let mut hessian: Vec<f64> = hessian32.iter().map(|&h| h as f64 / n as f64).collect();
        for (j, g) in grad.iter_mut().enumerate() {
            *g /= n as f64;
            if j + 1 < k {
                *g += lambda * theta[j];
                hessian[j * k + j] += lambda;
            }
        }
        let Some(step) = cholesky_solve(&mut hessian, &grad, k) else { break };
        // Half the squared Newton decrement: what a full step takes off the quadratic model.
        let decrement: f64 = 0.5 * grad.iter().zip(&step).map(|(g, s)| g * s).sum::<f64>();
        if decrement < options.tolerance {
            break;
        }
        // Take the step, halving it while the loss does not fall.
        let mut t = 1.0;
        let mut trial = vec![0.0f64; k];
        let mut z_trial = vec![0.0f64; n];
        let accepted = loop {
            trial.iter_mut().zip(&theta).zip(&step).for_each(|((o, &th), &s)| *o = th - t * s);
            let l = loss_at(x, y, k, &trial, lambda, &mut z_trial);
            if l < loss {
                break Some(l);
            }
            t *= 0.5;
            if t < 1e-10 {
                break None;
            }
        };
        let Some(l) = accepted else { break };
        (theta, z, loss) = (trial, z_trial, l);
    }
    (theta, iterations, loss)
}

/// The loss `L(θ)` (see the module doc), writing each `zᵢ = θ·x̃ᵢ` into `z`.
fn loss_at(x: &[f32], y: &[bool], k: usize, theta: &[f64], lambda: f64, z: &mut [f64]) -> f64 {
    let mut sum = 0.0;
    for ((xi, &yi), zi) in x.chunks_exact(k).zip(y).zip(z.iter_mut()) {
        *zi = xi.iter().zip(theta).map(|(&xv, &t)| xv as f64 * t).sum();
        // −y log σ(z) − (1 − y) log(1 − σ(z)) = softplus(z) − y·z, softplus computed stably.
        let softplus = zi.max(0.0) + (-zi.abs()).exp().ln_1p();
        sum += softplus - if yi { *zi } else { 0.0 };
    }
    let penalty: f64 = theta[..k - 1].iter().map(|t| t * t).sum();
    sum / y.len() as f64 + 0.5 * lambda * penalty
}

fn sigmoid64(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Solves `A s = g` for a symmetric positive definite `A` (`k × k`, overwritten by its Cholesky
/// factor `L`, `A = L Lᵀ`): forward then back substitution. `None` if `A` is not positive
/// definite (a pivot at or below 0), which a Hessian with `λ > 0` never is, short of rounding.
fn cholesky_solve(a: &mut [f64], g: &[f64], k: usize) -> Option<Vec<f64>> {
    // L, in the lower triangle of a: L[j][j] = sqrt(A[j][j] − Σₘ L[j][m]²),
    // L[i][j] = (A[i][j] − Σₘ L[i][m] L[j][m]) / L[j][j] for i > j.
    for j in 0..k {
        let d = a[j * k + j] - (0..j).map(|m| a[j * k + m] * a[j * k + m]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let s = a[i * k + j] - (0..j).map(|m| a[i * k + m] * a[j * k + m]).sum::<f64>();
            a[i * k + j] = s / d;
        }
    }
    // L u = g, then Lᵀ s = u.
    let mut u = vec![0.0; k];
    for i in 0..k {
        u[i] = (g[i] - (0..i).map(|m| a[i * k + m] * u[m]).sum::<f64>()) / a[i * k + i];
    }
    let mut s = vec![0.0; k];
    for i in (0..k).rev() {
        s[i] = (u[i] - (i + 1..k).map(|m| a[m * k + i] * s[m]).sum::<f64>()) / a[i * k + i];
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_symmetric_positive_definite_system() {
        // A = [[4, 2], [2, 3]], g = A·(1, −2) = (0, −4).
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let s = cholesky_solve(&mut a, &[0.0, -4.0], 2).unwrap();
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] + 2.0).abs() < 1e-12, "{s:?}");
        assert!(cholesky_solve(&mut [1.0, 2.0, 2.0, 1.0], &[1.0, 1.0], 2).is_none(), "indefinite");
    }

    #[test]
    fn newton_finds_the_minimum_where_the_gradient_vanishes() {
        // One feature and the bias; labels from a noisy threshold on the feature.
        let n = 400;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let f = (i as f32 / n as f32) * 4.0 - 2.0;
            x.extend([f, 1.0]);
            y.push(f + 0.7 * ((i * 7919 % 13) as f32 / 13.0 - 0.5) > 0.3);
        }
        let options = ExitGateOptions { l2: 1e-3, ..Default::default() };
        let (theta, iterations, loss) = fit_logistic(&x, &y, 2, &options);
        assert!(iterations < options.max_iterations, "Newton did not converge in {iterations} steps");
        // At the minimum the gradient (1/N) Σ (pᵢ − yᵢ) x̃ᵢ + λ(w, 0) is zero.
        let mut grad = [0.0f64; 2];
        for (xi, &yi) in x.chunks_exact(2).zip(&y) {
            let r = sigmoid64(theta[0] * xi[0] as f64 + theta[1]) - yi as u8 as f64;
            grad[0] += r * xi[0] as f64 / n as f64;
            grad[1] += r / n as f64;
        }
        grad[0] += 1e-3 * theta[0];
        assert!(grad.iter().all(|g| g.abs() < 1e-6), "gradient {grad:?} at θ = {theta:?}");
        // The boundary −b/w sits near the labels' 0.3, and the loss beats a constant guess.
        assert!((-theta[1] / theta[0] - 0.3).abs() < 0.15, "{theta:?}");
        assert!(loss < std::f64::consts::LN_2);
    }
}
