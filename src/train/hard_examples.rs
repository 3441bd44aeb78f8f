//! Hard examples: the tokens the shallow model is not confident about, and the batches phase 2
//! trains on.
//!
//! The **confidence** of a token is the largest probability of the exit head's softmax
//! ([`LegoTransformer::compute_confidence`]). A token **exits** when its confidence is at or
//! above the routing threshold (ties included), and is **hard** when it is below.
//!
//! Hard examples are kept as the spec insists, token by token: each hard token's hidden state
//! after the lower layers and its target. We store them inside the sequences they come from
//! (the lower hidden states of every position, and which positions are hard), so that phase 2
//! can train in either of two modes ([`Phase2Mode`]):
//!
//! - [`Phase2Mode::Token`], the spec's: each hard token's hidden state alone, a sequence of
//!   length 1. Cheap, but the upper layers' attention never sees context in training, though it
//!   does at inference (the prototype's weakness 2).
//! - [`Phase2Mode::Sequence`], our default: whole sequences of lower hidden states, the loss on
//!   the hard positions only, so the upper layers attend over the context of the sequence.
//! - [`Phase2Mode::SequenceSkip`]: the same sequences, but in the upper layers each position
//!   sees only the hard positions before it (and itself). That is the context TRUE early exit
//!   with the `Skip` fill leaves the upper layers at inference, where a token that exited never
//!   enters the upper cache: the upper layers train on what they will see.

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::LegoTransformer;
use crate::tensor::Tensor;

/// How phase 2 feeds hard examples to the upper layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase2Mode {
    /// Each hard token's hidden state alone (the spec's token-level mode).
    Token,
    /// Whole sequences, the loss on hard positions only (the default).
    Sequence,
    /// Whole sequences, the loss on hard positions only, the upper layers' attention limited to
    /// the hard positions (and each position itself), as the `Skip` fill leaves it.
    SequenceSkip,
}

impl std::str::FromStr for Phase2Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Phase2Mode> {
        match s {
            "token" => Ok(Phase2Mode::Token),
            "sequence" => Ok(Phase2Mode::Sequence),
            "sequence-skip" => Ok(Phase2Mode::SequenceSkip),
            _ => Err(Error::Input(format!(
                "phase-2 mode must be 'token', 'sequence' or 'sequence-skip', got '{s}'"
            ))),
        }
    }
}

/// The hard examples of a set of batches: for every sequence holding at least one hard token,
/// the lower hidden states of all its positions, its targets, and which positions are hard.
#[derive(Clone, Debug)]
pub struct HardExamples {
    /// Model width D.
    pub dim: usize,
    /// Positions per sequence T.
    pub seq_len: usize,
    /// Lower hidden states, `[sequences, T, D]`.
    pub hidden: Vec<f32>,
    /// Targets, `[sequences, T]`.
    pub targets: Vec<usize>,
    /// Whether each position is hard, `[sequences, T]`.
    pub hard: Vec<bool>,
    /// Flat indices (`sequence·T + position`) of the hard tokens.
    pub hard_positions: Vec<usize>,
    /// Tokens looked at to find them.
    pub tokens_seen: usize,
    /// The threshold they were collected at.
    pub threshold: f32,
}

impl HardExamples {
    /// The number of hard tokens.
    pub fn len(&self) -> usize {
        self.hard_positions.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.hard_positions.is_empty()
    }

    /// The number of sequences kept (those with at least one hard token).
    pub fn num_sequences(&self) -> usize {
        self.targets.len() / self.seq_len.max(1)
    }

    /// The hidden state and target of hard token `i`.
    pub fn token(&self, i: usize) -> (&[f32], usize) {
        let p = self.hard_positions[i];
        (&self.hidden[p * self.dim..(p + 1) * self.dim], self.targets[p])
    }
}

/// One phase-2 batch: hidden states entering the upper layers, targets, and loss weights.
#[derive(Clone, Debug)]
pub struct HardBatch {
    /// Hidden states `[batch, seq, D]`.
    pub hidden: Arc<Vec<f32>>,
    /// Rows.
    pub batch: usize,
    /// Positions per row (1 in token mode).
    pub seq: usize,
    /// Model width.
    pub dim: usize,
    /// Targets `[batch, seq]`.
    pub targets: Vec<usize>,
    /// Loss weight per position: 1 on hard positions, 0 elsewhere (all 1 in token mode).
    pub weights: Vec<f32>,
    /// In sequence-skip mode, the positions the upper layers' attention may see besides each
    /// position itself (`[batch, seq]`: the hard ones); `None`, every earlier position.
    pub upper_visible: Option<Arc<[bool]>>,
}

impl HardBatch {
    /// The hidden states as a tensor (sharing the buffer).
    pub fn hidden_tensor(&self) -> Tensor {
        Tensor::from_arc(self.hidden.clone(), &[self.batch, self.seq, self.dim])
    }

