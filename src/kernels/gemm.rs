//! The matrix product `C = α·A·B + β·C`, the one kernel that dominates training time.
//!
//! Large products go to `matrixmultiply::sgemm`, which packs panels of A and B into cache-sized
//! blocks and runs an AVX-512 / AVX2 micro-kernel. It takes any row and column strides, so a
//! transposed operand (`x·Wᵀ`, `dYᵀ·X`) is just a swap of strides, never a copy.
//!
//! Two things it does not do well, handled here:
//!
//! - **Threads.** Its own `threading` feature uses a separate pool (fighting rayon's for the
//!   same cores), so we split C into blocks of rows instead and give each block to a rayon
//!   task running a single-threaded `sgemm`. The split depends only on the shape and thread
//!   count, so results are deterministic.
//! - **A few rows.** With one row (decoding one token) `sgemm` spends its time packing and
//!   runs at a few GFLOP/s; when B is a row-major weight read transposed (`x·Wᵀ`, every
//!   `Linear`), we use the SIMD kernel [`simd::matmul_xwt`], which streams each weight row once
//!   against all rows of `x`.

use rayon::prelude::*;

use super::parallel::{threads, worth_splitting};
use super::simd;

/// Up to this many rows, `x·Wᵀ` takes the streaming small-M kernel instead of `sgemm`.
pub const SMALL_M: usize = 16;

/// `C = alpha·A·B + beta·C`, with A (m×k) and B (k×n) read through strides (element `A[i][p]`
/// at `a[i*rsa + p*csa]`) and C (m×n) row-major with row stride `ldc`.
///
/// With `beta == 0`, C's old contents are ignored (even NaN). Panics (naming the shapes) if a
/// slice is too short for its strides.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    sgemm_maybe_split(true, m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc);
}

/// [`sgemm`] on the calling thread only, for a caller that is already one of several
/// parallel tasks (attention runs its heads in parallel, and each head's products are small:
/// splitting them again costs more in hand-offs than it saves).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_one_thread(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    sgemm_maybe_split(false, m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc);
}

/// [`sgemm`], splitting C's rows over rayon's threads only if `split` and the product is large.
#[allow(clippy::too_many_arguments)]
fn sgemm_maybe_split(
    split: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "sgemm: row stride {ldc} of C is less than its {n} columns");
    assert!(
        c.len() > (m - 1) * ldc + n - 1,
        "sgemm: C has {} values, too few for {m}x{n} with row stride {ldc}",
        c.len()
    );
    if k == 0 {
        scale_rows(m, n, beta, c, ldc);
        return;
    }
    assert!(
        a.len() > (m - 1) * rsa + (k - 1) * csa,
        "sgemm: A has {} values, too few for {m}x{k} with strides ({rsa}, {csa})",
        a.len()
    );
    assert!(
        b.len() > (k - 1) * rsb + (n - 1) * csb,
        "sgemm: B has {} values, too few for {k}x{n} with strides ({rsb}, {csb})",
        b.len()
    );

    // x·Wᵀ with few rows: B[p][j] = W[j][p], W row-major with contiguous rows of length k.
    let x_contiguous = csa == 1 && (rsa == k || m == 1);
    let w_row_major = rsb == 1 && csb == k;
    if m <= SMALL_M && x_contiguous && w_row_major && alpha == 1.0 && beta == 0.0 {
        small_m_xwt(m, k, n, a, b, c, ldc);
        return;
    }

    let flops = 2 * m * k * n;
    let blocks = if split && worth_splitting(flops) && m >= 16 { threads().min(m / 8).max(1) } else { 1 };
    if blocks == 1 {
        sgemm_serial(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc);
        return;
    }
    let rows_per_block = m.div_ceil(blocks);
    // Only C's own rows are split: a `c` that runs on past them (the rest of a batch) must not
    // produce blocks that start beyond row m.
    c[..(m - 1) * ldc + n].par_chunks_mut(rows_per_block * ldc).enumerate().for_each(|(blk, c_blk)| {
        let row0 = blk * rows_per_block;
        let rows = rows_per_block.min(m - row0);
        sgemm_serial(rows, k, n, alpha, &a[row0 * rsa..], rsa, csa, b, rsb, csb, beta, c_blk, ldc);
    });
}

