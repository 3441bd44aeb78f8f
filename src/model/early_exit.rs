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
//! **Per row.** Each row routes on its own confidence (the prototype routed the whole batch one
//! way). The rows that go deep are gathered into a compact block, run through the upper layers
//! together, and their logits scattered back; so a deep row costs what it would alone, and a
//! shallow row nothing above the exit.
//!
//! **The upper cache for tokens that exited** ([`UpperCacheFill`]). A token that exits has no
//! keys and values in the upper layers. With [`UpperCacheFill::Skip`] (the spec's behaviour)
//! it simply is not there: later deep tokens attend over the upper positions that exist, each
//! still rotated by its true absolute position. With [`UpperCacheFill::Propagate`] its exit
//! hidden state is projected to each upper layer's keys and values (state copying, as in CALM:
//! `k = rope(Wk·norm(h))`, `v = Wv·norm(h)`, about `2·2·D²` FLOPs a layer), so the upper cache
//! holds every position.
//!
//! The prompt goes through every layer (the prefill); the first generated token is routed by
//! the confidence at the exit of the prompt's last position, like every later one.

use std::time::Instant;

use super::cache::KvCache;
use super::config::check_threshold;
use super::cost;
use super::decode::{Step, Workspace, linear};
use super::generate::{Sampler, Sampling};
use super::transformer::{LegoTransformer, confidence_with_scratch};
use crate::error::{Error, Result};
use crate::kernels::simd;
use crate::ops::rope::rotate;

/// The routing of one step: which rows go deep, which exit, and each row's confidence
/// (buffers kept between steps, so a step allocates nothing).
pub(crate) struct Routing<'a> {
    /// Every cache row of the batch, `0..batch`.
    pub all_rows: &'a [usize],
    /// Rows whose token goes through the upper layers.
    pub deep_rows: &'a mut Vec<usize>,
    /// Rows whose token exits.
    pub shallow_rows: &'a mut Vec<usize>,
    /// Each row's confidence at the exit.
    pub conf: &'a mut Vec<f32>,
}

/// What happens in the upper cache to a token that exited early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpperCacheFill {
    /// Nothing: the upper layers never see it (the spec's behaviour).
    Skip,
    /// Its exit hidden state is projected into every upper layer's keys and values.
    Propagate,
}

impl std::str::FromStr for UpperCacheFill {
    type Err = Error;
    fn from_str(s: &str) -> Result<UpperCacheFill> {
        match s {
            "skip" => Ok(UpperCacheFill::Skip),
            "propagate" => Ok(UpperCacheFill::Propagate),
            _ => Err(Error::Input(format!("upper-cache fill must be 'skip' or 'propagate', got '{s}'"))),
        }
    }
}

/// Where a generation's time went, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimeSplit {
    /// The prompt through every layer.
    pub prefill: f64,
    /// Embedding and the lower layers of generated tokens.
    pub lower: f64,
    /// The exit head and the confidence.
    pub exit_check: f64,
    /// Gathering deep rows, the upper layers and the final head.
    pub upper: f64,
    /// Projecting exited tokens into the upper cache (`Propagate`).
    pub upper_fill: f64,
    /// Choosing the next tokens.
    pub sampling: f64,
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
    /// the MLPs, the exit check's vocabulary projection, the head, and the upper-cache fill.
    pub flop_cost: f64,
    /// Wall time of the whole call, seconds.
    pub seconds: f64,
    /// Where the time went.
    pub time: TimeSplit,
    /// Per row, per generated token: whether it went deep.
    pub routes: Vec<Vec<bool>>,
    /// Per row, per generated token: its confidence at the exit.
    pub confidences: Vec<Vec<f32>>,
}

