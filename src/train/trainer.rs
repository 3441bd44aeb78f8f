//! The [`Trainer`]: both phases with early stopping, and evaluation with early-exit statistics.
//!
//! **Phase 1** ([`Trainer::train_with_early_stopping`]) is plain language-model training: for
//! each batch, forward through every layer, cross-entropy against the next tokens, backward,
//! clip, AdamW step; after each epoch the validation perplexity decides whether these are the
//! best weights so far, and training stops after `patience` epochs without improvement. The
//! model is left at its best weights.
//!
//! **Phase 2** ([`Trainer::train_upper_layers_with_early_stopping`]) trains only the upper
//! layers, on the hard examples. The frozen lower layers run **once** per split before the
//! epochs — the hard examples already hold the training split's lower hidden states, and the
//! validation split's are computed and cached here — so no epoch ever runs a lower layer:
//! that is where LEGO saves training compute. Early stopping uses the validation perplexity
//! *with early-exit routing at the calibrated threshold* (each token's loss taken from the
//! shallow exit if its confidence is at or above the threshold, from the deep path
//! otherwise), which is the quantity the deployed model is judged by.
//!
//! Whatever ends a phase, the model is left at its best weights: when a step meets a loss that
//! is not a number, or an evaluation meets logits that are not, the phase puts the best
//! weights so far back (those it started with, if no epoch finished) and then returns the
//! error, which names the epoch and step and says which weights the model holds.

use std::time::Instant;

use super::hard_examples::{
    HardBatch, HardExamples, Phase2Mode, check_exit_logits, evaluate_on_hard_examples,
};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::{ExitMeasure, ExitRule, LegoTransformer, cost};
use crate::optim::{AdamW, CosineSchedule, clip_grad_norm};
use crate::tensor::Tensor;

/// Options shared by both phases.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The most epochs to run.
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation perplexity.
    pub patience: usize,
    /// Clip the global gradient norm to this (None: no clipping).
    pub grad_clip: Option<f32>,
    /// Linear warm-up steps of the learning rate (then cosine decay to `min_lr_ratio`·lr over
    /// the `max_epochs`).
    pub warmup_steps: u64,
    /// The floor of the cosine decay, as a fraction of the optimizer's learning rate.
    pub min_lr_ratio: f32,
    /// Print progress (phase, epoch, step, loss, tokens/s, time left) on stderr.
    pub verbose: bool,
    /// A label for progress lines ("phase 1", ...).
    pub label: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            max_epochs: 10,
            patience: 2,
            grad_clip: Some(1.0),
            warmup_steps: 20,
            min_lr_ratio: 0.1,
            verbose: false,
            label: "train".into(),
        }
    }
}

/// What one epoch of phase 1 gave.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Validation loss (full depth).
    pub val_loss: f64,
    /// Validation perplexity, `exp(val_loss)`.
    pub val_ppl: f64,
    /// Validation next-token accuracy.
    pub val_accuracy: f64,
    /// Wall time of the epoch's training steps, seconds.
    pub seconds: f64,
    /// Training tokens per second.
    pub tokens_per_second: f64,
}

/// Phase 1's history.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// One record per epoch run.
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose weights the model was left with.
    pub best_epoch: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training tokens processed.
    pub tokens: u64,
}

/// One epoch of phase 2.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase2Epoch {
    /// Epoch number: 0 for the model as phase 2 received it (before any step), then from 1.
    pub epoch: usize,
    /// Mean training loss on the hard tokens (NaN at epoch 0: no step was taken).
    pub train_loss: f64,
    /// Perplexity of the deep path on the training hard examples.
    pub hard_ppl: f64,
    /// Validation perplexity with early-exit routing at the threshold.
    pub val_ppl_routed: f64,
    /// Wall time of the epoch's training steps, seconds.
    pub seconds: f64,
}

/// Phase 2's history.
#[derive(Clone, Debug, Default)]
pub struct Phase2History {
    /// One record per epoch run.
    pub epochs: Vec<Phase2Epoch>,
    /// The epoch whose weights the model was left with.
    pub best_epoch: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Hard tokens trained on (summed over epochs).
    pub tokens: u64,
    /// Positions run through the upper layers in training (context included).
    pub positions: u64,
}

