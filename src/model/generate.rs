//! Sampling, and the one generation loop: `generate` (full depth) and
//! `generate_with_early_exit` (TRUE early exit) are both [`LegoTransformer::generate_with`].
//!
//! ```text
//! prefill: the prompts through the decoder in one step     (every layer; early exit: routed;
//!          prompts of different lengths in one ragged step)
//! repeat:  each row's sampled token through the decoder    (one token per row per step)
//! ```
//!
//! Each step is a [`Decoder::routed_step`]: with no exit rule every layer runs; with one, each
//! row's token exits or goes deep on its own confidence. Everything is allocated before the
//! first step, so generating a token allocates nothing. Each new token is handed to a listener
//! as soon as it is chosen ([`LegoTransformer::generate_streaming`]); a row that meets a stop
//! token leaves the steps.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cost;
use super::decoder::Decoder;
use super::early_exit::{
    EarlyExitStats, ExitMeasure, ExitRule, Routes, TimeSplit, Timer, UpperCacheFill, UpperRows,
};
use super::speculative::Speculation;
use super::transformer::LegoTransformer;
use crate::error::{Error, Result};
use crate::ops::select::argmax;

/// How the next token is picked from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before the
    /// softmax (below 1 sharpens, above 1 flattens).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (nucleus sampling; 1.0: all).
    pub top_p: f32,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    /// Checks the settings (they often come from flags).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!("temperature must be a number >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Draws tokens from logits, with buffers kept between calls (no allocation per token).
pub struct Sampler {
    settings: Sampling,
    rng: StdRng,
    probs: Vec<f32>,
    order: Vec<usize>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(settings: Sampling, vocab: usize) -> Sampler {
        Sampler {
            settings,
            rng: StdRng::seed_from_u64(settings.seed),
            probs: vec![0.0; vocab],
            order: (0..vocab).collect(),
        }
    }

    /// The next token for one row of logits (finite: the decoder checks them).
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        if self.settings.temperature == 0.0 {
            return argmax(logits);
        }
        let keep = self.candidates(logits);
        let (probs, order) = (&self.probs, &self.order[..keep]);
        let total: f32 = order.iter().map(|&i| probs[i]).sum();
        let mut u = self.rng.random::<f32>() * total;
        for &i in order {
            u -= probs[i];
            if u <= 0.0 {
                return i;
            }
        }
        order[keep - 1]
    }

    /// The distribution [`sample`](Sampler::sample) draws from, written into `out` (`[V]`): the
    /// softmax of `logits / temperature` over the top-k / top-p candidates, renormalised, 0
    /// elsewhere; greedy (temperature 0): all the mass on the argmax.
    pub fn distribution(&mut self, logits: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        if self.settings.temperature == 0.0 {
            out[argmax(logits)] = 1.0;
            return;
        }
        let keep = self.candidates(logits);
        let (probs, order) = (&self.probs, &self.order[..keep]);
        let total: f32 = order.iter().map(|&i| probs[i]).sum();
        for &i in order {
            out[i] = probs[i] / total;
        }
    }

    /// Draws a token from `probs` (non-negative, summing to `total` > 0), in id order.
    pub fn draw(&mut self, probs: &[f32], total: f32) -> usize {
        let mut u = self.rng.random::<f32>() * total;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last = i;
                u -= p;
                if u <= 0.0 {
                    return i;
                }
            }
        }
        last
    }

    /// A uniform draw from `[0, 1)`, from this row's generator.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Puts the softmax of `logits / temperature` in `probs` and the candidate ids, most likely
    /// first, in `order[..keep]` (the top k, then the top-p nucleus of those); returns `keep`.
    fn candidates(&mut self, logits: &[f32]) -> usize {
        let s = self.settings;
        let probs = &mut self.probs[..logits.len()];
        let inv_t = 1.0 / s.temperature;
        probs.iter_mut().zip(logits).for_each(|(p, z)| *p = z * inv_t);
        crate::kernels::simd::softmax_in_place(probs);
        let order = &mut self.order[..logits.len()];
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        let probs_ref = &*probs;
        let desc = |a: &usize, b: &usize| probs_ref[*b].total_cmp(&probs_ref[*a]).then(a.cmp(b));
        // Candidates: the top k (or all), most likely first.
        let mut keep = logits.len();
        if s.top_k > 0 && s.top_k < keep {
            order.select_nth_unstable_by(s.top_k - 1, desc);
            keep = s.top_k;
        }
        order[..keep].sort_unstable_by(desc);
        if s.top_p < 1.0 {
            let mut mass = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                mass += probs_ref[i];
                if mass >= s.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        keep
    }
}

