//! The portable reference kernels: plain Rust, no intrinsics, always compiled.
//!
//! Every SIMD level is tested against these, and they run wherever the SIMD code does not (other
//! architectures, old CPUs, builds without the `simd` feature). They are written to be read first
//! and fast second; the one concession to speed is that sums are split over 8 independent partial
//! sums (see [`dot`]), which lets the compiler keep them in a vector register.
//!
//! Same names, signatures and panics as the dispatchers in [`super`].

use super::{AdamWScalars, AdamWStep, check_adamw, check_matmul_xwt, check_same_len};

/// The number of independent partial sums in the reductions.
const LANES: usize = 8;

/// The dot product `Σ a[i]·b[i]`. Panics if the lengths differ.
///
/// Floating-point addition is not associative, so the compiler may not reorder a single running
/// sum `s += a[i]*b[i]`: each add waits for the previous one. Keeping 8 partial sums, one per
/// position modulo 8, and adding them at the end, gives 8 independent chains the CPU (and the
/// auto-vectoriser) can run side by side. The result differs from the sequential sum only by
/// rounding.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    check_same_len("dot", "a", a.len(), "b", b.len());
    let mut partial = [0.0f32; LANES];
    let a_chunks = a.chunks_exact(LANES);
    let b_chunks = b.chunks_exact(LANES);
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            partial[l] += ca[l] * cb[l];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// `y += alpha · x`. Panics if the lengths differ.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    check_same_len("axpy", "x", x.len(), "y", y.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `out_t[j*m + i] = dot(x row i, w row j)`: the product `x · wᵀ` of `x (m, k)` and `w (n, k)`,
/// written as `(n, m)`. See [`super::matmul_xwt`] for the shapes and panics.
///
/// The reference is the definition: one [`dot`] per output. Row `j` of `w` is visited once, and
/// all `m` rows of `x` are dotted with it while it is in cache.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    check_matmul_xwt(x.len(), m, k, w.len(), out_t.len());
    if k == 0 || m == 0 {
        out_t.fill(0.0);
        return;
    }
    // out_t: (n, m); row j of out_t holds x · (row j of w) for every row of x.
    for (w_row, out_row) in w.chunks_exact(k).zip(out_t.chunks_exact_mut(m)) {
        for (x_row, out) in x.chunks_exact(k).zip(out_row.iter_mut()) {
            *out = dot(x_row, w_row);
        }
    }
}

/// `x[i] = σ(x[i]) = 1 / (1 + e^(−x[i]))`, in place. See [`super::sigmoid_in_place`].
pub fn sigmoid_in_place(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 1.0 / (1.0 + (-*v).exp());
    }
}

/// `gate[i] = silu(gate[i]) · up[i]` with `silu(g) = g · σ(g)`, `σ(g) = 1 / (1 + e^(−g))`: the
/// SwiGLU of one MLP row, in place. See [`super::swiglu_in_place`].
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    check_same_len("swiglu_in_place", "gate", gate.len(), "up", up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g * (1.0 / (1.0 + (-*g).exp())) * u;
    }
}

/// Softmax over the whole slice, in place; see [`super::softmax_in_place`].
///
/// Three passes: the max; `e_i = exp(x_i - max)` and their sum; a multiply by `1 / sum`.
pub fn softmax_in_place(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Subtracting the max makes every exponent <= 0: no overflow, and the max's term is 1.
    let mut partial = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            chunk[l] = (chunk[l] - max).exp();
            partial[l] += chunk[l];
        }
    }
    let mut sum: f32 = partial.iter().sum();
    for xi in chunks.into_remainder() {
        *xi = (*xi - max).exp();
        sum += *xi;
    }
    let inv_sum = 1.0 / sum;
    for xi in x.iter_mut() {
        *xi *= inv_sum;
    }
}

/// RMSNorm: `out = x · inv_rms · weight`, `inv_rms = 1/sqrt(mean(x²) + eps)`; returns `inv_rms`.
/// See [`super::rmsnorm`].
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    check_same_len("rmsnorm", "x", x.len(), "weight", weight.len());
    check_same_len("rmsnorm", "x", x.len(), "out", out.len());
    let inv_rms = inv_rms(sum_of_squares(x), x.len(), eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(weight) {
        *o = xi * inv_rms * wi;
    }
    inv_rms
}

