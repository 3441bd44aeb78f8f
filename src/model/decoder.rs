//! The inference engine: one [`Decoder`] that every way of running the model without a
//! gradient goes through (`forward_with_cache`, `generate`, TRUE early exit, the teacher-forced
//! evaluation, the benches).
//!
//! Training builds a graph of [`Tensor`]s; decoding must not. The decoder reads the same
//! parameters as plain slices and keeps every intermediate in a workspace allocated once,
//! so a decoding step allocates nothing (llama2.c's discipline). It owns the split
//! [`KvCache`] of a batch of rows.
//!
//! **A step.** A caller announces which cache rows take part and how many new tokens each
//! brings ([`Decoder::begin`]: rows may bring different numbers of tokens, e.g. a prompt of 7
//! beside one of 12, or one token each when decoding), then runs ranges of layers over them
//! ([`Decoder::layers`]), may drop rows between ranges ([`Decoder::retain`]: the rows whose
//! token exits early), and asks for logits ([`Decoder::logits`]). Per layer, for the `m` new
//! tokens of the step, `x` being their residual stream `[m, D]`:
//!
//! ```text
//! xn = rmsnorm(x)                          q, k, v = xn·Wqᵀ, xn·Wkᵀ, xn·Wvᵀ     each [m, D]
//! rotate q and k at each token's absolute position; append k, v to its row's layer cache
//! att[token, head] = Σⱼ softmax(q·kⱼ/√hd)ⱼ · vⱼ   over the row's cached entries up to itself
//! x += att·Woᵀ
//! xn = rmsnorm(x);   x += (silu(xn·W1ᵀ) ⊙ xn·W3ᵀ)·W2ᵀ                        hidden [m, F]
//! ```
//!
//! **Positions.** A row's next absolute position is `cache.positions[row]`; [`Decoder::begin`]
//! is the one place that advances it. Every token of a step carries its own position, so a
//! layer never guesses it, and the upper cache (which holds only the tokens that went deep)
//! still rotates each key at its true position (the spec's lesson 2).
//!
//! **Batch invariance.** A row's numbers do not depend on the other rows in its step, nor on how
//! many there are: every product goes through the same streaming kernel
//! ([`simd::matmul_xwt`], whose every output is one dot product summed in a fixed order) for any
//! number of rows, RMSNorm and attention work row by row, and splitting over threads divides
//! output elements, never a sum. So a batch decodes bit for bit like each of its rows alone.
//!
//! **Threads.** A layer runs as one job of the decode [`Team`] ([`super::decoder_layer`]):
//! each thread takes its share of every step of the layer (q, k, v and attention by heads, the
//! other products by rows of `W`) and meets the others at a barrier only where it needs their
//! results. The heads' products go through [`crate::kernels::matvec`], split the same way. The
//! team's workers spin between jobs, so each core streams its share of the weights without
//! waiting to be woken. Whether a model splits at all is a fixed rule from its size
//! ([`decode_parts`]).

use std::ops::Range;

use super::cache::KvCache;
use super::config::LegoConfig;
use super::decoder_layer::{Dims, LayerBuffers, LayerWeights, StepTokens, part_scratch_len, run_layer};
use super::transformer::{ExitHead, LegoTransformer, confidence_with_scratch};
use crate::error::{Error, Result};
use crate::kernels::matvec::{BLOCK, Epilogue, products, scratch_len};
use crate::kernels::simd;
use crate::kernels::team::{Team, decode_team};
use crate::ops::rope::{SharedRopeTables, rotate, shared_rope_tables};
use crate::tensor::Tensor;

/// Models with fewer weights a token than this (1 Mi weights, 4 MiB) decode on one thread; larger
/// ones split every product and attention over the decode team. Measured on the 2-core machine
/// (`LEGO_DECODE_SPLIT=never|always cargo bench --bench model -- decode`, quiet machine, new
/// tokens/s, one thread → two): config T (0.2 Mi weights, in L2) 17,000 → 14,300 at batch 1 and
/// 32,200 → 30,600 at batch 8 (the hand-offs cost more than half a tiny product saves); S
/// (4.2 Mi) 1,250 → 1,720-1,890 and 4,040-4,360 → 5,080-5,500; M (29 Mi) 104 → 178 and
/// 388 → 661.
pub const DECODE_SPLIT_MODEL_WEIGHTS: usize = 1 << 20;

