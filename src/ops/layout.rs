//! Ops that move values without computing on them: `reshape`, `permute`, `transpose`,
//! `narrow`, `cat`.
//!
//! **Backward.** Each output element is a copy of exactly one input element, so the op is a
//! permutation-like 0/1 matrix and its vector-Jacobian product moves each gradient value back
//! to the element it was copied from:
//!
//! - `reshape`: the values do not move (row-major order is kept), so neither does the gradient;
//! - `permute`: output axis d was input axis `axes[d]`, so the gradient is permuted back by the
//!   inverse permutation;
//! - `narrow`: the kept slice gets its gradient back in place, and every element that was cut
//!   away got no say in the output, so its gradient is 0;
//! - `cat`: each piece gets back its own stretch of the gradient.
//!
//! The forward passes copy (except `reshape`, which shares the buffer): every tensor here is
//! contiguous row-major, so a later op never has to deal with strides.

use crate::tensor::shape::{numel, strides};
use crate::tensor::{Tensor, pool};

/// Copies `x` (of `shape`) into the order of its axes permuted by `axes`: output axis `d` is
/// input axis `axes[d]`.
///
/// The output is written in its own row-major order; for each element the input offset is kept
/// up to date like an odometer: stepping output axis d moves `step[d]` in the input, and when
/// that axis wraps around to 0 the offset is taken back by `step[d]·size`.
fn permute_values(x: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    let in_strides = strides(shape);
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    // Stride in the input of one step along each output axis.
    let step: Vec<usize> = axes.iter().map(|&a| in_strides[a]).collect();
    let n = numel(shape);
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let rank = out_shape.len();
    // Walk the output in row-major order; the innermost axis is a strided run of the input.
    let inner = out_shape[rank - 1];
    let inner_step = step[rank - 1];
    let mut idx = vec![0usize; rank];
    let mut offset = 0usize;
    for _ in 0..n / inner {
        for j in 0..inner {
            out.push(x[offset + j * inner_step]);
        }
        for d in (0..rank - 1).rev() {
            idx[d] += 1;
            offset += step[d];
            if idx[d] < out_shape[d] {
                break;
            }
            offset -= step[d] * out_shape[d];
            idx[d] = 0;
        }
    }
    out
}

