//! Element-wise functions of one tensor, and arithmetic with a scalar.
//!
//! **Backward.** For `y = f(x)` element by element, `∂L/∂x = g · f'(x)`:
//!
//! | op | f(x) | f'(x), written with what the forward saved |
//! |---|---|---|
//! | `add_scalar(c)` | x + c | 1 |
//! | `mul_scalar(c)` | c·x | c |
//! | `neg` | −x | −1 |
//! | `exp` | eˣ | eˣ = y |
//! | `log` | ln x | 1/x |
//! | `sqr` | x² | 2x |
//! | `sqrt` | √x | 1/(2√x) = 1/(2y) |
//! | `relu` | max(x, 0) | 1 if x > 0 else 0 |
//! | `tanh` | tanh x | 1 − y² |
//! | `silu` | x·σ(x) | σ(x)·(1 + x·(1 − σ(x))) |

use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::parallel::worth_splitting;
use crate::tensor::{Tensor, pool};

/// The logistic sigmoid `σ(x) = 1/(1 + e⁻ˣ)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Applies `f` to every element, in parallel when there are many.
fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    let mut out = pool::take(x.len());
    if worth_splitting(x.len() * 8) {
        out.par_iter_mut().zip(x.par_iter()).for_each(|(o, &v)| *o = f(v));
    } else {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
    }
    out
}

/// `y = f(x)` element-wise, with `∂L/∂x = g · df(v)`: `v` is the saved input `x` or, when
/// `save_output`, the output `y` (for `exp`, `sqrt` and `tanh` the derivative is cheapest
/// written with `y`: the derivative of `eˣ` is `eˣ = y` itself).
fn unary(
    x: &Tensor,
    op: &'static str,
    f: impl Fn(f32) -> f32 + Sync + Send,
    save_output: bool,
    df: impl Fn(f32) -> f32 + Sync + Send + 'static,
) -> Tensor {
    let input = x.data();
    let out = map(&input, f);
    // Either way one shared buffer is kept: the input's own (no copy) or a copy of the output.
    let saved: Arc<Vec<f32>> = if save_output { Arc::new(out.clone()) } else { input };
    Tensor::from_op(out, x.shape(), op, &[x], move |g: &[f32]| {
        vec![Some(g.iter().zip(saved.iter()).map(|(gi, &vi)| gi * df(vi)).collect())]
    })
}

impl Tensor {
    /// `self + c` for a scalar `c`.
    pub fn add_scalar(&self, c: f32) -> Tensor {
        let out = map(&self.data(), |v| v + c);
        Tensor::from_op(out, self.shape(), "add_scalar", &[self], |g: &[f32]| vec![Some(pool::copy_of(g))])
    }

    /// `c · self` for a scalar `c`.
    pub fn mul_scalar(&self, c: f32) -> Tensor {
        let out = map(&self.data(), |v| v * c);
        Tensor::from_op(out, self.shape(), "mul_scalar", &[self], move |g: &[f32]| {
            vec![Some(g.iter().map(|x| x * c).collect())]
        })
    }

    /// `−self`.
    pub fn neg(&self) -> Tensor {
        self.mul_scalar(-1.0)
    }

    /// `eˣ` element-wise.
    pub fn exp(&self) -> Tensor {
        unary(self, "exp", f32::exp, true, |y| y)
    }

    /// Natural logarithm element-wise.
    pub fn log(&self) -> Tensor {
        unary(self, "log", f32::ln, false, |x| 1.0 / x)
    }

    /// `x²` element-wise.
    pub fn sqr(&self) -> Tensor {
        unary(self, "sqr", |x| x * x, false, |x| 2.0 * x)
    }

    /// `√x` element-wise.
    pub fn sqrt(&self) -> Tensor {
        unary(self, "sqrt", f32::sqrt, true, |y| 0.5 / y)
    }

    /// `max(x, 0)` element-wise.
    pub fn relu(&self) -> Tensor {
        unary(self, "relu", |x| x.max(0.0), false, |x| if x > 0.0 { 1.0 } else { 0.0 })
    }

    /// `tanh x` element-wise.
    pub fn tanh(&self) -> Tensor {
        unary(self, "tanh", f32::tanh, true, |y| 1.0 - y * y)
    }

    /// SiLU (also called swish): `x·σ(x)`.
    pub fn silu(&self) -> Tensor {
        unary(
            self,
            "silu",
            |x| x * sigmoid(x),
            false,
            |x| {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_gradients_with, values};

    #[test]
    fn gradients_match_finite_differences() {
        let s: &[usize] = &[4, 9];
        check_gradients(&[s], |x| x[0].add_scalar(1.5));
        check_gradients(&[s], |x| x[0].mul_scalar(-0.7));
        check_gradients(&[s], |x| x[0].neg());
        check_gradients(&[s], |x| x[0].exp());
        check_gradients(&[s], |x| x[0].sqr());
        check_gradients(&[s], |x| x[0].tanh());
        check_gradients(&[s], |x| x[0].silu());
        let positive: Vec<f32> = values(36, 3).iter().map(|v| 0.2 + v.abs()).collect();
        check_gradients_with(&[s], std::slice::from_ref(&positive), |x| x[0].log());
        check_gradients_with(&[s], &[positive], |x| x[0].sqrt());
        // Away from the kink at 0.
        let away: Vec<f32> = values(36, 4).iter().map(|v| v.signum() * (0.1 + v.abs())).collect();
        check_gradients_with(&[s], &[away], |x| x[0].relu());
    }
}
