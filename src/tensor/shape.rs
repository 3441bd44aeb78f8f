//! Shape arithmetic: element counts, strides, and the broadcasting rule.
//!
//! **Broadcasting** follows NumPy: align the two shapes at their last dimension; each pair of
//! sizes must be equal, or one of them 1 (that operand is repeated along the dimension); a
//! missing leading dimension counts as 1. So `[2, 3, 17] + [17]` adds a vector to every row,
//! and `[2, 3, 17] + [3, 1]` adds a column. Anything else (`[3, 4] + [3]`) is an error, never
//! a silent guess.

/// The number of elements of a shape (1 for the scalar shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides: how many elements one step along each dimension skips. The last
/// dimension is contiguous (stride 1); each earlier one skips a whole block of the later ones.
///
/// ```
/// use lego::tensor::shape::strides;
/// assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]); // element [i][j][k] at 12i + 4j + k
/// ```
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// The shape two operands of `op` broadcast to. Panics, naming the op and both shapes, if
/// they do not broadcast.
///
/// ```
/// use lego::tensor::shape::broadcast_shape;
/// assert_eq!(broadcast_shape("add", &[2, 3, 17], &[17]), vec![2, 3, 17]); // a row on every row
/// assert_eq!(broadcast_shape("add", &[1, 3], &[4, 1]), vec![4, 3]); // both stretch
/// ```
pub fn broadcast_shape(op: &str, a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    // Dimension i of the result, counted from the left of the longer shape; the shorter one is
    // padded with 1s on the left.
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i < rank - a.len() { 1 } else { a[i - (rank - a.len())] };
        let db = if i < rank - b.len() { 1 } else { b[i - (rank - b.len())] };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            panic!("{op}: shapes {a:?} and {b:?} do not broadcast (dimension {i}: {da} vs {db})")
        };
    }
    out
}

/// Strides for reading an operand of shape `shape` as if it had the (larger) broadcast shape
/// `out`: a broadcast dimension gets stride 0, so the same element is read again.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    // Missing leading dimensions (i < lead) and size-1 dimensions both get stride 0: moving
    // along them in the output stays on the same operand element.
    let own = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len()).map(|i| if i < lead || shape[i - lead] == 1 { 0 } else { own[i - lead] }).collect()
}

/// For each element of the broadcast shape `out`, in row-major order, the index of the
/// element of the operand (with broadcast strides `bstrides`) that it reads.
///
/// The binary ops precompute this once per op for the broadcasts that are neither "same shape"
/// nor "a suffix of the output" (a column `[3, 1]` against `[2, 3, 17]`), and then both the
/// forward and the backward just look indices up.
pub fn broadcast_index_map(out: &[usize], bstrides: &[usize]) -> Vec<usize> {
    let n = numel(out);
    let mut map = Vec::with_capacity(n);
    let mut idx = vec![0usize; out.len()];
    let mut offset = 0usize;
    for _ in 0..n {
        map.push(offset);
        // Odometer increment of the multi-index, updating the offset as it goes.
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            offset += bstrides[d];
            if idx[d] < out[d] {
                break;
            }
            offset -= bstrides[d] * out[d];
            idx[d] = 0;
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shape("t", &[2, 3, 17], &[17]), vec![2, 3, 17]);
        assert_eq!(broadcast_shape("t", &[2, 3, 17], &[3, 1]), vec![2, 3, 17]);
        assert_eq!(broadcast_shape("t", &[1, 3], &[4, 1]), vec![4, 3]);
        assert_eq!(broadcast_shape("t", &[], &[2]), vec![2]);
    }

    #[test]
    #[should_panic(expected = "add: shapes [3, 4] and [3] do not broadcast")]
    fn mismatched_shapes_are_refused() {
        broadcast_shape("add", &[3, 4], &[3]);
    }

    #[test]
    fn index_map_repeats_broadcast_elements() {
        let out = [2, 3];
        let map = broadcast_index_map(&out, &broadcast_strides(&[3], &out));
        assert_eq!(map, vec![0, 1, 2, 0, 1, 2]);
        let map = broadcast_index_map(&out, &broadcast_strides(&[2, 1], &out));
        assert_eq!(map, vec![0, 0, 0, 1, 1, 1]);
    }
}
