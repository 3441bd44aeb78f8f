//! Cross-entropy from logits, with an optional weight per token.
//!
//! For row i with logits `zᵢ`, target `tᵢ` and weight `wᵢ` (1 when none is given):
//! `nllᵢ = −log softmax(zᵢ)[tᵢ] = logsumexp(zᵢ) − zᵢ[tᵢ]`, and the loss is the weighted mean
//! `L = Σᵢ wᵢ·nllᵢ / Σᵢ wᵢ`. A weight of 0 masks a token out: phase 2 of LEGO trains on the
//! hard tokens only by giving the others weight 0.
//!
//! Fused: the softmax is never materialised in the forward (a `[tokens, vocab]` buffer), and
//! the backward recomputes it row by row from the saved logits.
//!
//! **Backward.** Of the two terms of `nllᵢ`, `∂ logsumexp(zᵢ)/∂zᵢₖ = e^(zᵢₖ) / Σⱼ e^(zᵢⱼ) =
//! softmax(zᵢ)ₖ` and `∂zᵢ[tᵢ]/∂zᵢₖ = [k = tᵢ]` (1 at the target, 0 elsewhere), so
//!
//! `∂nllᵢ/∂zᵢₖ = softmax(zᵢ)ₖ − [k = tᵢ]`  and  `∂L/∂zᵢₖ = g·(wᵢ/Σw)·(softmax(zᵢ)ₖ − [k = tᵢ])`:
//!
//! the predicted distribution minus the one-hot target, scaled by the row's share of the
//! weight. A row of weight 0 gets a gradient of exactly 0. The test module holds the fused op
//! equal to a slow twin written with `exp`, `log`, `sum` and a one-hot mask.

use crate::kernels::parallel::{for_each_row, worth_splitting};
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};
use rayon::prelude::*;

/// `log Σₖ e^(zₖ)`, computed stably: with `m = max z`, `log Σₖ e^(zₖ) = m + log Σₖ e^(zₖ − m)`,
/// and every `e^(zₖ − m) <= 1` cannot overflow.
///
/// ```
/// use lego::ops::cross_entropy::logsumexp;
/// assert!((logsumexp(&[0.0, 0.0]) - 2f32.ln()).abs() < 1e-7);
/// assert!((logsumexp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3); // no overflow
/// ```
pub fn logsumexp(z: &[f32]) -> f32 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + z.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
}