/// One new token, as [`LegoTransformer::generate_streaming`] hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEvent {
    /// The row (prompt) it continues.
    pub row: usize,
    /// Its id.
    pub token: usize,
    /// Whether it came from the exit head without the upper layers (early exit: it exited; a
    /// self-speculative draft: it was drafted and accepted).
    pub exited: bool,
}

/// How each generated token goes through the layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecodeMode {
    /// Every token through every layer.
    Full,
    /// TRUE early exit by the rule: a confident token skips the upper layers (lossy).
    EarlyExit(ExitRule),
    /// The lower layers and the exit head draft tokens, the whole model checks them: the output
    /// is the full model's (lossless; see [`speculative`](super::speculative)).
    SelfSpeculative(Speculation),
}

/// Everything a generation call can be asked: how many tokens, how to sample them, and
/// whether (and how) tokens exit early. Every entry point takes it; the spec's `generate` and
/// `generate_with_early_exit` fill it in from their arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to add to each prompt (at most: a row that meets a stop token ends there).
    pub max_new_tokens: usize,
    /// Token ids that end a row: a row whose new token is one of them keeps it as its last and
    /// takes no further step (it costs nothing more while the other rows go on).
    pub stop_tokens: Vec<usize>,
    /// How each token is picked from its logits. Each row samples with its own generator,
    /// seeded `seed + row`.
    pub sampling: Sampling,
    /// Full depth, TRUE early exit, or lossless self-speculative decoding.
    pub mode: DecodeMode,
    /// Measure where the time goes ([`EarlyExitStats::time`]); off, the clock is never read
    /// inside the loop.
    pub profile: bool,
}

impl GenerateOptions {
    /// Greedy, full-depth generation of `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            stop_tokens: Vec::new(),
            sampling: Sampling::greedy(),
            mode: DecodeMode::Full,
            profile: false,
        }
    }

    /// The same, ending each row at the first of `stop_tokens` it generates.
    pub fn with_stop_tokens(self, stop_tokens: &[usize]) -> GenerateOptions {
        GenerateOptions { stop_tokens: stop_tokens.to_vec(), ..self }
    }

    /// Checks what can come from outside: the sampling settings, the exit rule, and that each
    /// stop token is in `model`'s vocabulary.
    pub fn validate_for(&self, model: &LegoTransformer) -> Result<()> {
        self.sampling.validate()?;
        match &self.mode {
            DecodeMode::Full => {}
            DecodeMode::EarlyExit(rule) => rule.validate_for(model)?,
            DecodeMode::SelfSpeculative(spec) => spec.validate()?,
        }
        let v = model.config.vocab_size;
        if let Some((i, id)) = self.stop_tokens.iter().enumerate().find(|(_, id)| **id >= v) {
            return Err(Error::Input(format!(
                "stop token id {id} (stop_tokens[{i}]) is outside the vocabulary of {v}"
            )));
        }
        Ok(())
    }

    /// The same, with TRUE early exit by `rule`.
    pub fn with_exit(self, rule: ExitRule) -> GenerateOptions {
        GenerateOptions { mode: DecodeMode::EarlyExit(rule), ..self }
    }

    /// The same, decoded self-speculatively (lossless: see [`speculative`](super::speculative)).
    pub fn with_speculation(self, speculation: Speculation) -> GenerateOptions {
        GenerateOptions { mode: DecodeMode::SelfSpeculative(speculation), ..self }
    }

    /// The exit rule, in early-exit mode.
    pub fn exit_rule(&self) -> Option<&ExitRule> {
        match &self.mode {
            DecodeMode::EarlyExit(rule) => Some(rule),
            _ => None,
        }
    }
}