impl LegoTransformer {
    /// **Spec `generate_with_early_exit(input_ids, max_new_tokens, routing_threshold)`**: like
    /// [`generate`](LegoTransformer::generate), but each generated token of each row skips the
    /// upper layers when its confidence at the exit is at least `routing_threshold` (a threshold
    /// above 1 never exits; 0 always does). Returns each row's prompt and new tokens, and the
    /// statistics.
    pub fn generate_with_early_exit(
        &self,
        prompts: &[Vec<usize>],
        max_new_tokens: usize,
        routing_threshold: f32,
        sampling: &Sampling,
        fill: UpperCacheFill,
    ) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
        let t_start = Instant::now();
        check_threshold(routing_threshold)?;
        sampling.validate()?;
        let prompt_len = self.check_prompts(prompts, max_new_tokens)?;
        let c = &self.config;
        let (batch, v, d, exit) = (prompts.len(), c.vocab_size, c.dim, c.exit_layer);
        let n_layers = self.layers.len();
        let mut out: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                let mut o = Vec::with_capacity(p.len() + max_new_tokens);
                o.extend_from_slice(p);
                o
            })
            .collect();
        let mut stats = EarlyExitStats {
            routes: vec![Vec::with_capacity(max_new_tokens); batch],
            confidences: vec![Vec::with_capacity(max_new_tokens); batch],
            ..Default::default()
        };
        if max_new_tokens == 0 {
            return Ok((out, stats));
        }
        let mut cache = KvCache::new(c, batch);
        let mut ws = Workspace::new(self, batch * prompt_len);
        let mut sampler = Sampler::new(*sampling, v);
        let all_rows: Vec<usize> = (0..batch).collect();
        // Buffers reused every step: which rows go deep, and each row's confidence.
        let mut deep_rows: Vec<usize> = Vec::with_capacity(batch);
        let mut shallow_rows: Vec<usize> = Vec::with_capacity(batch);
        let mut next = vec![0usize; batch];
        let mut current = vec![0usize; batch];
        let mut conf = vec![0.0f32; batch];
        let (mut flops, mut full_flops) = (0.0f64, 0.0f64);

        // Prefill: the prompt through the lower layers, the exit check at its last position,
        // then (as the spec says) through the upper layers too.
        let t0 = Instant::now();
        let flat: Vec<usize> = prompts.iter().flatten().copied().collect();
        self.embed_into(&flat, &mut ws);
        self.run_cached(0..exit, &Step { cache_rows: &all_rows, t: prompt_len }, &mut cache, &mut ws);
        self.logits_into(self.exit(), (0..batch).map(|r| r * prompt_len + prompt_len - 1), &mut ws);
        deep_rows.clear();
        for r in 0..batch {
            conf[r] = confidence_with_scratch(&ws.logits[r * v..(r + 1) * v], &mut ws.probs);
            if conf[r] >= routing_threshold {
                next[r] = sampler.sample(&ws.logits[r * v..(r + 1) * v]);
            } else {
                deep_rows.push(r);
            }
        }
        self.run_cached(exit..n_layers, &Step { cache_rows: &all_rows, t: prompt_len }, &mut cache, &mut ws);
        self.logits_into(&self.head, deep_rows.iter().map(|&r| r * prompt_len + prompt_len - 1), &mut ws);
        for (i, &r) in deep_rows.iter().enumerate() {
            next[r] = sampler.sample(&ws.logits[i * v..(i + 1) * v]);
        }
        self.count_routes(&deep_rows, &conf, prompt_len - 1, &mut stats, &mut flops, &mut full_flops);
        stats.time.prefill = t0.elapsed().as_secs_f64();

        for step in 0..max_new_tokens {
            for (o, &n) in out.iter_mut().zip(&next) {
                o.push(n);
            }
            if step + 1 == max_new_tokens {
                break;
            }
            let mut routing = Routing {
                all_rows: &all_rows,
                deep_rows: &mut deep_rows,
                shallow_rows: &mut shallow_rows,
                conf: &mut conf,
            };
            current.copy_from_slice(&next);
            let sampled = self.early_exit_step(
                &current,
                routing_threshold,
                fill,
                &mut cache,
                &mut ws,
                &mut routing,
                &mut stats.time,
                |r, logits| {
                    next[r] = sampler.sample(logits);
                },
            );
            stats.time.sampling += sampled;
            let pos = prompt_len + step;
            self.count_routes(&deep_rows, &conf, pos, &mut stats, &mut flops, &mut full_flops);
            if fill == UpperCacheFill::Propagate {
                flops += shallow_rows.len() as f64 * (n_layers - exit) as f64 * 4.0 * (d * d) as f64;
            }
        }
        let total = stats.shallow_count + stats.deep_count;
        stats.shallow_ratio = stats.shallow_count as f64 / total.max(1) as f64;
        stats.actual_compute_cost = cost::layer_cost(c, stats.shallow_count, stats.deep_count);
        stats.flop_cost = flops / full_flops;
        stats.seconds = t_start.elapsed().as_secs_f64();
        Ok((out, stats))
    }

    /// One decoding step under early exit, for one new token per row (`tokens`): the lower
    /// layers for every row, the exit check, the upper-cache fill of the rows that exit
    /// (`Propagate`), and the upper layers for the gathered rows that do not. `emit(row, logits)`
    /// is called once per row with the logits its token ends with (the exit's or the deep
    /// head's). Adds the step's times to `time` and returns the time spent inside `emit`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn early_exit_step(
        &self,
        tokens: &[usize],
        threshold: f32,
        fill: UpperCacheFill,
        cache: &mut KvCache,
        ws: &mut Workspace,
        routing: &mut Routing,
        time: &mut TimeSplit,
        mut emit: impl FnMut(usize, &[f32]),
    ) -> f64 {
        let (v, d, exit, n_layers) =
            (self.config.vocab_size, self.config.dim, self.config.exit_layer, self.layers.len());
        let batch = tokens.len();
        // Lower layers for every row.
        let t0 = Instant::now();
        self.embed_into(tokens, ws);
        self.run_cached(0..exit, &Step { cache_rows: routing.all_rows, t: 1 }, cache, ws);
        let t1 = Instant::now();
        // The exit check: the confidence of each row.
        self.logits_into(self.exit(), 0..batch, ws);
        routing.deep_rows.clear();
        routing.shallow_rows.clear();
        for (r, c) in routing.conf.iter_mut().enumerate() {
            *c = confidence_with_scratch(&ws.logits[r * v..(r + 1) * v], &mut ws.probs);
            if *c >= threshold { routing.shallow_rows.push(r) } else { routing.deep_rows.push(r) }
        }
        let t2 = Instant::now();
        for &r in routing.shallow_rows.iter() {
            emit(r, &ws.logits[r * v..(r + 1) * v]);
        }
        let t3 = Instant::now();
        if fill == UpperCacheFill::Propagate && !routing.shallow_rows.is_empty() {
            self.propagate_into_upper_cache(routing.shallow_rows, cache, ws);
        }
        let t4 = Instant::now();
        if !routing.deep_rows.is_empty() {
            // Gather the deep rows' hidden states to the front (ascending, so in place).
            for (i, &r) in routing.deep_rows.iter().enumerate() {
                if i != r {
                    ws.x.copy_within(r * d..(r + 1) * d, i * d);
                }
            }
            self.run_cached(exit..n_layers, &Step { cache_rows: routing.deep_rows, t: 1 }, cache, ws);
            self.logits_into(&self.head, 0..routing.deep_rows.len(), ws);
        }
        let t5 = Instant::now();
        for (i, &r) in routing.deep_rows.iter().enumerate() {
            emit(r, &ws.logits[i * v..(i + 1) * v]);
        }
        let t6 = Instant::now();
        time.lower += (t1 - t0).as_secs_f64();
        time.exit_check += (t2 - t1).as_secs_f64();
        time.upper_fill += (t4 - t3).as_secs_f64();
        time.upper += (t5 - t4).as_secs_f64();
        (t3 - t2).as_secs_f64() + (t6 - t5).as_secs_f64()
    }

    /// Records one generated token per row (`conf` holds each row's confidence): deep for
    /// `deep_rows`, shallow for the others, at context length `pos + 1`.
    fn count_routes(
        &self,
        deep_rows: &[usize],
        conf: &[f32],
        pos: usize,
        stats: &mut EarlyExitStats,
        flops: &mut f64,
        full: &mut f64,
    ) {
        let c = &self.config;
        let mut d = deep_rows.iter().peekable();
        for (r, &cr) in conf.iter().enumerate() {
            stats.confidences[r].push(cr);
            let deep = d.peek() == Some(&&r);
            if deep {
                d.next();
                stats.deep_count += 1;
                *flops += cost::deep_flops(c, pos + 1);
            } else {
                stats.shallow_count += 1;
                *flops += cost::shallow_flops(c, pos + 1);
            }
            *full += cost::full_depth_flops(c, pos + 1);
            stats.routes[r].push(deep);
        }
    }

    /// `Propagate`: for each row in `rows` (whose exit hidden states are in `ws.x`), writes the
    /// keys and values every upper layer would have made from it.
    fn propagate_into_upper_cache(&self, rows: &[usize], cache: &mut KvCache, ws: &mut Workspace) {
        let c = &self.config;
        let (d, heads, hd) = (c.dim, c.num_heads, c.head_dim());
        let half = hd / 2;
        let max_seq = ws.max_seq_len;
        for l in c.exit_layer..self.layers.len() {
            let layer = &self.layers[l];
            let norm = layer.attention_norm.weight.data();
            let (wk, wv) = (layer.attention.wk.weight.data(), layer.attention.wv.weight.data());
            for (i, &r) in rows.iter().enumerate() {
                simd::rmsnorm(&ws.x[r * d..(r + 1) * d], &norm, c.norm_eps, &mut ws.xn[i * d..(i + 1) * d]);
            }
            let m = rows.len();
            linear(&ws.xn, m, d, &wk, d, &mut ws.k, &mut ws.transposed, ws.split_above);
            linear(&ws.xn, m, d, &wv, d, &mut ws.v, &mut ws.transposed, ws.split_above);
            // Rotate each key by its token's absolute position (the lower layers already
            // counted the token, so it is `positions − 1`).
            for (i, &r) in rows.iter().enumerate() {
                let pos = cache.positions[r] - 1;
                let (cos, sin) =
                    (&ws.rope_cos[pos * half..(pos + 1) * half], &ws.rope_sin[pos * half..(pos + 1) * half]);
                for h in 0..heads {
                    rotate(&mut ws.k[i * d + h * hd..i * d + (h + 1) * hd], cos, sin);
                }
            }
            let lc = cache.layer_mut(l);
            for (i, &r) in rows.iter().enumerate() {
                let len = lc.len[r];
                let dst = (r * max_seq + len) * d;
                lc.k[dst..dst + d].copy_from_slice(&ws.k[i * d..(i + 1) * d]);
                lc.v[dst..dst + d].copy_from_slice(&ws.v[i * d..(i + 1) * d]);
                lc.len[r] += 1;
            }
        }
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
    /// through the early-exit engine, routing each token as generation would, with the split
    /// caches and `fill`; the loss of each next token is taken from the logits its predecessor
    /// ended with. Unlike [`Trainer::evaluate`](crate::train::Trainer::evaluate), which runs
    /// both paths over whole sequences, here a token that exited really is missing from the
    /// upper cache (with `Skip`), as in generation.
    pub fn evaluate_with_early_exit(
        &self,
        sequences: &[Vec<usize>],
        threshold: f32,
        fill: UpperCacheFill,
    ) -> Result<TeacherForcedStats> {
        check_threshold(threshold)?;
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
        let mut cache = KvCache::new(&self.config, batch);
        let mut ws = Workspace::new(self, batch);
        let all_rows: Vec<usize> = (0..batch).collect();
        let (mut deep_rows, mut shallow_rows, mut conf) = (Vec::new(), Vec::new(), vec![0.0f32; batch]);
        let mut tokens = vec![0usize; batch];
        let mut stats = TeacherForcedStats::default();
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let mut time = TimeSplit::default();
        for pos in 0..len - 1 {
            for (t, s) in tokens.iter_mut().zip(sequences) {
                *t = s[pos];
            }
            let mut routing = Routing {
                all_rows: &all_rows,
                deep_rows: &mut deep_rows,
                shallow_rows: &mut shallow_rows,
                conf: &mut conf,
            };
            self.early_exit_step(
                &tokens,
                threshold,
                fill,
                &mut cache,
                &mut ws,
                &mut routing,
                &mut time,
                |r, logits| {
                    let target = sequences[r][pos + 1];
                    loss += (crate::ops::cross_entropy::logsumexp(logits) - logits[target]) as f64;
                    correct += (crate::ops::select::argmax(logits) == target) as usize;
                },
            );
            stats.shallow_count += shallow_rows.len();
            stats.tokens += batch;
        }
        stats.loss = loss / stats.tokens as f64;
        stats.ppl = stats.loss.exp();
        stats.accuracy = correct as f64 / stats.tokens as f64;
        stats.shallow_ratio = stats.shallow_count as f64 / stats.tokens as f64;
        Ok(stats)
    }
}