impl Tensor {
    /// Mean cross-entropy of these logits (`[..., vocab]`, one row per target) against
    /// `targets`, each row weighted by `weights` if given. Panics if a target is out of the
    /// vocabulary, the lengths disagree, or the weights sum to zero.
    ///
    /// ```
    /// use lego::Tensor;
    /// // Two tokens over a vocabulary of 3; uniform logits give log 3 whatever the target.
    /// let logits = Tensor::zeros(&[2, 3]).requires_grad();
    /// let loss = logits.cross_entropy(&[0, 2], None);
    /// assert!((loss.item() - 3f32.ln()).abs() < 1e-6);
    /// loss.backward();
    /// // (softmax − one-hot) / rows: 1/3 − 1 at the target, 1/3 elsewhere, halved.
    /// let g = logits.grad().unwrap();
    /// assert!((g[0] - (1.0 / 3.0 - 1.0) / 2.0).abs() < 1e-6 && (g[1] - 1.0 / 6.0).abs() < 1e-6);
    /// ```
    pub fn cross_entropy(&self, targets: &[usize], weights: Option<&[f32]>) -> Tensor {
        let vocab = *self.shape().last().expect("cross_entropy: logits need a vocabulary axis");
        let rows = self.numel() / vocab.max(1);
        assert_eq!(
            targets.len(),
            rows,
            "cross_entropy: {} targets for logits of shape {:?} ({rows} rows)",
            targets.len(),
            self.shape()
        );
        if let Some(w) = weights {
            assert_eq!(w.len(), rows, "cross_entropy: {} weights for {rows} rows", w.len());
        }
        for (i, &t) in targets.iter().enumerate() {
            assert!(t < vocab, "cross_entropy: target {t} at row {i} is outside the vocabulary of {vocab}");
        }
        let weight = |i: usize| weights.map_or(1.0, |w| w[i]);
        let total_weight: f64 = (0..rows).map(|i| weight(i) as f64).sum();
        assert!(total_weight > 0.0, "cross_entropy: the weights of all {rows} rows sum to zero");

        // Each row's weighted nll, in f64: the loss is a mean over up to millions of tokens.
        let z = self.data();
        let nll = |i: usize| -> f64 {
            let w = weight(i);
            if w == 0.0 {
                return 0.0;
            }
            let row = &z[i * vocab..(i + 1) * vocab];
            w as f64 * (logsumexp(row) - row[targets[i]]) as f64
        };
        let sum: f64 = if worth_splitting(rows * vocab * 4) {
            (0..rows).into_par_iter().map(nll).collect::<Vec<_>>().iter().sum()
        } else {
            (0..rows).map(nll).sum()
        };
        let loss = (sum / total_weight) as f32;

        // Saved for the backward: the logits (shared, no copy), the targets, and each row's
        // weight share wᵢ/Σw.
        let targets = targets.to_vec();
        let scaled: Vec<f32> = (0..rows).map(|i| (weight(i) as f64 / total_weight) as f32).collect();
        Tensor::from_op(vec![loss], &[], "cross_entropy", &[self], move |g: &[f32]| {
            // Row by row, in place on a copy of the logits: softmax, minus 1 at the target, times
            // g·wᵢ/Σw. The softmax is recomputed here rather than kept from the forward.
            let mut dz = pool::copy_of(&z);
            for_each_row(&mut dz, vocab, 4 * vocab, |i, row| {
                let c = g[0] * scaled[i];
                if c == 0.0 {
                    row.fill(0.0);
                    return;
                }
                simd::softmax_in_place(row);
                row[targets[i]] -= 1.0;
                row.iter_mut().for_each(|v| *v *= c);
            });
            vec![Some(dz)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_twins, values};
    use crate::tensor::Tensor;

    /// Cross-entropy written with simple ops, the slow twin of the fused op, for logits
    /// `z` of shape `[rows, vocab]`: `nllᵢ = logsumexp(zᵢ) − zᵢ[tᵢ]`, then the weighted mean.
    fn cross_entropy_slow(z: &Tensor, targets: &[usize], weights: Option<&[f32]>) -> Tensor {
        let (rows, vocab) = (z.dim(0), z.dim(1));
        // logsumexp(zᵢ) = mᵢ + log Σₖ e^(zᵢₖ − mᵢ), shifted by the row's max mᵢ. The shift is a
        // constant (no gradient): it cancels out of the function, so its gradient would too.
        let m = Tensor::from_vec(z.max_last(), &[rows, 1]);
        let lse = z.sub(&m).exp().sum_axis(1, true).log().add(&m); // [rows, 1]
        // zᵢ[tᵢ], picked out by a one-hot mask.
        let one_hot: Vec<f32> =
            (0..rows * vocab).map(|i| if i % vocab == targets[i / vocab] { 1.0 } else { 0.0 }).collect();
        let picked = z.mul(&Tensor::from_vec(one_hot, &[rows, vocab])).sum_axis(1, true); // [rows, 1]
        let w = weights.map_or(vec![1.0; rows], <[f32]>::to_vec);
        let total: f32 = w.iter().sum();
        lse.sub(&picked).mul(&Tensor::from_vec(w, &[rows, 1])).sum_all().mul_scalar(1.0 / total)
    }

    #[test]
    fn fused_equals_the_slow_twin_values_and_gradients() {
        let targets = [0, 3, 10, 3, 7, 1, 9];
        let weights = [1.0, 0.0, 0.5, 2.0, 0.0, 1.5, 0.7];
        // Logits spread wide (±8), so the softmax is far from uniform.
        let z: Vec<f32> = values(7 * 11, 3).iter().map(|v| 8.0 * v).collect();
        for w in [None, Some(&weights[..])] {
            check_twins(
                &[&[7, 11]],
                std::slice::from_ref(&z),
                |x| x[0].cross_entropy(&targets, w),
                |x| cross_entropy_slow(&x[0], &targets, w),
                1e-6,
            );
        }
        // A vocabulary wider than the SIMD registers, with a tail.
        let z = values(3 * 1001, 4);
        check_twins(
            &[&[3, 1001]],
            &[z],
            |x| x[0].cross_entropy(&[0, 500, 1000], None),
            |x| cross_entropy_slow(&x[0], &[0, 500, 1000], None),
            1e-6,
        );
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let z = Tensor::zeros(&[3, 10]);
        let l = z.cross_entropy(&[0, 5, 9], None).item();
        assert!((l - 10f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn zero_weight_rows_do_not_count() {
        let z = Tensor::from_vec(vec![5.0, 0.0, 0.0, 5.0], &[2, 2]);
        let both = z.cross_entropy(&[0, 0], None).item();
        let first = z.cross_entropy(&[0, 0], Some(&[1.0, 0.0])).item();
        assert!(first < both);
        assert!((first - z.narrow(0, 0, 1).cross_entropy(&[0], None).item()).abs() < 1e-7);
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[6, 11]], |x| x[0].cross_entropy(&[0, 3, 10, 3, 7, 1], None));
        check_gradients(&[&[7, 11]], |x| {
            x[0].cross_entropy(&[1, 2, 3, 4, 5, 6, 0], Some(&[1.0, 0.0, 0.5, 2.0, 0.0, 1.5, 0.7]))
        });
        check_gradients(&[&[1, 1]], |x| x[0].cross_entropy(&[0], None));
    }

    #[test]
    #[should_panic(expected = "target 11 at row 1 is outside the vocabulary of 11")]
    fn out_of_range_target_panics() {
        Tensor::zeros(&[2, 11]).cross_entropy(&[0, 11], None);
    }
}
