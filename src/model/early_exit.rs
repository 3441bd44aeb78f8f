//! TRUE early exit: generation in which confident tokens really skip the upper layers.
//!
//! For each generated token and each row of the batch:
//!
//! ```text
//! h = embedding(token)
//! h = lower layers 0..exit_layer (lower cache, always updated)
//! confidence = max softmax(exit head(h))
//! if confidence >= threshold:  next token from the exit logits        (upper layers not run)
//! else:                        h = upper layers (upper cache); next token from the deep logits
//! ```
//!
//! **The measure** ([`ExitMeasure`]). Above is the spec's: every token pays the exit head (a
//! `V×D` projection) to learn its confidence, and a token that goes deep then pays the deep
//! head too. With [`ExitMeasure::Gate`] the confidence is the model's learned
//! [`ExitGate`] instead, `p_exit = sigmoid(w·x̂ + q·(x̂ ⊙ x̂) + b)`, `x̂ = norm(h)`: a norm
//! and a `2D`-term sum per token, and only the tokens that exit run the exit head (their
//! logits are their output):
//!
//! ```text
//! p_exit = sigmoid(w·norm(h) + b)
//! if p_exit >= threshold:      next token from exit head(h)             (upper layers not run)
//! else:                        h = upper layers (upper cache); next token from the deep logits
//! ```
//!
//! **Per row.** Each row routes on its own confidence (the prototype routed the whole batch one
//! way). The rows that go deep are gathered into a compact block ([`Decoder::retain`]), run
//! through the upper layers together, and their logits taken; so a deep row costs what it would
//! alone, and a shallow row nothing above the exit.
//!
//! **The upper cache for tokens that exited** ([`UpperCacheFill`]). A token that exits has no
//! keys and values in the upper layers. With [`UpperCacheFill::Skip`] (the spec's behaviour)
//! it simply is not there: later deep tokens attend over the upper positions that exist, each
//! still rotated by its true absolute position. With [`UpperCacheFill::Propagate`] its exit
//! hidden state is projected to each upper layer's keys and values (state copying, as in CALM:
//! `k = rope(Wk·norm(h))`, `v = Wv·norm(h)`, about `2·2·D²` FLOPs a layer), so the upper cache
//! holds every position, though not with the keys and values full depth would give it. With
//! [`UpperCacheFill::Deferred`] its exit state is kept in the cache and owed: when a later
//! token of the row goes deep, the owed tokens go through the upper layers with it, in one
//! step, at their own positions (`begin_hidden`), so the upper cache holds every position with
//! its true keys and values. A deep token then computes exactly what full depth computes, and
//! the teacher-forced perplexity equals [`Trainer::evaluate`](crate::train::Trainer::evaluate)'s
//! fake early exit. The cost: the upper layers for every token that exited and is followed by a
//! deep one, batched into the deep token's pass.
//!
//! The prompt goes through every layer (the prefill); the first generated token is routed by
//! the confidence at the exit of the prompt's last position, like every later one.
//!
//! One routed step ([`Decoder::routed_step`]) serves generation and the teacher-forced
//! evaluation alike; full-depth decoding is the same step with no exit rule.

use std::time::Instant;

use super::config::check_threshold;
use super::decoder::{Decoder, Tokens};
use super::exit_gate::ExitGate;
use super::speculative::SpeculationStats;
use super::transformer::LegoTransformer;
use crate::error::{Error, Result};
use crate::ops::unary::sigmoid;

/// What happens in the upper cache to a token that exited early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpperCacheFill {
    /// Nothing: the upper layers never see it (the spec's behaviour).
    Skip,
    /// Its exit hidden state is projected into every upper layer's keys and values.
    Propagate,
    /// Its exit hidden state is kept, and run through the upper layers when a later token of
    /// its row goes deep, in the same pass just before that token (FREE, Bae et al. 2023;
    /// EE-LLM, Chen et al. 2024): the upper cache then holds every position's true keys and
    /// values, as full depth would, and a deep token sees exactly what it would at full depth.
    Deferred,
}