/// Every buffer a step needs, allocated once for up to `capacity` new tokens a step.
/// `m` below is the number of tokens in the current step (`m <= capacity`).
struct Workspace {
    /// Tokens a step can hold.
    capacity: usize,
    /// The residual stream, `[m, D]`.
    x: Vec<f32>,
    /// `x` normalised (before attention, before the MLP, before a head): one `[capacity, D]`
    /// region per thread of the team (a layer's parts each normalise all of `x` into their
    /// own; a head uses the first), `[team size, capacity, D]`.
    xn: Vec<f32>,
    /// Queries, keys and values of the new tokens, `[m, D]` each (heads side by side).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, `[m, D]`.
    att: Vec<f32>,
    /// The MLP's hidden state `silu(xn·W1ᵀ) ⊙ xn·W3ᵀ`, `[m, F]`.
    hidden: Vec<f32>,
    /// Attention scores, one `max_seq_len` row per (token, head): `[m·H, max_seq_len]`.
    scores: Vec<f32>,
    /// Products' outputs as the streaming kernel writes them, transposed, `BLOCK` rows of `x`
    /// at a time: `[n, BLOCK]` for the widest `n` of a hand-off outside the layers (`2D` for
    /// the propagated k, v; `V` for a head); see [`crate::kernels::matvec`].
    scratch: Vec<f32>,
    /// The same for a layer's parts, one region each: `[team size, BLOCK · max(D, 2F)]`
    /// ([`part_scratch_len`]).
    part_scratch: Vec<f32>,
    /// Logits of the tokens asked for, `[rows, V]`.
    logits: Vec<f32>,
    /// One row of probabilities, `[V]` (the exit check's softmax).
    probs: Vec<f32>,
    /// RoPE cos / sin for every position, `[max_seq_len, head_dim / 2]` each (shared by every
    /// decoder of the same shape: [`shared_rope_tables`]).
    rope: SharedRopeTables,
}

impl Workspace {
    fn new(model: &LegoTransformer, capacity: usize, team_size: usize) -> Workspace {
        let c = &model.config;
        let (d, f, v) = (c.dim, c.ffn_hidden, c.vocab_size);
        Workspace {
            capacity,
            x: vec![0.0; capacity * d],
            xn: vec![0.0; team_size * capacity * d],
            q: vec![0.0; capacity * d],
            k: vec![0.0; capacity * d],
            v: vec![0.0; capacity * d],
            att: vec![0.0; capacity * d],
            hidden: vec![0.0; capacity * f],
            scores: vec![0.0; capacity * c.num_heads * c.max_seq_len],
            scratch: vec![0.0; scratch_len(&[(2 * d).max(v)], capacity.min(BLOCK))],
            part_scratch: vec![0.0; team_size * part_scratch_len(d, f)],
            logits: vec![0.0; capacity * v],
            probs: vec![0.0; v],
            rope: shared_rope_tables(c.max_seq_len, c.head_dim(), c.rope_theta),
        }
    }
}

/// Which tokens of the step [`Decoder::logits`] computes logits for.
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    /// The last new token of every row of the step, in step order.
    LastOfEach,
    /// The last new token of the given rows (indices into the step, ascending).
    LastOf(&'a [usize]),
    /// Every new token of the step, in order.
    All,
}

/// The rows of the current step and their tokens (buffers kept between steps).
#[derive(Default)]
struct StepRows {
    /// The cache row of each row of the step.
    rows: Vec<usize>,
    /// New tokens each row brings.
    counts: Vec<usize>,
    /// Where each row's first token sits in the workspace (`x[first·D..]`).
    first: Vec<usize>,
    /// Tokens in the step, `Σ counts`.
    tokens: usize,
    /// Per token: its step row and its absolute position, `[m]` each.
    token_row: Vec<usize>,
    token_pos: Vec<usize>,
}

