//! One decoder layer as **one job of the decode team**: every thread takes its share of each
//! step of the layer and waits for the others only where it needs their results.
//!
//! A layer for the `m` new tokens of a step (see [`super::decoder`] for the maths) has five
//! steps. Each thread (a *part*, `p` of `P`) does its share of each, then meets the others at a
//! barrier ([`Gang::sync`]) before the next step reads what they wrote:
//!
//! ```text
//! step  what part p does                                             shares by       then
//! 1     xn = rmsnorm(x) (all of it, into its own buffer); q, k, v    heads           sync
//!       of its heads; RoPE on them; their keys and values into the
//!       cache entries reserved for the step
//! 2     attention of its heads, every token                         heads           sync
//! 3     x += att·Woᵀ, its rows of Wo (columns of x)                  rows of Wo      sync
//! 4     xn = rmsnorm(x) (all, own buffer); silu(xn·W1ᵀ) ⊙ xn·W3ᵀ,    rows of W1, W3  sync
//!       its rows of W1 and W3 (columns of the hidden state)
//! 5     x += hidden·W2ᵀ, its rows of W2 (columns of x)               rows of W2      (job ends)
//! ```
//!
//! So a layer costs one hand-off and four barriers, where one hand-off per product (and the
//! norms, RoPE and residual adds on the calling thread while the others wait) cost several
//! times more on two cores: `cargo bench --bench kernels` times a token's products both ways
//! ("decode step hand-offs" against "decode step one job").
//!
//! **The same numbers for any `P`.** Every output element is computed whole by one part with
//! the same kernel and the same summation order as with one thread: products by rows of W
//! through [`simd::matmul_xwt`], `BLOCK` rows of `x` at a time, attention by (token, head), norms
//! row by row; the shares only decide *who* computes an element. So 1 or 2 threads, and a row
//! alone or in a batch, give the same bits (tested in `tests/decoder.rs`).
//!
//! The buffers the parts share are [`SharedBuf`]s: in each step a part writes only its own
//! columns (or its own heads' pairs), and reads whole buffers only after the barrier that ends
//! the step that wrote them. Each `unsafe` block below says which of the two it relies on.

use super::cache::LayerCache;
use crate::kernels::matvec::BLOCK;
use crate::kernels::simd;
use crate::kernels::team::{Gang, SharedBuf, Team, part_rows};
use crate::ops::rope::rotate;

/// Rows of W a part's share of a product is a multiple of (as in [`crate::kernels::matvec`]:
/// whole tiles of the kernel, whole cache lines of output).
const ALIGN: usize = 16;

/// A layer's weights, as plain slices: the norms `[D]`; `wq`, `wk`, `wv`, `wo` `[D, D]`; `w1`,
/// `w3` `[F, D]`; `w2` `[D, F]`.
pub(super) struct LayerWeights<'a> {
    pub attention_norm: &'a [f32],
    pub wq: &'a [f32],
    pub wk: &'a [f32],
    pub wv: &'a [f32],
    pub wo: &'a [f32],
    pub ffn_norm: &'a [f32],
    pub w1: &'a [f32],
    pub w3: &'a [f32],
    pub w2: &'a [f32],
}

/// The sizes a layer step needs.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub dim: usize,
    pub ffn_hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    /// Tokens in the step.
    pub m: usize,
    /// Tokens the workspace holds (the stride between the parts' `xn` buffers).
    pub capacity: usize,
}

/// The step's rows and tokens (as the decoder's `StepRows` holds them): per step row its cache
/// row, its first token and its token count; per token its step row and absolute position.
pub(super) struct StepTokens<'a> {
    pub rows: &'a [usize],
    pub first: &'a [usize],
    pub counts: &'a [usize],
    pub token_row: &'a [usize],
    pub token_pos: &'a [usize],
}

impl StepTokens<'_> {
    /// Token `t`'s cache row, and how many of its row's new tokens come after it in the step.
    fn place(&self, t: usize) -> (usize, usize) {
        let r = self.token_row[t];
        (self.rows[r], self.first[r] + self.counts[r] - 1 - t)
    }
}

/// The workspace buffers a layer step reads and writes (shapes in [`super::decoder`]'s
/// `Workspace`): `xn` and `scratch` hold one region per part.
pub(super) struct LayerBuffers<'a> {
    pub x: &'a mut [f32],
    pub xn: &'a mut [f32],
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub att: &'a mut [f32],
    pub hidden: &'a mut [f32],
    pub scores: &'a mut [f32],
    pub scratch: &'a mut [f32],
    pub rope_cos: &'a [f32],
    pub rope_sin: &'a [f32],
}

/// Scratch each part needs: one `BLOCK`-row block of its widest products (`W1` and `W3` side
/// by side, or a `[D]`-wide share), transposed.
pub(super) fn part_scratch_len(dim: usize, ffn_hidden: usize) -> usize {
    BLOCK * dim.max(2 * ffn_hidden)
}