impl UpperCacheFill {
    /// Its name in flags, tables and files (what [`str::parse`] reads back).
    pub fn name(self) -> &'static str {
        match self {
            UpperCacheFill::Skip => "skip",
            UpperCacheFill::Propagate => "propagate",
            UpperCacheFill::Deferred => "deferred",
        }
    }
}

impl std::str::FromStr for UpperCacheFill {
    type Err = Error;
    fn from_str(s: &str) -> Result<UpperCacheFill> {
        match s {
            "skip" => Ok(UpperCacheFill::Skip),
            "propagate" => Ok(UpperCacheFill::Propagate),
            "deferred" => Ok(UpperCacheFill::Deferred),
            _ => Err(Error::Input(format!(
                "upper-cache fill must be 'skip', 'propagate' or 'deferred', got '{s}'"
            ))),
        }
    }
}

/// What the exit decision is taken on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExitMeasure {
    /// The spec's confidence: the largest probability of the exit head's softmax. The exit
    /// logits are computed for every token, and are a shallow token's output. It also defines
    /// the hard examples and the calibrated threshold, whatever the measure used to decode.
    #[default]
    MaxSoftmax,
    /// The model's learned exit gate ([`ExitGate`], CALM's "classifier"
    /// measure): `p_exit = sigmoid(w·norm(h) + b)` on the exit hidden state. A token that goes
    /// deep never runs the exit head; one that exits runs it for its output. An error when the
    /// model has no gate.
    Gate,
}

impl ExitMeasure {
    /// Its name in flags, tables and files (what [`str::parse`] reads back).
    pub fn name(self) -> &'static str {
        match self {
            ExitMeasure::MaxSoftmax => "softmax",
            ExitMeasure::Gate => "gate",
        }
    }
}

impl std::str::FromStr for ExitMeasure {
    type Err = Error;
    fn from_str(s: &str) -> Result<ExitMeasure> {
        match s {
            "softmax" => Ok(ExitMeasure::MaxSoftmax),
            "gate" => Ok(ExitMeasure::Gate),
            _ => Err(Error::Input(format!("exit measure must be 'softmax' or 'gate', got '{s}'"))),
        }
    }
}

/// When a token leaves at the exit layer, and what the upper cache does about it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExitRule {
    /// A token exits when its confidence (by `measure`: the max softmax, or the gate's
    /// `p_exit`) is at least this (above 1: never; 0: always).
    pub threshold: f32,
    /// The upper cache for tokens that exited.
    pub fill: UpperCacheFill,
    /// The confidence measure.
    pub measure: ExitMeasure,
}

impl ExitRule {
    /// The spec's rule: max-softmax confidence against `threshold`, with `fill`.
    pub fn new(threshold: f32, fill: UpperCacheFill) -> ExitRule {
        ExitRule { threshold, fill, measure: ExitMeasure::MaxSoftmax }
    }

    /// The learned gate's rule: the model's [`ExitGate`] `p_exit` against
    /// `threshold` (usually the gate's calibrated one: see
    /// [`ExitGate::rule`]), with `fill`.
    pub fn gate(threshold: f32, fill: UpperCacheFill) -> ExitRule {
        ExitRule { threshold, fill, measure: ExitMeasure::Gate }
    }

    /// Checks the rule (its threshold often comes from a flag or a file).
    pub fn validate(&self) -> Result<()> {
        check_threshold(self.threshold)
    }

    /// Checks the rule, and that `model` can route by it (a [`Gate`](ExitMeasure::Gate) rule
    /// needs a model with an exit gate of its width).
    pub fn validate_for(&self, model: &LegoTransformer) -> Result<()> {
        self.validate()?;
        if self.measure == ExitMeasure::Gate {
            gate_of(model)?;
        }
        Ok(())
    }
}

