//! Rotary position embedding (RoPE, Su et al. 2021), in Meta's Llama and llama2.c convention.
//!
//! Inside each head, the pairs `(x[2j], x[2j+1])` are rotated by the angle
//! `θⱼ(p) = p · base^(−2j/head_dim)` where `p` is the token's **absolute** position. The dot
//! product of a rotated query at p with a rotated key at p' then depends on p − p' only:
//! attention sees relative positions. (This is the interleaved form, not the "rotate half"
//! form of some other code bases; the two are not interchangeable with the same weights.)
//!
//! With a KV cache, a new token at position `past_len + t` must be rotated by that absolute
//! position, never by `t` alone (the spec's lesson 2): callers pass the offset.
//!
//! **Backward.** Each pair is multiplied by the rotation matrix `R(θ) = [[cos θ, −sin θ],
//! [sin θ, cos θ]]`, a linear map, so `∂L/∂x = R(θ)ᵀ·g`. A rotation is orthogonal, its
//! transpose is its inverse `R(−θ)`: the gradient is rotated back by `−θ`,
//! `dx₀ = g₀·cos θ + g₁·sin θ`, `dx₁ = −g₀·sin θ + g₁·cos θ`. The same code does both
//! directions, with the sine's sign flipped.
//!
//! ```
//! use lego::Tensor;
//! // One head of width 2 at position 1 with base 1: the pair turns by θ = 1 radian.
//! let x = Tensor::from_vec(vec![1.0, 0.0], &[1, 1, 1, 2]); // [batch, seq, heads, head_dim]
//! let y = x.rope(1, 1.0).to_vec();
//! assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[1] - 1f32.sin()).abs() < 1e-6);
//! ```

use std::sync::{Arc, Mutex};

use crate::tensor::{Tensor, pool};

/// The cosine and sine of `θⱼ(p)` for each position in `positions` and each pair `j`,
/// laid out `[position][j]`.
pub fn rope_tables(positions: &[usize], head_dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    // θⱼ = base^(−2j/head_dim), computed in f64 so that large positions keep their precision.
    let freqs: Vec<f64> =
        (0..half).map(|j| (base as f64).powf(-((2 * j) as f64) / head_dim as f64)).collect();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &freq in &freqs {
            let angle = p as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// [`rope_tables`] for positions `0..max_seq_len`: row `p` of each (`p·head_dim/2..`) holds
/// position `p`'s cosines or sines.
#[derive(Debug, PartialEq)]
pub struct RopeTables {
    /// `cos θⱼ(p)`, `[max_seq_len, head_dim / 2]`.
    pub cos: Vec<f32>,
    /// `sin θⱼ(p)`, `[max_seq_len, head_dim / 2]`.
    pub sin: Vec<f32>,
}

/// [`RopeTables`] shared between decoders ([`shared_rope_tables`]).
pub type SharedRopeTables = Arc<RopeTables>;

/// The tables of positions `0..max_seq_len`, computed once per process for each
/// `(max_seq_len, head_dim, base)` and shared after that. A decoder needs them for every
/// generation call, and computing them (two f64 trigonometric calls per position and pair: 4,096
/// at config S) costs more than a decoded token at config T.
pub fn shared_rope_tables(max_seq_len: usize, head_dim: usize, base: f32) -> SharedRopeTables {
    type Key = (usize, usize, u32);
    // A handful of entries at most (one per model shape in use): a list is enough.
    static CACHE: Mutex<Vec<(Key, SharedRopeTables)>> = Mutex::new(Vec::new());
    let key = (max_seq_len, head_dim, base.to_bits());
    // A panic elsewhere while the lock was held cannot leave a half-written entry (entries are
    // pushed whole), so a poisoned lock is still usable.
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, tables)) = cache.iter().find(|(k, _)| *k == key) {
        return Arc::clone(tables);
    }
    let positions: Vec<usize> = (0..max_seq_len).collect();
    let (cos, sin) = rope_tables(&positions, head_dim, base);
    let tables = Arc::new(RopeTables { cos, sin });
    cache.push((key, Arc::clone(&tables)));
    tables
}

/// Rotates one head's vector in place: pair j by the angle whose cos/sin are `cos[j]`, `sin[j]`
/// (`(a, b) ↦ (a·cos − b·sin, a·sin + b·cos)`, the complex product `(a + ib)·e^(iθ)`).
#[inline]
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (j, pair) in x.chunks_exact_mut(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos[j] - b * sin[j];
        pair[1] = a * sin[j] + b * cos[j];
    }
}

impl Tensor {
    /// RoPE on a `[batch, seq, heads, head_dim]` tensor whose token t sits at absolute
    /// position `offset + t`, with frequency base `theta` (10000 in Llama).
    pub fn rope(&self, offset: usize, theta: f32) -> Tensor {
        let seq = self.shape().get(1).copied().unwrap_or(0);
        let positions: Vec<usize> = (0..seq).map(|t| offset + t).collect();
        self.rope_at(&positions, theta)
    }