/// Runs one layer over the step's `dims.m` tokens on `parts` threads of `team` (see the module
/// doc). The step's entries in `cache` must be reserved already (`LayerCache::reserve`, in
/// token order); their keys and values are written here.
pub(super) fn run_layer(
    team: &Team,
    parts: usize,
    dims: Dims,
    w: &LayerWeights,
    tokens: &StepTokens,
    b: LayerBuffers,
    cache: &mut LayerCache,
) {
    let Dims { dim: d, ffn_hidden: f, heads, head_dim: hd, norm_eps: eps, m, capacity } = dims;
    let (max_seq, half, scale) = (cache.max_seq_len, hd / 2, 1.0 / (hd as f32).sqrt());
    let (rope_cos, rope_sin) = (b.rope_cos, b.rope_sin);
    let scratch_len = part_scratch_len(d, f);
    let (cache_len, cache_k, cache_v) =
        (&cache.len, SharedBuf::new(&mut cache.k), SharedBuf::new(&mut cache.v));
    let (x, xn, q, k, v) = (
        SharedBuf::new(b.x),
        SharedBuf::new(b.xn),
        SharedBuf::new(b.q),
        SharedBuf::new(b.k),
        SharedBuf::new(b.v),
    );
    let (att, hidden, scores, scratch) = (
        SharedBuf::new(b.att),
        SharedBuf::new(b.hidden),
        SharedBuf::new(b.scores),
        SharedBuf::new(b.scratch),
    );

    team.run_together(parts, &|g: &Gang| {
        let (p, parts) = (g.part, g.parts);
        // SAFETY (both): part p's own regions of the per-part buffers; no other part uses them.
        let xn = unsafe { xn.part_mut(p * capacity * d..p * capacity * d + m * d) };
        let scratch = unsafe { scratch.part_mut(p * scratch_len..(p + 1) * scratch_len) };

        // 1. Norm; q, k, v of this part's heads; RoPE; keys and values into the cache.
        // SAFETY: x is written only in steps 3 and 5, after barriers every part passes after this read.
        rmsnorm_rows(unsafe { x.read(0..m * d) }, w.attention_norm, eps, xn, d);
        let my_heads = part_rows(heads, parts, p, 1);
        let cols = my_heads.start * hd..my_heads.end * hd;
        for (weights, out) in [(w.wq, &q), (w.wk, &k), (w.wv, &v)] {
            // SAFETY: columns `cols` of q, k, v are this part's alone in step 1.
            product(xn, m, d, &weights[cols.start * d..cols.end * d], scratch, Into::Write, |t| unsafe {
                out.part_mut(t * d + cols.start..t * d + cols.end)
            });
        }
        for t in 0..m {
            let pos = tokens.token_pos[t];
            let (cos, sin) =
                (&rope_cos[pos * half..(pos + 1) * half], &rope_sin[pos * half..(pos + 1) * half]);
            // The token's reserved cache entry: the row's last `later + 1` entries are this
            // step's, in token order.
            let (row, later) = tokens.place(t);
            let entry = row * max_seq + cache_len[row] - 1 - later;
            for h in my_heads.clone() {
                let at = t * d + h * hd;
                // SAFETY: head h is this part's in step 1 (of q, k, v and of the cache entry).
                let (qh, kh) = unsafe { (q.part_mut(at..at + hd), k.part_mut(at..at + hd)) };
                rotate(qh, cos, sin);
                rotate(kh, cos, sin);
                let to = entry * d + h * hd;
                unsafe { cache_k.part_mut(to..to + hd) }.copy_from_slice(kh);
                unsafe { cache_v.part_mut(to..to + hd) }.copy_from_slice(unsafe { v.read(at..at + hd) });
            }
        }
        g.sync();

        // 2. Attention of this part's heads, every token, over its row's entries up to itself.
        for t in 0..m {
            let (row, later) = tokens.place(t);
            let visible = cache_len[row] - later;
            let base = row * max_seq * d;
            let span = (visible - 1) * d + hd;
            for h in my_heads.clone() {
                let pair = t * heads + h;
                // SAFETY: the cache and q were written in step 1, before the barrier; the pair
                // (t, h) of att and scores is this part's alone.
                let (keys, values, qh) = unsafe {
                    (
                        cache_k.read(base + h * hd..base + h * hd + span),
                        cache_v.read(base + h * hd..base + h * hd + span),
                        q.read(t * d + h * hd..t * d + (h + 1) * hd),
                    )
                };
                let out = unsafe { att.part_mut(t * d + h * hd..t * d + (h + 1) * hd) };
                let sc = unsafe { scores.part_mut(pair * max_seq..(pair + 1) * max_seq) };
                simd::attend(qh, keys, values, d, visible, scale, sc, out);
            }
        }
        g.sync();

        // 3. x += att·Woᵀ, this part's rows of Wo.
        let rows_o = part_rows(d, parts, p, ALIGN);
        // SAFETY: att was finished in step 2; columns rows_o of x are this part's in step 3.
        let att_all = unsafe { att.read(0..m * d) };
        product(att_all, m, d, &w.wo[rows_o.start * d..rows_o.end * d], scratch, Into::Add, |t| unsafe {
            x.part_mut(t * d + rows_o.start..t * d + rows_o.end)
        });
        g.sync();

        // 4. Norm; silu(xn·W1ᵀ) ⊙ xn·W3ᵀ for this part's rows of W1 and W3.
        // SAFETY: x was finished in step 3 and is next written in step 5, after a barrier.
        rmsnorm_rows(unsafe { x.read(0..m * d) }, w.ffn_norm, eps, xn, d);
        let rows_f = part_rows(f, parts, p, ALIGN);
        let (w1, w3) = (&w.w1[rows_f.start * d..rows_f.end * d], &w.w3[rows_f.start * d..rows_f.end * d]);
        // SAFETY: columns rows_f of the hidden state are this part's in step 4.
        swiglu_product(xn, m, d, w1, w3, scratch, |t| unsafe {
            hidden.part_mut(t * f + rows_f.start..t * f + rows_f.end)
        });
        g.sync();

        // 5. x += hidden·W2ᵀ, this part's rows of W2.
        // SAFETY: the hidden state was finished in step 4; columns rows_o of x are this part's.
        let hidden_all = unsafe { hidden.read(0..m * f) };
        product(hidden_all, m, f, &w.w2[rows_o.start * f..rows_o.end * f], scratch, Into::Add, |t| unsafe {
            x.part_mut(t * d + rows_o.start..t * d + rows_o.end)
        });
    });
}