/// The model's exit gate, checked against its width; an error naming the problem if it has
/// none (the rule came from outside: a flag, a file).
fn gate_of(model: &LegoTransformer) -> Result<&ExitGate> {
    let gate = model.exit_gate.as_ref().ok_or_else(|| {
        Error::Input(
            "exit measure 'gate': this model has no exit gate (train one with \
             lego::train::train_exit_gate after phase 1, or load a checkpoint that holds \
             exit_gate.weight), or route with the max-softmax measure"
                .into(),
        )
    })?;
    if gate.dim() != model.config.dim {
        return Err(Error::Input(format!(
            "exit measure 'gate': the model's exit gate has {} weights, its width is {}",
            gate.dim(),
            model.config.dim
        )));
    }
    Ok(gate)
}

/// Which rows of a routed step go through the upper layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpperRows {
    /// Every row (a prompt: all its tokens fill the upper cache; only the routing of its last
    /// token is decided at the exit).
    All,
    /// The rows whose token goes deep (decoding).
    Deep,
}

/// The routing of one step (buffers kept between steps, so a step allocates nothing). Indexed
/// by the step's rows, in step order.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// Whether each row's (last) token went deep.
    pub deep: Vec<bool>,
    /// Each row's confidence at the exit (NaN when there was no exit check): the max softmax,
    /// or the gate's `p_exit`, by the rule's measure.
    pub confidence: Vec<f32>,
    /// The step rows whose token exited / went deep, ascending.
    shallow_rows: Vec<usize>,
    deep_rows: Vec<usize>,
    /// The gate's scratch row, `[D]`: a hidden state normalised by the exit head's norm (sized
    /// at the first gate check, so later steps allocate nothing).
    normed: Vec<f32>,
    /// The deferred fill's step: owed and new hidden states `[tokens, D]`, and per row its
    /// cache row, token count and first position (sized at the first deferred step).
    gathered: Vec<f32>,
    flush_rows: Vec<usize>,
    flush_counts: Vec<usize>,
    flush_starts: Vec<usize>,
}

impl Routes {
    /// Buffers for steps of up to `rows` rows.
    pub fn with_capacity(rows: usize) -> Routes {
        Routes {
            deep: Vec::with_capacity(rows),
            confidence: Vec::with_capacity(rows),
            shallow_rows: Vec::with_capacity(rows),
            deep_rows: Vec::with_capacity(rows),
            normed: Vec::new(),
            gathered: Vec::new(),
            flush_rows: Vec::with_capacity(rows),
            flush_counts: Vec::with_capacity(rows),
            flush_starts: Vec::with_capacity(rows),
        }
    }

    /// Records step row `i`'s route.
    fn push(&mut self, i: usize, confidence: f32, deep: bool) {
        self.confidence.push(confidence);
        self.deep.push(deep);
        if deep { self.deep_rows.push(i) } else { self.shallow_rows.push(i) }
    }

    /// How many rows of the last step exited early.
    pub fn shallow_count(&self) -> usize {
        self.shallow_rows.len()
    }
}

/// The statistics of an early-exit generation (spec: `shallow_count, deep_count,
/// actual_compute_cost, shallow_ratio`, and more).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EarlyExitStats {
    /// Generated tokens that exited at the exit layer.
    pub shallow_count: usize,
    /// Generated tokens that went through the upper layers.
    pub deep_count: usize,
    /// `shallow_count / (shallow_count + deep_count)`.
    pub shallow_ratio: f64,
    /// The spec's layer compute cost: `(shallow·exit + deep·N) / (total·N)`.
    pub actual_compute_cost: f64,
    /// FLOPs against full-depth decoding of the same tokens, counting attention over the cache,
    /// the MLPs, the exit check (the exit head's vocabulary projection for every token, or the
    /// gate's norm and dot product and the exit head for exiting tokens only), the head, and
    /// the upper-cache fill (see [`cost`](super::cost)).
    pub flop_cost: f64,
    /// Wall time of the whole call, seconds.
    pub seconds: f64,
    /// Where the time went (zeros unless [`GenerateOptions::profile`] asked for it).
    ///
    /// [`GenerateOptions::profile`]: super::generate::GenerateOptions::profile
    pub time: TimeSplit,
    /// Per row, per generated token: whether it went deep.
    pub routes: Vec<Vec<bool>>,
    /// Per row, per generated token: its confidence at the exit (empty at full depth): the max
    /// softmax, or with [`ExitMeasure::Gate`] the gate's `p_exit`.
    pub confidences: Vec<Vec<f32>>,
    /// Per row: whether it ended on one of the options' stop tokens (its last token).
    pub stopped: Vec<bool>,
    /// Self-speculative decoding's counts (zeros in the other modes). In that mode a token
    /// "exited" (`routes`: not deep; `shallow_count`) when it was drafted and accepted, and
    /// the layer and FLOP costs count every pass made, rejected drafts included.
    pub speculation: SpeculationStats,
}

