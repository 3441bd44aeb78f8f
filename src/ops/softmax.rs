//! Softmax and log-softmax over the last axis.
//!
//! `softmax(x)ᵢ = e^(xᵢ − m) / Σⱼ e^(xⱼ − m)` with `m = maxⱼ xⱼ` (subtracting the max changes
//! nothing mathematically and keeps `e^x` from overflowing).
//!
//! **Backward.** With `y = softmax(x)`, `∂yᵢ/∂xₖ = yᵢ(δᵢₖ − yₖ)`, so
//! `∂L/∂xₖ = Σᵢ gᵢ·yᵢ(δᵢₖ − yₖ) = yₖ·(gₖ − Σᵢ gᵢ·yᵢ)`.
//! For `z = log_softmax(x) = x − m − log Σ e^(x−m)`, `∂zᵢ/∂xₖ = δᵢₖ − yₖ`, so
//! `∂L/∂xₖ = gₖ − yₖ·Σᵢ gᵢ`.
//!
//! Both backward passes need only one dot product (or sum) per row, never the `d × d`
//! Jacobian: the softmax one uses the saved output `y`, the log-softmax one recovers `y = eᶻ`
//! from its saved output `z`.
//!
//! ```
//! use lego::Tensor;
//! let y = Tensor::from_vec(vec![0.0, 0.0, 2f32.ln()], &[1, 3]).softmax();
//! assert!(y.to_vec().iter().zip([0.25, 0.25, 0.5]).all(|(a, b)| (a - b).abs() < 1e-6));
//! ```

use std::sync::Arc;

use crate::kernels::parallel::for_each_row;
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};

/// The size of `t`'s last axis, the one the softmax runs over; panics (naming `op`) for a
/// scalar or an empty axis.
fn last_dim(t: &Tensor, op: &str) -> usize {
    let d = *t.shape().last().unwrap_or_else(|| panic!("{op}: a scalar has no last axis"));
    assert!(d > 0, "{op}: the last axis of {:?} is empty", t.shape());
    d
}

impl Tensor {
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Tensor {
        let d = last_dim(self, "softmax");
        let mut out = pool::copy_of(&self.data());
        for_each_row(&mut out, d, 4 * d, |_, row| simd::softmax_in_place(row));
        let y = Arc::new(out.clone()); // the backward is written with the output
        Tensor::from_op(out, self.shape(), "softmax", &[self], move |g: &[f32]| {
            let mut dx = pool::take(g.len());
            for ((dxr, gr), yr) in dx.chunks_mut(d).zip(g.chunks(d)).zip(y.chunks(d)) {
                // ∂L/∂xₖ = yₖ·(gₖ − Σᵢ gᵢ·yᵢ)
                let gy: f32 = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                for k in 0..d {
                    dxr[k] = yr[k] * (gr[k] - gy);
                }
            }
            vec![Some(dx)]
        })
    }

    /// Log-softmax over the last axis (computed directly, never as `log(softmax)`, which
    /// would give −∞ for tiny probabilities).
    pub fn log_softmax(&self) -> Tensor {
        let d = last_dim(self, "log_softmax");
        let mut out = pool::copy_of(&self.data());
        for_each_row(&mut out, d, 4 * d, |_, row| {
            // z = x − logsumexp(x), with the max subtracted first (as in `logsumexp`).
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
            row.iter_mut().for_each(|v| *v -= lse);
        });
        let z = Arc::new(out.clone());
        Tensor::from_op(out, self.shape(), "log_softmax", &[self], move |g: &[f32]| {
            let mut dx = pool::take(g.len());
            for ((dxr, gr), zr) in dx.chunks_mut(d).zip(g.chunks(d)).zip(z.chunks(d)) {
                // ∂L/∂xₖ = gₖ − yₖ·Σᵢ gᵢ, with yₖ = e^(zₖ)
                let gsum: f32 = gr.iter().sum();
                for k in 0..d {
                    dxr[k] = gr[k] - zr[k].exp() * gsum;
                }
            }
            vec![Some(dx)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::check_gradients;
    use crate::tensor::Tensor;

    #[test]
    fn rows_sum_to_one_and_large_values_do_not_overflow() {
        let x = Tensor::from_vec(vec![1000.0, 1001.0, 999.0, 0.0, 0.0, 0.0], &[2, 3]);
        let y = x.softmax().to_vec();
        assert!((y[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((y[3] - 1.0 / 3.0).abs() < 1e-6);
        let z = x.log_softmax().to_vec();
        assert!(z.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[4, 13]], |x| x[0].mul_scalar(3.0).softmax());
        check_gradients(&[&[4, 13]], |x| x[0].mul_scalar(3.0).log_softmax());
        check_gradients(&[&[2, 1]], |x| x[0].log_softmax());
    }
}
