//! Element-wise `add`, `sub`, `mul`, `div` of two tensors, with NumPy broadcasting
//! (see [`crate::tensor::shape`]).
//!
//! **Backward.** For `y = a ∘ b` element by element, with upstream `g = ∂L/∂y`, the chain
//! rule gives `∂L/∂a = g·∂y/∂a` and `∂L/∂b = g·∂y/∂b` at each element:
//!
//! | op | ∂y/∂a | ∂y/∂b |
//! |---|---|---|
//! | `add` | 1 | 1 |
//! | `sub` | 1 | −1 |
//! | `mul` | b | a |
//! | `div` | 1/b | −a/b² |
//!
//! Where an operand was broadcast, one of its elements fed many outputs; by the multivariate
//! chain rule its gradient is the **sum** over those outputs. So a bias `[D]` added to
//! `[B, T, D]` gets `Σ_{b,t} g[b, t, :]`.
//!
//! ```
//! use lego::Tensor;
//! let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).requires_grad();
//! let bias = Tensor::from_vec(vec![10.0, 20.0], &[2]).requires_grad();
//! let y = x.add(&bias); // the bias is added to each row
//! assert_eq!(y.to_vec(), vec![11.0, 22.0, 13.0, 24.0]);
//! y.sum_all().backward();
//! assert_eq!(bias.grad().unwrap(), vec![2.0, 2.0]); // each bias element fed two outputs
//! ```

use std::sync::Arc;

use crate::kernels::parallel::worth_splitting;
use crate::tensor::shape::{broadcast_index_map, broadcast_shape, broadcast_strides, numel};
use crate::tensor::{Tensor, pool};
use rayon::prelude::*;

/// The four element-wise operations, which share one forward loop and one backward.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    /// The op's name, for the graph and for error messages.
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
    /// `a ∘ b` for one pair of elements.
    #[inline]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

/// How an operand's elements map onto the output's.
enum Layout {
    /// Same shape as the output: element i feeds output i.
    Same,
    /// The operand's shape is a suffix of the output's (e.g. a bias `[D]` on `[B, T, D]`):
    /// it repeats every `len` outputs.
    Repeat(usize),
    /// Any other broadcast: output i reads operand element `map[i]`.
    Map(Vec<usize>),
}

impl Layout {
    /// How an operand of `shape` is read by an output of shape `out`, picking the cheapest
    /// layout that describes it (a scalar, `[1, 1]` included, repeats with period 1).
    fn of(shape: &[usize], out: &[usize]) -> Layout {
        if shape == out {
            Layout::Same
        } else if out.ends_with(shape) || shape.iter().all(|&d| d == 1) && numel(shape) == 1 {
            Layout::Repeat(numel(shape))
        } else {
            Layout::Map(broadcast_index_map(out, &broadcast_strides(shape, out)))
        }
    }
    /// The operand element that output element `i` reads.
    #[inline]
    fn index(&self, i: usize) -> usize {
        match self {
            Layout::Same => i,
            Layout::Repeat(len) => i % len,
            Layout::Map(map) => map[i],
        }
    }
    /// Sums a gradient over the output's elements back into the operand's `n` elements: each
    /// operand element receives the sum of the gradients of the outputs that read it.
    fn reduce(&self, g: Vec<f32>, n: usize) -> Vec<f32> {
        match self {
            Layout::Same => g,
            Layout::Repeat(len) => {
                // The output is a run of `len`-long blocks, each reading the whole operand:
                // add the blocks' gradients up.
                let mut acc = pool::zeroed(n);
                for chunk in g.chunks_exact(*len) {
                    acc.iter_mut().zip(chunk).for_each(|(a, b)| *a += b);
                }
                pool::recycle(g);
                acc
            }
            Layout::Map(map) => {
                // Scatter-add: output i's gradient goes to the element it read.
                let mut acc = pool::zeroed(n);
                for (i, v) in g.iter().enumerate() {
                    acc[map[i]] += v;
                }
                pool::recycle(g);
                acc
            }
        }
    }
}