/// Where a generation's time went, in seconds (measured only when asked, see [`Timer`]). In
/// self-speculative decoding: `lower` and `exit_check` are the draft's lower layers and exit
/// heads, `upper` and `head` the check passes, `sampling` the accepting and rolling back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimeSplit {
    /// The prompt through every layer.
    pub prefill: f64,
    /// The lower layers of generated tokens.
    pub lower: f64,
    /// The exit check: the exit head and the confidence (max softmax), or the gate and the exit
    /// head of the rows that exit (gate).
    pub exit_check: f64,
    /// Gathering the deep rows and the upper layers.
    pub upper: f64,
    /// The deep head (final norm and projection to the vocabulary).
    pub head: f64,
    /// Filling the upper cache for tokens that exited: `Propagate`'s projections; `Deferred`'s
    /// bookkeeping plus the owed tokens' share of the upper pass they ride in (that pass is
    /// timed once and split by its token count, owed tokens against the deep rows' own).
    pub upper_fill: f64,
    /// Choosing the next tokens.
    pub sampling: f64,
}

/// A stopwatch that reads the clock only when switched on, so timing the phases of a step costs
/// nothing when nobody asked for it.
#[derive(Debug)]
pub struct Timer {
    last: Option<Instant>,
}

impl Timer {
    /// A timer that measures (`on`) or does nothing.
    pub fn new(on: bool) -> Timer {
        Timer { last: on.then(Instant::now) }
    }

    /// Seconds since the previous lap (or since it started); 0 when off.
    pub fn lap(&mut self) -> f64 {
        match &mut self.last {
            None => 0.0,
            Some(last) => {
                let now = Instant::now();
                let s = (now - *last).as_secs_f64();
                *last = now;
                s
            }
        }
    }
}

