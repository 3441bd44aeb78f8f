//! The baseline with a tuned exit head: what a user who already has a deep model would try
//! for early exit, and what LEGO must beat at equal cost.
//!
//! ```text
//! deep model (N layers, trained) ── frozen ──────────────────────────────────────────┐
//!   tokens ─ embedding ─ layers 0..exit ─► h_exit ─ exit head (a trainable copy of    │
//!                          (run once,       │        the final norm + output) ─► logits ─ CE to the next token
//!                           no graph)       └─ layers exit..N ─ final head (frozen, unchanged)
//! ```
//!
//! A deep model's final head was trained on layer-N states; applied at the exit layer it was
//! never asked to predict anything, so its confidence there means little. The cheapest fix
//! keeps the whole model as it is and trains **only a copy of its head** on the exit layer's
//! hidden states. Those states do not change while the head trains (the body is frozen), so
//! they are computed **once** for the training and validation splits, graph-free, and every
//! epoch then costs one head's forward and backward per token. Early stopping keeps the
//! epoch with the best validation perplexity at the exit, counting the untuned copy as epoch 0,
//! so tuning can never leave the head worse than it started on validation.

use std::time::Instant;

use super::trainer::{EarlyStopping, Progress, Trainer, check_batches};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::LegoTransformer;
use crate::optim::{AdamW, AdamWConfig};
use crate::tensor::Tensor;

/// One epoch of exit-head tuning.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitHeadEpoch {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss at the exit over the epoch's batches.
    pub train_loss: f64,
    /// Validation perplexity at the exit (every token through the exit head).
    pub val_ppl: f64,
    /// Wall time of the epoch's training steps, seconds.
    pub seconds: f64,
}

/// The history of [`Trainer::tune_exit_head_with_early_stopping`].
#[derive(Clone, Debug, Default)]
pub struct ExitHeadHistory {
    /// Validation perplexity at the exit of the untuned copy (epoch 0).
    pub initial_val_ppl: f64,
    /// One record per epoch run.
    pub epochs: Vec<ExitHeadEpoch>,
    /// The epoch whose exit head the model was left with (0: the untuned copy).
    pub best_epoch: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training tokens processed (summed over epochs).
    pub tokens: u64,
    /// Wall time of computing the exit states once, seconds.
    pub feature_seconds: f64,
}

/// A split's exit-layer hidden states, `[batch, seq, D]` per batch, with its targets.
fn exit_states(model: &LegoTransformer, batches: &[Batch]) -> Result<Vec<(Tensor, Vec<usize>)>> {
    batches
        .iter()
        .map(|b| Ok((crate::no_grad(|| model.get_hidden_states(&b.x, b.batch))?, b.y.clone())))
        .collect()
}

/// The mean next-token loss of `model`'s exit head over `states`, graph-free.
fn exit_loss(model: &LegoTransformer, states: &[(Tensor, Vec<usize>)]) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (h, y) in states {
        let loss = crate::no_grad(|| model.exit().forward(h).cross_entropy(y, None)).item();
        sum += loss as f64 * y.len() as f64;
        n += y.len();
    }
    sum / n.max(1) as f64
}

impl Trainer {
    /// The baseline with a tuned exit head: a copy of the deep `model` (its `exit_layer` below
    /// its `num_layers`) whose every parameter is frozen, given a trainable copy of its final
    /// head as its exit head, which alone is trained, with AdamW at `lr`, on the exit-layer
    /// states of `train` (cross-entropy to the next token), with early stopping on the
    /// validation perplexity at the exit. `model` itself is not changed. Returns the tuned
    /// model (its exit head frozen again) and the history.
    ///
    /// Errors: a model with no layers above its exit, empty or over-long batches, or a loss
    /// that is not finite (the best head so far is kept, and the error names the step).
    pub fn tune_exit_head_with_early_stopping(
        &self,
        model: &LegoTransformer,
        train: &[Batch],
        val: &[Batch],
        lr: f32,
    ) -> Result<(LegoTransformer, ExitHeadHistory)> {
        let c = &model.config;
        if c.exit_layer >= c.num_layers {
            return Err(Error::Input(format!(
                "tune_exit_head: the model's exit layer {} is its last layer ({} layers): there is nothing to exit from",
                c.exit_layer, c.num_layers
            )));
        }
        check_batches(model, train, "exit-head training")?;
        check_batches(model, val, "exit-head validation")?;

        // The frozen body, and a trainable copy of its final head at the exit.
        let mut tuned = model.deep_clone();
        for p in tuned.params() {
            p.set_requires_grad(false);
        }
        let exit = tuned.head.deep_clone();
        exit.set_frozen(false);
        let mut opt = AdamW::new(
            vec![exit.norm.weight.clone(), exit.output.weight.clone()],
            AdamWConfig { lr, ..AdamWConfig::default() },
        );
        tuned.exit_head = Some(exit);

        // The exit states, once: they cannot change while only the head trains.
        let t0 = Instant::now();
        let (train_states, val_states) = (exit_states(&tuned, train)?, exit_states(&tuned, val)?);
        let mut history =
            ExitHeadHistory { feature_seconds: t0.elapsed().as_secs_f64(), ..ExitHeadHistory::default() };

        history.initial_val_ppl = exit_loss(&tuned, &val_states).exp();
        let mut stopping = EarlyStopping::new(&tuned, self.options.patience);
        stopping.update(&tuned, 0, history.initial_val_ppl);
        let outcome =
            self.exit_head_epochs(&tuned, &train_states, &val_states, &mut opt, &mut history, &mut stopping);
        stopping.restore(&tuned, outcome)?;
        tuned.exit().set_frozen(true);
        Ok((tuned, history))
    }