/// A matrix read in place through strides: element `[i][j]` is `data[i·row_stride + j·col_stride]`.
///
/// A row-major `rows × cols` matrix has strides `(cols, 1)`; its transpose is the same buffer
/// with the strides (and the sizes) swapped, so [`t`](MatView::t) costs nothing. One head of a
/// `[T, H, hd]` activation is the `T × hd` view with row stride `H·hd`, also without a copy.
#[derive(Clone, Copy, Debug)]
pub struct MatView<'a> {
    /// The buffer the matrix lives in (it may hold more than the matrix).
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance in `data` between `[i][j]` and `[i + 1][j]`.
    pub row_stride: usize,
    /// Distance in `data` between `[i][j]` and `[i][j + 1]`.
    pub col_stride: usize,
}

impl<'a> MatView<'a> {
    /// The `rows × cols` matrix stored row-major at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> MatView<'a> {
        MatView { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose: `[j][i]` of the result is `[i][j]` of `self` (no copy).
    pub fn t(self) -> MatView<'a> {
        MatView {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The transpose if `transposed`, else `self`.
    pub fn t_if(self, transposed: bool) -> MatView<'a> {
        if transposed { self.t() } else { self }
    }
}

/// `C = alpha·A·B + beta·C` on matrix views: [`sgemm`] with the sizes and strides taken from
/// `a` and `b`. C is row-major `a.rows × b.cols` at the start of `c`.
///
/// Panics, naming both shapes, if `a.cols != b.rows`; with `beta == 0` C's old contents are
/// ignored.
///
/// ```
/// use lego::kernels::gemm::{MatView, gemm};
/// let a = [1.0, 2.0, 3.0, 4.0]; // [[1, 2], [3, 4]]
/// let mut c = [0.0; 4];
/// // C = A·Aᵀ, the transpose read through swapped strides.
/// gemm(1.0, MatView::row_major(&a, 2, 2), MatView::row_major(&a, 2, 2).t(), 0.0, &mut c);
/// assert_eq!(c, [5.0, 11.0, 11.0, 25.0]);
/// ```
pub fn gemm(alpha: f32, a: MatView, b: MatView, beta: f32, c: &mut [f32]) {
    assert_eq!(
        a.cols, b.rows,
        "gemm: cannot multiply a {}x{} matrix by a {}x{} one",
        a.rows, a.cols, b.rows, b.cols
    );
    sgemm(
        a.rows,
        a.cols,
        b.cols,
        alpha,
        a.data,
        a.row_stride,
        a.col_stride,
        b.data,
        b.row_stride,
        b.col_stride,
        beta,
        c,
        b.cols,
    );
}

/// One single-threaded call of `matrixmultiply::sgemm` (bounds already checked by the caller).
#[allow(clippy::too_many_arguments)]
fn sgemm_serial(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    debug_assert!(a.len() > (m - 1) * rsa + (k - 1) * csa);
    debug_assert!(b.len() > (k - 1) * rsb + (n - 1) * csb);
    debug_assert!(c.len() > (m - 1) * ldc + n - 1);
    // SAFETY: matrixmultiply reads A[i][p] at a + i*rsa + p*csa for i < m, p < k, B likewise,
    // and writes C[i][j] at c + i*ldc + j for i < m, j < n. The caller has checked that the
    // largest such offsets lie inside each slice (asserts in `sgemm`, re-checked above in
    // debug builds), C is borrowed mutably so nothing else aliases it, and A and B are only read.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// `C = beta·C` (the product of an empty K dimension is zero).
fn scale_rows(m: usize, n: usize, beta: f32, c: &mut [f32], ldc: usize) {
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|x| *x *= beta);
        }
    }
}

/// `C = x·Wᵀ` for a few rows of x (contiguous, m×k): W (n×k, row-major) is streamed once, each
/// of its rows dotted with all m rows of x.
fn small_m_xwt(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], c: &mut [f32], ldc: usize) {
    let (x, w) = (&x[..m * k], &w[..n * k]);
    if m == 1 {
        // One row: the transposed output (n×1) is the row itself, written straight into C.
        matmul_xwt_split(x, 1, k, w, &mut c[..n]);
        return;
    }
    let mut out_t = vec![0.0f32; n * m];
    matmul_xwt_split(x, m, k, w, &mut out_t);
    for i in 0..m {
        for j in 0..n {
            c[i * ldc + j] = out_t[j * m + i];
        }
    }
}