impl Decoder<'_> {
    /// One step of (early-exit) decoding over the tokens announced by [`Decoder::begin`]:
    ///
    /// - with no `rule`, every layer and the deep head, for every row (full depth);
    /// - with a rule, the lower layers, the exit check on each row's last token, the upper-cache
    ///   fill of the rows that exit, then the upper layers for `upper` rows and the deep head
    ///   for the rows that did not exit. The exit check runs the exit head on every row
    ///   ([`ExitMeasure::MaxSoftmax`]), or the gate on every row and the exit head on the rows
    ///   that exit ([`ExitMeasure::Gate`]).
    ///
    /// `emit(cache_row, logits)` is called once per row with the logits its last token ends
    /// with (the exit head's or the deep head's). The routing is left in `routes`; phase times
    /// are added to `time` when `timer` is on. Errors: a confidence or gate score that is not
    /// finite, a non-finite logit, a gate rule for a model without a gate.
    pub fn routed_step(
        &mut self,
        rule: Option<&ExitRule>,
        upper: UpperRows,
        routes: &mut Routes,
        timer: &mut Timer,
        time: &mut TimeSplit,
        mut emit: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let model = self.model();
        let (exit, n_layers) = (model.config.exit_layer, model.layers.len());
        let rows = self.step_rows().len();
        routes.deep.clear();
        routes.confidence.clear();
        routes.shallow_rows.clear();
        routes.deep_rows.clear();
        let Some(rule) = rule else {
            timer.lap();
            self.layers(0..exit);
            time.lower += timer.lap();
            self.layers(exit..n_layers);
            time.upper += timer.lap();
            self.logits(&model.head, Tokens::LastOfEach)?;
            time.head += timer.lap();
            for i in 0..rows {
                emit(self.step_rows()[i], self.logits_row(i));
            }
            routes.deep.resize(rows, true);
            routes.confidence.resize(rows, f32::NAN);
            time.sampling += timer.lap();
            return Ok(());
        };

        // Lower layers for every row.
        timer.lap();
        self.layers(0..exit);
        time.lower += timer.lap();

        // The exit check: each row's confidence, its route, and the output of the rows that
        // exit.
        match rule.measure {
            ExitMeasure::MaxSoftmax => {
                // Every row pays the exit head; its softmax maximum is the confidence.
                self.logits(model.exit(), Tokens::LastOfEach)?;
                for i in 0..rows {
                    let c = self.confidence(i);
                    if !c.is_finite() {
                        return Err(Error::NonFinite(format!(
                            "the exit confidence of cache row {} is {c}",
                            self.step_rows()[i]
                        )));
                    }
                    routes.push(i, c, c < rule.threshold);
                }
                time.exit_check += timer.lap();
                for &i in &routes.shallow_rows {
                    emit(self.step_rows()[i], self.logits_row(i));
                }
            }
            ExitMeasure::Gate => {
                // Every row pays a norm and a 2D-term dot product ...
                let gate = gate_of(model)?;
                let norm = &model.exit().norm;
                routes.normed.resize(gate.dim(), 0.0);
                for i in 0..rows {
                    let z = gate.logit(norm, self.last_hidden(i), &mut routes.normed);
                    if !z.is_finite() {
                        return Err(Error::NonFinite(format!(
                            "the exit gate's score of cache row {} is {z}",
                            self.step_rows()[i]
                        )));
                    }
                    let p = sigmoid(z);
                    routes.push(i, p, p < rule.threshold);
                }
                // ... and only the rows that exit run the exit head: its logits are their output.
                if !routes.shallow_rows.is_empty() {
                    self.logits(model.exit(), Tokens::LastOf(&routes.shallow_rows))?;
                }
                time.exit_check += timer.lap();
                for (j, &i) in routes.shallow_rows.iter().enumerate() {
                    emit(self.step_rows()[i], self.logits_row(j));
                }
            }
        }
        time.sampling += timer.lap();

        // Tokens that exit: their keys and values into the upper cache, if asked.
        if upper == UpperRows::Deep
            && rule.fill == UpperCacheFill::Propagate
            && !routes.shallow_rows.is_empty()
        {
            self.propagate_to_upper_cache(&routes.shallow_rows);
            time.upper_fill += timer.lap();
        }

        // Tokens that exit under the deferred fill: their exit states are owed to the upper cache.
        let deferred = rule.fill == UpperCacheFill::Deferred;
        if deferred {
            self.owe_upper_entries(routes, upper);
            time.upper_fill += timer.lap();
        }

        // The upper layers and the deep head.
        if upper == UpperRows::All || !routes.deep_rows.is_empty() {
            let mut owed = 0;
            if deferred && self.settle_upper_debts(routes, upper)? {
                // The step now holds, per deep row, its owed tokens and then its own: the
                // same rows in the same order as `retain` would leave.
                owed = self.step_tokens() - self.step_rows().len();
            } else if upper == UpperRows::Deep {
                self.retain(&routes.deep_rows);
            }
            self.layers(exit..n_layers);
            // The owed tokens' share of the pass is the deferred fill's cost, not the upper
            // layers' (both 0 when the timer is off).
            let pass = timer.lap();
            let fill = pass * owed as f64 / self.step_tokens() as f64;
            time.upper_fill += fill;
            time.upper += pass - fill;
            let which =
                if upper == UpperRows::Deep { Tokens::LastOfEach } else { Tokens::LastOf(&routes.deep_rows) };
            self.logits(&model.head, which)?;
            time.head += timer.lap();
            // `deep_rows` holds the original step indices, in the order of the logits rows.
            // Logits row j belongs to step row deep_rows[j]: after `retain` that row is j.
            for (j, &i) in routes.deep_rows.iter().enumerate() {
                let row = self.step_rows()[if upper == UpperRows::Deep { j } else { i }];
                emit(row, self.logits_row(j));
            }
            time.sampling += timer.lap();
        }
        Ok(())
    }
}