/// Evaluation of a model on a split, with fake-early-exit statistics (both paths computed,
/// then the routing applied).
#[derive(Clone, Debug, PartialEq)]
pub struct EvalStats {
    /// Mean loss with routing (full depth when no threshold is given).
    pub loss: f64,
    /// `exp(loss)`.
    pub ppl: f64,
    /// Next-token accuracy with routing.
    pub accuracy: f64,
    /// Tokens evaluated.
    pub tokens: usize,
    /// Tokens that exited early.
    pub shallow: usize,
    /// `shallow / tokens`.
    pub shallow_ratio: f64,
    /// The spec's layer compute cost (1 at full depth).
    pub layer_cost: f64,
    /// FLOPs with early exit against full-depth inference, counting the exit check's
    /// vocabulary projection and attention (see [`crate::model::cost`]).
    pub flop_cost: f64,
    /// Loss of the full-depth path on every token, for comparison.
    pub full_depth_loss: f64,
}

/// Trains and evaluates LEGO models (spec `Trainer`).
///
/// A tiny phase 1: a shallow model learns a repeating sequence, and early stopping leaves it at
/// its best validation perplexity.
///
/// ```
/// use lego::Tensor;
/// use lego::data::{batches, make_sequences};
/// use lego::model::{LegoConfig, LegoTransformer};
/// use lego::optim::{AdamW, AdamWConfig};
/// use lego::train::{TrainOptions, Trainer};
///
/// // The stream 0 1 2 … 7 0 1 2 …: each token predicts the next one exactly.
/// let stream: Vec<usize> = (0..400).map(|i| i % 8).collect();
/// let sequences = make_sequences(&stream, 8); // windows of 9: x and y shifted by one
/// let train = batches(&sequences[..40], 8, Some(0)).unwrap();
/// let val = batches(&sequences[40..], 4, None).unwrap();
///
/// let config = LegoConfig {
///     vocab_size: 8, dim: 16, num_layers: 2, num_heads: 2, ffn_hidden: 32, max_seq_len: 8,
///     exit_layer: 2, ..LegoConfig::t()
/// };
/// let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
/// let trainer = Trainer::new(TrainOptions { max_epochs: 3, warmup_steps: 2, ..Default::default() });
/// let mut opt = AdamW::new(model.params(), AdamWConfig { lr: 1e-2, ..Default::default() });
/// let history = trainer.train_with_early_stopping(&model, &train, &val, &mut opt).unwrap();
///
/// let best = &history.epochs[history.best_epoch - 1];
/// assert!(best.val_ppl < 4.0, "a uniform guess would be 8: {best:?}");
/// // The model holds the best epoch's weights: evaluating again gives its perplexity.
/// let again = trainer.evaluate(&model, &val, None).unwrap();
/// assert!((again.ppl - best.val_ppl).abs() < 1e-9 * best.val_ppl);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Trainer {
    /// The options of both phases.
    pub options: TrainOptions,
}

/// Early stopping: remembers the best weights seen and says when to stop.
///
/// The snapshot holds the parameters' buffers themselves (shared `Arc`s, no copy); the next
/// optimizer step then copies each parameter before writing it (copy-on-write), so keeping the
/// best weights costs one copy of the model per improving epoch.
pub(super) struct EarlyStopping {
    best: f64,
    /// The epoch the snapshot was taken after (0: the weights the phase started with).
    best_epoch: usize,
    snapshot: Vec<std::sync::Arc<Vec<f32>>>,
    since_best: usize,
    patience: usize,
}

impl EarlyStopping {
    pub(super) fn new(model: &LegoTransformer, patience: usize) -> EarlyStopping {
        EarlyStopping {
            best: f64::INFINITY,
            best_epoch: 0,
            snapshot: snapshot(model),
            since_best: 0,
            patience,
        }
    }

    /// Records epoch `epoch`'s validation perplexity; returns (whether it is the best so far,
    /// whether to stop now).
    pub(super) fn update(&mut self, model: &LegoTransformer, epoch: usize, ppl: f64) -> (bool, bool) {
        if ppl < self.best {
            self.best = ppl;
            self.best_epoch = epoch;
            self.snapshot = snapshot(model);
            self.since_best = 0;
            (true, false)
        } else {
            self.since_best += 1;
            (false, self.since_best >= self.patience)
        }
    }