impl LegoTransformer {
    /// Checks a batch of prompts for generation: at least one, none empty, ids in the
    /// vocabulary, and room for `max_new_tokens` more after the longest. Prompts may differ in
    /// length (a ragged batch). Returns the longest prompt's length.
    pub fn check_prompts(&self, prompts: &[Vec<usize>], max_new_tokens: usize) -> Result<usize> {
        if prompts.is_empty() {
            return Err(Error::Input("no prompt given".into()));
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::Input(format!(
                    "empty prompt (row {i} of {}): generation needs at least one token to start from",
                    prompts.len()
                )));
            }
            if let Some((j, &id)) = p.iter().enumerate().find(|(_, id)| **id >= self.config.vocab_size) {
                return Err(Error::Input(format!(
                    "token id {id} (prompt {i}, position {j}) is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        let longest = prompts.iter().map(Vec::len).max().expect("at least one prompt");
        match longest.checked_add(max_new_tokens) {
            Some(total) if total <= self.config.max_seq_len => Ok(longest),
            _ => Err(Error::Input(format!(
                "prompt of {longest} tokens + {max_new_tokens} new ones exceeds max_seq_len {}",
                self.config.max_seq_len
            ))),
        }
    }

    /// **Spec `generate(input_ids, max_new_tokens, ...)`**: continues each prompt by
    /// `max_new_tokens` tokens through all layers, with the KV cache. Returns each row's prompt
    /// followed by its new tokens.
    pub fn generate(
        &self,
        prompts: &[Vec<usize>],
        max_new_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Vec<Vec<usize>>> {
        let options = GenerateOptions { sampling: *sampling, ..GenerateOptions::greedy(max_new_tokens) };
        Ok(self.generate_with(prompts, &options)?.0)
    }

    /// **Spec `generate_with_early_exit(input_ids, max_new_tokens, routing_threshold)`**: like
    /// [`generate`](LegoTransformer::generate), but each generated token of each row skips the
    /// upper layers when its confidence at the exit is at least `routing_threshold` (a threshold
    /// above 1 never exits; 0 always does). Returns each row's prompt and new tokens, and the
    /// statistics.
    ///
    /// ```
    /// use lego::Tensor;
    /// use lego::model::{LegoConfig, LegoTransformer, Sampling, UpperCacheFill};
    ///
    /// let config = LegoConfig { vocab_size: 32, dim: 16, num_heads: 2, ffn_hidden: 32, ..LegoConfig::t() };
    /// let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap(); // 4 layers, exit at 2
    /// let prompts = vec![vec![1, 2, 3], vec![4, 5, 6]];
    /// let (greedy, skip) = (Sampling::greedy(), UpperCacheFill::Skip);
    ///
    /// // Threshold 0: every generated token exits; the upper layers ran once, for the prompts.
    /// model.reset_layer_calls();
    /// let (out, stats) = model.generate_with_early_exit(&prompts, 5, 0.0, &greedy, skip).unwrap();
    /// assert_eq!(out[0].len(), 3 + 5);
    /// assert_eq!((stats.shallow_count, stats.deep_count, stats.shallow_ratio), (10, 0, 1.0));
    /// assert_eq!((model.layer_calls(1), model.layer_calls(2)), (5, 1));
    ///
    /// // Above 1: no token exits, and the tokens are those of full-depth generation.
    /// let (out, stats) = model.generate_with_early_exit(&prompts, 5, 1.5, &greedy, skip).unwrap();
    /// assert_eq!(stats.deep_count, 10);
    /// assert_eq!(out, model.generate(&prompts, 5, &greedy).unwrap());
    /// ```
    pub fn generate_with_early_exit(
        &self,
        prompts: &[Vec<usize>],
        max_new_tokens: usize,
        routing_threshold: f32,
        sampling: &Sampling,
        fill: UpperCacheFill,
    ) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
        let options = GenerateOptions { sampling: *sampling, ..GenerateOptions::greedy(max_new_tokens) }
            .with_exit(ExitRule::new(routing_threshold, fill));
        self.generate_with(prompts, &options)
    }

    /// [`generate_streaming`](LegoTransformer::generate_streaming) with nobody listening: each
    /// row's prompt followed by its new tokens, and the statistics (at full depth every token
    /// counts as deep).
    ///
    /// ```
    /// use lego::Tensor;
    /// use lego::model::{ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling, UpperCacheFill};
    ///
    /// let config = LegoConfig { vocab_size: 32, dim: 16, num_heads: 2, ffn_hidden: 32, ..LegoConfig::t() };
    /// let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
    /// let prompts = vec![vec![7, 8, 9]];
    ///
    /// // Sampled at temperature 0.8 from the top 5 tokens, seeded: the same call, the same tokens.
    /// let sampling = Sampling { temperature: 0.8, top_k: 5, top_p: 1.0, seed: 42 };
    /// let options = GenerateOptions { sampling, ..GenerateOptions::greedy(6) };
    /// let (a, _) = model.generate_with(&prompts, &options).unwrap();
    /// assert_eq!(a, model.generate_with(&prompts, &options).unwrap().0);
    ///
    /// // The same options with TRUE early exit (here with the upper cache filled for exited tokens).
    /// let rule = ExitRule::new(0.05, UpperCacheFill::Propagate);
    /// let (b, stats) = model.generate_with(&prompts, &options.clone().with_exit(rule)).unwrap();
    /// assert_eq!((b[0].len(), stats.shallow_count + stats.deep_count), (3 + 6, 6));
    /// assert_eq!(stats.confidences[0].len(), 6); // each token's confidence at the exit
    /// ```
    pub fn generate_with(
        &self,
        prompts: &[Vec<usize>],
        options: &GenerateOptions,
    ) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
        self.generate_streaming(prompts, options, |_| {})
    }

    /// The generation loop behind every entry point (see the module doc). `on_token` is called
    /// with each new token as soon as it is chosen, row by row within a step and in order
    /// within a row (to print text as it comes: [`TextStream`](crate::data::TextStream));
    /// the return value holds the same tokens. Returns each row's prompt
    /// followed by its new tokens (up to and including a stop token, if it met one), and the
    /// statistics (at full depth every token counts as deep). Prompts may differ in length:
    /// each row is computed as it would be alone. Errors: bad options or prompts (a stop token
    /// or prompt id outside the vocabulary, an empty prompt, too long a total), non-finite
    /// logits.
    ///
    /// ```
    /// use lego::model::{GenerateOptions, LegoConfig, LegoTransformer};
    ///
    /// let model = LegoTransformer::new(LegoConfig::new(50, 16, 2, 2, 32, 32), &mut lego::Tensor::rng(0))?;
    /// let mut streamed = Vec::new();
    /// let options = GenerateOptions::greedy(5).with_stop_tokens(&[7]);
    /// let (out, _) = model.generate_streaming(&[vec![1, 2, 3], vec![4]], &options, |t| {
    ///     streamed.push((t.row, t.token));
    /// })?;
    /// for (row, tokens) in out.iter().enumerate() {
    ///     let mine: Vec<usize> = streamed.iter().filter(|s| s.0 == row).map(|s| s.1).collect();
    ///     assert_eq!(mine, tokens[[3, 1][row]..]);
    /// }
    /// # Ok::<(), lego::Error>(())
    /// ```
    pub fn generate_streaming(
        &self,
        prompts: &[Vec<usize>],
        options: &GenerateOptions,
        mut on_token: impl FnMut(TokenEvent),
    ) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
        let t_start = std::time::Instant::now();
        options.validate_for(self)?;
        let max_new = options.max_new_tokens;
        self.check_prompts(prompts, max_new)?;
        let (batch, v) = (prompts.len(), self.config.vocab_size);
        if let DecodeMode::SelfSpeculative(spec) = &options.mode {
            return self.generate_self_speculative(prompts, options, spec, on_token);
        }
        let mut out = output_rows(prompts, max_new);
        let exits = options.exit_rule().is_some();
        // (Not `vec![Vec::with_capacity(n); batch]`: its clones would not keep the capacity.)
        let mut stats = EarlyExitStats {
            routes: (0..batch).map(|_| Vec::with_capacity(max_new)).collect(),
            confidences: (0..batch).map(|_| Vec::with_capacity(if exits { max_new } else { 0 })).collect(),
            stopped: vec![false; batch],
            ..Default::default()
        };
        if max_new == 0 {
            return Ok((out, stats));
        }
        let rule = options.exit_rule();
        // The prefill holds every prompt token in one step (a ragged one if lengths differ).
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        // (The deferred fill may send a row's owed tokens, up to all its new ones, through the
        // upper layers in one step.)
        let deferred = rule.is_some_and(|r| r.fill == UpperCacheFill::Deferred);
        let capacity = lens.iter().sum::<usize>().max(if deferred { batch * (max_new + 1) } else { 0 });
        let mut dec = Decoder::new(self, batch, capacity);
        let mut samplers: Vec<Sampler> = (0..batch as u64)
            .map(|r| {
                Sampler::new(Sampling { seed: options.sampling.seed.wrapping_add(r), ..options.sampling }, v)
            })
            .collect();
        // The rows still generating, in cache-row order: the rows of every step.
        let mut active: Vec<usize> = (0..batch).collect();
        let ones = vec![1usize; batch];
        let mut routes = Routes::with_capacity(batch);
        let mut timer = Timer::new(options.profile);
        let mut time = TimeSplit::default();
        let (mut next, mut current) = (vec![0usize; batch], vec![0usize; batch]);
        let mut flops = Flops::default();

        // The prefill: every prompt token through every layer; each row's last one routed.
        let flat: Vec<usize> = prompts.iter().flatten().copied().collect();
        dec.begin(&active, &lens, &flat)?;
        dec.routed_step(rule, UpperRows::All, &mut routes, &mut timer, &mut time, |r, logits| {
            next[r] = samplers[r].sample(logits)
        })?;
        stats.time.prefill =
            time.lower + time.exit_check + time.upper + time.head + time.upper_fill + time.sampling;
        time = TimeSplit::default();

        // Decoding: each active row's new token is recorded, then fed back, one a row a step.
        loop {
            for (i, &r) in active.iter().enumerate() {
                self.record(r, &routes, i, rule, out[r].len(), &mut stats, &mut flops);
                out[r].push(next[r]);
                on_token(TokenEvent { row: r, token: next[r], exited: !routes.deep[i] });
                stats.stopped[r] = options.stop_tokens.contains(&next[r]);
            }
            // A row ends at a stop token or at its last new token; it takes no further step.
            active.retain(|&r| !stats.stopped[r] && out[r].len() - lens[r] < max_new);
            if active.is_empty() {
                break;
            }
            for (c, &r) in current.iter_mut().zip(&active) {
                *c = next[r];
            }
            let n = active.len();
            dec.begin(&active, &ones[..n], &current[..n])?;
            dec.routed_step(rule, UpperRows::Deep, &mut routes, &mut timer, &mut time, |r, logits| {
                next[r] = samplers[r].sample(logits)
            })?;
        }
        let total = stats.shallow_count + stats.deep_count;
        stats.shallow_ratio = stats.shallow_count as f64 / total.max(1) as f64;
        stats.actual_compute_cost = cost::layer_cost(&self.config, stats.shallow_count, stats.deep_count);
        stats.flop_cost = flops.spent / flops.full_depth;
        stats.time = TimeSplit { prefill: stats.time.prefill, ..time };
        stats.seconds = t_start.elapsed().as_secs_f64();
        Ok((out, stats))
    }

    /// Records the token that step row `i` of the last step produced for cache row `row` (whose
    /// routing is `routes`), at context length `context`: its route, its confidence, and its
    /// FLOPs beside full depth's.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        row: usize,
        routes: &Routes,
        i: usize,
        rule: Option<&ExitRule>,
        context: usize,
        stats: &mut EarlyExitStats,
        flops: &mut Flops,
    ) {
        let c = &self.config;
        let deep = routes.deep[i];
        stats.routes[row].push(deep);
        flops.full_depth += cost::full_depth_flops(c, context);
        let Some(rule) = rule else {
            stats.deep_count += 1;
            flops.spent += cost::full_depth_flops(c, context);
            return;
        };
        stats.confidences[row].push(routes.confidence[i]);
        let gate = rule.measure == ExitMeasure::Gate;
        if deep {
            stats.deep_count += 1;
            flops.spent +=
                if gate { cost::gate_deep_flops(c, context) } else { cost::deep_flops(c, context) };
        } else {
            stats.shallow_count += 1;
            flops.spent +=
                if gate { cost::gate_shallow_flops(c, context) } else { cost::shallow_flops(c, context) };
            match rule.fill {
                UpperCacheFill::Skip => {}
                UpperCacheFill::Propagate => flops.spent += cost::propagate_flops(c),
                // Counted as paid now; a token still owed at the end never pays it.
                UpperCacheFill::Deferred => {
                    flops.spent += (c.num_layers - c.exit_layer) as f64 * cost::layer_flops(c, context)
                }
            }
        }
    }
}

/// FLOPs spent by a generation, and what full depth would have spent on the same tokens.
#[derive(Default)]
struct Flops {
    spent: f64,
    full_depth: f64,
}

/// Each row's output buffer: its prompt, with room for `max_new` more tokens (so appending a
/// generated token never allocates).
pub(crate) fn output_rows(prompts: &[Vec<usize>], max_new: usize) -> Vec<Vec<usize>> {
    prompts
        .iter()
        .map(|p| {
            let mut o = Vec::with_capacity(p.len() + max_new);
            o.extend_from_slice(p);
            o
        })
        .collect()
}
