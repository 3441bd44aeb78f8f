//! Picking values out: `max`, `argmax`, `top_k` along the last axis. These choose, they do not
//! compute a differentiable function, so they return plain `Vec`s and record no gradient.
//!
//! The slice versions ([`argmax`], [`top_k`]) are what the decoding loop calls on a row of
//! logits.

use crate::tensor::Tensor;

/// The index of the largest value (the first one on ties). Panics on an empty slice.
///
/// ```
/// use lego::ops::select::argmax;
/// assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), 1);
/// ```
pub fn argmax(x: &[f32]) -> usize {
    assert!(!x.is_empty(), "argmax: empty slice");
    let mut best = 0;
    for (i, &v) in x.iter().enumerate().skip(1) {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The `k` largest values and their indices, largest first (ties: lower index first).
/// `k` is clamped to the length.
pub fn top_k(x: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let k = k.min(x.len());
    // Partition the k largest to the front in O(n) (no full sort of a vocabulary-wide row),
    // then sort just those k.
    let by_value_desc = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    if k < x.len() {
        idx.select_nth_unstable_by(k, by_value_desc);
        idx.truncate(k);
    }
    idx.sort_by(by_value_desc);
    idx.into_iter().map(|i| (i, x[i])).collect()
}

impl Tensor {
    /// The maximum of each row of the last axis.
    pub fn max_last(&self) -> Vec<f32> {
        let d = *self.shape().last().expect("max_last: scalar");
        self.data().chunks(d).map(|r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect()
    }

    /// The index of the maximum of each row of the last axis.
    pub fn argmax_last(&self) -> Vec<usize> {
        let d = *self.shape().last().expect("argmax_last: scalar");
        self.data().chunks(d).map(argmax).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_by_hand() {
        let x = Tensor::from_vec(vec![1.0, 5.0, 3.0, 5.0, -1.0, 0.0], &[2, 3]);
        assert_eq!(x.argmax_last(), vec![1, 0]);
        assert_eq!(x.max_last(), vec![5.0, 5.0]);
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9, 0.2], 3), vec![(1, 0.9), (3, 0.9), (2, 0.5)]);
        assert_eq!(top_k(&[2.0], 5), vec![(0, 2.0)]);
    }
}
