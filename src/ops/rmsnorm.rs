//! RMSNorm: `y = x / rms(x) · w`, with `rms(x) = √(mean(x²) + ε)` over the last axis and a
//! learned scale `w` (Zhang & Sennrich 2019; Llama's normalisation).
//!
//! Fused into one op: built from small ops (`sqr`, `mean_axis`, `sqrt`, `div`, `mul`: the
//! slow twin in the tests) it would allocate five intermediate tensors; here the forward is
//! one SIMD pass a row and keeps only `r` of each row for the backward.
//!
//! **Backward.** For one row of D values, write `r = (mean(x²) + ε)^(−1/2)` so
//! `yⱼ = xⱼ·r·wⱼ`. Every `yⱼ` depends on `xₖ` twice: directly when `j = k`, and through `r`,
//! which every x of the row moves. With `mean(x²) = Σⱼ xⱼ²/D`,
//! `∂r/∂xₖ = −½·(mean(x²) + ε)^(−3/2)·2xₖ/D = −r³·xₖ/D`, so
//!
//! `∂L/∂xₖ = Σⱼ gⱼ·wⱼ·(δⱼₖ·r + xⱼ·∂r/∂xₖ) = r·gₖ·wₖ − (r³·xₖ/D)·Σⱼ gⱼ·wⱼ·xⱼ`
//!
//! (term 1: the direct path through xₖ; term 2: the path through the shared rms). The weight
//! is shared by all rows, so its gradient is a sum over them: `∂L/∂wⱼ = Σ_rows gⱼ·xⱼ·r`.
//!
//! ```
//! use lego::Tensor;
//! let x = Tensor::from_vec(vec![3.0, 4.0, 1.0, 1.0], &[2, 2]); // two rows of D = 2
//! let w = Tensor::ones(&[2]).requires_grad();
//! let y = x.rms_norm(&w, 0.0); // each row divided by its rms: √12.5 and 1
//! let want = [3.0 / 12.5f32.sqrt(), 4.0 / 12.5f32.sqrt(), 1.0, 1.0];
//! assert!(y.to_vec().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
//! y.sum_all().backward(); // ∂L/∂wⱼ = Σ_rows xⱼ·r
//! assert!((w.grad().unwrap()[0] - (3.0 / 12.5f32.sqrt() + 1.0)).abs() < 1e-6);
//! ```

use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::parallel::{for_each_row2, worth_splitting};
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};

/// Rows per block of the backward pass: the unit of parallel work, and of the order in which
/// the weight's gradient is summed (see there).
const ROWS_PER_BLOCK: usize = 64;