impl Decoder<'_> {
    /// The deferred fill, part 1: keeps the exit states of the step rows that exit (with
    /// `UpperRows::Deep`) as owed upper-cache entries of their rows.
    fn owe_upper_entries(&mut self, routes: &mut Routes, upper: UpperRows) {
        let c = &self.model().config;
        let (d, per_row) = (c.dim, c.max_seq_len * c.dim);
        let batch = self.cache().batch;
        if self.cache().deferred.is_empty() {
            self.cache_mut().deferred.resize(batch * per_row, 0.0);
        }
        if routes.gathered.is_empty() {
            // Room for every row's whole sequence: a flush never needs more.
            routes.gathered.resize(batch * per_row, 0.0);
        }
        if upper == UpperRows::All {
            return; // every token goes through the upper layers
        }
        for &i in &routes.shallow_rows {
            let row = self.step_rows()[i];
            let (h, first) = self.row_hidden(i);
            let n = h.len() / d;
            routes.gathered[..n * d].copy_from_slice(h);
            let cache = self.cache_mut();
            let owed = cache.deferred_len[row];
            if owed == 0 {
                cache.deferred_from[row] = first;
            }
            debug_assert_eq!(cache.deferred_from[row] + owed, first, "owed positions are contiguous");
            let at = row * per_row + owed * d;
            cache.deferred[at..at + n * d].copy_from_slice(&routes.gathered[..n * d]);
            cache.deferred_len[row] = owed + n;
        }
    }

    /// The deferred fill, part 2: if a row going through the upper layers owes entries,
    /// restarts the step from hidden states, each such row bringing its owed states (at their
    /// positions) before its own tokens. Returns whether it did (false: nothing owed, the step
    /// is untouched). The rows are the deep ones (`Deep`) or all (`All`), in step order.
    fn settle_upper_debts(&mut self, routes: &mut Routes, upper: UpperRows) -> Result<bool> {
        let d = self.model().config.dim;
        let per_row = self.cache().max_seq_len * d;
        let n_rows = if upper == UpperRows::All { self.step_rows().len() } else { routes.deep_rows.len() };
        let step_row = |j: usize| if upper == UpperRows::All { j } else { routes.deep_rows[j] };
        if (0..n_rows).all(|j| self.cache().deferred_len[self.step_rows()[step_row(j)]] == 0) {
            return Ok(false);
        }
        routes.flush_rows.clear();
        routes.flush_counts.clear();
        routes.flush_starts.clear();
        let mut m = 0;
        for j in 0..n_rows {
            let i = step_row(j);
            let row = self.step_rows()[i];
            let (h, first) = self.row_hidden(i);
            let (owed, from) = (self.cache().deferred_len[row], self.cache().deferred_from[row]);
            let src = &self.cache().deferred[row * per_row..row * per_row + owed * d];
            routes.gathered[m * d..(m + owed) * d].copy_from_slice(src);
            routes.gathered[(m + owed) * d..(m + owed) * d + h.len()].copy_from_slice(h);
            let n = owed + h.len() / d;
            routes.flush_rows.push(row);
            routes.flush_counts.push(n);
            routes.flush_starts.push(if owed > 0 { from } else { first });
            m += n;
        }
        for &row in &routes.flush_rows {
            self.cache_mut().deferred_len[row] = 0;
        }
        self.begin_hidden(
            &routes.flush_rows,
            &routes.flush_counts,
            &routes.flush_starts,
            &routes.gathered[..m * d],
        )?;
        Ok(true)
    }
}