/// `Σ x[i]²`, with 8 partial sums as in [`dot`].
fn sum_of_squares(x: &[f32]) -> f32 {
    dot(x, x)
}

/// `1 / sqrt(sum_sq / n + eps)`, with the mean of an empty slice taken as 0. Shared by every
/// level, so they differ only in how `sum_sq` was summed.
pub(super) fn inv_rms(sum_sq: f32, n: usize, eps: f32) -> f32 {
    let mean_sq = if n == 0 { 0.0 } else { sum_sq / n as f32 };
    1.0 / (mean_sq + eps).sqrt()
}

/// One step of PyTorch's AdamW on a flat parameter; see [`super::adamw_update`] for the formula.
pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    check_adamw(param.len(), grad.len(), m.len(), v.len(), h.step);
    let s = AdamWScalars::new(h);
    for (((p, &g), mi), vi) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_element(p, g, mi, vi, h, &s);
    }
}

/// The AdamW update of one element (also the scalar tail of the AVX2 version).
#[inline]
pub(super) fn adamw_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, h: &AdamWStep, s: &AdamWScalars) {
    // Decoupled weight decay: shrink the parameter first, independently of the gradient.
    *p *= s.decay;
    // Exponential moving averages of g and g².
    *m = h.beta1 * *m + s.one_minus_beta1 * g;
    *v = h.beta2 * *v + s.one_minus_beta2 * g * g;
    // m / bc1 and v / bc2 are the bias-corrected moments; PyTorch folds 1/bc1 into the step size
    // and divides sqrt(v) by sqrt(bc2) before adding eps, and so do we.
    let denom = v.sqrt() / s.bc2_sqrt + h.eps;
    *p -= s.step_size * *m / denom;
}