    /// The number of hard tokens (positions with weight).
    pub fn hard_tokens(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

/// Runs the lower layers and the exit head on each of `batches`, and hands `each` the batch,
/// its lower hidden states and its tokens' exit confidences (row-major). `what` names the
/// caller in errors. Exit logits that are not finite are an error (see [`check_exit_logits`]).
fn exit_confidences(
    model: &LegoTransformer,
    batches: &[Batch],
    what: &str,
    mut each: impl FnMut(&Batch, &Tensor, &[f32]),
) -> Result<()> {
    for (i, b) in batches.iter().enumerate() {
        let h = crate::no_grad(|| model.get_hidden_states(&b.x, b.batch))?;
        let (conf, logits) = model.compute_confidence(&h);
        check_exit_logits(&logits.data(), model.config.vocab_size, b.seq, i, what)?;
        each(b, &h, &conf);
    }
    Ok(())
}

/// Checks that the exit head's logits of batch `batch_index` (`[rows, seq, vocab]`, flat) are
/// all finite, and names the first token whose are not.
///
/// A softmax over a row holding a NaN is NaN everywhere, and its maximum, taken with
/// `f32::max` (which skips NaN), reads as confidence 0: the token would silently count as
/// hard, calibration would print a threshold of 0, and every token would go deep. So a
/// non-finite logit (a NaN or an infinite weight, an overflow) stops the caller instead.
pub(crate) fn check_exit_logits(
    logits: &[f32],
    vocab: usize,
    seq: usize,
    batch_index: usize,
    what: &str,
) -> Result<()> {
    let Some(i) = logits.iter().position(|z| !z.is_finite()) else { return Ok(()) };
    let token = i / vocab;
    Err(Error::NonFinite(format!(
        "{what}: the exit head's logit for id {} is {} at batch {batch_index}, row {}, position {}, \
         so its confidence is undefined (are the model's weights finite?)",
        i % vocab,
        logits[i],
        token / seq.max(1),
        token % seq.max(1)
    )))
}

pub(crate) fn check_ratio(target_ratio: f32) -> Result<()> {
    if !(target_ratio > 0.0 && target_ratio < 1.0) {
        return Err(Error::Input(format!("the hard-example ratio must be in (0, 1), got {target_ratio}")));
    }
    Ok(())
}

/// **Spec `compute_confidence_threshold(model, batches, target_ratio)`**: the threshold below
/// which `target_ratio` of the tokens of `batches` fall, as an exact quantile.
///
/// With the n confidences sorted, `c₍₀₎ <= … <= c₍ₙ₋₁₎`, and `k = round(target_ratio·n)`, the
/// threshold is `c₍ₖ₎`: exactly the k smallest are below it (hard), the rest at or above it
/// exit, unless confidences tie at the boundary (tied tokens all exit, so slightly fewer than k
/// are hard). If k = n the threshold is just above the largest confidence.
pub fn compute_confidence_threshold(
    model: &LegoTransformer,
    batches: &[Batch],
    target_ratio: f32,
) -> Result<f32> {
    check_ratio(target_ratio)?;
    let mut all = Vec::new();
    exit_confidences(model, batches, "compute_confidence_threshold", |_, _, c| all.extend_from_slice(c))?;
    if all.is_empty() {
        return Err(Error::Input("compute_confidence_threshold: no tokens in the batches".into()));
    }
    Ok(quantile_threshold(&mut all, target_ratio))
}

/// The threshold below which `ratio` of `scores` (non-empty) fall, as an exact quantile (see
/// [`compute_confidence_threshold`]); sorts `scores`. The exit gate's threshold is calibrated
/// the same way.
pub(crate) fn quantile_threshold(scores: &mut [f32], ratio: f32) -> f32 {
    assert!(!scores.is_empty(), "quantile_threshold: no scores");
    scores.sort_by(f32::total_cmp);
    let k = ((ratio as f64 * scores.len() as f64).round() as usize).min(scores.len());
    if k == scores.len() { scores[k - 1].next_up() } else { scores[k] }
}

/// **Spec `collect_hard_examples(model, batches, threshold)`**: the tokens of `batches` whose
/// exit confidence is below `threshold`, with their lower hidden states (see [`HardExamples`]).
pub fn collect_hard_examples(
    model: &LegoTransformer,
    batches: &[Batch],
    threshold: f32,
) -> Result<HardExamples> {
    crate::model::config::check_threshold(threshold)?;
    let d = model.config.dim;
    let seq_len = batches.first().map_or(0, |b| b.seq);
    let mut out = HardExamples {
        dim: d,
        seq_len,
        hidden: Vec::new(),
        targets: Vec::new(),
        hard: Vec::new(),
        hard_positions: Vec::new(),
        tokens_seen: 0,
        threshold,
    };
    let mut bad_seq = None;
    exit_confidences(model, batches, "collect_hard_examples", |b, h, conf| {
        if b.seq != seq_len {
            bad_seq = Some(b.seq);
            return;
        }
        out.tokens_seen += conf.len();
        let hd = h.data();
        for r in 0..b.batch {
            let rows = r * b.seq..(r + 1) * b.seq;
            if !conf[rows.clone()].iter().any(|&c| c < threshold) {
                continue;
            }
            let base = out.targets.len();
            out.hidden.extend_from_slice(&hd[rows.start * d..rows.end * d]);
            out.targets.extend_from_slice(&b.y[rows.clone()]);
            for (t, &c) in conf[rows].iter().enumerate() {
                out.hard.push(c < threshold);
                if c < threshold {
                    out.hard_positions.push(base + t);
                }
            }
        }
    })?;
    if let Some(s) = bad_seq {
        return Err(Error::Input(format!(
            "collect_hard_examples: batches of sequence length {s} and {seq_len} mixed"
        )));
    }
    Ok(out)
}

/// **Spec `create_hard_example_loader(hard_examples, batch_size, ...)`**: the hard examples in
/// shuffled batches of `batch_size` tokens (token mode) or sequences (sequence mode).
pub fn create_hard_example_loader(
    hard: &HardExamples,
    batch_size: usize,
    seed: u64,
    mode: Phase2Mode,
) -> Result<Vec<HardBatch>> {
    if batch_size == 0 {
        return Err(Error::Input("batch size must be at least 1".into()));
    }
    if hard.is_empty() {
        return Err(Error::Input("there are no hard examples to batch (is the threshold too low?)".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let d = hard.dim;
    let mut out = Vec::new();
    match mode {
        Phase2Mode::Token => {
            let mut order: Vec<usize> = (0..hard.len()).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch_size) {
                let mut hidden = Vec::with_capacity(chunk.len() * d);
                let mut targets = Vec::with_capacity(chunk.len());
                for &i in chunk {
                    let (h, t) = hard.token(i);
                    hidden.extend_from_slice(h);
                    targets.push(t);
                }
                out.push(HardBatch {
                    hidden: Arc::new(hidden),
                    batch: chunk.len(),
                    seq: 1,
                    dim: d,
                    targets,
                    weights: vec![1.0; chunk.len()],
                    upper_visible: None,
                });
            }
        }
        Phase2Mode::Sequence | Phase2Mode::SequenceSkip => {
            let t = hard.seq_len;
            let mut order: Vec<usize> = (0..hard.num_sequences()).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks(batch_size) {
                let mut hidden = Vec::with_capacity(chunk.len() * t * d);
                let mut targets = Vec::with_capacity(chunk.len() * t);
                let mut weights = Vec::with_capacity(chunk.len() * t);
                for &s in chunk {
                    hidden.extend_from_slice(&hard.hidden[s * t * d..(s + 1) * t * d]);
                    targets.extend_from_slice(&hard.targets[s * t..(s + 1) * t]);
                    weights.extend(hard.hard[s * t..(s + 1) * t].iter().map(|&h| if h { 1.0 } else { 0.0 }));
                }
                let upper_visible =
                    (mode == Phase2Mode::SequenceSkip).then(|| weights.iter().map(|&w| w > 0.0).collect());
                out.push(HardBatch {
                    hidden: Arc::new(hidden),
                    batch: chunk.len(),
                    seq: t,
                    dim: d,
                    targets,
                    weights,
                    upper_visible,
                });
            }
        }
    }
    Ok(out)
}

/// **Spec `evaluate_on_hard_examples(model, hard_examples)`**: the deep path's mean loss and
/// perplexity on the hard tokens, fed as `mode` feeds them (alone, or in their sequences).
/// Returns `(loss, ppl)`.
pub fn evaluate_on_hard_examples(
    model: &LegoTransformer,
    hard: &HardExamples,
    mode: Phase2Mode,
) -> Result<(f64, f64)> {
    let batches = create_hard_example_loader(hard, 64, 0, mode)?;
    let start = model.config.exit_layer;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for b in &batches {
        let visible = b.upper_visible.as_ref();
        let logits = crate::no_grad(|| model.forward_upper_layers_masked(&b.hidden_tensor(), start, visible));
        let k = b.hard_tokens();
        let batch_loss = logits.cross_entropy(&b.targets, Some(&b.weights)).item();
        if !batch_loss.is_finite() {
            return Err(Error::NonFinite(format!(
                "evaluate_on_hard_examples: the deep path's loss is {batch_loss} on a batch of hard \
                 examples (are the model's weights and the hidden states finite?)"
            )));
        }
        sum += batch_loss as f64 * k as f64;
        n += k;
    }
    let loss = sum / n as f64;
    Ok((loss, loss.exp()))
}
