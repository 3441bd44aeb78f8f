//! Causal scaled-dot-product attention, fused, with an optional cached prefix.
//!
//! Layout: `q` is `[batch, q_len, heads, head_dim]`, `k` and `v` are
//! `[batch, kv_len, heads, head_dim]` with `kv_len >= q_len`: the first
//! `prefix = kv_len − q_len` key/value positions come from a cache (tokens seen before), the
//! rest belong to the queries themselves. Query i (position `prefix + i`) may look at keys
//! `0 ..= prefix + i`: the causal mask, shifted by the prefix.
//!
//! For each (batch, head), with `s = 1/√head_dim`:
//!
//! ```text
//! S = s · Q·Kᵀ              scores,        [q_len, kv_len]
//! P = softmax(S + mask)     probabilities  (masked entries are exactly 0)
//! O = P·V                   output,        [q_len, head_dim]
//! ```
//!
//! The heads are independent, so they run in parallel; each one's products go to `sgemm`
//! reading Q, K and V in place through strides (row stride `heads·head_dim`), no copies, on
//! the head's own thread ([`sgemm_one_thread`]: a head's products are too small to split
//! again). What a head writes (P, O, and in the backward dQ, dK, dV, dS) is its block of
//! buffers allocated once for all heads (`per_head`).
//!
//! [`sgemm_one_thread`]: crate::kernels::gemm::sgemm_one_thread
//!
//! **Visible keys** ([`Tensor::attention_masked`]). A further mask can hide keys: with
//! `visible` (`[batch, kv_len]`), query i of batch row b sees key j only if j is causal for it
//! and `visible[b·kv_len + j]`, or j is the query's own position (a token always sees itself,
//! so no row is all masked). This is what the upper layers see in TRUE early exit with the
//! `Skip` fill, where a token that exited never enters the upper cache; phase 2 can train the
//! upper layers under the same mask ([`Phase2Mode::SequenceSkip`]). Hidden keys get P = 0
//! exactly, like the causal mask's, so the backward below needs nothing new.
//!
//! [`Phase2Mode::SequenceSkip`]: crate::train::Phase2Mode::SequenceSkip
//!
//! **Backward.** With `G = ∂L/∂O`:
//! `∂L/∂V = Pᵀ·G`; `∂L/∂P = G·Vᵀ`; through the softmax (see [`super::softmax`]),
//! `∂L/∂Sᵢⱼ = Pᵢⱼ·(∂L/∂Pᵢⱼ − Σₗ Pᵢₗ·∂L/∂Pᵢₗ)` (masked entries have P = 0 and get 0);
//! then `∂L/∂Q = s·∂L/∂S·K` and `∂L/∂K = s·(∂L/∂S)ᵀ·Q`.
//!
//! (These are the matmul rules `∂(A·B)/∂A = G·Bᵀ`, `∂(A·B)/∂B = Aᵀ·G` of
//! [`super::matmul`] applied to `O = P·V` and `S = s·Q·Kᵀ`.) P is kept from the forward, one
//! `[q_len, kv_len]` matrix per head: recomputing it would cost the whole forward again.
//!
//! ```
//! use lego::Tensor;
//! // One batch, three tokens, one head of width 2: [batch, seq, heads, head_dim].
//! let q = Tensor::zeros(&[1, 3, 1, 2]); // equal scores: each token averages what it sees
//! let v = Tensor::from_vec(vec![3.0, 0.0, 0.0, 3.0, 3.0, 3.0], &[1, 3, 1, 2]);
//! let out = Tensor::attention(&q, &q, &v).to_vec();
//! // Token 0 sees itself, token 1 tokens 0..=1, token 2 all three (the causal mask).
//! let want = [3.0, 0.0, 1.5, 1.5, 2.0, 2.0];
//! assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
//! ```

use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::gemm::sgemm_one_thread as sgemm;
use crate::kernels::parallel::worth_splitting;
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};