    /// Puts the best weights back into the model. If the phase ended in `outcome`'s error,
    /// the error's message then says which weights the model was left with.
    pub(super) fn restore<T>(self, model: &LegoTransformer, outcome: Result<T>) -> Result<T> {
        for (p, v) in model.params().iter().zip(self.snapshot) {
            p.set_data(std::sync::Arc::unwrap_or_clone(v));
        }
        let left_at = match self.best_epoch {
            0 => "the weights it started this phase with".to_string(),
            e => format!("its best weights so far (after epoch {e})"),
        };
        outcome.map_err(|e| match e {
            Error::Input(msg) => Error::Input(format!("{msg}; the model was put back to {left_at}")),
            Error::NonFinite(msg) => Error::NonFinite(format!("{msg}; the model was put back to {left_at}")),
            other => other,
        })
    }
}

fn snapshot(model: &LegoTransformer) -> Vec<std::sync::Arc<Vec<f32>>> {
    model.params().iter().map(Tensor::data).collect()
}

pub(super) fn check_batches(model: &LegoTransformer, batches: &[Batch], what: &str) -> Result<()> {
    if batches.is_empty() {
        return Err(Error::Input(format!("{what}: no batches")));
    }
    for b in batches {
        if b.seq > model.config.max_seq_len {
            return Err(Error::Input(format!(
                "{what}: seq_len {} is above the model's max_seq_len {}",
                b.seq, model.config.max_seq_len
            )));
        }
    }
    Ok(())
}

/// Progress on stderr at most every half second.
pub(super) struct Progress {
    start: Instant,
    last: Instant,
    on: bool,
}