/// `a ∘ b` with broadcasting, and its backward.
fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Tensor {
    let out_shape = broadcast_shape(op.name(), a.shape(), b.shape());
    let n = numel(&out_shape);
    let (la, lb) = (Arc::new(Layout::of(a.shape(), &out_shape)), Arc::new(Layout::of(b.shape(), &out_shape)));
    let (av, bv) = (a.data(), b.data());
    // Output element i combines the operand elements it reads through each layout.
    let mut out = pool::take(n);
    let fill = |(i, o): (usize, &mut f32)| *o = op.apply(av[la.index(i)], bv[lb.index(i)]);
    // Threads only when there is enough work to pay for waking them.
    if worth_splitting(n * 4) {
        out.par_iter_mut().enumerate().for_each(fill);
    } else {
        out.iter_mut().enumerate().for_each(fill);
    }

    let (na, nb) = (a.numel(), b.numel());
    // The derivatives of `mul` and `div` read the operands' values; `add` and `sub` need none.
    let needs_values = matches!(op, BinaryOp::Mul | BinaryOp::Div);
    let (a_saved, b_saved) = if needs_values { (Some(av.clone()), Some(bv.clone())) } else { (None, None) };
    // Decided now: an operand that needs no gradient (a constant, a frozen weight) gets none.
    let (need_a, need_b) = (a.requires_grad_flag(), b.requires_grad_flag());
    Tensor::from_op(out, &out_shape, op.name(), &[a, b], move |g: &[f32]| {
        // The saved values (empty for `add` and `sub`, which never read them).
        let av: &[f32] = a_saved.as_deref().map_or(&[], Vec::as_slice);
        let bv: &[f32] = b_saved.as_deref().map_or(&[], Vec::as_slice);
        // Each gradient is first computed per output element, `g·∂y/∂operand` (the operands
        // read through their broadcast layouts), then summed back to the operand's shape.
        let ga = need_a.then(|| {
            let mut ga = pool::take(g.len());
            match op {
                // ∂(a ± b)/∂a = 1
                BinaryOp::Add | BinaryOp::Sub => ga.copy_from_slice(g),
                // ∂(a·b)/∂a = b
                BinaryOp::Mul => per_element(&mut ga, g, |i, gi| gi * bv[lb.index(i)]),
                // ∂(a/b)/∂a = 1/b
                BinaryOp::Div => per_element(&mut ga, g, |i, gi| gi / bv[lb.index(i)]),
            }
            la.reduce(ga, na)
        });
        let gb = need_b.then(|| {
            let mut gb = pool::take(g.len());
            match op {
                // ∂(a + b)/∂b = 1
                BinaryOp::Add => gb.copy_from_slice(g),
                // ∂(a − b)/∂b = −1
                BinaryOp::Sub => per_element(&mut gb, g, |_, gi| -gi),
                // ∂(a·b)/∂b = a
                BinaryOp::Mul => per_element(&mut gb, g, |i, gi| gi * av[la.index(i)]),
                // ∂(a/b)/∂b = −a/b²
                BinaryOp::Div => per_element(&mut gb, g, |i, gi| {
                    let bi = bv[lb.index(i)];
                    -gi * av[la.index(i)] / (bi * bi)
                }),
            }
            lb.reduce(gb, nb)
        });
        vec![ga, gb]
    })
}

/// `out[i] = f(i, g[i])` for every output element.
#[inline]
fn per_element(out: &mut [f32], g: &[f32], f: impl Fn(usize, f32) -> f32) {
    for (i, (o, &gi)) in out.iter_mut().zip(g).enumerate() {
        *o = f(i, gi);
    }
}

impl Tensor {
    /// `self + other`, broadcasting (see the module doc for the rule and an example).
    pub fn add(&self, other: &Tensor) -> Tensor {
        binary(self, other, BinaryOp::Add)
    }
    /// `self − other`, broadcasting.
    pub fn sub(&self, other: &Tensor) -> Tensor {
        binary(self, other, BinaryOp::Sub)
    }
    /// `self · other` element-wise, broadcasting.
    pub fn mul(&self, other: &Tensor) -> Tensor {
        binary(self, other, BinaryOp::Mul)
    }
    /// `self / other` element-wise, broadcasting.
    pub fn div(&self, other: &Tensor) -> Tensor {
        binary(self, other, BinaryOp::Div)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{
        check_gradients, check_gradients_with, check_skips_unneeded_gradients, values,
    };
    use crate::tensor::Tensor;

    #[test]
    fn broadcasting_a_row_and_a_column() {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let row = Tensor::from_vec(vec![10.0, 20.0, 30.0], &[3]);
        let col = Tensor::from_vec(vec![100.0, 200.0], &[2, 1]);
        assert_eq!(x.add(&row).to_vec(), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
        assert_eq!(x.add(&col).to_vec(), vec![101.0, 102.0, 103.0, 204.0, 205.0, 206.0]);
    }

    #[test]
    fn gradients_match_finite_differences_for_every_broadcast() {
        // Same shapes; a suffix (a bias); a leading 1; a column; a scalar against a column.
        let cases: [(&[usize], &[usize]); 5] = [
            (&[3, 17], &[3, 17]),
            (&[2, 3, 17], &[17]),
            (&[2, 3, 17], &[1, 3, 17]),
            (&[2, 3, 17], &[3, 1]),
            (&[1], &[4, 1]),
        ];
        for (sa, sb) in cases {
            check_gradients(&[sa, sb], |x| x[0].add(&x[1]));
            check_gradients(&[sa, sb], |x| x[0].sub(&x[1]));
            check_gradients(&[sa, sb], |x| x[0].mul(&x[1]));
            // Keep the divisor away from zero.
            let a = values(sa.iter().product(), 1);
            let b: Vec<f32> =
                values(sb.iter().product(), 2).iter().map(|v| v.signum() * (0.5 + v.abs())).collect();
            check_gradients_with(&[sa, sb], &[a, b], |x| x[0].div(&x[1]));
        }
    }

    #[test]
    fn only_the_operands_that_need_a_gradient_get_one() {
        for (sa, sb) in [(&[3, 17][..], &[3, 17][..]), (&[2, 3, 17], &[17]), (&[2, 3, 17], &[3, 1])] {
            check_skips_unneeded_gradients(&[sa, sb], |x| x[0].add(&x[1]));
            check_skips_unneeded_gradients(&[sa, sb], |x| x[0].sub(&x[1]));
            check_skips_unneeded_gradients(&[sa, sb], |x| x[0].mul(&x[1]));
            check_skips_unneeded_gradients(&[sa, sb], |x| x[0].div(&x[1]));
        }
    }

    #[test]
    #[should_panic(expected = "mul: shapes [3, 4] and [3] do not broadcast")]
    fn mismatched_shapes_panic_with_the_op_and_shapes() {
        Tensor::zeros(&[3, 4]).mul(&Tensor::zeros(&[3]));
    }
}