/// The graph-free inference engine of a [`LegoTransformer`] for a batch of cache rows: the split
/// KV cache, the workspace, and the rows of the current step (see the module doc).
///
/// A prompt, then one more token, by hand: [`begin`](Decoder::begin) a step,
/// run [`layers`](Decoder::layers), ask for [`logits`](Decoder::logits).
///
/// ```
/// use lego::{Tensor, no_grad};
/// use lego::model::{Decoder, LegoConfig, LegoTransformer, Tokens};
///
/// let config = LegoConfig { vocab_size: 32, dim: 16, num_heads: 2, ffn_hidden: 32, ..LegoConfig::t() };
/// let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
/// let n = model.layers.len();
/// let mut dec = Decoder::new(&model, 1, 4); // one cache row, steps of up to 4 tokens
/// dec.begin(&[0], &[4], &[3, 1, 4, 1]).unwrap(); // row 0 brings its prompt
/// dec.layers(0..n);
/// dec.logits(&model.head, Tokens::LastOfEach).unwrap();
/// dec.begin(&[0], &[1], &[5]).unwrap(); // then one token, at position 4
/// dec.layers(0..n);
/// dec.logits(&model.head, Tokens::LastOfEach).unwrap();
/// assert_eq!((dec.position(0), dec.cache().lower.len(0)), (5, 5));
///
/// // What the training graph computes for the whole sequence, at its last position.
/// let full = no_grad(|| model.forward(&[3, 1, 4, 1, 5], 1).unwrap()).to_vec();
/// let want = &full[4 * 32..];
/// assert!(dec.logits_row(0).iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-4));
/// ```
pub struct Decoder<'m> {
    model: &'m LegoTransformer,
    cache: KvCache,
    ws: Workspace,
    step: StepRows,
    /// The decode team, and how many of its threads each product and attention is split over
    /// (1: all on the calling thread; see [`decode_parts`]).
    team: &'static Team,
    parts: usize,
}

impl<'m> Decoder<'m> {
    /// A decoder with an empty cache of `batch` rows, whose steps hold up to `max_step_tokens`
    /// new tokens in all (a prompt's length times the batch, for a prefill in one step).
    pub fn new(model: &'m LegoTransformer, batch: usize, max_step_tokens: usize) -> Decoder<'m> {
        let cache = KvCache::new(&model.config, batch);
        Decoder::with_cache(model, cache, max_step_tokens).expect("a new cache fits its own model")
    }

    /// A decoder that continues from `cache` (which must have been made for this model).
    pub fn with_cache(
        model: &'m LegoTransformer,
        cache: KvCache,
        max_step_tokens: usize,
    ) -> Result<Decoder<'m>> {
        check_cache(model, &cache)?;
        let c = &model.config;
        let capacity = max_step_tokens.max(1);
        let step = StepRows {
            rows: Vec::with_capacity(cache.batch),
            counts: Vec::with_capacity(cache.batch),
            first: Vec::with_capacity(cache.batch),
            tokens: 0,
            token_row: vec![0; capacity],
            token_pos: vec![0; capacity],
        };
        let team = decode_team();
        let parts = decode_parts(c, team.size().min(rayon::current_num_threads()));
        Ok(Decoder { model, ws: Workspace::new(model, capacity, team.size()), cache, step, team, parts })
    }

    /// Splits this decoder's products and attention over `threads` threads of the decode team
    /// (clamped to `1..=` the team's size), whatever [`decode_parts`]'s rule says: to measure
    /// the rule, or to test the split path on a small model. The numbers do not change.
    pub fn set_threads(&mut self, threads: usize) {
        self.parts = threads.clamp(1, self.team.size());
    }

    /// The model this decoder runs.
    pub fn model(&self) -> &'m LegoTransformer {
        self.model
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Gives the KV cache back (to keep it, or to continue with another decoder).
    pub fn into_cache(self) -> KvCache {
        self.cache
    }

    /// Empties every row of the cache (the buffers stay allocated).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// The next absolute position of cache row `row` (= tokens it has seen).
    pub fn position(&self, row: usize) -> usize {
        self.cache.positions[row]
    }

    /// The cache rows of the current step, in step order.
    pub fn step_rows(&self) -> &[usize] {
        &self.step.rows
    }

    /// Tokens in the current step (`Σ counts`).
    pub fn step_tokens(&self) -> usize {
        self.step.tokens
    }

    /// The residual stream of the current step's tokens, `[m, D]` (after the layers run so far).
    pub fn hidden(&self) -> &[f32] {
        &self.ws.x[..self.step.tokens * self.model.config.dim]
    }