/// Runs `f(i, blocks)` for every (batch, head) pair `i = b·heads + h`, in parallel when the
/// work is large, where `blocks[j]` is pair `i`'s own `sizes[j]`-float piece of `bufs[j]` (each
/// buffer holds one block per pair, side by side). Every buffer is allocated once, on the
/// calling thread, for all pairs: a head allocating its own blocks on a worker thread, freed
/// later on another, made glibc grow and trim the workers' heaps (page faults on both threads,
/// and attention no faster on two threads than on one).
fn per_head<const N: usize>(
    pairs: usize,
    work: usize,
    bufs: [&mut [f32]; N],
    sizes: [usize; N],
    f: impl Fn(usize, [&mut [f32]; N]) + Sync + Send,
) {
    // Each pair's blocks, cut from the buffers (a zero-sized block is an empty slice).
    let mut blocks: Vec<[&mut [f32]; N]> = Vec::with_capacity(pairs);
    let mut rest = bufs;
    for _ in 0..pairs {
        let mut taken: [&mut [f32]; N] = std::array::from_fn(|_| <&mut [f32]>::default());
        for j in 0..N {
            let (block, tail) = std::mem::take(&mut rest[j]).split_at_mut(sizes[j]);
            taken[j] = block;
            rest[j] = tail;
        }
        blocks.push(taken);
    }
    if worth_splitting(work) {
        blocks.into_par_iter().enumerate().for_each(|(i, b)| f(i, b));
    } else {
        blocks.into_iter().enumerate().for_each(|(i, b)| f(i, b));
    }
}

/// Writes a head's `[len, head_dim]` block back into a `[batch, len, heads, head_dim]` buffer.
fn scatter_head(dst: &mut [f32], src: &[f32], b: usize, h: usize, len: usize, heads: usize, hd: usize) {
    for t in 0..len {
        let o = ((b * len + t) * heads + h) * hd;
        dst[o..o + hd].copy_from_slice(&src[t * hd..(t + 1) * hd]);
    }
}

