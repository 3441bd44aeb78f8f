//! The inference engine: the model's layers on preallocated buffers, with the KV cache, and
//! no autodiff graph at all.
//!
//! Training builds a graph of [`Tensor`]s; decoding must not. Here the same parameters are
//! read as plain slices and every intermediate lives in a [`Workspace`] allocated once, so a
//! decoding step allocates nothing (llama2.c's discipline). One step processes `t` new tokens
//! for each of a set of cache rows (`t = prompt length` for the prefill, 1 when decoding):
//!
//! ```text
//! per layer, for the m = rows·t new tokens x [m, D]:
//!   xn = rmsnorm(x)                          q, k, v = xn·Wqᵀ, xn·Wkᵀ, xn·Wvᵀ
//!   rotate q and k at each token's absolute position; append k, v to the layer's cache
//!   att[token, head] = Σⱼ softmax(q·kⱼ/√hd)ⱼ · vⱼ  over the cached entries 0..=its own
//!   x += att·Woᵀ
//!   xn = rmsnorm(x);   x += (silu(xn·W1ᵀ) ⊙ xn·W3ᵀ)·W2ᵀ
//! ```
//!
//! Products with few rows (decoding) use the streaming small-M kernel, with W's rows split over
//! threads when W is large; the prefill's many rows go to `sgemm`.

use std::ops::Range;

use rayon::prelude::*;

use super::cache::{KvCache, LayerCache};
use super::transformer::{ExitHead, LegoTransformer};
use crate::error::{Error, Result};
use crate::kernels::gemm::{SMALL_M, SPLIT_MIN_WEIGHTS, matmul_xwt_split_above, sgemm};
use crate::kernels::parallel::worth_splitting;
use crate::kernels::simd;
use crate::ops::rope::{rope_tables, rotate};
use crate::ops::unary::sigmoid;
use crate::tensor::Tensor;

/// Models with fewer weights than this (64 MiB of f32) decode on one thread (see
/// [`Workspace::new`]).
pub const DECODE_SPLIT_MODEL_WEIGHTS: usize = 1 << 24;

/// Every buffer one decoding step needs, allocated once for up to `capacity` token rows.
pub struct Workspace {
    /// Token rows the buffers hold.
    capacity: usize,
    dim: usize,
    hidden: usize,
    vocab: usize,
    pub(crate) max_seq_len: usize,
    heads: usize,
    /// The residual stream, `[rows, D]`.
    pub x: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    att: Vec<f32>,
    delta: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Attention scores, one `max_seq_len` row per (token, head).
    scores: Vec<f32>,
    /// The small-M kernel's transposed output.
    pub(crate) transposed: Vec<f32>,
    /// Logits, `[rows, V]`.
    pub logits: Vec<f32>,
    /// One row of probabilities, `[V]` (the exit check's softmax).
    pub(crate) probs: Vec<f32>,
    /// The absolute position of the first new token of each row in the current step.
    positions: Vec<usize>,
    /// Weight matrices at least this large are split across threads when decoding (see
    /// [`Workspace::new`]).
    pub(crate) split_above: usize,
    /// RoPE cos / sin for every position `0..max_seq_len`, `[position][head_dim / 2]`.
    pub(crate) rope_cos: Vec<f32>,
    pub(crate) rope_sin: Vec<f32>,
}

impl Workspace {
    /// Buffers for steps of up to `capacity` token rows of `model`.
    pub fn new(model: &LegoTransformer, capacity: usize) -> Workspace {
        let c = &model.config;
        let positions: Vec<usize> = (0..c.max_seq_len).collect();
        let (rope_cos, rope_sin) = rope_tables(&positions, c.head_dim(), c.rope_theta);
        // Splitting a product across threads pays only if the other thread stays busy: a rayon
        // worker that sleeps between two splits takes longer to wake than a small product
        // takes. Measured at batch 1 and 8 on 2 cores: config S (17 MB of weights a token)
        // decodes 25 % faster with no split at all, config M (118 MB) 17-35 % faster with every
        // product of 1 MiB and more split. So small models decode on one thread.
        let weights_per_token =
            c.num_layers * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_hidden) + c.vocab_size * c.dim;
        let split_above =
            if weights_per_token >= DECODE_SPLIT_MODEL_WEIGHTS { SPLIT_MIN_WEIGHTS } else { usize::MAX };
        let mut ws = Workspace {
            split_above,
            capacity: 0,
            dim: c.dim,
            hidden: c.ffn_hidden,
            vocab: c.vocab_size,
            max_seq_len: c.max_seq_len,
            heads: c.num_heads,
            x: Vec::new(),
            xn: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            delta: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            scores: Vec::new(),
            transposed: Vec::new(),
            logits: Vec::new(),
            probs: vec![0.0; c.vocab_size],
            positions: Vec::new(),
            rope_cos,
            rope_sin,
        };
        ws.reserve(capacity);
        ws
    }

    /// Makes room for `rows` token rows (a no-op when there is room already).
    pub fn reserve(&mut self, rows: usize) {
        if rows <= self.capacity {
            return;
        }
        let (d, f, v) = (self.dim, self.hidden, self.vocab);
        for (buf, width) in [
            (&mut self.x, d),
            (&mut self.xn, d),
            (&mut self.q, d),
            (&mut self.k, d),
            (&mut self.v, d),
            (&mut self.att, d),
            (&mut self.delta, d),
            (&mut self.gate, f),
            (&mut self.up, f),
            (&mut self.logits, v),
        ] {
            buf.resize(rows * width, 0.0);
        }
        self.scores.resize(rows * self.heads * self.max_seq_len, 0.0);
        self.transposed.resize(SMALL_M.min(rows) * d.max(f).max(v), 0.0);
        self.positions.resize(rows, 0);
        self.capacity = rows;
    }
}

