//! SwiGLU's gate: `y = silu(a) · b` (Shazeer 2020), the heart of Llama's MLP
//! `w2·(silu(w1·x) ⊙ w3·x)`. Fused so the gate costs one pass and one buffer.
//!
//! **Backward.** `y` is a product, so `∂L/∂b = g·silu(a)` and `∂L/∂a = g·b·silu'(a)`. With
//! `silu(a) = a·σ(a)` and the sigmoid's `σ'(a) = σ(a)·(1 − σ(a))`, the product rule gives
//!
//! `silu'(a) = σ(a) + a·σ(a)·(1 − σ(a)) = σ(a)·(1 + a·(1 − σ(a)))`.
//!
//! Both gradients share `σ(a)`, so one pass computes it once for both.

use rayon::prelude::*;

use crate::kernels::parallel::worth_splitting;
use crate::kernels::simd;
use crate::tensor::{Tensor, pool};

/// Elements a thread takes at a time (forward and backward): a fixed multiple of every SIMD
/// width, so the pieces (and so the bits) do not depend on the number of threads.
const CHUNK: usize = 4096;

impl Tensor {
    /// `silu(a) · b`, element-wise, for `a` and `b` of the same shape.
    ///
    /// ```
    /// use lego::Tensor;
    /// let (a, b) = (Tensor::from_vec(vec![0.0, 2.0], &[2]), Tensor::from_vec(vec![5.0, 1.0], &[2]));
    /// let y = Tensor::swiglu(&a, &b).to_vec();
    /// assert_eq!(y[0], 0.0); // silu(0) = 0: a closed gate lets nothing through
    /// assert!((y[1] - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6); // silu(2)·1
    /// ```
    pub fn swiglu(a: &Tensor, b: &Tensor) -> Tensor {
        assert_eq!(a.shape(), b.shape(), "swiglu: gate {:?} and value {:?} differ", a.shape(), b.shape());
        // a (the gate) and b (the value) are saved, shared, for the backward.
        let (av, bv) = (a.data(), b.data());
        // out = a, then the SIMD kernel's silu(out)·b in place (its vector exp, not libm's: with
        // a scalar `expf` per element, forward and backward took a sixth of a config-T
        // training step).
        let mut out = pool::take(av.len());
        out.copy_from_slice(&av);
        if worth_splitting(av.len() * 8) {
            out.par_chunks_mut(CHUNK)
                .zip(bv.par_chunks(CHUNK))
                .for_each(|(o, y)| simd::swiglu_in_place(o, y));
        } else {
            out.chunks_mut(CHUNK).zip(bv.chunks(CHUNK)).for_each(|(o, y)| simd::swiglu_in_place(o, y));
        }
        let (need_a, need_b) = (a.requires_grad_flag(), b.requires_grad_flag());
        Tensor::from_op(out, a.shape(), "swiglu", &[a, b], move |g: &[f32]| {
            // Both gradients of element i, from a = x and b = y:
            //   d/da = g·y·silu'(x) = g·y·s·(1 + x·(1 − s)),  d/db = g·silu(x) = g·x·s,
            // with s = sigmoid(x), computed first for every element by the SIMD kernel (in the
            // forward's fixed chunks). Elementwise, so splitting over threads gives the same
            // bits as one thread.
            let split = worth_splitting(g.len() * 12);
            let mut sig = pool::take(g.len());
            sig.copy_from_slice(&av);
            if split {
                sig.par_chunks_mut(CHUNK).for_each(simd::sigmoid_in_place);
            } else {
                sig.chunks_mut(CHUNK).for_each(simd::sigmoid_in_place);
            }
            let grads = |i: usize| {
                let (x, y, s) = (av[i], bv[i], sig[i]);
                (g[i] * y * s * (1.0 + x * (1.0 - s)), g[i] * x * s)
            };
            let mut da = need_a.then(|| pool::take(g.len()));
            let mut db = need_b.then(|| pool::take(g.len()));
            match (da.as_deref_mut(), db.as_deref_mut()) {
                (Some(da), Some(db)) => {
                    let f = |(i, (a, b)): (usize, (&mut f32, &mut f32))| (*a, *b) = grads(i);
                    if split {
                        da.par_iter_mut().zip(db.par_iter_mut()).enumerate().for_each(f);
                    } else {
                        da.iter_mut().zip(db.iter_mut()).enumerate().for_each(f);
                    }
                }
                (Some(d), None) | (None, Some(d)) => {
                    let f = |(i, o): (usize, &mut f32)| {
                        let (ga, gb) = grads(i);
                        *o = if need_a { ga } else { gb };
                    };
                    if split {
                        d.par_iter_mut().enumerate().for_each(f);
                    } else {
                        d.iter_mut().enumerate().for_each(f);
                    }
                }
                (None, None) => {}
            }
            pool::recycle(sig);
            vec![da, db]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_skips_unneeded_gradients};
    use crate::tensor::Tensor;

    #[test]
    fn equals_silu_times_b_and_its_gradients_check() {
        let a = Tensor::from_vec(vec![-1.0, 0.5, 2.0], &[3]);
        let b = Tensor::from_vec(vec![2.0, -3.0, 0.25], &[3]);
        let want = a.silu().mul(&b).to_vec();
        assert_eq!(Tensor::swiglu(&a, &b).to_vec(), want);
        check_gradients(&[&[3, 19], &[3, 19]], |x| Tensor::swiglu(&x[0], &x[1]));
        check_skips_unneeded_gradients(&[&[3, 19], &[3, 19]], |x| Tensor::swiglu(&x[0], &x[1]));
    }

    #[test]
    fn the_backward_is_the_derivation_s_formula_bit_for_bit_across_chunks_and_threads() {
        // More than two chunks, so that chunk boundaries (and a short last chunk) are crossed.
        let n = 2 * super::CHUNK + 123;
        let val = |i: usize, k: f32| ((i * 37 % 101) as f32 - 50.0) * k;
        let (x, y, g): (Vec<f32>, Vec<f32>, Vec<f32>) =
            (0..n).map(|i| (val(i, 0.13), val(i + 7, 0.05), val(i + 3, 0.01))).collect();
        // The formula of the comment above the backward, element by element, σ from the SIMD
        // kernel (one element at a time: it is elementwise).
        let want = |i: usize| {
            let mut s = [x[i]];
            crate::kernels::simd::sigmoid_in_place(&mut s);
            let s = s[0];
            (g[i] * y[i] * s * (1.0 + x[i] * (1.0 - s)), g[i] * x[i] * s)
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (grad_a, grad_b) in [(true, true), (true, false), (false, true)] {
                let (da, db) = pool.install(|| {
                    let a = Tensor::from_vec(x.clone(), &[n]);
                    let b = Tensor::from_vec(y.clone(), &[n]);
                    let (a, b) = (
                        if grad_a { a.requires_grad() } else { a },
                        if grad_b { b.requires_grad() } else { b },
                    );
                    Tensor::swiglu(&a, &b).backward_with(g.clone());
                    (a.grad(), b.grad())
                });
                for i in 0..n {
                    let (wa, wb) = want(i);
                    if grad_a {
                        assert_eq!(
                            da.as_ref().unwrap()[i].to_bits(),
                            wa.to_bits(),
                            "d/da at {i}, {threads} thread(s)"
                        );
                    }
                    if grad_b {
                        assert_eq!(
                            db.as_ref().unwrap()[i].to_bits(),
                            wb.to_bits(),
                            "d/db at {i}, {threads} thread(s)"
                        );
                    }
                }
            }
        }
    }
}