impl Tensor {
    /// Causal attention of `q` over `k`, `v` (see the module doc for shapes, the mask and an
    /// example). Returns `[batch, q_len, heads, head_dim]`.
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        Tensor::attention_masked(q, k, v, None)
    }

    /// [`Tensor::attention`] in which, with `visible` (`[batch, kv_len]`), a query sees only the
    /// visible keys before it, and itself (see the module doc's "Visible keys"). `None` is
    /// plain causal attention.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lego::Tensor;
    /// // Three tokens, one head of width 2; token 1 is hidden from the tokens after it.
    /// let q = Tensor::zeros(&[1, 3, 1, 2]); // equal scores: each token averages what it sees
    /// let v = Tensor::from_vec(vec![3.0, 0.0, 0.0, 3.0, 3.0, 3.0], &[1, 3, 1, 2]);
    /// let visible: Arc<[bool]> = Arc::from(vec![true, false, true]);
    /// let out = Tensor::attention_masked(&q, &q, &v, Some(&visible)).to_vec();
    /// // Token 1 still sees itself; token 2 sees tokens 0 and 2 only.
    /// let want = [3.0, 0.0, 1.5, 1.5, 3.0, 1.5];
    /// assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
    /// ```
    pub fn attention_masked(q: &Tensor, k: &Tensor, v: &Tensor, visible: Option<&Arc<[bool]>>) -> Tensor {
        let (qs, ks) = (q.shape().to_vec(), k.shape().to_vec());
        assert!(
            qs.len() == 4 && ks.len() == 4 && k.shape() == v.shape(),
            "attention: expected q [B, Tq, H, hd] and k, v [B, Tk, H, hd], got q {qs:?}, k {ks:?}, v {:?}",
            v.shape()
        );
        let (batch, q_len, heads, hd) = (qs[0], qs[1], qs[2], qs[3]);
        let kv_len = ks[1];
        assert!(
            ks[0] == batch && ks[2] == heads && ks[3] == hd && kv_len >= q_len,
            "attention: q {qs:?} and k {ks:?} disagree (need the same batch, heads, head_dim, and kv_len >= q_len)"
        );
        let prefix = kv_len - q_len; // cached positions before the first query
        if let Some(m) = visible {
            assert_eq!(
                m.len(),
                batch * kv_len,
                "attention_masked: visible has {} flags, not batch {batch} x kv_len {kv_len}",
                m.len()
            );
        }
        // s = 1/√hd keeps the scores' variance near 1 whatever the head width.
        let scale = 1.0 / (hd as f32).sqrt();
        let row = heads * hd; // stride between consecutive positions of one head
        let (qd, kd, vd) = (q.data(), k.data(), v.data());
        let work = 4 * q_len * kv_len * hd;

        // Per head: the probabilities P (kept for the backward, [q_len, kv_len] a head) and
        // the output O ([q_len, hd] a head), each head's block of one buffer.
        let (pairs, per_p, per_o) = (batch * heads, q_len * kv_len, q_len * hd);
        let mut probs = pool::take(pairs * per_p); // sgemm with β = 0 writes every element
        let mut heads_out = pool::take(pairs * per_o); // likewise
        per_head(pairs, pairs * work, [&mut probs, &mut heads_out], [per_p, per_o], |i, [p, o]| {
            let (b, h) = (i / heads, i % heads);
            let q0 = (b * q_len * heads + h) * hd;
            let k0 = (b * kv_len * heads + h) * hd;
            // S = s·Q·Kᵀ: Q read with row stride `row`, Kᵀ by swapping K's strides.
            sgemm(q_len, hd, kv_len, scale, &qd[q0..], row, 1, &kd[k0..], 1, row, 0.0, p, kv_len);
            // P = softmax over the visible keys of each row; the masked ones are exactly 0.
            for (i, pr) in p.chunks_mut(kv_len).enumerate() {
                let causal = prefix + i + 1; // keys 0..causal; the last is the query's own
                if let Some(m) = visible {
                    // Hidden keys before the query's own: −∞ becomes exactly 0 in the softmax.
                    let keys = &m[b * kv_len..b * kv_len + causal - 1];
                    pr.iter_mut()
                        .zip(keys)
                        .filter(|(_, seen)| !**seen)
                        .for_each(|(s, _)| *s = f32::NEG_INFINITY);
                }
                simd::softmax_in_place(&mut pr[..causal]);
                pr[causal..].fill(0.0);
            }
            // O = P·V   [q_len, hd]
            sgemm(q_len, kv_len, hd, 1.0, p, kv_len, 1, &vd[k0..], row, 1, 0.0, o, hd);
        });
        // Heads back side by side: [batch, q_len, heads, hd].
        let mut out = pool::take(batch * q_len * row); // every head scatters its block
        for i in 0..pairs {
            scatter_head(
                &mut out,
                &heads_out[i * per_o..(i + 1) * per_o],
                i / heads,
                i % heads,
                q_len,
                heads,
                hd,
            );
        }
        pool::recycle(heads_out);
        let probs = pool::Recycled(probs);

        Tensor::from_op(out, &qs, "attention", &[q, k, v], move |g: &[f32]| {
            // Each head's dQ [q_len, hd], dK and dV [kv_len, hd], and dS [q_len, kv_len]
            // (scratch), each head's block of one buffer.
            let (per_q, per_k) = (q_len * hd, kv_len * hd);
            let mut gq = pool::take(pairs * per_q); // every block written by sgemm (β = 0)
            let mut gk = pool::take(pairs * per_k);
            let mut gv = pool::take(pairs * per_k);
            let mut ds_all = pool::take(pairs * per_p);
            let (bufs, sizes) = ([&mut gq[..], &mut gk, &mut gv, &mut ds_all], [per_q, per_k, per_k, per_p]);
            per_head(pairs, 2 * pairs * work, bufs, sizes, |i, [dq, dk, dv, ds]| {
                let (b, h) = (i / heads, i % heads);
                let p = &probs[i * per_p..(i + 1) * per_p];
                let q0 = (b * q_len * heads + h) * hd;
                let k0 = (b * kv_len * heads + h) * hd;
                // dV = Pᵀ·G   [kv_len, hd]
                sgemm(kv_len, q_len, hd, 1.0, p, 1, kv_len, &g[q0..], row, 1, 0.0, dv, hd);
                // dP = G·Vᵀ   [q_len, kv_len]
                sgemm(q_len, hd, kv_len, 1.0, &g[q0..], row, 1, &vd[k0..], 1, row, 0.0, ds, kv_len);
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place.
                for (dr, pr) in ds.chunks_mut(kv_len).zip(p.chunks(kv_len)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(d, &pp)| *d = pp * (*d - dot));
                }
                // dQ = s·dS·K   [q_len, hd];  dK = s·dSᵀ·Q   [kv_len, hd]
                sgemm(q_len, kv_len, hd, scale, ds, kv_len, 1, &kd[k0..], row, 1, 0.0, dq, hd);
                sgemm(kv_len, q_len, hd, scale, ds, 1, kv_len, &qd[q0..], row, 1, 0.0, dk, hd);
            });
            pool::recycle(ds_all);
            let mut dq = pool::take(batch * q_len * row);
            let mut dk = pool::take(batch * kv_len * row);
            let mut dv = pool::take(batch * kv_len * row);
            for i in 0..pairs {
                let (b, h) = (i / heads, i % heads);
                scatter_head(&mut dq, &gq[i * per_q..(i + 1) * per_q], b, h, q_len, heads, hd);
                scatter_head(&mut dk, &gk[i * per_k..(i + 1) * per_k], b, h, kv_len, heads, hd);
                scatter_head(&mut dv, &gv[i * per_k..(i + 1) * per_k], b, h, kv_len, heads, hd);
            }
            for buf in [gq, gk, gv] {
                pool::recycle(buf);
            }
            vec![Some(dq), Some(dk), Some(dv)]
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::ops::gradcheck::{check_gradients, check_twins, values};
    use crate::tensor::Tensor;

    /// Attention written out with small ops (matmul, softmax), the slow twin of the fused op.
    fn attention_slow(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        attention_slow_masked(q, k, v, None)
    }

    /// The same with visible keys: an additive mask `[B, 1, Tq, Tk]`, −1e30 where hidden.
    fn attention_slow_masked(q: &Tensor, k: &Tensor, v: &Tensor, visible: Option<&[bool]>) -> Tensor {
        let (batch, q_len, kv_len, hd) = (q.dim(0), q.dim(1), k.dim(1), q.dim(3));
        let prefix = kv_len - q_len;
        let qh = q.permute(&[0, 2, 1, 3]); // [B, H, Tq, hd]
        let kh = k.permute(&[0, 2, 1, 3]);
        let vh = v.permute(&[0, 2, 1, 3]);
        let s = qh.matmul_t(&kh).mul_scalar(1.0 / (hd as f32).sqrt());
        let seen = |b: usize, i: usize, j: usize| {
            j == prefix + i || (j < prefix + i && visible.is_none_or(|m| m[b * kv_len + j]))
        };
        let mask: Vec<f32> = (0..batch)
            .flat_map(|b| (0..q_len).flat_map(move |i| (0..kv_len).map(move |j| (b, i, j))))
            .map(|(b, i, j)| if seen(b, i, j) { 0.0 } else { -1e30 })
            .collect();
        let p = s.add(&Tensor::from_vec(mask, &[batch, 1, q_len, kv_len])).softmax();
        p.matmul(&vh).permute(&[0, 2, 1, 3])
    }

    /// Visible-key flags for `batch` rows of `kv_len` keys: a fixed, irregular pattern.
    fn some_visible(batch: usize, kv_len: usize) -> Arc<[bool]> {
        (0..batch * kv_len).map(|i| (i * 7 + i / 3) % 5 < 2).collect()
    }

    #[test]
    fn masked_equals_the_slow_twin_and_all_visible_is_plain_attention() {
        for &(b, tq, tk, h, hd) in &[(2, 4, 6, 3, 8), (1, 5, 5, 2, 4), (2, 1, 7, 2, 6), (1, 33, 40, 2, 16)] {
            let (q, kv) = ([b, tq, h, hd], [b, tk, h, hd]);
            let inputs: Vec<Vec<f32>> =
                (0..3).map(|i| values(if i == 0 { tq } else { tk } * b * h * hd, i)).collect();
            let visible = some_visible(b, tk);
            check_twins(
                &[&q, &kv, &kv],
                &inputs,
                |x| Tensor::attention_masked(&x[0], &x[1], &x[2], Some(&visible)),
                |x| attention_slow_masked(&x[0], &x[1], &x[2], Some(&visible)),
                1e-5,
            );
            // Every key visible: the plain causal op, bit for bit.
            let all: Arc<[bool]> = vec![true; b * tk].into();
            let x: Vec<Tensor> =
                (0..3).map(|i| Tensor::from_vec(inputs[i].clone(), if i == 0 { &q } else { &kv })).collect();
            let plain = Tensor::attention(&x[0], &x[1], &x[2]).to_vec();
            assert_eq!(Tensor::attention_masked(&x[0], &x[1], &x[2], Some(&all)).to_vec(), plain);
        }
    }

    #[test]
    #[should_panic(expected = "attention_masked: visible has 5 flags, not batch 1 x kv_len 4")]
    fn masked_panics_on_a_mask_of_the_wrong_size() {
        let x = Tensor::zeros(&[1, 4, 1, 2]);
        Tensor::attention_masked(&x, &x, &x, Some(&Arc::from(vec![true; 5])));
    }

    #[test]
    fn fused_equals_the_slow_twin_with_and_without_prefix() {
        for &(b, tq, tk, h, hd) in &[(2, 4, 6, 3, 8), (1, 5, 5, 2, 4), (2, 1, 7, 2, 6), (1, 33, 40, 2, 16)] {
            let (q, kv) = ([b, tq, h, hd], [b, tk, h, hd]);
            let inputs: Vec<Vec<f32>> =
                (0..3).map(|i| values(if i == 0 { tq } else { tk } * b * h * hd, i)).collect();
            // Values and the gradients of q, k and v.
            check_twins(
                &[&q, &kv, &kv],
                &inputs,
                |x| Tensor::attention(&x[0], &x[1], &x[2]),
                |x| attention_slow(&x[0], &x[1], &x[2]),
                1e-5,
            );
        }
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        // Large enough that the heads run in parallel on two threads.
        let (b, t, h, hd) = (2, 32, 4, 16);
        let n = b * t * h * hd;
        let inputs: Vec<Vec<f32>> = (0..4).map(|i| values(n, i)).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let x: Vec<Tensor> = (0..3)
                    .map(|i| Tensor::from_vec(inputs[i].clone(), &[b, t, h, hd]).requires_grad())
                    .collect();
                let out = Tensor::attention(&x[0], &x[1], &x[2]);
                out.backward_with(inputs[3].clone());
                let mut all = out.to_vec();
                x.iter().for_each(|x| all.extend(x.grad().unwrap()));
                all.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            })
        };
        assert_eq!(run(1), run(2), "attention's output and gradients differ between 1 and 2 threads");
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[2, 4, 3, 8], &[2, 6, 3, 8], &[2, 6, 3, 8]], |x| {
            Tensor::attention(&x[0], &x[1], &x[2])
        });
        check_gradients(&[&[1, 5, 2, 4], &[1, 5, 2, 4], &[1, 5, 2, 4]], |x| {
            Tensor::attention(&x[0], &x[1], &x[2])
        });
        check_gradients(&[&[2, 1, 2, 6], &[2, 7, 2, 6], &[2, 7, 2, 6]], |x| {
            Tensor::attention(&x[0], &x[1], &x[2])
        });
        let visible = some_visible(2, 6);
        check_gradients(&[&[2, 4, 3, 8], &[2, 6, 3, 8], &[2, 6, 3, 8]], |x| {
            Tensor::attention_masked(&x[0], &x[1], &x[2], Some(&visible))
        });
    }
}