/// `out = x·Wᵀ` for `m` rows of `x` (`[m, k]`) and `W` (`[n, k]`): the small-M kernel for few
/// rows, `sgemm` for many. Allocates nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    transposed: &mut [f32],
    split_above: usize,
) {
    let (x, out) = (&x[..m * k], &mut out[..m * n]);
    if m == 1 {
        matmul_xwt_split_above(x, 1, k, w, out, split_above);
    } else if m <= SMALL_M {
        let t = &mut transposed[..n * m];
        matmul_xwt_split_above(x, m, k, w, t, split_above);
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = t[j * m + i];
            }
        }
    } else {
        sgemm(m, k, n, 1.0, x, k, 1, w, 1, k, 0.0, out, n);
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `out`.
fn rmsnorm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], dim: usize) {
    let rows = x.len() / dim;
    if worth_splitting(rows * dim * 4) {
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, r)| {
            simd::rmsnorm(r, weight, eps, o);
        });
    } else {
        for (o, r) in out.chunks_mut(dim).zip(x.chunks(dim)) {
            simd::rmsnorm(r, weight, eps, o);
        }
    }
}

/// Which rows of the cache a step works on, and how many new tokens each brings.
pub struct Step<'a> {
    /// The cache row of each row of `x` (rows of `x` hold `t` tokens each, in this order).
    pub cache_rows: &'a [usize],
    /// New tokens per row.
    pub t: usize,
}

impl LegoTransformer {
    /// Runs layers `range` on the residual stream `ws.x` (`[rows·t, D]`) of a step, reading and
    /// appending to `cache`.
    ///
    /// Positions: a step that starts at layer 0 brings new tokens, at the row's next position
    /// `cache.positions[row]`, which it then advances by `t`; a step that starts higher carries
    /// tokens that already went through layer 0 (so their positions are `positions − t`).
    pub fn run_cached(&self, range: Range<usize>, step: &Step, cache: &mut KvCache, ws: &mut Workspace) {
        let t = step.t;
        let m = step.cache_rows.len() * t;
        assert!(m <= ws.capacity, "run_cached: {m} token rows but the workspace holds {}", ws.capacity);
        for (i, &row) in step.cache_rows.iter().enumerate() {
            let p = cache.positions[row];
            ws.positions[i] = if range.start == 0 {
                p
            } else {
                assert!(
                    p >= t,
                    "run_cached: layers {range:?} of row {row} need its tokens to have passed layer 0 first"
                );
                p - t
            };
        }
        for l in range.clone() {
            self.count_layer_call(l);
            self.layer_step(l, step, cache.layer_mut(l), ws);
        }
        if range.start == 0 {
            for &row in step.cache_rows {
                cache.positions[row] += t;
            }
        }
    }