/// RMSNorm of each `dim`-wide row of `x` into `out`, row by row.
fn rmsnorm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], dim: usize) {
    for (o, r) in out.chunks_mut(dim).zip(x.chunks(dim)) {
        simd::rmsnorm(r, weight, eps, o);
    }
}

/// How a product's outputs reach their destination.
#[derive(Clone, Copy, PartialEq)]
enum Into {
    /// `dest = x·Wᵀ`.
    Write,
    /// `dest += x·Wᵀ` (a residual add).
    Add,
}

/// `x·Wᵀ` for the `m` rows of `x` (`[m, k]`) and a share `w` (`[n, k]`) of a weight matrix's
/// rows: `BLOCK` rows of `x` at a time through the streaming kernel into `scratch` (`[n, rows]`,
/// transposed), then into `dest(token)` (`[n]`, the token's share of the output row).
fn product<'o>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    scratch: &mut [f32],
    into: Into,
    mut dest: impl FnMut(usize) -> &'o mut [f32],
) {
    let n = w.len() / k;
    if n == 0 {
        return;
    }
    for r0 in (0..m).step_by(BLOCK) {
        let rows = BLOCK.min(m - r0);
        let out = &mut scratch[..n * rows];
        simd::matmul_xwt(&x[r0 * k..(r0 + rows) * k], rows, k, w, out);
        for r in 0..rows {
            let o = dest(r0 + r);
            let column = out.iter().skip(r).step_by(rows);
            match into {
                Into::Write => o.iter_mut().zip(column).for_each(|(o, y)| *o = *y),
                Into::Add => o.iter_mut().zip(column).for_each(|(o, y)| *o += y),
            }
        }
    }
}

/// `silu(x·W1ᵀ) ⊙ x·W3ᵀ` for shares `w1`, `w3` (`[n, k]` each) of the MLP's matrices, into
/// `dest(token)` (`[n]`), as [`product`] does one product.
fn swiglu_product<'o>(
    x: &[f32],
    m: usize,
    k: usize,
    w1: &[f32],
    w3: &[f32],
    scratch: &mut [f32],
    mut dest: impl FnMut(usize) -> &'o mut [f32],
) {
    let n = w1.len() / k;
    if n == 0 {
        return;
    }
    for r0 in (0..m).step_by(BLOCK) {
        let rows = BLOCK.min(m - r0);
        let (gate, up) = scratch[..2 * n * rows].split_at_mut(n * rows);
        let xb = &x[r0 * k..(r0 + rows) * k];
        simd::matmul_xwt(xb, rows, k, w1, gate);
        simd::matmul_xwt(xb, rows, k, w3, up);
        // Elementwise, so the transposed layout does not matter.
        simd::swiglu_in_place(gate, up);
        for r in 0..rows {
            let o = dest(r0 + r);
            o.iter_mut().zip(gate.iter().skip(r).step_by(rows)).for_each(|(o, g)| *o = *g);
        }
    }
}