impl Progress {
    pub(super) fn new(on: bool) -> Progress {
        Progress { start: Instant::now(), last: Instant::now(), on }
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tick(
        &mut self,
        label: &str,
        epoch: usize,
        epochs: usize,
        step: usize,
        steps: usize,
        loss: f32,
        tokens: u64,
    ) {
        if !self.on || (self.last.elapsed().as_secs_f64() < 0.5 && step + 1 != steps) {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64();
        let done = ((epoch - 1) * steps + step + 1) as f64 / (epochs * steps) as f64;
        eprint!(
            "\r{label}: epoch {epoch}/{epochs} step {}/{steps} loss {loss:.4} {:.0} tok/s, at most {:.0}s left   ",
            step + 1,
            tokens as f64 / secs,
            secs / done - secs
        );
        if step + 1 == steps {
            eprintln!();
        }
    }
}

impl Trainer {
    /// A trainer with these options.
    pub fn new(options: TrainOptions) -> Trainer {
        Trainer { options }
    }

    /// The second half of every training step: backward from `loss`, clip, AdamW step.
    /// Returns the loss. A loss that is not finite is an error naming the epoch and the step
    /// (both from 1), raised before the backward pass, so that its NaN gradients never reach
    /// the weights.
    pub(super) fn backward_and_step(
        &self,
        loss: &Tensor,
        opt: &mut AdamW,
        epoch: usize,
        step: usize,
        steps: usize,
    ) -> Result<f32> {
        let l = loss.item();
        if !l.is_finite() {
            return Err(Error::NonFinite(format!(
                "{}: the loss became {l} at epoch {epoch}, step {} of {steps} (lower the learning rate?)",
                self.options.label,
                step + 1
            )));
        }
        loss.backward();
        if let Some(c) = self.options.grad_clip {
            clip_grad_norm(opt.params(), c);
        }
        opt.step();
        Ok(l)
    }

    pub(super) fn schedule(&self, opt: &AdamW, steps_per_epoch: usize) -> CosineSchedule {
        let total = (self.options.max_epochs * steps_per_epoch) as u64;
        let lr = opt.config.lr;
        CosineSchedule {
            max_lr: lr,
            min_lr: lr * self.options.min_lr_ratio,
            warmup: self.options.warmup_steps.min(total / 2),
            total,
        }
    }

    /// **Spec `train_with_early_stopping(model, train, val, optimizer)`** (phase 1): trains every
    /// trainable parameter of `model`, leaves it at its best validation perplexity, and returns
    /// the history.
    pub fn train_with_early_stopping(
        &self,
        model: &LegoTransformer,
        train: &[Batch],
        val: &[Batch],
        opt: &mut AdamW,
    ) -> Result<History> {
        check_batches(model, train, "training")?;
        check_batches(model, val, "validation")?;
        let mut history = History::default();
        let mut stopping = EarlyStopping::new(model, self.options.patience);
        let outcome = self.phase1_epochs(model, train, val, opt, &mut history, &mut stopping);
        stopping.restore(model, outcome)?;
        crate::tensor::pool::release(); // training is over: give its step buffers back
        Ok(history)
    }

    /// Phase 1's epochs, recording into `history` and `stopping`; returns at the first error.
    fn phase1_epochs(
        &self,
        model: &LegoTransformer,
        train: &[Batch],
        val: &[Batch],
        opt: &mut AdamW,
        history: &mut History,
        stopping: &mut EarlyStopping,
    ) -> Result<()> {
        let o = &self.options;
        let schedule = self.schedule(opt, train.len());
        let base_step = opt.step_count();
        let mut progress = Progress::new(o.verbose);
        for epoch in 1..=o.max_epochs {
            let t0 = Instant::now();
            let mut loss_sum = 0.0;
            let mut epoch_tokens = 0u64;
            for (i, b) in train.iter().enumerate() {
                opt.config.lr = schedule.lr(opt.step_count() - base_step);
                opt.zero_grad();
                let loss = model.forward(&b.x, b.batch)?.cross_entropy(&b.y, None);
                let l = self.backward_and_step(&loss, opt, epoch, i, train.len())?;
                loss_sum += l as f64;
                epoch_tokens += b.x.len() as u64;
                history.tokens += b.x.len() as u64;
                history.steps += 1;
                progress.tick(&o.label, epoch, o.max_epochs, i, train.len(), l, history.tokens);
            }
            let seconds = t0.elapsed().as_secs_f64();
            let eval = self.evaluate(model, val, None)?;
            history.epochs.push(EpochRecord {
                epoch,
                train_loss: loss_sum / train.len() as f64,
                val_loss: eval.loss,
                val_ppl: eval.ppl,
                val_accuracy: eval.accuracy,
                seconds,
                tokens_per_second: epoch_tokens as f64 / seconds,
            });
            if o.verbose {
                eprintln!(
                    "{}: epoch {epoch} val PPL {:.2} accuracy {:.2} %",
                    o.label,
                    eval.ppl,
                    100.0 * eval.accuracy
                );
            }
            let (improved, stop) = stopping.update(model, epoch, eval.ppl);
            if improved {
                history.best_epoch = epoch;
            }
            if stop {
                break;
            }
        }
        Ok(())
    }

    /// **Spec `train_upper_layers_with_early_stopping(model, hard_batches, val, hard_examples,
    /// optimizer, num_lower_layers, routing_threshold)`** (phase 2): trains layers
    /// `num_lower_layers..` and the final head on `hard_batches`, from their cached lower hidden
    /// states, with early stopping on the routed validation perplexity (see the module doc).
    /// `mode` says how `hard_examples` are fed when their perplexity is measured each epoch.
    #[allow(clippy::too_many_arguments)]
    pub fn train_upper_layers_with_early_stopping(
        &self,
        model: &LegoTransformer,
        hard_batches: &[HardBatch],
        val: &[Batch],
        hard_examples: &HardExamples,
        opt: &mut AdamW,
        num_lower_layers: usize,
        routing_threshold: f32,
        mode: Phase2Mode,
    ) -> Result<Phase2History> {
        crate::model::config::check_threshold(routing_threshold)?;
        check_batches(model, val, "validation")?;
        if hard_batches.is_empty() {
            return Err(Error::Input("phase 2: no hard batches".into()));
        }
        if num_lower_layers != model.config.exit_layer {
            return Err(Error::Input(format!(
                "phase 2: num_lower_layers {num_lower_layers} differs from the model's exit_layer {}",
                model.config.exit_layer
            )));
        }
        // The lower layers run here, once, for the validation split.
        let val_cache = ValCache::new(model, val)?;
        let mut history = Phase2History::default();
        let mut stopping = EarlyStopping::new(model, self.options.patience);
        let run = Phase2Run {
            hard_batches,
            val_cache: &val_cache,
            hard_examples,
            num_lower_layers,
            routing_threshold,
            mode,
        };
        let outcome = self.phase2_epochs(model, &run, opt, &mut history, &mut stopping);
        stopping.restore(model, outcome)?;
        crate::tensor::pool::release(); // training is over: give its step buffers back
        Ok(history)
    }

    /// Phase 2's epochs, recording into `history` and `stopping`; returns at the first error.
    fn phase2_epochs(
        &self,
        model: &LegoTransformer,
        run: &Phase2Run,
        opt: &mut AdamW,
        history: &mut Phase2History,
        stopping: &mut EarlyStopping,
    ) -> Result<()> {
        let o = &self.options;
        let Phase2Run { hard_batches, val_cache, hard_examples, num_lower_layers, routing_threshold, mode } =
            *run;
        let schedule = self.schedule(opt, hard_batches.len());
        let base_step = opt.step_count();
        let mut progress = Progress::new(o.verbose);
        // Epoch 0: the model as it came, before any step. Early stopping then keeps these
        // weights if no epoch beats them (with `ExtendInit::Identity` they are phase 1's model,
        // so phase 2 can only improve on it). It stops on the *routed* validation perplexity:
        // the quality of what LEGO serves (each token from the exit or from the deep path, as
        // the calibrated threshold routes it), not of the deep path alone on tokens it would
        // never see. In sequence-skip mode the deep path is measured as that mode trains it,
        // seeing only the tokens routed deep (`ValCache::phase2_routed`).
        let (_, hard_ppl) = evaluate_on_hard_examples(model, hard_examples, mode)?;
        let routed = val_cache.phase2_routed(model, routing_threshold, mode)?;
        history.epochs.push(Phase2Epoch {
            epoch: 0,
            train_loss: f64::NAN,
            hard_ppl,
            val_ppl_routed: routed.ppl,
            seconds: 0.0,
        });
        stopping.update(model, 0, routed.ppl);
        if o.verbose {
            eprintln!(
                "{}: before phase 2: hard PPL {hard_ppl:.2}, routed val PPL {:.2}",
                o.label, routed.ppl
            );
        }
        for epoch in 1..=o.max_epochs {
            let t0 = Instant::now();
            let (mut loss_sum, mut weight_sum) = (0.0f64, 0usize);
            for (i, b) in hard_batches.iter().enumerate() {
                let k = b.hard_tokens();
                if k == 0 {
                    continue;
                }
                opt.config.lr = schedule.lr(opt.step_count() - base_step);
                opt.zero_grad();
                let visible = b.upper_visible.as_ref();
                let logits = model.forward_upper_layers_masked(&b.hidden_tensor(), num_lower_layers, visible);
                let loss = logits.cross_entropy(&b.targets, Some(&b.weights));
                let l = self.backward_and_step(&loss, opt, epoch, i, hard_batches.len())?;
                loss_sum += l as f64 * k as f64;
                weight_sum += k;
                history.steps += 1;
                history.tokens += k as u64;
                history.positions += (b.batch * b.seq) as u64;
                progress.tick(&o.label, epoch, o.max_epochs, i, hard_batches.len(), l, history.tokens);
            }
            let seconds = t0.elapsed().as_secs_f64();
            let (_, hard_ppl) = evaluate_on_hard_examples(model, hard_examples, mode)?;
            let routed = val_cache.phase2_routed(model, routing_threshold, mode)?;
            history.epochs.push(Phase2Epoch {
                epoch,
                train_loss: loss_sum / weight_sum.max(1) as f64,
                hard_ppl,
                val_ppl_routed: routed.ppl,
                seconds,
            });
            if o.verbose {
                eprintln!(
                    "{}: epoch {epoch} hard PPL {hard_ppl:.2}, routed val PPL {:.2}",
                    o.label, routed.ppl
                );
            }
            let (improved, stop) = stopping.update(model, epoch, routed.ppl);
            if improved {
                history.best_epoch = epoch;
            }
            if stop {
                break;
            }
        }
        Ok(())
    }

    /// **Spec `evaluate(model, val_batches, routing_threshold)`**: loss, perplexity and accuracy,
    /// and the fake-early-exit statistics: with a threshold, each token's prediction comes from
    /// the exit if its confidence is at or above it, from the deep path otherwise (both are
    /// computed); without one, every token goes the full depth.
    pub fn evaluate(
        &self,
        model: &LegoTransformer,
        batches: &[Batch],
        routing_threshold: Option<f32>,
    ) -> Result<EvalStats> {
        check_batches(model, batches, "evaluation")?;
        if let Some(t) = routing_threshold {
            crate::model::config::check_threshold(t)?;
        }
        let cache = ValCache::new(model, batches)?;
        cache.routed(model, routing_threshold.unwrap_or(f32::INFINITY))
    }

    /// [`evaluate`](Trainer::evaluate) routed by `rule`: its threshold and its measure (the
    /// max softmax, or the model's exit gate, whose FLOPs are then counted as the gate's:
    /// see [`cost`]). Its fill plays no part: both paths run over whole sequences, so the upper
    /// layers see every position. `None`: full depth.
    pub fn evaluate_with_rule(
        &self,
        model: &LegoTransformer,
        batches: &[Batch],
        rule: Option<&ExitRule>,
    ) -> Result<EvalStats> {
        check_batches(model, batches, "evaluation")?;
        let Some(rule) = rule else { return self.evaluate(model, batches, None) };
        rule.validate_for(model)?;
        ValCache::new(model, batches)?.routed_by(model, rule.threshold, rule.measure)
    }
}

/// What phase 2's epochs work on, besides the model and the optimizer (the arguments of
/// [`Trainer::train_upper_layers_with_early_stopping`], checked, and the validation cache).
#[derive(Clone, Copy)]
struct Phase2Run<'a> {
    hard_batches: &'a [HardBatch],
    val_cache: &'a ValCache,
    hard_examples: &'a HardExamples,
    num_lower_layers: usize,
    routing_threshold: f32,
    mode: Phase2Mode,
}

/// A split's lower hidden states and shallow results, computed once so that each evaluation
/// runs only the upper layers.
struct ValCache {
    /// Per batch: lower hidden states, targets.
    hidden: Vec<(Tensor, Vec<usize>)>,
    /// Per token: exit confidence, shallow loss, whether the shallow prediction is right.
    shallow: Vec<(f32, f64, bool)>,
    /// Per token: the exit gate's `p_exit` (empty when the model has no gate of its width).
    gate: Vec<f32>,
    seq: usize,
}

impl ValCache {
    fn new(model: &LegoTransformer, batches: &[Batch]) -> Result<ValCache> {
        let v = model.config.vocab_size;
        let mut hidden = Vec::with_capacity(batches.len());
        let mut shallow = Vec::new();
        let (d, norm) = (model.config.dim, &model.exit().norm);
        let gate = model.exit_gate.as_ref().filter(|g| g.dim() == d);
        let (mut gate_p, mut normed) = (Vec::new(), vec![0.0; d]);
        for (bi, b) in batches.iter().enumerate() {
            let h = crate::no_grad(|| model.get_hidden_states(&b.x, b.batch))?;
            let (conf, logits) = model.compute_confidence(&h);
            let z = logits.data();
            check_exit_logits(&z, v, b.seq, bi, "evaluation")?;
            for (i, (&c, &y)) in conf.iter().zip(&b.y).enumerate() {
                let row = &z[i * v..(i + 1) * v];
                let nll = (crate::ops::cross_entropy::logsumexp(row) - row[y]) as f64;
                shallow.push((c, nll, crate::ops::select::argmax(row) == y));
            }
            if let Some(gate) = gate {
                let hd = h.data();
                gate_p.extend(hd.chunks_exact(d).map(|row| gate.probability(norm, row, &mut normed)));
            }
            hidden.push((h, b.y.clone()));
        }
        Ok(ValCache { hidden, shallow, gate: gate_p, seq: batches[0].seq })
    }

