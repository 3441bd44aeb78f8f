//! Matrix products: `a·b`, `a·bᵀ`, `aᵀ·b`, batched over leading dimensions.
//!
//! Shapes: `a` is `[..., M, K]` (or `[..., K, M]` read transposed), `b` is `[..., K, N]` (or
//! `[..., N, K]` read transposed) with the same leading (batch) dimensions as `a`, or `b` is a
//! plain matrix shared by every batch (a weight). The output is `[..., M, N]`.
//!
//! **Backward.** With `C = A·B` (A: M×K, B: K×N) and `G = ∂L/∂C`: since
//! `C[i][j] = Σ_p A[i][p]·B[p][j]`, the entry `A[i][p]` reaches the loss through row i of C,
//! each `C[i][j]` with weight `B[p][j]`:
//!
//! ```text
//! ∂L/∂A[i][p] = Σ_j G[i][j]·B[p][j]    i.e.  ∂L/∂A = G·Bᵀ     (M×N · N×K = M×K)
//! ∂L/∂B[p][j] = Σ_i A[i][p]·G[i][j]    i.e.  ∂L/∂B = Aᵀ·G     (K×M · M×N = K×N)
//! ```
//!
//! An operand read transposed, `A = Xᵀ`, wants its gradient in X's layout, the transpose of
//! the above: `∂L/∂X = (G·Bᵀ)ᵀ = B·Gᵀ`; likewise `∂L/∂Y = (Aᵀ·G)ᵀ = Gᵀ·A` for `B = Yᵀ`. A `b`
//! shared by the batch takes part in every product, so its gradient is the sum over the batch.
//!
//! Each formula is one [`gemm`] call on [`MatView`]s: a transpose is a swap of strides, never a
//! copy. An input that needs no gradient (a frozen weight, a constant) gets none computed.

use crate::kernels::gemm::{MatView, gemm};
use crate::tensor::{Tensor, pool};

/// A batched product worked out from the operands' shapes: how many matrix products it is
/// (`groups`), and where each one's operands lie in the buffers.
#[derive(Clone, Copy)]
struct Product {
    /// Number of separate `gemm` calls: the batch size, or 1 when the batch is folded into
    /// the rows (see [`Tensor::matmul_ex`]).
    groups: usize,
    /// Rows of `op(A)` and of C in one group: M, or batch·M when folded.
    rows: usize,
    /// The inner dimension K.
    k: usize,
    /// Columns of `op(B)` and of C: N.
    n: usize,
    /// Whether `a` is read transposed (stored `[K, M]`).
    ta: bool,
    /// Whether `b` is read transposed (stored `[N, K]`).
    tb: bool,
    /// Whether `b` is one matrix shared by all groups.
    b_shared: bool,
}

impl Product {
    /// Group i's left operand as the product reads it: `op(A)`, `rows × K`.
    fn a<'a>(&self, a: &'a [f32], i: usize) -> MatView<'a> {
        let size = self.rows * self.k;
        let stored = &a[i * size..(i + 1) * size];
        // Stored `[rows, K]`, or `[K, rows]` when it is read transposed.
        let (r, c) = if self.ta { (self.k, self.rows) } else { (self.rows, self.k) };
        MatView::row_major(stored, r, c).t_if(self.ta)
    }

    /// Group i's right operand as the product reads it: `op(B)`, `K × N`.
    fn b<'a>(&self, b: &'a [f32], i: usize) -> MatView<'a> {
        let (k, n) = (self.k, self.n);
        let stored = &b[self.b_offset(i)..self.b_offset(i) + k * n];
        let (r, c) = if self.tb { (n, k) } else { (k, n) };
        MatView::row_major(stored, r, c).t_if(self.tb)
    }

    /// Where group i's B starts in b's buffer (always 0 for a shared B).
    fn b_offset(&self, i: usize) -> usize {
        if self.b_shared { 0 } else { i * self.k * self.n }
    }

    /// Group i's block of `rows × cols` values in a buffer of all groups' blocks (C: N
    /// columns; dA: K, or `rows` for an A stored transposed, `[K, rows]`, the same size).
    fn block_of<'a>(&self, buf: &'a mut [f32], i: usize, cols: usize) -> &'a mut [f32] {
        &mut buf[i * self.rows * cols..(i + 1) * self.rows * cols]
    }
}

/// The output shape and the [`Product`] for `op(a)·op(b)`, panicking with both shapes if they
/// do not fit.
fn plan(a: &[usize], b: &[usize], ta: bool, tb: bool) -> (Vec<usize>, Product) {
    assert!(
        a.len() >= 2 && b.len() >= 2,
        "matmul: both operands need at least 2 dimensions, got {a:?} and {b:?}"
    );
    let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
    let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if tb { (bc, br) } else { (br, bc) };
    assert_eq!(
        k,
        kb,
        "matmul: inner dimensions differ: {a:?}{} times {b:?}{}",
        if ta { "ᵀ" } else { "" },
        if tb { "ᵀ" } else { "" }
    );
    let a_batch = &a[..a.len() - 2];
    let b_batch = &b[..b.len() - 2];
    let b_shared = b_batch.is_empty();
    assert!(
        b_shared || a_batch == b_batch,
        "matmul: batch dimensions differ: {a:?} vs {b:?} (b must have a's batch dimensions or none)"
    );
    let batch: usize = a_batch.iter().product();
    // A weight shared by the batch, read by an untransposed `a`: `[batch, M, K]` is the matrix
    // `[batch·M, K]`, so the batch folds into the rows: one large product instead of many
    // small ones (every `Linear` layer takes this path).
    let fold = b_shared && !ta;
    let (groups, rows) = if fold { (1, batch * m) } else { (batch, m) };
    let mut out_shape = a_batch.to_vec();
    out_shape.extend([m, n]);
    (out_shape, Product { groups, rows, k, n, ta, tb, b_shared })
}