    /// The epochs of exit-head tuning; returns at the first error.
    fn exit_head_epochs(
        &self,
        tuned: &LegoTransformer,
        train: &[(Tensor, Vec<usize>)],
        val: &[(Tensor, Vec<usize>)],
        opt: &mut AdamW,
        history: &mut ExitHeadHistory,
        stopping: &mut EarlyStopping,
    ) -> Result<()> {
        let o = &self.options;
        let schedule = self.schedule(opt, train.len());
        let mut progress = Progress::new(o.verbose);
        for epoch in 1..=o.max_epochs {
            let t0 = Instant::now();
            let mut loss_sum = 0.0;
            for (i, (h, y)) in train.iter().enumerate() {
                opt.config.lr = schedule.lr(history.steps);
                opt.zero_grad();
                // h holds no graph: the backward pass stops at the exit head.
                let loss = tuned.exit().forward(h).cross_entropy(y, None);
                let l = self.backward_and_step(&loss, opt, epoch, i, train.len())?;
                loss_sum += l as f64;
                history.steps += 1;
                history.tokens += y.len() as u64;
                progress.tick(&o.label, epoch, o.max_epochs, i, train.len(), l, history.tokens);
            }
            let seconds = t0.elapsed().as_secs_f64();
            let val_ppl = exit_loss(tuned, val).exp();
            history.epochs.push(ExitHeadEpoch {
                epoch,
                train_loss: loss_sum / train.len() as f64,
                val_ppl,
                seconds,
            });
            if o.verbose {
                eprintln!("{}: epoch {epoch} exit val PPL {val_ppl:.2}", o.label);
            }
            let (improved, stop) = stopping.update(tuned, epoch, val_ppl);
            if improved {
                history.best_epoch = epoch;
            }
            if stop {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, SyntheticConfig, Tokenizer, generate_corpus, split_documents};
    use crate::model::LegoConfig;
    use crate::train::{TrainOptions, set_seed};

    #[test]
    fn the_tuned_head_predicts_better_at_the_exit_than_the_untuned_copy() {
        let docs = generate_corpus(&SyntheticConfig { documents: 8, bytes_per_document: 2_000, seed: 3 });
        let split = split_documents(docs, 1, 1, 0).unwrap();
        let data = Dataset::new(&Tokenizer::Byte, &split, 16, 16, 0).unwrap();
        // A small 4-layer model, exit after layer 2, trained briefly as the baseline is.
        let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(256, 32, 4, 2, 88, 16) };
        let model = LegoTransformer::new(config, &mut set_seed(1)).unwrap();
        let trainer = Trainer::new(TrainOptions { max_epochs: 2, ..TrainOptions::default() });
        let mut opt = AdamW::new(model.params(), AdamWConfig { lr: 3e-3, ..AdamWConfig::default() });
        trainer.train_with_early_stopping(&model, &data.train, &data.val, &mut opt).unwrap();
        let before: Vec<Vec<f32>> = model.params().iter().map(|p| p.data().to_vec()).collect();

        let (tuned, history) =
            trainer.tune_exit_head_with_early_stopping(&model, &data.train, &data.val, 3e-3).unwrap();
        // Validation at the exit improved, and the tuned head beats the untuned copy on train too.
        assert!(history.best_epoch >= 1, "{history:?}");
        let best = history.epochs[history.best_epoch - 1].val_ppl;
        assert!(best < history.initial_val_ppl, "{best} vs {}", history.initial_val_ppl);
        let train_states = exit_states(&tuned, &data.train).unwrap();
        // (`model` has no exit head of its own: its exit is its final head, the untuned copy.)
        assert!(exit_loss(&tuned, &train_states) < exit_loss(&model, &train_states));
        // The body and the deep head are untouched, in the tuned copy and in the original.
        let after: Vec<Vec<f32>> = model.params().iter().map(|p| p.data().to_vec()).collect();
        assert_eq!(before, after);
        for ((name, p), q) in tuned.named_params().iter().zip(&before) {
            if !name.starts_with("exit_") {
                assert_eq!(&p.data().to_vec(), q, "{name} changed");
            }
            assert!(!p.requires_grad_flag(), "{name} left trainable");
        }
    }

    #[test]
    fn a_model_with_nothing_above_its_exit_is_refused() {
        let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(256, 16, 2, 2, 32, 8) };
        let model = LegoTransformer::new(config, &mut set_seed(0)).unwrap();
        let b = Batch { x: vec![1; 8], y: vec![2; 8], batch: 1, seq: 8 };
        let batches = [b];
        let err = Trainer::default().tune_exit_head_with_early_stopping(&model, &batches, &batches, 1e-3);
        assert!(err.unwrap_err().to_string().contains("nothing to exit from"));
    }
}