    /// Statistics with max-softmax routing at `threshold` (infinity: full depth).
    fn routed(&self, model: &LegoTransformer, threshold: f32) -> Result<EvalStats> {
        self.routed_by(model, threshold, ExitMeasure::MaxSoftmax)
    }

    /// Phase 2's validation measure in `mode`: routed by the max softmax at `threshold`. In
    /// sequence-skip mode the deep path's attention sees only the tokens routed deep (and each
    /// token itself), as TRUE early exit's `Skip` fill leaves it, which is what that mode trains
    /// for; then `full_depth_loss` is that masked deep path's.
    fn phase2_routed(&self, model: &LegoTransformer, threshold: f32, mode: Phase2Mode) -> Result<EvalStats> {
        self.routed_masked(model, threshold, ExitMeasure::MaxSoftmax, mode == Phase2Mode::SequenceSkip)
    }

    /// Statistics with routing by `measure` at `threshold`. Deep logits, or gate scores, that
    /// are not finite are an error naming the batch or token.
    fn routed_by(&self, model: &LegoTransformer, threshold: f32, measure: ExitMeasure) -> Result<EvalStats> {
        self.routed_masked(model, threshold, measure, false)
    }

    /// [`routed_by`](ValCache::routed_by); with `skip`, the deep path's attention limited to
    /// the tokens routed deep (see [`phase2_routed`](ValCache::phase2_routed)).
    fn routed_masked(
        &self,
        model: &LegoTransformer,
        threshold: f32,
        measure: ExitMeasure,
        skip: bool,
    ) -> Result<EvalStats> {
        let by_gate = measure == ExitMeasure::Gate;
        if by_gate {
            assert_eq!(
                self.gate.len(),
                self.shallow.len(),
                "ValCache: gate routing without the gate's scores"
            );
            if let Some(i) = self.gate.iter().position(|p| !p.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "evaluation: the exit gate's score of token {i} is {}",
                    self.gate[i]
                )));
            }
        }
        let c = &model.config;
        let v = c.vocab_size;
        let has_upper = c.exit_layer < c.num_layers;
        let (mut loss, mut full_loss, mut correct, mut shallow_n) = (0.0f64, 0.0f64, 0usize, 0usize);
        let (mut flops, mut full_flops) = (0.0f64, 0.0f64);
        let mut k = 0;
        let score = |k: usize| if by_gate { self.gate[k] } else { self.shallow[k].0 };
        for (bi, (h, targets)) in self.hidden.iter().enumerate() {
            // With `skip`, the upper layers see the tokens routed deep (score under the threshold).
            let visible: Option<std::sync::Arc<[bool]>> =
                skip.then(|| (k..k + targets.len()).map(|t| score(t) < threshold).collect());
            let deep = has_upper.then(|| {
                crate::no_grad(|| model.forward_upper_layers_masked(h, c.exit_layer, visible.as_ref())).data()
            });
            if let Some(z) = &deep
                && let Some(i) = z.iter().position(|x| !x.is_finite())
            {
                return Err(Error::NonFinite(format!(
                    "evaluation: the deep path's logit for id {} is {} at batch {bi}, token {} \
                     (are the model's weights finite?)",
                    i % v,
                    z[i],
                    i / v
                )));
            }
            for (i, &y) in targets.iter().enumerate() {
                let (_, s_nll, s_ok) = self.shallow[k];
                let ctx = i % self.seq + 1;
                let (d_nll, d_ok) = match &deep {
                    Some(z) => {
                        let row = &z[i * v..(i + 1) * v];
                        (
                            (crate::ops::cross_entropy::logsumexp(row) - row[y]) as f64,
                            crate::ops::select::argmax(row) == y,
                        )
                    }
                    None => (s_nll, s_ok),
                };
                let exits = !has_upper || score(k) >= threshold;
                let (nll, ok) = if exits { (s_nll, s_ok) } else { (d_nll, d_ok) };
                if exits {
                    // A model with nothing above its exit has only one path: its tokens are not
                    // "shallow", they went the full depth.
                    shallow_n += has_upper as usize;
                    flops +=
                        if by_gate { cost::gate_shallow_flops(c, ctx) } else { cost::shallow_flops(c, ctx) };
                } else if by_gate {
                    flops += cost::gate_deep_flops(c, ctx);
                } else if threshold.is_finite() {
                    flops += cost::deep_flops(c, ctx);
                } else {
                    // No threshold: plain full-depth inference, no exit check at all.
                    flops += cost::full_depth_flops(c, ctx);
                }
                full_flops += cost::full_depth_flops(c, ctx);
                loss += nll;
                full_loss += d_nll;
                correct += ok as usize;
                k += 1;
            }
        }
        let n = k.max(1);
        let loss = loss / n as f64;
        Ok(EvalStats {
            loss,
            ppl: loss.exp(),
            accuracy: correct as f64 / n as f64,
            tokens: k,
            shallow: shallow_n,
            shallow_ratio: shallow_n as f64 / n as f64,
            layer_cost: if has_upper { cost::layer_cost(c, shallow_n, k - shallow_n) } else { 1.0 },
            flop_cost: flops / full_flops,
            full_depth_loss: full_loss / n as f64,
        })
    }
}