impl Tensor {
    /// `self · other`: `[..., M, K] · [..., K, N] → [..., M, N]` (`other` may be a plain matrix
    /// shared by all batches).
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        self.matmul_ex(other, false, false)
    }

    /// `self · otherᵀ`: `[..., M, K] · [N, K]ᵀ → [..., M, N]`. This is a linear layer with the
    /// weight stored `(out, in)`, as PyTorch and Llama checkpoints store it.
    pub fn matmul_t(&self, other: &Tensor) -> Tensor {
        self.matmul_ex(other, false, true)
    }

    /// The general product `op(self) · op(other)`, where `op` transposes the last two
    /// dimensions when its flag is set.
    pub fn matmul_ex(&self, other: &Tensor, ta: bool, tb: bool) -> Tensor {
        let (out_shape, p) = plan(self.shape(), other.shape(), ta, tb);
        let (a, b) = (self.data(), other.data());
        let mut out = pool::take(p.groups * p.rows * p.n); // β = 0 below writes every element
        for i in 0..p.groups {
            // C = A·B   [rows, N]
            gemm(1.0, p.a(&a, i), p.b(&b, i), 0.0, p.block_of(&mut out, i, p.n));
        }

        // Decided now, as PyTorch does: a weight frozen when the graph was built gets nothing.
        let (need_a, need_b) = (self.requires_grad_flag(), other.requires_grad_flag());
        Tensor::from_op(out, &out_shape, "matmul", &[self, other], move |g: &[f32]| {
            let mut da = need_a.then(|| pool::take(a.len()));
            let mut db = need_b.then(|| pool::take(b.len()));
            let (k, n) = (p.k, p.n);
            for i in 0..p.groups {
                let (a_i, b_i) = (p.a(&a, i), p.b(&b, i));
                let g_i = MatView::row_major(&g[i * p.rows * n..(i + 1) * p.rows * n], p.rows, n);
                if let Some(da) = da.as_mut() {
                    let da_i = p.block_of(da, i, k);
                    match p.ta {
                        false => gemm(1.0, g_i, b_i.t(), 0.0, da_i), // dA = G·Bᵀ
                        true => gemm(1.0, b_i, g_i.t(), 0.0, da_i),  // a stored transposed: (G·Bᵀ)ᵀ = B·Gᵀ
                    }
                }
                if let Some(db) = db.as_mut() {
                    // A B shared by the groups sums their shares: β = 1 after the first.
                    let db_i = &mut db[p.b_offset(i)..p.b_offset(i) + k * n];
                    let beta = if p.b_shared && i > 0 { 1.0 } else { 0.0 };
                    match p.tb {
                        false => gemm(1.0, a_i.t(), g_i, beta, db_i), // dB = Aᵀ·G
                        true => gemm(1.0, g_i.t(), a_i, beta, db_i),  // b stored transposed: (Aᵀ·G)ᵀ = Gᵀ·A
                    }
                }
            }
            vec![da, db]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::{check_gradients, check_skips_unneeded_gradients};
    use crate::tensor::Tensor;

    #[test]
    fn small_product_by_hand() {
        let a = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = Tensor::from_vec(vec![5.0, 6.0, 7.0, 8.0], &[2, 2]);
        assert_eq!(a.matmul(&b).to_vec(), vec![19.0, 22.0, 43.0, 50.0]);
        assert_eq!(a.matmul_t(&b).to_vec(), vec![17.0, 23.0, 39.0, 53.0]);
        assert_eq!(a.matmul_ex(&b, true, false).to_vec(), vec![26.0, 30.0, 38.0, 44.0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
            for &(m, k, n) in &[(1, 1, 1), (3, 5, 2), (2, 17, 9)] {
                let a_shape = if ta { [k, m] } else { [m, k] };
                let b_shape = if tb { [n, k] } else { [k, n] };
                check_gradients(&[&a_shape, &b_shape], |x| x[0].matmul_ex(&x[1], ta, tb));
                // Batched, and with b shared across the batch.
                check_gradients(&[&[2, a_shape[0], a_shape[1]], &[2, b_shape[0], b_shape[1]]], |x| {
                    x[0].matmul_ex(&x[1], ta, tb)
                });
                check_gradients(&[&[3, a_shape[0], a_shape[1]], &b_shape], |x| x[0].matmul_ex(&x[1], ta, tb));
            }
        }
    }

    #[test]
    fn only_the_inputs_that_need_a_gradient_get_one() {
        for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
            let (a, b) = (if ta { [5, 3] } else { [3, 5] }, if tb { [4, 5] } else { [5, 4] });
            check_skips_unneeded_gradients(&[&a, &b], |x| x[0].matmul_ex(&x[1], ta, tb));
            check_skips_unneeded_gradients(&[&[2, a[0], a[1]], &b], |x| x[0].matmul_ex(&x[1], ta, tb));
            check_skips_unneeded_gradients(&[&[2, a[0], a[1]], &[2, b[0], b[1]]], |x| {
                x[0].matmul_ex(&x[1], ta, tb)
            });
        }
    }

    #[test]
    #[should_panic(expected = "matmul: inner dimensions differ: [2, 3] times [4, 5]")]
    fn mismatched_inner_dimensions_name_the_shapes() {
        Tensor::zeros(&[2, 3]).matmul(&Tensor::zeros(&[4, 5]));
    }
}