impl Tensor {
    /// RMSNorm over the last axis with scale `weight` (`[dim]`) and `eps`: `[..., dim]` in,
    /// the same shape out (see the module doc for the formula and an example).
    pub fn rms_norm(&self, weight: &Tensor, eps: f32) -> Tensor {
        let dim = *self.shape().last().expect("rms_norm: a scalar has no last axis");
        assert_eq!(
            weight.shape(),
            &[dim],
            "rms_norm: weight of shape {:?} does not match last axis of {:?}",
            weight.shape(),
            self.shape()
        );
        let (x, w) = (self.data(), weight.data());
        let rows = x.len() / dim.max(1);
        let mut out = pool::take(x.len());
        // One SIMD pass a row writes y and returns that row's r.
        let mut inv_rms = vec![0.0f32; rows];
        for_each_row2(&mut out, dim, &mut inv_rms, 1, 4 * dim, |i, y, r| {
            r[0] = simd::rmsnorm(&x[i * dim..(i + 1) * dim], &w, eps, y);
        });
        let inv_rms = Arc::new(inv_rms); // r of each row, saved for the backward
        let (need_x, need_w) = (self.requires_grad_flag(), weight.requires_grad_flag());
        Tensor::from_op(out, self.shape(), "rms_norm", &[self, weight], move |g: &[f32]| {
            // Rows go in blocks of a fixed size (not tied to the thread count, so that dw below
            // is summed in the same order whatever the threads). A block writes its rows' dx
            // and returns its share of dw; the shares are then added in block order.
            let block = |b: usize, mut dx_block: Option<&mut [f32]>| -> Vec<f32> {
                let mut dw_part = vec![0.0f32; if need_w { dim } else { 0 }];
                let first = b * ROWS_PER_BLOCK;
                for i in first..(first + ROWS_PER_BLOCK).min(rows) {
                    let (xr, gr) = (&x[i * dim..(i + 1) * dim], &g[i * dim..(i + 1) * dim]);
                    let r = inv_rms[i];
                    if let Some(dx_block) = dx_block.as_deref_mut() {
                        // Term 2's sum Σⱼ gⱼ·wⱼ·xⱼ is shared by every k of the row.
                        let gwx: f32 = (0..dim).map(|k| gr[k] * w[k] * xr[k]).sum();
                        let c = r * r * r * gwx / dim as f32;
                        let dxr = &mut dx_block[(i - first) * dim..(i - first + 1) * dim];
                        for k in 0..dim {
                            dxr[k] = r * gr[k] * w[k] - c * xr[k]; // term 1 − term 2
                        }
                    }
                    if need_w {
                        for k in 0..dim {
                            dw_part[k] += gr[k] * xr[k] * r; // this row's gⱼ·xⱼ·r
                        }
                    }
                }
                dw_part
            };
            let mut dx = need_x.then(|| pool::take(x.len()));
            let chunk = ROWS_PER_BLOCK * dim;
            let parts: Vec<Vec<f32>> = match dx.as_mut() {
                Some(dx) if worth_splitting(rows * dim * 8) => {
                    dx.par_chunks_mut(chunk).enumerate().map(|(b, d)| block(b, Some(d))).collect()
                }
                Some(dx) => dx.chunks_mut(chunk).enumerate().map(|(b, d)| block(b, Some(d))).collect(),
                // dw alone (x needs no gradient): one light pass, not worth threads.
                None => (0..rows.div_ceil(ROWS_PER_BLOCK)).map(|b| block(b, None)).collect(),
            };
            // The blocks' shares of dw, added in block order in f64.
            let dw = need_w.then(|| {
                let mut dw = vec![0.0f64; dim];
                for part in &parts {
                    dw.iter_mut().zip(part).for_each(|(a, &b)| *a += b as f64);
                }
                dw.into_iter().map(|v| v as f32).collect()
            });
            vec![dx, dw]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients_with, check_skips_unneeded_gradients, check_twins, values};
    use crate::tensor::Tensor;

    /// RMSNorm written with simple ops, the slow twin of the fused op: every step of
    /// `x / √(mean(x²) + ε) · w` is a tensor of its own, and autodiff derives the backward.
    fn rms_norm_slow(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
        let last = x.rank() - 1;
        let rms = x.sqr().mean_axis(last, true).add_scalar(eps).sqrt(); // [..., 1]
        x.div(&rms).mul(w) // [..., D] / [..., 1] · [D]
    }

    #[test]
    fn fused_equals_the_slow_twin_values_and_gradients() {
        for shape in [&[5, 67][..], &[2, 3, 16], &[1, 1], &[130, 9]] {
            let n: usize = shape.iter().product();
            let dim = shape[shape.len() - 1];
            let x = values(n, 5);
            let w: Vec<f32> = values(dim, 6).iter().map(|v| 1.0 + 0.5 * v).collect();
            check_twins(
                &[shape, &[dim]],
                &[x, w],
                |t| t[0].rms_norm(&t[1], 1e-5),
                |t| rms_norm_slow(&t[0], &t[1], 1e-5),
                1e-5,
            );
        }
    }

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = Tensor::from_vec(vec![3.0, 4.0], &[1, 2]);
        let y = x.rms_norm(&Tensor::ones(&[2]), 0.0).to_vec();
        let rms = ((y[0] * y[0] + y[1] * y[1]) / 2.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn many_rows_split_in_blocks_give_the_same_gradients() {
        // 200 rows: several blocks, and enough work to be split across threads.
        let (rows, dim) = (200, 67);
        let x = values(rows * dim, 3);
        let w: Vec<f32> = values(dim, 4).iter().map(|v| 1.0 + 0.3 * v).collect();
        check_gradients_with(&[&[rows, dim], &[dim]], &[x, w], |t| t[0].rms_norm(&t[1], 1e-5));
    }

    #[test]
    fn gradients_match_finite_differences() {
        for dim in [1usize, 7, 13, 67] {
            let x = values(3 * dim, 1);
            let w: Vec<f32> = values(dim, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
            check_gradients_with(&[&[3, dim], &[dim]], &[x, w], |t| t[0].rms_norm(&t[1], 1e-5));
        }
    }

    #[test]
    fn a_frozen_weight_or_a_constant_input_gets_no_gradient() {
        // 200 rows: several blocks, split over threads when x needs its gradient.
        check_skips_unneeded_gradients(&[&[200, 67], &[67]], |t| t[0].rms_norm(&t[1], 1e-5));
        check_skips_unneeded_gradients(&[&[3, 8], &[8]], |t| t[0].rms_norm(&t[1], 1e-5));
    }
}