    /// One layer of a step (see the module doc).
    fn layer_step(&self, l: usize, step: &Step, cache: &mut LayerCache, ws: &mut Workspace) {
        let c = &self.config;
        let (d, f, heads, hd) = (c.dim, c.ffn_hidden, c.num_heads, c.head_dim());
        let (t, max_seq) = (step.t, ws.max_seq_len);
        let m = step.cache_rows.len() * t;
        let layer = &self.layers[l];
        let (attn, ffn) = (&layer.attention, &layer.feed_forward);
        let half = hd / 2;

        // Attention: normalise, project, rotate, append to the cache.
        rmsnorm_rows(&ws.x[..m * d], &layer.attention_norm.weight.data(), c.norm_eps, &mut ws.xn[..m * d], d);
        linear(&ws.xn, m, d, &attn.wq.weight.data(), d, &mut ws.q, &mut ws.transposed, ws.split_above);
        linear(&ws.xn, m, d, &attn.wk.weight.data(), d, &mut ws.k, &mut ws.transposed, ws.split_above);
        linear(&ws.xn, m, d, &attn.wv.weight.data(), d, &mut ws.v, &mut ws.transposed, ws.split_above);
        for (r, &row) in step.cache_rows.iter().enumerate() {
            let len = cache.len[row];
            assert!(
                len + t <= max_seq,
                "run_cached: row {row} of layer {l} would hold {} > max_seq_len {max_seq} entries",
                len + t
            );
            for i in 0..t {
                let pos = ws.positions[r] + i;
                let (cos, sin) =
                    (&ws.rope_cos[pos * half..(pos + 1) * half], &ws.rope_sin[pos * half..(pos + 1) * half]);
                let tok = (r * t + i) * d;
                for h in 0..heads {
                    rotate(&mut ws.q[tok + h * hd..tok + (h + 1) * hd], cos, sin);
                    rotate(&mut ws.k[tok + h * hd..tok + (h + 1) * hd], cos, sin);
                }
                let dst = (row * max_seq + len + i) * d;
                cache.k[dst..dst + d].copy_from_slice(&ws.k[tok..tok + d]);
                cache.v[dst..dst + d].copy_from_slice(&ws.v[tok..tok + d]);
            }
        }

        // Each (token, head) attends over its row's cached entries up to and including itself.
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, kc, vc, lens) = (&ws.q, &cache.k, &cache.v, &cache.len);
        let attend = |idx: usize, out: &mut [f32], scores: &mut [f32]| {
            let (token, h) = (idx / heads, idx % heads);
            let (r, i) = (token / t, token % t);
            let row = step.cache_rows[r];
            let visible = lens[row] + i + 1;
            let qh = &q[token * d + h * hd..token * d + (h + 1) * hd];
            // This head's slice of every cached position of the row: stride D apart.
            let base = row * max_seq * d + h * hd;
            let span = (visible - 1) * d + hd;
            let (keys, values) = (&kc[base..base + span], &vc[base..base + span]);
            simd::attend(qh, keys, values, d, visible, scale, scores, out);
        };
        let att = &mut ws.att[..m * d];
        let scores = &mut ws.scores[..m * heads * max_seq];
        let work = m * heads * (cache.len[step.cache_rows[0]] + t) * hd * 4;
        // Decoding one token attends over a few thousand cached floats per head: microseconds,
        // not worth waking a second thread for (see `SPLIT_MIN_WEIGHTS`). Prefill splits.
        if worth_splitting(work) && work >= SPLIT_MIN_WEIGHTS * 4 {
            att.par_chunks_mut(hd)
                .zip(scores.par_chunks_mut(max_seq))
                .enumerate()
                .for_each(|(idx, (o, s))| attend(idx, o, s));
        } else {
            att.chunks_mut(hd)
                .zip(scores.chunks_mut(max_seq))
                .enumerate()
                .for_each(|(idx, (o, s))| attend(idx, o, s));
        }
        for &row in step.cache_rows {
            cache.len[row] += t;
        }
        linear(&ws.att, m, d, &attn.wo.weight.data(), d, &mut ws.delta, &mut ws.transposed, ws.split_above);
        ws.x[..m * d].iter_mut().zip(&ws.delta[..m * d]).for_each(|(x, y)| *x += y);