    /// The residual stream of the last new token of step row `i`, `[D]` (what the exit check
    /// reads after the lower layers).
    pub fn last_hidden(&self, i: usize) -> &[f32] {
        let (d, tok) = (self.model.config.dim, self.step.first[i] + self.step.counts[i] - 1);
        &self.ws.x[tok * d..(tok + 1) * d]
    }

    /// Starts a step: cache row `rows[i]` brings `counts[i]` new tokens, whose ids are
    /// `ids[Σ counts[..i] ..][..counts[i]]`. Their embeddings enter the residual stream, and each
    /// row's position advances by its count (the one place it does). Errors, changing nothing:
    /// a row outside the batch or named twice, a count of 0, an id outside the vocabulary, a row
    /// that would pass `max_seq_len`, or more tokens than the decoder was made for.
    pub fn begin(&mut self, rows: &[usize], counts: &[usize], ids: &[usize]) -> Result<()> {
        let c = &self.model.config;
        self.check_step(rows, counts, ids.len(), true)?;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, id)| **id >= c.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} (new token {i} of the step) is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let d = c.dim;
        let table = self.model.tok_embeddings.data();
        for (i, &id) in ids.iter().enumerate() {
            self.ws.x[i * d..(i + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
        }
        let positions = &self.cache.positions;
        set_step(&mut self.step, rows, counts, |i| positions[rows[i]]);
        for (&row, &n) in rows.iter().zip(counts) {
            self.cache.positions[row] += n;
        }
        Ok(())
    }

    /// Starts a step from hidden states instead of token ids (`hidden`: `[Σ counts, D]`), for
    /// tokens that are already at absolute positions `start_positions[i]..` of their rows (e.g.
    /// entering the upper layers after the lower ones ran in an earlier step). Positions do not
    /// advance. Errors as [`begin`](Decoder::begin).
    pub fn begin_hidden(
        &mut self,
        rows: &[usize],
        counts: &[usize],
        start_positions: &[usize],
        hidden: &[f32],
    ) -> Result<()> {
        let d = self.model.config.dim;
        if !hidden.len().is_multiple_of(d) {
            return Err(Error::Input(format!("{} hidden values are not rows of {d}", hidden.len())));
        }
        self.check_step(rows, counts, hidden.len() / d, false)?;
        if start_positions.len() != rows.len() {
            return Err(Error::Input(format!(
                "{} start positions for {} rows",
                start_positions.len(),
                rows.len()
            )));
        }
        for ((&row, &n), &p) in rows.iter().zip(counts).zip(start_positions) {
            if p + n > self.cache.positions[row] {
                return Err(Error::Input(format!(
                    "row {row}: tokens at positions {p}..{} have not entered the model (it has seen {})",
                    p + n,
                    self.cache.positions[row]
                )));
            }
        }
        self.ws.x[..hidden.len()].copy_from_slice(hidden);
        set_step(&mut self.step, rows, counts, |i| start_positions[i]);
        Ok(())
    }

    /// Checks a step's shape against the batch and the capacity, and (for `new_tokens`) that
    /// each row has room for its tokens under `max_seq_len`.
    fn check_step(&self, rows: &[usize], counts: &[usize], tokens: usize, new_tokens: bool) -> Result<()> {
        let c = &self.model.config;
        if rows.is_empty() || rows.len() != counts.len() {
            return Err(Error::Input(format!(
                "a step needs one token count per row, and at least one row (got {} rows, {} counts)",
                rows.len(),
                counts.len()
            )));
        }
        let total = counts.iter().try_fold(0usize, |s, &n| s.checked_add(n));
        if total != Some(tokens) {
            return Err(Error::Input(format!(
                "the counts {counts:?} do not add up to the {tokens} tokens given"
            )));
        }
        if tokens > self.ws.capacity {
            return Err(Error::Input(format!(
                "{tokens} tokens in one step, but this decoder holds {} a step",
                self.ws.capacity
            )));
        }
        for (i, (&row, &n)) in rows.iter().zip(counts).enumerate() {
            if row >= self.cache.batch {
                return Err(Error::Input(format!(
                    "cache row {row} is outside the batch of {}",
                    self.cache.batch
                )));
            }
            if rows[..i].contains(&row) {
                return Err(Error::Input(format!("cache row {row} is named twice in one step")));
            }
            if n == 0 {
                return Err(Error::Input(format!("cache row {row} brings no token")));
            }
            let room = c.max_seq_len - self.cache.positions[row].min(c.max_seq_len);
            if new_tokens && n > room {
                return Err(Error::Input(format!(
                    "cache row {row}: {n} more tokens after {} exceed max_seq_len {}",
                    self.cache.positions[row], c.max_seq_len
                )));
            }
        }
        Ok(())
    }

    /// Keeps only the step rows `keep` (indices into the step, ascending) for what follows:
    /// their tokens move to the front of the workspace, in order. Early exit calls this to send
    /// on only the rows whose token goes deep.
    pub fn retain(&mut self, keep: &[usize]) {
        let d = self.model.config.dim;
        let s = &mut self.step;
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]) && keep.last().is_none_or(|&k| k < s.rows.len()),
            "Decoder::retain: {keep:?} must be ascending step rows below {}",
            s.rows.len()
        );
        if keep.len() == s.rows.len() {
            return;
        }
        // Ascending indices only ever move data towards the front, so in place is safe.
        let mut m = 0;
        for (new, &old) in keep.iter().enumerate() {
            let (first, n) = (s.first[old], s.counts[old]);
            if first != m {
                self.ws.x.copy_within(first * d..(first + n) * d, m * d);
                s.token_pos.copy_within(first..first + n, m);
            }
            s.token_row[m..m + n].iter_mut().for_each(|r| *r = new);
            s.rows[new] = s.rows[old];
            s.counts[new] = n;
            s.first[new] = m;
            m += n;
        }
        s.rows.truncate(keep.len());
        s.counts.truncate(keep.len());
        s.first.truncate(keep.len());
        s.tokens = m;
    }

    /// Runs layers `range` over the step's tokens, reading and appending to those layers'
    /// caches. A range above the lower layers works on tokens that came through the layers
    /// below in this step (or from [`begin_hidden`](Decoder::begin_hidden)).
    pub fn layers(&mut self, range: Range<usize>) {
        assert!(
            range.end <= self.model.layers.len(),
            "Decoder::layers: {range:?} is beyond the model's {} layers",
            self.model.layers.len()
        );
        for l in range {
            self.model.count_layer_call(l);
            self.layer(l);
        }
    }

    /// One layer over the step's tokens (see the module doc): its entries reserved in the
    /// layer's cache, then the layer as one job of the decode team ([`super::decoder_layer`]).
    fn layer(&mut self, l: usize) {
        let model = self.model;
        let c = &model.config;
        let layer = &model.layers[l];
        let (attn, ffn) = (&layer.attention, &layer.feed_forward);
        let s = &self.step;
        let cache = self.cache.layer_mut(l);
        for t in 0..s.tokens {
            cache.reserve(s.rows[s.token_row[t]], s.token_pos[t]);
        }
        let (attention_norm, ffn_norm) = (layer.attention_norm.weight.data(), layer.ffn_norm.weight.data());
        let (wq, wk, wv, wo) =
            (attn.wq.weight.data(), attn.wk.weight.data(), attn.wv.weight.data(), attn.wo.weight.data());
        let (w1, w3, w2) = (ffn.w1.weight.data(), ffn.w3.weight.data(), ffn.w2.weight.data());
        let weights = LayerWeights {
            attention_norm: &attention_norm,
            wq: &wq,
            wk: &wk,
            wv: &wv,
            wo: &wo,
            ffn_norm: &ffn_norm,
            w1: &w1,
            w3: &w3,
            w2: &w2,
        };
        let (d, f, m) = (c.dim, c.ffn_hidden, s.tokens);
        let dims = Dims {
            dim: d,
            ffn_hidden: f,
            heads: c.num_heads,
            head_dim: c.head_dim(),
            norm_eps: c.norm_eps,
            m,
            capacity: self.ws.capacity,
        };
        let tokens = StepTokens {
            rows: &s.rows,
            first: &s.first,
            counts: &s.counts,
            token_row: &s.token_row[..m],
            token_pos: &s.token_pos[..m],
        };
        let ws = &mut self.ws;
        let buffers = LayerBuffers {
            x: &mut ws.x[..m * d],
            xn: &mut ws.xn,
            q: &mut ws.q[..m * d],
            k: &mut ws.k[..m * d],
            v: &mut ws.v[..m * d],
            att: &mut ws.att[..m * d],
            hidden: &mut ws.hidden[..m * f],
            scores: &mut ws.scores,
            scratch: &mut ws.part_scratch,
            rope_cos: &ws.rope.cos,
            rope_sin: &ws.rope.sin,
        };
        run_layer(self.team, self.parts, dims, &weights, &tokens, buffers, cache);
    }

    /// Logits of `head` for the chosen tokens of the step, into rows `0..n` of the logits
    /// buffer (read them with [`logits_row`](Decoder::logits_row)); returns `n`. A logit that is
    /// not finite (NaN or infinite weights, an overflow) is an error naming the row and
    /// position: nothing downstream ever samples from it.
    pub fn logits(&mut self, head: &ExitHead, tokens: Tokens) -> Result<usize> {
        let d = self.model.config.dim;
        let s = &self.step;
        let last = |i: usize| s.first[i] + s.counts[i] - 1;
        // Gather the tokens' hidden states into `xn`, normalised, in the order asked.
        let w = head.norm.weight.data();
        let mut n = 0;
        let mut norm = |tok: usize| {
            simd::rmsnorm(
                &self.ws.x[tok * d..(tok + 1) * d],
                &w,
                head.norm.eps,
                &mut self.ws.xn[n * d..(n + 1) * d],
            );
            n += 1;
        };
        match tokens {
            Tokens::LastOfEach => (0..s.rows.len()).for_each(|i| norm(last(i))),
            Tokens::LastOf(rows) => rows.iter().for_each(|&i| norm(last(i))),
            Tokens::All => (0..s.tokens).for_each(norm),
        }
        let v = self.model.config.vocab_size;
        self.model.count_head_rows(head, n);
        let ws = &mut self.ws;
        let w = head.output.weight.data();
        let logits = [&mut ws.logits[..n * v]];
        products(self.team, self.parts, &ws.xn, n, d, [&w], logits, &mut ws.scratch, Epilogue::None);
        if let Some(bad) = ws.logits[..n * v].iter().position(|z| !z.is_finite()) {
            return Err(Error::NonFinite(format!(
                "logit {} of output row {} is {} (non-finite weights or activations)",
                bad % v,
                bad / v,
                ws.logits[bad]
            )));
        }
        Ok(n)
    }

    /// Row `i` of the logits computed by the last [`logits`](Decoder::logits) call, `[V]`.
    pub fn logits_row(&self, i: usize) -> &[f32] {
        let v = self.model.config.vocab_size;
        &self.ws.logits[i * v..(i + 1) * v]
    }

    /// The spec's confidence of logits row `i`: `max softmax`, through the same kernel as
    /// calibration ([`confidence_with_scratch`]), so a token routes the same way in both.
    pub fn confidence(&mut self, i: usize) -> f32 {
        let v = self.model.config.vocab_size;
        confidence_with_scratch(&self.ws.logits[i * v..(i + 1) * v], &mut self.ws.probs)
    }

    /// Writes, for the last token of each of the step rows `rows` (whose residual stream holds
    /// the token's state at the exit), the keys and values every upper layer would make from
    /// that state (`UpperCacheFill::Propagate`, CALM's state copying): per upper layer
    /// `k = rope(Wk·norm(h))`, `v = Wv·norm(h)`.
    pub fn propagate_to_upper_cache(&mut self, rows: &[usize]) {
        let model = self.model;
        let c = &model.config;
        let (d, heads, hd) = (c.dim, c.num_heads, c.head_dim());
        let half = hd / 2;
        let n = rows.len();
        for l in c.exit_layer..model.layers.len() {
            let layer = &model.layers[l];
            let ws = &mut self.ws;
            let norm = layer.attention_norm.weight.data();
            for (i, &r) in rows.iter().enumerate() {
                let tok = self.step.first[r] + self.step.counts[r] - 1;
                simd::rmsnorm(
                    &ws.x[tok * d..(tok + 1) * d],
                    &norm,
                    c.norm_eps,
                    &mut ws.xn[i * d..(i + 1) * d],
                );
            }
            let (wk, wv) = (layer.attention.wk.weight.data(), layer.attention.wv.weight.data());
            let kv = [&mut ws.k[..n * d], &mut ws.v[..n * d]];
            products(self.team, self.parts, &ws.xn, n, d, [&wk, &wv], kv, &mut ws.scratch, Epilogue::None);
            let lc = self.cache.layer_mut(l);
            for (i, &r) in rows.iter().enumerate() {
                let tok = self.step.first[r] + self.step.counts[r] - 1;
                let pos = self.step.token_pos[tok];
                let (cos, sin) =
                    (&ws.rope.cos[pos * half..(pos + 1) * half], &ws.rope.sin[pos * half..(pos + 1) * half]);
                for h in 0..heads {
                    rotate(&mut ws.k[i * d + h * hd..i * d + (h + 1) * hd], cos, sin);
                }
                lc.push(self.step.rows[r], pos, &ws.k[i * d..(i + 1) * d], &ws.v[i * d..(i + 1) * d]);
            }
        }
    }

    /// Forgets everything cache row `row` saw from absolute position `len` on, in every layer:
    /// its position becomes `len` and each layer keeps only its entries for positions below
    /// `len` (in the upper layers, those may be fewer than `len`). The cache is then exactly that
    /// of a run that never saw the forgotten tokens. An error if `len` is past the row's position.
    pub fn rollback(&mut self, row: usize, len: usize) -> Result<()> {
        self.cache.rollback(row, len)
    }
}

