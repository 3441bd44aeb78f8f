//! Matrix products: `a·b`, `a·bᵀ`, `aᵀ·b`, batched over leading dimensions.
//!
//! Shapes: `a` is `[..., M, K]` (or `[..., K, M]` read transposed), `b` is `[..., K, N]` (or
//! `[..., N, K]` read transposed) with the same leading (batch) dimensions as `a`, or `b` is a
//! plain matrix shared by every batch (a weight). The output is `[..., M, N]`.
//!
//! **Backward.** With `C = A·B` (A: M×K, B: K×N) and `G = ∂L/∂C`:
//! `C[i][j] = Σ_p A[i][p]·B[p][j]`, so `∂L/∂A[i][p] = Σ_j G[i][j]·B[p][j]`, i.e.
//! `∂L/∂A = G·Bᵀ`, and likewise `∂L/∂B = Aᵀ·G`. When an operand was read transposed, its
//! gradient is the transpose of that: `∂L/∂(Aᵀ) = (G·Bᵀ)ᵀ = B·Gᵀ`. Every transpose here is a
//! swap of strides handed to `sgemm`, never a copy.

use crate::kernels::gemm::sgemm;
use crate::tensor::{Tensor, pool};

/// How a stored matrix is read: element `[i][j]` of the (possibly transposed) view is at
/// `i*rs + j*cs` of the buffer.
#[derive(Clone, Copy)]
struct View {
    rs: usize,
    cs: usize,
}

impl View {
    /// A matrix stored row-major with `cols` columns, read as is (`transposed = false`) or as
    /// its transpose.
    fn of(cols: usize, transposed: bool) -> View {
        if transposed { View { rs: 1, cs: cols } } else { View { rs: cols, cs: 1 } }
    }
    fn t(self) -> View {
        View { rs: self.cs, cs: self.rs }
    }
}

/// Sizes of one product, worked out from the operands' shapes.
struct Dims {
    batch: usize,
    /// Whether `b` is one matrix shared by all batches.
    b_shared: bool,
    m: usize,
    k: usize,
    n: usize,
    out_shape: Vec<usize>,
}

fn dims(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Dims {
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
    let mut out_shape = a_batch.to_vec();
    out_shape.extend([m, n]);
    Dims { batch: a_batch.iter().product(), b_shared, m, k, n, out_shape }
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
        let d = dims(self.shape(), other.shape(), ta, tb);
        let (m, k, n) = (d.m, d.k, d.n);
        let a_view = View::of(if ta { m } else { k }, ta);
        let b_view = View::of(if tb { k } else { n }, tb);
        let (a, b) = (self.data(), other.data());
        let mut out = pool::take(d.batch * m * n); // sgemm with β = 0 writes every element

        // A weight shared by the batch, read untransposed by an untransposed `a`: the batch
        // folds into the rows, one large product instead of many small ones.
        let fold = d.b_shared && !ta;
        if fold {
            sgemm(
                d.batch * m,
                k,
                n,
                1.0,
                &a,
                a_view.rs,
                a_view.cs,
                &b,
                b_view.rs,
                b_view.cs,
                0.0,
                &mut out,
                n,
            );
        } else {
            for bi in 0..d.batch {
                let b_off = if d.b_shared { 0 } else { bi * k * n };
                sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    &a[bi * m * k..],
                    a_view.rs,
                    a_view.cs,
                    &b[b_off..],
                    b_view.rs,
                    b_view.cs,
                    0.0,
                    &mut out[bi * m * n..],
                    n,
                );
            }
        }

        let (a_saved, b_saved) = (a.clone(), b.clone());
        let batch = d.batch;
        let b_shared = d.b_shared;
        Tensor::from_op(out, &d.out_shape, "matmul", &[self, other], move |g: &[f32]| {
            let g_view = View { rs: n, cs: 1 };
            let rows = if fold { batch * m } else { m };
            // ∂L/∂A: G·Bᵀ (or B·Gᵀ if A was read transposed).
            let mut da = pool::take(a_saved.len());
            // ∂L/∂B: Aᵀ·G (or Gᵀ·A if B was read transposed), summed over batches if shared.
            let mut db = pool::take(b_saved.len());
            let groups = if fold { 1 } else { batch };
            for bi in 0..groups {
                let (ao, go) = (bi * m * k, bi * m * n);
                let bo = if b_shared { 0 } else { bi * k * n };
                let a_blk = &a_saved[ao..];
                let b_blk = &b_saved[bo..];
                let g_blk = &g[go..];
                if !ta {
                    // dA (rows×k) = G (rows×n) · Bᵀ (n×k)
                    let bt = b_view.t();
                    sgemm(
                        rows,
                        n,
                        k,
                        1.0,
                        g_blk,
                        g_view.rs,
                        g_view.cs,
                        b_blk,
                        bt.rs,
                        bt.cs,
                        0.0,
                        &mut da[ao..],
                        k,
                    );
                } else {
                    // dA stored (k×m) = B (k×n) · Gᵀ (n×m)
                    let gt = g_view.t();
                    sgemm(
                        k,
                        n,
                        m,
                        1.0,
                        b_blk,
                        b_view.rs,
                        b_view.cs,
                        g_blk,
                        gt.rs,
                        gt.cs,
                        0.0,
                        &mut da[ao..],
                        m,
                    );
                }
                let beta = if b_shared && bi > 0 { 1.0 } else { 0.0 };
                let at = View::of(if ta { m } else { k }, ta).t();
                if !tb {
                    // dB (k×n) = Aᵀ (k×rows) · G (rows×n)
                    sgemm(
                        k,
                        rows,
                        n,
                        1.0,
                        a_blk,
                        at.rs,
                        at.cs,
                        g_blk,
                        g_view.rs,
                        g_view.cs,
                        beta,
                        &mut db[bo..],
                        n,
                    );
                } else {
                    // dB stored (n×k) = Gᵀ (n×rows) · A (rows×k)
                    let gt = g_view.t();
                    let av = at.t();
                    sgemm(n, rows, k, 1.0, g_blk, gt.rs, gt.cs, a_blk, av.rs, av.cs, beta, &mut db[bo..], k);
                }
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
    #[should_panic(expected = "matmul: inner dimensions differ: [2, 3] times [4, 5]")]
    fn mismatched_inner_dimensions_name_the_shapes() {
        Tensor::zeros(&[2, 3]).matmul(&Tensor::zeros(&[4, 5]));
    }
}
