//! Sums and means, over everything or along one axis.
//!
//! **Backward.** `y = Σᵢ xᵢ` has `∂y/∂xᵢ = 1`, so every summed element receives the upstream
//! gradient of the sum it went into; a mean divides it by the count. Along an axis, view the
//! tensor as `[outer, len, inner]` (the axis in the middle): output `(o, i)` is the sum of
//! `x[o, 0..len, i]`, and each of those gets `g[o, i]`.
//!
//! ```
//! use lego::Tensor;
//! let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).requires_grad();
//! let row_means = x.mean_axis(1, false); // [2.0, 5.0]
//! assert_eq!(row_means.to_vec(), vec![2.0, 5.0]);
//! row_means.sum_all().backward();
//! assert_eq!(x.grad().unwrap(), vec![1.0 / 3.0; 6]); // each element is a third of a mean
//! ```

use crate::tensor::Tensor;

impl Tensor {
    /// The sum of all elements, as a tensor of shape `[]`.
    pub fn sum_all(&self) -> Tensor {
        // f64 accumulation: a long f32 sum loses digits, and this is where losses are summed.
        let s: f64 = self.data().iter().map(|&v| v as f64).sum();
        let n = self.numel();
        // Backward: every element gets the sum's gradient g.
        Tensor::from_op(vec![s as f32], &[], "sum_all", &[self], move |g: &[f32]| vec![Some(vec![g[0]; n])])
    }

    /// The mean of all elements, as a tensor of shape `[]`.
    pub fn mean_all(&self) -> Tensor {
        let n = self.numel();
        assert!(n > 0, "mean_all: the tensor is empty (shape {:?})", self.shape());
        let s: f64 = self.data().iter().map(|&v| v as f64).sum();
        // Backward: every element gets g/n, its share of the mean.
        Tensor::from_op(vec![(s / n as f64) as f32], &[], "mean_all", &[self], move |g: &[f32]| {
            vec![Some(vec![g[0] / n as f32; n])]
        })
    }

    /// The sum along `axis`, which is removed from the shape (`keepdim` keeps it as size 1).
    pub fn sum_axis(&self, axis: usize, keepdim: bool) -> Tensor {
        self.reduce_axis(axis, keepdim, false)
    }

    /// The mean along `axis`, which is removed from the shape (`keepdim` keeps it as size 1).
    pub fn mean_axis(&self, axis: usize, keepdim: bool) -> Tensor {
        self.reduce_axis(axis, keepdim, true)
    }

    /// The sum (or mean) along `axis`, shared by [`sum_axis`](Tensor::sum_axis) and
    /// [`mean_axis`](Tensor::mean_axis).
    fn reduce_axis(&self, axis: usize, keepdim: bool, mean: bool) -> Tensor {
        let shape = self.shape().to_vec();
        assert!(axis < shape.len(), "sum/mean along axis {axis}: tensor has shape {shape:?}");
        // [outer, len, inner] with the summed axis in the middle.
        let outer: usize = shape[..axis].iter().product();
        let len = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let scale = if mean {
            assert!(len > 0, "mean along axis {axis}: it is empty (shape {shape:?})");
            1.0 / len as f32
        } else {
            1.0
        };
        // out[o, :] = scale·Σ_l x[o, l, :], adding whole rows of `inner` values at a time.
        let x = self.data();
        let mut out = vec![0.0f32; outer * inner];
        for o in 0..outer {
            let acc = &mut out[o * inner..(o + 1) * inner];
            for l in 0..len {
                let row = &x[(o * len + l) * inner..(o * len + l + 1) * inner];
                acc.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            acc.iter_mut().for_each(|a| *a *= scale);
        }
        // `keepdim` leaves the axis as size 1, so that the result broadcasts against `self`
        // (e.g. subtracting each row's mean from its row).
        let mut out_shape = shape.clone();
        if keepdim {
            out_shape[axis] = 1;
        } else {
            out_shape.remove(axis);
        }
        let op = if mean { "mean_axis" } else { "sum_axis" };
        Tensor::from_op(out, &out_shape, op, &[self], move |g: &[f32]| {
            // dx[o, l, :] = scale·g[o, :] for every l: the gradient is broadcast back.
            let mut dx = vec![0.0f32; outer * len * inner];
            for o in 0..outer {
                let go = &g[o * inner..(o + 1) * inner];
                for l in 0..len {
                    let d = &mut dx[(o * len + l) * inner..(o * len + l + 1) * inner];
                    d.iter_mut().zip(go).for_each(|(a, b)| *a = b * scale);
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
    fn sums_by_hand() {
        let x = Tensor::from_vec((1..=6).map(|v| v as f32).collect(), &[2, 3]);
        assert_eq!(x.sum_all().item(), 21.0);
        // Axis 0 adds up the columns; axis 1 averages each row.
        assert_eq!(x.sum_axis(0, false).to_vec(), vec![5.0, 7.0, 9.0]);
        assert_eq!(x.mean_axis(1, true).shape(), &[2, 1]);
        assert_eq!(x.mean_axis(1, false).to_vec(), vec![2.0, 5.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let s: &[usize] = &[3, 5, 7];
        check_gradients(&[s], |x| x[0].sum_all());
        check_gradients(&[s], |x| x[0].mean_all());
        for axis in 0..3 {
            check_gradients(&[s], |x| x[0].sum_axis(axis, false));
            check_gradients(&[s], |x| x[0].mean_axis(axis, true));
        }
    }
}