// Two small accessors for the deferred upper-cache fill (`UpperCacheFill::Deferred`, in
// early_exit.rs): the tokens of one step row, and the cache to keep owed exit states in.
impl Decoder<'_> {
    /// The residual stream of step row `i`'s tokens, `[counts[i], D]`, and the absolute
    /// position of the first.
    pub fn row_hidden(&self, i: usize) -> (&[f32], usize) {
        let (d, s) = (self.model.config.dim, &self.step);
        let first = s.first[i];
        (&self.ws.x[first * d..(first + s.counts[i]) * d], s.token_pos[first])
    }

    /// The KV cache, mutably (the deferred fill keeps owed exit states in it). Positions and
    /// entries are the decoder's to change: [`begin`](Decoder::begin) and
    /// [`rollback`](Decoder::rollback).
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }
}

/// Records a step's rows and each token's step row and absolute position (`start(i)`: that of
/// step row `i`'s first token).
fn set_step(s: &mut StepRows, rows: &[usize], counts: &[usize], start: impl Fn(usize) -> usize) {
    s.rows.clear();
    s.rows.extend_from_slice(rows);
    s.counts.clear();
    s.counts.extend_from_slice(counts);
    s.first.clear();
    let mut m = 0;
    for (i, &n) in counts.iter().enumerate() {
        s.first.push(m);
        let p = start(i);
        for j in 0..n {
            s.token_row[m + j] = i;
            s.token_pos[m + j] = p + j;
        }
        m += n;
    }
    s.tokens = m;
}