/// One query's attention over `count` cached positions (bounds checked by the dispatcher):
/// `scores[j] = scale·(q·k_j)` with `k_j = keys[j·stride ..][..q.len()]`, a softmax over
/// `scores[..count]`, and `out = Σ_j scores[j]·v_j` (values laid out like keys).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    count: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    for (j, s) in scores[..count].iter_mut().enumerate() {
        *s = dot(q, &keys[j * stride..j * stride + hd]) * scale;
    }
    softmax_in_place(&mut scores[..count]);
    out.fill(0.0);
    for (j, &p) in scores[..count].iter().enumerate() {
        axpy(p, &values[j * stride..j * stride + hd], out);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{TEST_LENGTHS, assert_all_close, assert_close, test_data};
    use super::*;

    /// The dot product in f64, the ground truth for the f32 sums.
    fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn dot_matches_f64() {
        for len in TEST_LENGTHS {
            let a = test_data(len, 1);
            let b = test_data(len, 2);
            assert_close(dot(&a, &b), dot_f64(&a, &b) as f32, 1e-5, &format!("dot len {len}"));
        }
        assert_eq!(dot(&[], &[]), 0.0);
    }

    #[test]
    fn axpy_matches_f64() {
        for len in TEST_LENGTHS {
            let x = test_data(len, 3);
            let y0 = test_data(len, 4);
            let mut y = y0.clone();
            axpy(-1.5, &x, &mut y);
            let want: Vec<f32> =
                x.iter().zip(&y0).map(|(&xi, &yi)| (yi as f64 - 1.5 * xi as f64) as f32).collect();
            assert_all_close(&y, &want, 1e-6, &format!("axpy len {len}"));
        }
    }

    #[test]
    fn matmul_xwt_matches_f64() {
        for m in [1, 2, 3, 5, 8, 9, 16, 17] {
            for (k, n) in [(1, 1), (7, 3), (33, 5), (100, 9), (257, 4)] {
                let x = test_data(m * k, 5);
                let w = test_data(n * k, 6);
                let mut out_t = vec![f32::NAN; n * m];
                matmul_xwt(&x, m, k, &w, &mut out_t);
                for j in 0..n {
                    for i in 0..m {
                        let want = dot_f64(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                        let what = format!("matmul_xwt m={m} k={k} n={n} (i={i}, j={j})");
                        assert_close(out_t[j * m + i], want as f32, 1e-5, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_xwt_degenerate_shapes() {
        // k = 0: every dot product is empty.
        let mut out_t = [f32::NAN; 6];
        matmul_xwt(&[], 2, 0, &[], &mut out_t);
        assert_eq!(out_t, [0.0; 6]);
        // m = 0 or n = 0: nothing to write.
        matmul_xwt(&[], 0, 4, &[1.0; 8], &mut []);
        matmul_xwt(&[1.0; 8], 2, 4, &[], &mut []);
    }

    #[test]
    fn softmax_matches_f64_and_sums_to_one() {
        for len in TEST_LENGTHS {
            let x0: Vec<f32> = test_data(len, 7).iter().map(|v| v * 20.0).collect();
            let mut x = x0.clone();
            softmax_in_place(&mut x);
            let max = x0.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let e: Vec<f64> = x0.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let want: Vec<f32> = e.iter().map(|&v| (v / sum) as f32).collect();
            assert_all_close(&x, &want, 1e-6, &format!("softmax len {len}"));
            if len > 0 {
                let total: f64 = x.iter().map(|&v| v as f64).sum();
                assert!((total - 1.0).abs() < 1e-5, "softmax len {len} sums to {total}");
            }
        }
    }

    #[test]
    fn softmax_edge_cases() {
        // Empty: no-op.
        softmax_in_place(&mut []);
        // Large inputs do not overflow.
        let mut x = [1000.0, 1000.0, 999.0];
        softmax_in_place(&mut x);
        let e = (-1.0f32).exp();
        assert_all_close(&x, &[1.0 / (2.0 + e), 1.0 / (2.0 + e), e / (2.0 + e)], 1e-6, "big");
        // A masked row: all -inf except one entry.
        let mut x = [f32::NEG_INFINITY; 9];
        x[4] = -3.0;
        softmax_in_place(&mut x);
        let mut want = [0.0; 9];
        want[4] = 1.0;
        assert_eq!(x, want);
    }

    #[test]
    fn rmsnorm_matches_f64() {
        for len in TEST_LENGTHS {
            let x = test_data(len, 8);
            let w = test_data(len, 9);
            let mut out = vec![0.0; len];
            let inv = rmsnorm(&x, &w, 1e-5, &mut out);
            let mean_sq = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / len.max(1) as f64;
            let want_inv = 1.0 / (mean_sq + 1e-5).sqrt();
            assert_close(inv, want_inv as f32, 1e-6, &format!("inv_rms len {len}"));
            let want: Vec<f32> =
                x.iter().zip(&w).map(|(&xi, &wi)| (xi as f64 * want_inv * wi as f64) as f32).collect();
            assert_all_close(&out, &want, 1e-6, &format!("rmsnorm len {len}"));
        }
    }

    /// The AdamW formula of [`super::super::adamw_update`], written out in f64.
    fn adamw_f64(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], h: &AdamWStep) {
        let (lr, b1, b2) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64);
        let (eps, wd, t) = (h.eps as f64, h.weight_decay as f64, h.step as i32);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            let denom = v[i].sqrt() / bc2.sqrt() + eps;
            p[i] -= (lr / bc1) * m[i] / denom;
        }
    }

    #[test]
    fn adamw_three_steps_match_f64() {
        let len = 37;
        let mut p = test_data(len, 10);
        let (mut m, mut v) = (vec![0.0; len], vec![0.0; len]);
        let to64 = |s: &[f32]| s.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (mut p64, mut m64, mut v64) = (to64(&p), vec![0.0; len], vec![0.0; len]);
        for step in 1..=3 {
            let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
            let g = test_data(len, 100 + step);
            adamw_update(&mut p, &g, &mut m, &mut v, &h);
            adamw_f64(&mut p64, &to64(&g), &mut m64, &mut v64, &h);
            let f32s = |s: &[f64]| s.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            assert_all_close(&p, &f32s(&p64), 1e-6, &format!("param after step {step}"));
            assert_all_close(&m, &f32s(&m64), 1e-6, &format!("m after step {step}"));
            assert_all_close(&v, &f32s(&v64), 1e-6, &format!("v after step {step}"));
        }
        // The parameters did move (by about lr per step).
        assert!((p[0] as f64 - test_data(len, 10)[0] as f64).abs() > 0.005);
    }
}