/// The result of [`LegoTransformer::evaluate_with_early_exit`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeacherForcedStats {
    /// Mean loss of predicting each next token from the logits its token ended with.
    pub loss: f64,
    /// `exp(loss)`.
    pub ppl: f64,
    /// Next-token accuracy.
    pub accuracy: f64,
    /// Tokens evaluated.
    pub tokens: usize,
    /// Tokens that exited early.
    pub shallow_count: usize,
    /// `shallow_count / tokens`.
    pub shallow_ratio: f64,
}

impl LegoTransformer {
    /// Teacher-forced TRUE early exit: each sequence (all of one length) is fed token by token
    /// through the decoder, routing each token as generation would ([`Decoder::routed_step`],
    /// the same step), with the split caches and `rule`'s fill; the loss of each next token is
    /// taken from the logits its predecessor ended with. Unlike
    /// [`Trainer::evaluate`](crate::train::Trainer::evaluate), which runs both paths over whole
    /// sequences, here a token that exited really is missing from the upper cache (with
    /// `Skip`), as in generation.
    pub fn evaluate_with_early_exit(
        &self,
        sequences: &[Vec<usize>],
        rule: &ExitRule,
    ) -> Result<TeacherForcedStats> {
        rule.validate_for(self)?;
        let first = sequences.first().ok_or_else(|| Error::Input("no sequences to evaluate".into()))?;
        let len = first.len();
        if len < 2 {
            return Err(Error::Input("sequences need at least 2 tokens (an input and a target)".into()));
        }
        if let Some((i, s)) = sequences.iter().enumerate().find(|(_, s)| s.len() != len) {
            return Err(Error::Input(format!("sequence {i} has {} tokens, sequence 0 has {len}", s.len())));
        }
        // The first len − 1 tokens go through the model (they must fit its max_seq_len); the
        // last is only a target (it must be in the vocabulary).
        let inputs: Vec<usize> = sequences.iter().flat_map(|s| s[..len - 1].iter().copied()).collect();
        self.check_tokens(&inputs, sequences.len(), 0)?;
        if let Some((i, s)) = sequences.iter().enumerate().find(|(_, s)| s[len - 1] >= self.config.vocab_size)
        {
            return Err(Error::Input(format!(
                "target token id {} (sequence {i}, last position) is outside the vocabulary of {}",
                s[len - 1],
                self.config.vocab_size
            )));
        }
        let batch = sequences.len();
        // (The deferred fill may send up to a whole sequence of a row through the upper layers.)
        let capacity = if rule.fill == UpperCacheFill::Deferred { batch * len } else { batch };
        let mut dec = Decoder::new(self, batch, capacity);
        let rows: Vec<usize> = (0..batch).collect();
        let ones = vec![1; batch];
        let mut routes = Routes::with_capacity(batch);
        let mut tokens = vec![0usize; batch];
        let (mut timer, mut time) = (Timer::new(false), TimeSplit::default());
        let mut stats = TeacherForcedStats::default();
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for pos in 0..len - 1 {
            for (t, s) in tokens.iter_mut().zip(sequences) {
                *t = s[pos];
            }
            dec.begin(&rows, &ones, &tokens)?;
            dec.routed_step(Some(rule), UpperRows::Deep, &mut routes, &mut timer, &mut time, |r, logits| {
                let target = sequences[r][pos + 1];
                loss += (crate::ops::cross_entropy::logsumexp(logits) - logits[target]) as f64;
                correct += (crate::ops::select::argmax(logits) == target) as usize;
            })?;
            stats.shallow_count += routes.shallow_count();
            stats.tokens += batch;
        }
        stats.loss = loss / stats.tokens as f64;
        stats.ppl = stats.loss.exp();
        stats.accuracy = correct as f64 / stats.tokens as f64;
        stats.shallow_ratio = stats.shallow_count as f64 / stats.tokens as f64;
        Ok(stats)
    }
}