/// How many threads of the decode team (of `available`) a model's decoder splits its work over:
/// all of them for a model with at least [`DECODE_SPLIT_MODEL_WEIGHTS`] weights a token, else 1.
/// `LEGO_DECODE_SPLIT=always|never` overrides the rule (to measure it).
pub fn decode_parts(c: &LegoConfig, available: usize) -> usize {
    let weights_per_token =
        c.num_layers * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_hidden) + c.vocab_size * c.dim;
    match std::env::var("LEGO_DECODE_SPLIT").as_deref() {
        Ok("always") => available,
        Ok("never") => 1,
        _ if weights_per_token >= DECODE_SPLIT_MODEL_WEIGHTS => available,
        _ => 1,
    }
}

/// Checks that a cache was made for this model.
fn check_cache(model: &LegoTransformer, cache: &KvCache) -> Result<()> {
    let c = &model.config;
    if cache.dim != c.dim
        || cache.max_seq_len != c.max_seq_len
        || cache.upper.first_layer != c.exit_layer
        || cache.lower.layers.len() + cache.upper.layers.len() != c.num_layers
    {
        return Err(Error::Input(format!(
            "the KV cache (dim {}, max_seq_len {}, {} + {} layers) does not fit this model (dim {}, max_seq_len {}, {} + {} layers)",
            cache.dim,
            cache.max_seq_len,
            cache.lower.layers.len(),
            cache.upper.layers.len(),
            c.dim,
            c.max_seq_len,
            c.exit_layer,
            c.num_layers - c.exit_layer
        )));
    }
    Ok(())
}