        // MLP: x += W2·(silu(W1·xn) ⊙ W3·xn).
        rmsnorm_rows(&ws.x[..m * d], &layer.ffn_norm.weight.data(), c.norm_eps, &mut ws.xn[..m * d], d);
        linear(&ws.xn, m, d, &ffn.w1.weight.data(), f, &mut ws.gate, &mut ws.transposed, ws.split_above);
        linear(&ws.xn, m, d, &ffn.w3.weight.data(), f, &mut ws.up, &mut ws.transposed, ws.split_above);
        ws.gate[..m * f].iter_mut().zip(&ws.up[..m * f]).for_each(|(g, u)| *g = *g * sigmoid(*g) * u);
        linear(&ws.gate, m, f, &ffn.w2.weight.data(), d, &mut ws.delta, &mut ws.transposed, ws.split_above);
        ws.x[..m * d].iter_mut().zip(&ws.delta[..m * d]).for_each(|(x, y)| *x += y);
    }

    /// Logits of `head` for the hidden states in `ws.x` at the given token rows, into
    /// `ws.logits` (`[rows.len(), V]`, in the order given).
    pub fn logits_into(
        &self,
        head: &ExitHead,
        token_rows: impl Iterator<Item = usize>,
        ws: &mut Workspace,
    ) -> usize {
        let d = self.config.dim;
        let mut n = 0;
        // Gather the rows first (they may be spread out), normalising as we go.
        let w = head.norm.weight.data();
        for tok in token_rows {
            simd::rmsnorm(&ws.x[tok * d..(tok + 1) * d], &w, head.norm.eps, &mut ws.xn[n * d..(n + 1) * d]);
            n += 1;
        }
        linear(
            &ws.xn,
            n,
            d,
            &head.output.weight.data(),
            self.config.vocab_size,
            &mut ws.logits,
            &mut ws.transposed,
            ws.split_above,
        );
        n
    }

    /// Copies the embeddings of `ids` into the residual stream `ws.x`.
    pub fn embed_into(&self, ids: &[usize], ws: &mut Workspace) {
        let d = self.config.dim;
        let table = self.tok_embeddings.data();
        for (i, &id) in ids.iter().enumerate() {
            ws.x[i * d..(i + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
        }
    }

    /// **Spec `forward_with_cache(x, past_kv_cache, use_cache)`**: logits `[B, T, V]` for new
    /// tokens `ids` (`[batch, T]` row-major, one row per cache row), attending to what the cache
    /// holds. With `use_cache` the new keys and values stay in the cache; without, the cache is
    /// left as it was. Records no graph.
    pub fn forward_with_cache(
        &self,
        ids: &[usize],
        batch: usize,
        cache: &mut KvCache,
        use_cache: bool,
    ) -> Result<Tensor> {
        check_cache(self, cache, batch)?;
        let start = cache.positions.iter().copied().max().unwrap_or(0);
        let t = self.check_tokens(ids, batch, start)?;
        // Without use_cache, remember only the lengths: the new entries written past them are
        // then simply not part of the cache (no copy of the buffers).
        let saved = (!use_cache).then(|| cache.lengths());
        let mut ws = Workspace::new(self, batch * t);
        self.embed_into(ids, &mut ws);
        let rows: Vec<usize> = (0..batch).collect();
        let step = Step { cache_rows: &rows, t };
        self.run_cached(0..self.layers.len(), &step, cache, &mut ws);
        self.logits_into(&self.head, 0..batch * t, &mut ws);
        if let Some(saved) = saved {
            cache.set_lengths(saved);
        }
        let v = self.config.vocab_size;
        Ok(Tensor::from_vec(ws.logits[..batch * t * v].to_vec(), &[batch, t, v]))
    }

    /// **Spec `forward_with_cache_partial(h, cache, start, end)`**: hidden states `[B, T, D]`
    /// after layers `start..end`, from hidden states `h` entering layer `start`, reading and
    /// appending to those layers' caches. A call starting at layer 0 brings new tokens (at each
    /// row's next position); a later one continues tokens that already passed layer 0.
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
        check_cache(self, cache, batch)?;
        for row in 0..batch {
            let len = (start..end).map(|l| cache.layer(l).len[row]).max().unwrap_or(0);
            if len + t > self.config.max_seq_len {
                return Err(Error::Input(format!(
                    "row {row}: {t} more tokens exceed max_seq_len {}",
                    self.config.max_seq_len
                )));
            }
            if start > 0 && cache.positions[row] < t {
                return Err(Error::Input(format!(
                    "row {row}: layers {start}.. need tokens that went through layer 0 first"
                )));
            }
        }
        let mut ws = Workspace::new(self, batch * t);
        ws.x[..batch * t * d].copy_from_slice(&h.data());
        let rows: Vec<usize> = (0..batch).collect();
        self.run_cached(start..end, &Step { cache_rows: &rows, t }, cache, &mut ws);
        Ok(Tensor::from_vec(ws.x[..batch * t * d].to_vec(), &[batch, t, d]))
    }
}

/// Checks that a cache was made for this model and batch.
fn check_cache(model: &LegoTransformer, cache: &KvCache, batch: usize) -> Result<()> {
    let c = &model.config;
    if cache.batch != batch
        || cache.dim != c.dim
        || cache.max_seq_len != c.max_seq_len
        || cache.upper.first_layer != c.exit_layer
        || cache.lower.layers.len() + cache.upper.layers.len() != c.num_layers
    {
        return Err(Error::Input(format!(
            "the KV cache (batch {}, dim {}, {} + {} layers) does not fit this model and batch (batch {batch}, dim {}, {} + {} layers)",
            cache.batch,
            cache.dim,
            cache.lower.layers.len(),
            cache.upper.layers.len(),
            c.dim,
            c.exit_layer,
            c.num_layers - c.exit_layer
        )));
    }
    Ok(())
}