/// Below this many weights (1 MiB of f32) a small-M product stays on one thread.
pub const SPLIT_MIN_WEIGHTS: usize = 1 << 18;

/// `out_t = (x·Wᵀ)ᵀ` (n×m), splitting W's rows over rayon's threads when the product is large
/// (the autodiff op's few-row path; the decoder splits its products over its own thread team,
/// [`crate::kernels::matvec`]).
pub fn matmul_xwt_split(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    let n = w.len() / k.max(1);
    // A matrix-vector product is bound by reading W: a W of 256×256 floats is read in about
    // 10 µs, and handing half of it to a sleeping rayon worker costs about as much. Split
    // only when W is large enough (measured: splitting every product of config S made decoding
    // 1.6x slower on 2 threads than on 1).
    if !worth_splitting(2 * m * k * n) || n * k < SPLIT_MIN_WEIGHTS || n < 64 {
        simd::matmul_xwt(x, m, k, w, out_t);
        return;
    }
    // Blocks of W rows, a multiple of 16 rows each, a couple per thread.
    let rows_per_task = n.div_ceil(threads() * 2).next_multiple_of(16);
    out_t
        .par_chunks_mut(rows_per_task * m)
        .zip(w.par_chunks(rows_per_task * k))
        .for_each(|(o, wb)| simd::matmul_xwt(x, m, k, wb, o));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop, in f64.
    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn matches_the_triple_loop_at_odd_sizes_and_both_paths() {
        for &(m, k, n) in
            &[(1, 1, 1), (1, 7, 13), (3, 5, 2), (5, 17, 33), (16, 9, 70), (17, 33, 65), (130, 70, 90)]
        {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let mut c = vec![f32::NAN; m * n];
            sgemm(m, k, n, 1.0, &a, k, 1, &b, n, 1, 0.0, &mut c, n);
            close(&c, &naive(m, k, n, &a, &b));

            // The same product as x·Wᵀ with W = Bᵀ stored row-major (n×k): the small-M path.
            let w: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
            let mut c2 = vec![f32::NAN; m * n];
            sgemm(m, k, n, 1.0, &a, k, 1, &w, 1, k, 0.0, &mut c2, n);
            close(&c2, &naive(m, k, n, &a, &b));
        }
    }

    #[test]
    fn accumulates_with_beta_and_respects_row_stride() {
        let (m, k, n, ldc) = (3, 4, 5, 8);
        let a = values(m * k, 3);
        let b = values(k * n, 4);
        let mut c = vec![1.0f32; m * ldc];
        sgemm(m, k, n, 2.0, &a, k, 1, &b, n, 1, 1.0, &mut c, ldc);
        let want = naive(m, k, n, &a, &b);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                let expect = if j < n { 1.0 + 2.0 * want[i * n + j] } else { 1.0 };
                assert!((got - expect).abs() < 1e-4, "({i},{j}): {got} vs {expect}");
            }
        }
    }

    #[test]
    fn a_c_longer_than_the_product_is_left_alone_past_it() {
        // C is the first of two products in one buffer, large enough to split over threads.
        let (m, k, n) = (40, 64, 64);
        let a = values(m * k, 7);
        let b = values(k * n, 8);
        let mut c = vec![f32::NAN; 2 * m * n];
        sgemm(m, k, n, 1.0, &a, k, 1, &b, n, 1, 0.0, &mut c, n);
        close(&c[..m * n], &naive(m, k, n, &a, &b));
        assert!(c[m * n..].iter().all(|v| v.is_nan()), "values past C were written");
    }

    #[test]
    fn row_blocks_on_two_threads_give_the_same_bits_as_one() {
        let (m, k, n) = (200, 96, 130);
        let a = values(m * k, 5);
        let b = values(k * n, 6);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut c = vec![0.0f32; m * n];
                sgemm(m, k, n, 1.0, &a, k, 1, &b, n, 1, 0.0, &mut c, n);
                c
            })
        };
        let (one, two) = (run(1), run(2));
        close(&two, &naive(m, k, n, &a, &b));
        assert_eq!(one, two);
    }
}