impl LegoTransformer {
    /// **Spec `forward_with_cache(x, past_kv_cache, use_cache)`**: logits `[B, T, V]` for new
    /// tokens `ids` (`[B, T]` row-major, row `b` continuing cache row `b`), attending to what the
    /// cache holds. With `use_cache` the new keys and values stay in the cache; without, the
    /// cache is left as it was. Records no graph.
    pub fn forward_with_cache(
        &self,
        ids: &[usize],
        batch: usize,
        cache: &mut KvCache,
        use_cache: bool,
    ) -> Result<Tensor> {
        if cache.batch != batch {
            return Err(Error::Input(format!(
                "a KV cache of {} rows does not fit a batch of {batch}",
                cache.batch
            )));
        }
        let start = cache.positions.iter().copied().max().unwrap_or(0);
        let t = self.check_tokens(ids, batch, start)?;
        let before = cache.positions.clone();
        let mut dec = Decoder::with_cache(self, std::mem::replace(cache, KvCache::empty()), batch * t)?;
        let rows: Vec<usize> = (0..batch).collect();
        let result = dec.begin(&rows, &vec![t; batch], ids).and_then(|()| {
            dec.layers(0..self.layers.len());
            dec.logits(&self.head, Tokens::All)
        });
        let v = self.config.vocab_size;
        let logits = result.map(|n| Tensor::from_vec(dec.ws.logits[..n * v].to_vec(), &[batch, t, v]));
        *cache = dec.into_cache();
        if !use_cache {
            for (row, &len) in before.iter().enumerate() {
                cache.rollback(row, len).expect("rolling back to a length the cache had");
            }
        }
        logits
    }

