//! SwiGLU's gate: `y = silu(a) · b` (Shazeer 2020), the heart of Llama's MLP
//! `w2·(silu(w1·x) ⊙ w3·x)`. Fused so the gate costs one pass and one buffer.
//!
//! **Backward.** `∂L/∂a = g·b·silu'(a)` with `silu'(a) = σ(a)·(1 + a·(1 − σ(a)))`, and
//! `∂L/∂b = g·silu(a)`.

use rayon::prelude::*;

use crate::kernels::parallel::worth_splitting;
use crate::ops::unary::sigmoid;
use crate::tensor::Tensor;

impl Tensor {
    /// `silu(a) · b`, element-wise, for `a` and `b` of the same shape.
    pub fn swiglu(a: &Tensor, b: &Tensor) -> Tensor {
        assert_eq!(
            a.shape(),
            b.shape(),
            "swiglu: gate {:?} and value {:?} differ",
            a.shape(),
            b.shape()
        );
        let (av, bv) = (a.data(), b.data());
        let f = |(x, y): (&f32, &f32)| x * sigmoid(*x) * y;
        let out: Vec<f32> = if worth_splitting(av.len() * 8) {
            av.par_iter().zip(bv.par_iter()).map(f).collect()
        } else {
            av.iter().zip(bv.iter()).map(f).collect()
        };
        Tensor::from_op(out, a.shape(), "swiglu", &[a, b], move |g: &[f32]| {
            let mut da = vec![0.0f32; g.len()];
            let mut db = vec![0.0f32; g.len()];
            for i in 0..g.len() {
                let (x, y) = (av[i], bv[i]);
                let s = sigmoid(x);
                da[i] = g[i] * y * s * (1.0 + x * (1.0 - s));
                db[i] = g[i] * x * s;
            }
            vec![Some(da), Some(db)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::check_gradients;
    use crate::tensor::Tensor;

    #[test]
    fn equals_silu_times_b_and_its_gradients_check() {
        let a = Tensor::from_vec(vec![-1.0, 0.5, 2.0], &[3]);
        let b = Tensor::from_vec(vec![2.0, -3.0, 0.25], &[3]);
        let want = a.silu().mul(&b).to_vec();
        assert_eq!(Tensor::swiglu(&a, &b).to_vec(), want);
        check_gradients(&[&[3, 19], &[3, 19]], |x| Tensor::swiglu(&x[0], &x[1]));
    }
}