impl Tensor {
    /// The same values with another shape of the same size (no copy). Panics if the sizes differ.
    ///
    /// ```
    /// use lego::Tensor;
    /// let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3]);
    /// let y = x.reshape(&[3, 2]); // same row-major order: [[0, 1], [2, 3], [4, 5]]
    /// assert_eq!(y.to_vec(), x.to_vec());
    /// ```
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            numel(shape),
            self.numel(),
            "reshape: cannot view shape {:?} ({} values) as {shape:?}",
            self.shape(),
            self.numel()
        );
        // Backward: ∂L/∂x is g itself, read with x's shape.
        Tensor::from_op_shared(self.data(), shape, "reshape", &[self], |g: &[f32]| {
            vec![Some(pool::copy_of(g))]
        })
    }

    /// Reorders the axes: output axis `d` is input axis `axes[d]` (`[0, 2, 1, 3]` swaps the
    /// middle two, turning `[B, T, H, hd]` into `[B, H, T, hd]`).
    ///
    /// ```
    /// use lego::Tensor;
    /// let x = Tensor::zeros(&[2, 5, 3, 4]); // [B, T, H, hd]
    /// assert_eq!(x.permute(&[0, 2, 1, 3]).shape(), &[2, 3, 5, 4]); // [B, H, T, hd]
    /// ```
    pub fn permute(&self, axes: &[usize]) -> Tensor {
        let shape = self.shape().to_vec();
        let mut seen = vec![false; shape.len()];
        assert!(
            axes.len() == shape.len()
                && axes.iter().all(|&a| a < shape.len() && !std::mem::replace(&mut seen[a], true)),
            "permute: {axes:?} is not a permutation of the axes of shape {shape:?}"
        );
        let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        let out = permute_values(&self.data(), &shape, axes);
        // Backward: output axis d came from input axis axes[d], so input axis a comes back from
        // output axis inverse[a] = d. Permuting g (of the output's shape) by `inverse` undoes it.
        let mut inverse = vec![0; axes.len()];
        for (d, &a) in axes.iter().enumerate() {
            inverse[a] = d;
        }
        let out_shape_saved = out_shape.clone();
        Tensor::from_op(out, &out_shape, "permute", &[self], move |g: &[f32]| {
            vec![Some(permute_values(g, &out_shape_saved, &inverse))]
        })
    }

    /// Swaps two axes (a [`permute`](Tensor::permute) that exchanges `a` and `b`).
    pub fn transpose(&self, a: usize, b: usize) -> Tensor {
        let mut axes: Vec<usize> = (0..self.rank()).collect();
        assert!(a < axes.len() && b < axes.len(), "transpose({a}, {b}): tensor has shape {:?}", self.shape());
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// The slice `start..start+len` along `axis`.
    ///
    /// ```
    /// use lego::Tensor;
    /// let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3]);
    /// assert_eq!(x.narrow(1, 1, 2).to_vec(), vec![1.0, 2.0, 4.0, 5.0]); // columns 1 and 2
    /// ```
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Tensor {
        let shape = self.shape().to_vec();
        assert!(
            axis < shape.len() && start + len <= shape[axis],
            "narrow: axis {axis}, {start}..{} is out of shape {shape:?}",
            start + len
        );
        // View the tensor as [outer, full, inner] with `axis` in the middle: the slice is, for
        // each outer index, one contiguous run of len·inner values starting at start·inner.
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let full = shape[axis];
        let x = self.data();
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&x[(o * full + start) * inner..(o * full + start + len) * inner]);
        }
        let mut out_shape = shape.clone();
        out_shape[axis] = len;
        Tensor::from_op(out, &out_shape, "narrow", &[self], move |g: &[f32]| {
            // Each run of g goes back where it was cut from; the rest of dx stays 0.
            let mut dx = pool::zeroed(outer * full * inner);
            for o in 0..outer {
                dx[(o * full + start) * inner..(o * full + start + len) * inner]
                    .copy_from_slice(&g[o * len * inner..(o + 1) * len * inner]);
            }
            vec![Some(dx)]
        })
    }

    /// Joins tensors along `axis`; all other dimensions must agree.
    ///
    /// ```
    /// use lego::Tensor;
    /// let a = Tensor::from_vec(vec![1.0, 2.0], &[2, 1]);
    /// let b = Tensor::from_vec(vec![3.0, 4.0, 5.0, 6.0], &[2, 2]);
    /// let c = Tensor::cat(&[&a, &b], 1); // [2, 1] beside [2, 2]
    /// assert_eq!(c.shape(), &[2, 3]);
    /// assert_eq!(c.to_vec(), vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
    /// ```
    pub fn cat(tensors: &[&Tensor], axis: usize) -> Tensor {
        assert!(!tensors.is_empty(), "cat: no tensors given");
        let first = tensors[0].shape().to_vec();
        assert!(axis < first.len(), "cat: axis {axis} is out of shape {first:?}");
        for t in tensors {
            let s = t.shape();
            assert!(
                s.len() == first.len() && (0..s.len()).all(|d| d == axis || s[d] == first[d]),
                "cat along axis {axis}: shapes {first:?} and {s:?} differ off that axis"
            );
        }
        // As in `narrow`, each piece is [outer, len, inner]: for each outer index the output
        // holds one run of len·inner values from each piece in turn.
        let outer: usize = first[..axis].iter().product();
        let inner: usize = first[axis + 1..].iter().product();
        let lens: Vec<usize> = tensors.iter().map(|t| t.shape()[axis]).collect();
        let total: usize = lens.iter().sum();
        let datas: Vec<_> = tensors.iter().map(|t| t.data()).collect();
        let mut out = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for (d, &len) in datas.iter().zip(&lens) {
                out.extend_from_slice(&d[o * len * inner..(o + 1) * len * inner]);
            }
        }
        let mut out_shape = first.clone();
        out_shape[axis] = total;
        let needs: Vec<bool> = tensors.iter().map(|t| t.requires_grad_flag()).collect();
        Tensor::from_op(out, &out_shape, "cat", tensors, move |g: &[f32]| {
            // Cut g the way the output was glued: for each outer index, `len·inner` values
            // from each piece in turn. A piece that needs no gradient is skipped over.
            let mut grads: Vec<Option<Vec<f32>>> = lens
                .iter()
                .zip(&needs)
                .map(|(&l, &need)| need.then(|| Vec::with_capacity(outer * l * inner)))
                .collect();
            let mut offset = 0;
            for _ in 0..outer {
                for (gi, &len) in grads.iter_mut().zip(&lens) {
                    if let Some(gi) = gi {
                        gi.extend_from_slice(&g[offset..offset + len * inner]);
                    }
                    offset += len * inner;
                }
            }
            grads
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_skips_unneeded_gradients};
    use crate::tensor::Tensor;

    #[test]
    fn transpose_and_narrow_by_hand() {
        let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3]);
        assert_eq!(x.transpose(0, 1).to_vec(), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(x.narrow(1, 1, 2).to_vec(), vec![1.0, 2.0, 4.0, 5.0]);
        let y = Tensor::cat(&[&x, &x.narrow(1, 0, 1)], 1);
        assert_eq!(y.shape(), &[2, 4]);
        assert_eq!(y.to_vec(), vec![0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 5.0, 3.0]);
    }

    #[test]
    fn reshape_shares_the_values() {
        let x = Tensor::ones(&[2, 3]);
        let y = x.reshape(&[3, 2]);
        assert!(std::sync::Arc::ptr_eq(&x.data(), &y.data()));
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_gradients(&[&[2, 3, 4, 5]], |x| x[0].permute(&[0, 2, 1, 3]));
        check_gradients(&[&[3, 4, 5]], |x| x[0].transpose(1, 2));
        check_gradients(&[&[2, 3, 4]], |x| x[0].reshape(&[6, 4]).mul(&x[0].reshape(&[6, 4])));
        check_gradients(&[&[2, 7, 5]], |x| x[0].narrow(1, 2, 3));
        check_gradients(&[&[2, 3, 5], &[2, 4, 5], &[2, 1, 5]], |x| Tensor::cat(&[&x[0], &x[1], &x[2]], 1));
        check_skips_unneeded_gradients(&[&[2, 3, 5], &[2, 4, 5], &[2, 1, 5]], |x| {
            Tensor::cat(&[&x[0], &x[1], &x[2]], 1)
        });
    }

    #[test]
    #[should_panic(expected = "narrow: axis 1, 2..5 is out of shape [2, 4]")]
    fn narrow_out_of_range_names_the_shape() {
        Tensor::zeros(&[2, 4]).narrow(1, 2, 3);
    }
}