    /// **Spec `forward_with_cache_partial(h, cache, start, end)`**: hidden states `[B, T, D]`
    /// after layers `start..end`, from hidden states `h` entering layer `start`, reading and
    /// appending to those layers' caches. A call starting at layer 0 brings new tokens (at each
    /// row's next position); a later one continues the last `T` tokens of each row, which
    /// already went through layer 0.
    pub fn forward_with_cache_partial(
        &self,
        h: &Tensor,
        cache: &mut KvCache,
        start: usize,
        end: usize,
    ) -> Result<Tensor> {
        if start > end || end > self.layers.len() {
            return Err(Error::Input(format!(
                "layer range {start}..{end} is not inside 0..{}",
                self.layers.len()
            )));
        }
        if h.rank() != 3 || h.dim(2) != self.config.dim {
            return Err(Error::Input(format!(
                "hidden states must be [batch, seq, {}], got {:?}",
                self.config.dim,
                h.shape()
            )));
        }
        let (batch, t, d) = (h.dim(0), h.dim(1), h.dim(2));
        if cache.batch != batch {
            return Err(Error::Input(format!(
                "a KV cache of {} rows does not fit a batch of {batch}",
                cache.batch
            )));
        }
        let rows: Vec<usize> = (0..batch).collect();
        let counts = vec![t; batch];
        let starts: Vec<usize> = if start == 0 {
            // New tokens: they start at each row's next position, which advances here.
            if let Some(row) = (0..batch).find(|&r| cache.positions[r] + t > self.config.max_seq_len) {
                return Err(Error::Input(format!(
                    "row {row}: {t} more tokens after {} exceed max_seq_len {}",
                    cache.positions[row], self.config.max_seq_len
                )));
            }
            let starts = cache.positions.clone();
            cache.positions.iter_mut().for_each(|p| *p += t);
            starts
        } else {
            // Tokens that already passed layer 0: the last t of each row.
            cache.positions.iter().map(|&p| p.saturating_sub(t)).collect()
        };
        let mut dec = Decoder::with_cache(self, std::mem::replace(cache, KvCache::empty()), batch * t)?;
        let result = dec.begin_hidden(&rows, &counts, &starts, &h.data()).map(|()| {
            dec.layers(start..end);
            Tensor::from_vec(dec.hidden()[..batch * t * d].to_vec(), &[batch, t, d])
        });
        *cache = dec.into_cache();
        result
    }
}