    /// RoPE with an explicit absolute position for each step of the sequence axis:
    /// `positions.len() == seq`.
    pub fn rope_at(&self, positions: &[usize], theta: f32) -> Tensor {
        let s = self.shape().to_vec();
        assert!(s.len() == 4, "rope: expected [batch, seq, heads, head_dim], got {s:?}");
        let (batch, seq, heads, hd) = (s[0], s[1], s[2], s[3]);
        assert!(hd % 2 == 0, "rope: head_dim {hd} must be even (shape {s:?})");
        assert_eq!(positions.len(), seq, "rope: {} positions for a sequence of {seq}", positions.len());
        // cos/sin of θⱼ(p) for each position of the sequence: [seq, hd/2].
        let (cos, sin) = rope_tables(positions, hd, theta);
        let half = hd / 2;
        // Rotates every head of every token by its position's angles; the forward passes the
        // tables, the backward the same tables with the sine negated.
        let apply = move |x: &[f32], cos: &[f32], sin: &[f32]| -> Vec<f32> {
            let mut out = pool::copy_of(x);
            for b in 0..batch {
                for t in 0..seq {
                    let (c, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                    for h in 0..heads {
                        let o = ((b * seq + t) * heads + h) * hd;
                        rotate(&mut out[o..o + hd], c, sn);
                    }
                }
            }
            out
        };
        let out = apply(&self.data(), &cos, &sin);
        // The backward rotates by −θ: cos stays, sin flips sign.
        let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
        Tensor::from_op(out, &s, "rope", &[self], move |g: &[f32]| vec![Some(apply(g, &cos, &neg_sin))])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{rope_tables, shared_rope_tables};
    use crate::ops::gradcheck::{check_gradients, check_twins, values};
    use crate::tensor::Tensor;

    #[test]
    fn shared_tables_equal_fresh_ones_and_are_computed_once_per_shape() {
        let shared = shared_rope_tables(17, 6, 500.0);
        let positions: Vec<usize> = (0..17).collect();
        let fresh = rope_tables(&positions, 6, 500.0);
        assert_eq!((&shared.cos, &shared.sin), (&fresh.0, &fresh.1));
        // The same shape again: the same tables, not a new computation.
        assert!(Arc::ptr_eq(&shared, &shared_rope_tables(17, 6, 500.0)));
        // Another base is another entry.
        assert!(!Arc::ptr_eq(&shared, &shared_rope_tables(17, 6, 10_000.0)));
    }

    /// RoPE written with simple ops, the slow twin of the fused op (candle's `rope_i_slow`):
    /// split each head into its pairs `(x₀, x₁)`, rotate them with broadcast cos/sin tables,
    /// and glue the halves back.
    fn rope_slow(x: &Tensor, offset: usize, theta: f32) -> Tensor {
        let (b, t, h, hd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let half = hd / 2;
        let pairs = x.reshape(&[b, t, h, half, 2]);
        let (x0, x1) = (pairs.narrow(4, 0, 1), pairs.narrow(4, 1, 1)); // [B, T, H, hd/2, 1] each
        // θⱼ(p) = p·theta^(−2j/hd) at p = offset + t, as [T, 1, hd/2, 1]: it broadcasts over
        // the batch and the heads.
        let angle = move |p: usize, j: usize| {
            (offset + p) as f64 * (theta as f64).powf(-((2 * j) as f64) / hd as f64)
        };
        let table = |f: fn(f64) -> f64| {
            let v: Vec<f32> = (0..t).flat_map(|p| (0..half).map(move |j| f(angle(p, j)) as f32)).collect();
            Tensor::from_vec(v, &[t, 1, half, 1])
        };
        let (cos, sin) = (table(f64::cos), table(f64::sin));
        let y0 = x0.mul(&cos).sub(&x1.mul(&sin)); // x₀·cos θ − x₁·sin θ
        let y1 = x0.mul(&sin).add(&x1.mul(&cos)); // x₀·sin θ + x₁·cos θ
        Tensor::cat(&[&y0, &y1], 4).reshape(&[b, t, h, hd])
    }

    #[test]
    fn fused_equals_the_slow_twin_values_and_gradients() {
        for (shape, offset) in [([2, 5, 3, 8], 0), ([1, 7, 2, 6], 3), ([2, 3, 2, 64], 1000)] {
            let x = values(shape.iter().product(), 8);
            check_twins(
                &[&shape],
                &[x],
                |t| t[0].rope(offset, 10000.0),
                |t| rope_slow(&t[0], offset, 10000.0),
                1e-6,
            );
        }
    }

    #[test]
    fn position_zero_is_the_identity_and_norms_are_kept() {
        let x = Tensor::from_vec((0..8).map(|v| v as f32 - 3.0).collect(), &[1, 1, 2, 4]);
        assert_eq!(x.rope(0, 10000.0).to_vec(), x.to_vec());
        let y = x.rope(7, 10000.0).to_vec();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - norm(&x.to_vec())).abs() < 1e-4);
    }

    #[test]
    fn scores_depend_on_relative_position_only() {
        let q = Tensor::from_vec(vec![0.3, -1.0, 0.5, 2.0], &[1, 1, 1, 4]);
        let k = Tensor::from_vec(vec![1.0, 0.2, -0.7, 0.4], &[1, 1, 1, 4]);
        let dot = |a: &Tensor, b: &Tensor| a.to_vec().iter().zip(b.to_vec()).map(|(x, y)| x * y).sum::<f32>();
        let s1 = dot(&q.rope(5, 10000.0), &k.rope(2, 10000.0));
        let s2 = dot(&q.rope(105, 10000.0), &k.rope(102, 10000.0));
        assert!((s1 - s2).abs() < 1e-4, "{s1} vs {s2}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[2, 5, 3, 8]], |x| x[0].rope(3, 10000.0));
        check_gradients(&[&[1, 7, 2, 6]], |x| x[0].rope(0, 500.0));
    }
}
