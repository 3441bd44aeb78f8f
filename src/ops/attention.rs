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
//! reading Q, K and V in place through strides (row stride `heads·head_dim`), no copies.
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

use rayon::prelude::*;

use crate::kernels::gemm::sgemm;
use crate::kernels::parallel::worth_splitting;
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};

/// Runs `f(b, h)` for every (batch, head) pair, in parallel when the work is large, and
/// collects the results in (b, h) order.
fn per_head<R: Send>(
    batch: usize,
    heads: usize,
    work: usize,
    f: impl Fn(usize, usize) -> R + Sync + Send,
) -> Vec<R> {
    if worth_splitting(work) {
        (0..batch * heads).into_par_iter().map(|i| f(i / heads, i % heads)).collect()
    } else {
        (0..batch * heads).map(|i| f(i / heads, i % heads)).collect()
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
        // s = 1/√hd keeps the scores' variance near 1 whatever the head width.
        let scale = 1.0 / (hd as f32).sqrt();
        let row = heads * hd; // stride between consecutive positions of one head
        let (qd, kd, vd) = (q.data(), k.data(), v.data());
        let work = 4 * q_len * kv_len * hd;

        // Per head: the probabilities P (kept for the backward) and the output O.
        let results = per_head(batch, heads, batch * heads * work, |b, h| {
            let q0 = (b * q_len * heads + h) * hd;
            let k0 = (b * kv_len * heads + h) * hd;
            let mut p = pool::take(q_len * kv_len); // sgemm with β = 0 writes every element
            // S = s·Q·Kᵀ: Q read with row stride `row`, Kᵀ by swapping K's strides.
            sgemm(q_len, hd, kv_len, scale, &qd[q0..], row, 1, &kd[k0..], 1, row, 0.0, &mut p, kv_len);
            // P = softmax over the visible keys of each row; the masked ones are exactly 0.
            for (i, pr) in p.chunks_mut(kv_len).enumerate() {
                let visible = prefix + i + 1;
                simd::softmax_in_place(&mut pr[..visible]);
                pr[visible..].fill(0.0);
            }
            // O = P·V   [q_len, hd]
            let mut o = vec![0.0f32; q_len * hd];
            sgemm(q_len, kv_len, hd, 1.0, &p, kv_len, 1, &vd[k0..], row, 1, 0.0, &mut o, hd);
            (p, o)
        });
        // Heads back side by side: [batch, q_len, heads, hd].
        let mut out = pool::take(batch * q_len * row); // every head scatters its block
        for (i, (_, o)) in results.iter().enumerate() {
            scatter_head(&mut out, o, i / heads, i % heads, q_len, heads, hd);
        }
        let probs: Vec<pool::Recycled> = results.into_iter().map(|(p, _)| pool::Recycled(p)).collect();

        Tensor::from_op(out, &qs, "attention", &[q, k, v], move |g: &[f32]| {
            let grads = per_head(batch, heads, 2 * batch * heads * work, |b, h| {
                let p = &probs[b * heads + h];
                let q0 = (b * q_len * heads + h) * hd;
                let k0 = (b * kv_len * heads + h) * hd;
                // dV = Pᵀ·G   [kv_len, hd]
                let mut dv = vec![0.0f32; kv_len * hd];
                sgemm(kv_len, q_len, hd, 1.0, p, 1, kv_len, &g[q0..], row, 1, 0.0, &mut dv, hd);
                // dP = G·Vᵀ   [q_len, kv_len]
                let mut ds = pool::take(q_len * kv_len);
                sgemm(q_len, hd, kv_len, 1.0, &g[q0..], row, 1, &vd[k0..], 1, row, 0.0, &mut ds, kv_len);
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place.
                for (dr, pr) in ds.chunks_mut(kv_len).zip(p.chunks(kv_len)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(d, &pp)| *d = pp * (*d - dot));
                }
                // dQ = s·dS·K   [q_len, hd];  dK = s·dSᵀ·Q   [kv_len, hd]
                let mut dq = vec![0.0f32; q_len * hd];
                sgemm(q_len, kv_len, hd, scale, &ds, kv_len, 1, &kd[k0..], row, 1, 0.0, &mut dq, hd);
                let mut dk = vec![0.0f32; kv_len * hd];
                sgemm(kv_len, q_len, hd, scale, &ds, 1, kv_len, &qd[q0..], row, 1, 0.0, &mut dk, hd);
                pool::recycle(ds);
                (dq, dk, dv)
            });
            let mut dq = pool::take(batch * q_len * row);
            let mut dk = pool::take(batch * kv_len * row);
            let mut dv = pool::take(batch * kv_len * row);
            for (i, (gq, gk, gv)) in grads.iter().enumerate() {
                let (b, h) = (i / heads, i % heads);
                scatter_head(&mut dq, gq, b, h, q_len, heads, hd);
                scatter_head(&mut dk, gk, b, h, kv_len, heads, hd);
                scatter_head(&mut dv, gv, b, h, kv_len, heads, hd);
            }
            vec![Some(dq), Some(dk), Some(dv)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_twins, values};
    use crate::tensor::Tensor;

    /// Attention written out with small ops (matmul, softmax), the slow twin of the fused op.
    fn attention_slow(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (q_len, kv_len, hd) = (q.dim(1), k.dim(1), q.dim(3));
        let prefix = kv_len - q_len;
        let qh = q.permute(&[0, 2, 1, 3]); // [B, H, Tq, hd]
        let kh = k.permute(&[0, 2, 1, 3]);
        let vh = v.permute(&[0, 2, 1, 3]);
        let s = qh.matmul_t(&kh).mul_scalar(1.0 / (hd as f32).sqrt());
        let mask: Vec<f32> = (0..q_len)
            .flat_map(|i| (0..kv_len).map(move |j| if j <= prefix + i { 0.0 } else { -1e30 }))
            .collect();
        let p = s.add(&Tensor::from_vec(mask, &[q_len, kv_len])).softmax();
        p.matmul(&vh).permute(&[0, 2, 1, 3])
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
    }
}
