//! AVX2 + FMA kernels: 8 f32 lanes per `__m256` register, 16 registers.
//!
//! Each function is an `unsafe fn` compiled with `#[target_feature(enable = "avx2,fma")]`: the
//! compiler may use those instructions in it, so it must only run on a CPU that has them. That is
//! the one safety condition; shapes are checked (with the same panics as [`super::scalar`]) and
//! every memory access stays inside the slices. [`super::level`] decides when these are used.
//!
//! AVX2 has no cheap masked loads for arbitrary tails, so each loop runs over whole registers and
//! finishes the last `len % 8` elements with scalar code.
//!
//! Since Rust 1.87, intrinsics that do not take pointers are safe to call inside a function with
//! the matching `target_feature`, so `unsafe` blocks below surround only loads and stores.

use std::arch::x86_64::*;

use super::{
    AdamWScalars, AdamWStep, EXP_HI, EXP_LO, EXP_P, LN2_HI, LN2_LO, LOG2_E, check_adamw, check_matmul_xwt,
    check_same_len, scalar,
};

/// f32 lanes in one register.
const W: usize = 8;

/// The sum of the 8 lanes of `v` (a horizontal sum), by halving: 8 -> 4 -> 2 -> 1 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    // [a0+a4, a1+a5, a2+a6, a3+a7]
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    // lanes 0, 1: [s0+s2, s1+s3]  (movehl brings lanes 2, 3 down)
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    // lane 0: s0 + s1  (the shuffle brings lane 1 down)
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// The largest of the 8 lanes of `v`, by the same halving as [`hsum`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// The dot product `Σ a[i]·b[i]`. Panics if the lengths differ.
///
/// Four independent accumulators of 8 lanes, so that four FMAs (latency 4 cycles) are in flight
/// at once instead of each waiting for the previous one; then whole registers; then a scalar
/// tail.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    check_same_len("dot", "a", a.len(), "b", b.len());
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 4 * W <= n {
        for (u, acc_u) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4W <= n, so lanes i + uW .. i + (u+1)W are inside both slices.
            let (va, vb) =
                unsafe { (_mm256_loadu_ps(pa.add(i + u * W)), _mm256_loadu_ps(pb.add(i + u * W))) };
            *acc_u = _mm256_fmadd_ps(va, vb, *acc_u);
        }
        i += 4 * W;
    }
    while i + W <= n {
        // SAFETY: i + W <= n.
        let (va, vb) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        acc[0] = _mm256_fmadd_ps(va, vb, acc[0]);
        i += W;
    }
    let sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    let tail: f32 = a[i..].iter().zip(&b[i..]).map(|(x, y)| x * y).sum();
    sum + tail
}

/// `y += alpha · x` (one fused multiply-add a lane). Panics if the lengths differ.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    check_same_len("axpy", "x", x.len(), "y", y.len());
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside both slices; y is borrowed mutably, so nothing aliases it.
        unsafe {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
        }
        i += W;
    }
    for (yi, &xi) in y[i..].iter_mut().zip(&x[i..]) {
        *yi += alpha * xi;
    }
}

/// `out_t[j*m + i] = dot(x row i, w row j)`, the small-M product `x · wᵀ` written `(n, m)`.
/// See [`super::matmul_xwt`] for the shapes and panics.
///
/// The output is cut into tiles of `J = 4` rows of `w` by up to `R = 2` rows of `x`: 8 dot
/// products in 8 accumulator registers, plus 2 for the `x` vectors and 1 for `w`, within the 16
/// registers AVX2 has. Each row of `w` is loaded once per tile and feeds R FMAs; the 4 rows of
/// `w` stay in L1 while all `m` rows of `x` pass over them, so `w` is read from memory once.
/// With one row of `x` (batch-1 decoding) the tiles are 8 × 1 instead, for more independent
/// accumulators and more reuse of each `x` vector.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    let n = check_matmul_xwt(x.len(), m, k, w.len(), out_t.len());
    if k == 0 || m == 0 {
        out_t.fill(0.0);
        return;
    }
    let mut j = 0;
    if m == 1 {
        while j + 8 <= n {
            w_rows::<8>(x, m, k, w, j, out_t);
            j += 8;
        }
    }
    while j + 4 <= n {
        w_rows::<4>(x, m, k, w, j, out_t);
        j += 4;
    }
    while j < n {
        w_rows::<1>(x, m, k, w, j, out_t);
        j += 1;
    }
}

/// All of `out_t` for the `J` rows of `w` starting at `j0`: tiles of up to 2 rows of `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn w_rows<const J: usize>(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, out_t: &mut [f32]) {
    let mut i0 = 0;
    while i0 + 2 <= m {
        tile::<J, 2>(x, m, k, w, j0, i0, out_t);
        i0 += 2;
    }
    if i0 < m {
        tile::<J, 1>(x, m, k, w, j0, i0, out_t);
    }
}

/// One `J × R` tile: rows `j0..j0+J` of `w` against rows `i0..i0+R` of `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // r and jj index several arrays in step
fn tile<const J: usize, const R: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    j0: usize,
    i0: usize,
    out_t: &mut [f32],
) {
    // Bounds are checked here, once per tile: rows i0..i0+R of x and j0..j0+J of w, k floats
    // each, lie inside the slices. (Pointers, not an array of row slices built by a closure,
    // which is not inlined across the target-feature boundary: see the AVX-512 tile.) Row r of
    // the tile's x starts at xp + r·k.
    assert!((i0 + R) * k <= x.len() && (j0 + J) * k <= w.len(), "matmul_xwt tile: rows out of range");
    let (xp, wp) = (x[i0 * k..].as_ptr(), w[j0 * k..].as_ptr());
    // acc[jj][r] holds 8 partial sums of dot(w row j0+jj, x row i0+r).
    let mut acc = [[_mm256_setzero_ps(); R]; J];
    let mut xv = [_mm256_setzero_ps(); R];
    let mut p = 0;
    while p + W <= k {
        for r in 0..R {
            // SAFETY: r < R and p + W <= k: inside the rows checked above.
            xv[r] = unsafe { _mm256_loadu_ps(xp.add(r * k + p)) };
        }
        for jj in 0..J {
            // SAFETY: as above.
            let wv = unsafe { _mm256_loadu_ps(wp.add(jj * k + p)) };
            for r in 0..R {
                acc[jj][r] = _mm256_fmadd_ps(wv, xv[r], acc[jj][r]);
            }
        }
        p += W;
    }
    for jj in 0..J {
        for r in 0..R {
            // The vector part, then the last k - p products in scalar code.
            let (w_tail, x_tail) =
                (&w[(j0 + jj) * k + p..(j0 + jj + 1) * k], &x[(i0 + r) * k + p..(i0 + r + 1) * k]);
            let tail: f32 = w_tail.iter().zip(x_tail).map(|(a, b)| a * b).sum();
            // out_t is (n, m): row j, column i.
            out_t[(j0 + jj) * m + i0 + r] = hsum(acc[jj][r]) + tail;
        }
    }
}

/// e^x on 8 lanes, to ~1 ulp for x <= 0 (see the derivation above `EXP_LO` in [`super`]):
/// x = n·ln2 + r, e^x = 2^n · p(r), with 2^n built in the exponent bits.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    // Where the answer is 0 (x < EXP_LO, including -inf) or +inf (x > EXP_HI): all-ones lanes.
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
    let overflow = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(EXP_HI));
    // Clamp so the arithmetic below stays finite. (max/min return their second operand when one
    // is NaN, so x goes second: NaN passes through and comes out NaN.)
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
    // n = round(x / ln2), at most 127 so that 2^n is a normal float.
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2_E),
    ));
    let n = _mm256_min_ps(n, _mm256_set1_ps(127.0));
    // r = x - n·ln2, in two steps (Cody-Waite): n·LN2_HI is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    // e^r ≈ 1 + r + r²·P(r), P evaluated by Horner's rule.
    let mut poly = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let e_r = _mm256_add_ps(_mm256_fmadd_ps(poly, r2, r), _mm256_set1_ps(1.0));
    // 2^n: put n + 127 in the exponent field (bits 23..31), mantissa 0.
    let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
    let y = _mm256_mul_ps(e_r, two_n);
    // blendv takes the second operand where the mask lane is all-ones.
    let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), underflow);
    _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), overflow)
}

/// σ(v) = 1 / (1 + e^(−v)) on 8 lanes, in the scalar version's order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sigmoid(v: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    _mm256_div_ps(one, _mm256_add_ps(one, exp(_mm256_sub_ps(_mm256_setzero_ps(), v))))
}

/// The sigmoid in place, 8 lanes at a time through the vector `exp`; see
/// [`super::sigmoid_in_place`].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sigmoid_in_place(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside the slice.
        unsafe { _mm256_storeu_ps(p.add(i), sigmoid(_mm256_loadu_ps(p.add(i)))) };
        i += W;
    }
    // The tail (fewer than 8): the scalar kernel.
    super::scalar::sigmoid_in_place(&mut x[i..]);
}

/// SwiGLU in place, 8 lanes at a time through the vector `exp`; see
/// [`super::swiglu_in_place`].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    check_same_len("swiglu_in_place", "gate", gate.len(), "up", up.len());
    let n = gate.len();
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside both slices.
        unsafe {
            let (g, u) = (_mm256_loadu_ps(pg.add(i)), _mm256_loadu_ps(pu.add(i)));
            // g · σ(g) · u, in the scalar order.
            _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(_mm256_mul_ps(g, sigmoid(g)), u));
        }
        i += W;
    }
    // The tail (fewer than 8): the scalar kernel.
    super::scalar::swiglu_in_place(&mut gate[i..], &up[i..]);
}

/// Softmax over the whole slice, in place; see [`super::softmax_in_place`].
///
/// Three passes as in the scalar version (max; exp and sum; scale), 8 lanes at a time with a
/// scalar tail (which uses the standard library's `exp`).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_in_place(x: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let main = n - n % W;
    let px = x.as_mut_ptr();

    // Pass 1: the max.
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= main <= n.
        vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(px.add(i)) });
    }
    let max_s = x[main..].iter().copied().fold(hmax(vmax), f32::max);
    let max = _mm256_set1_ps(max_s);

    // Pass 2: x = exp(x - max), and their sum.
    let mut vsum = _mm256_setzero_ps();
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= n; x is borrowed mutably, so nothing aliases it.
        unsafe {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(px.add(i)), max));
            _mm256_storeu_ps(px.add(i), e);
            vsum = _mm256_add_ps(vsum, e);
        }
    }
    let mut sum = hsum(vsum);
    for xi in &mut x[main..] {
        *xi = (*xi - max_s).exp();
        sum += *xi;
    }

    // Pass 3: divide by the sum (one division, then multiplies).
    let inv_sum_s = 1.0 / sum;
    let inv_sum = _mm256_set1_ps(inv_sum_s);
    let px = x.as_mut_ptr();
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= n.
        unsafe { _mm256_storeu_ps(px.add(i), _mm256_mul_ps(_mm256_loadu_ps(px.add(i)), inv_sum)) };
    }
    for xi in &mut x[main..] {
        *xi *= inv_sum_s;
    }
}

/// RMSNorm: `out = x · inv_rms · weight`, `inv_rms = 1/sqrt(mean(x²) + eps)`; returns `inv_rms`.
/// See [`super::rmsnorm`].
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    check_same_len("rmsnorm", "x", x.len(), "weight", weight.len());
    check_same_len("rmsnorm", "x", x.len(), "out", out.len());
    // SAFETY: this function's own precondition (AVX2 + FMA) is dot's.
    let sum_sq = unsafe { dot(x, x) };
    let inv_rms = scalar::inv_rms(sum_sq, x.len(), eps);
    let n = x.len();
    let (px, pw, po) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    let s = _mm256_set1_ps(inv_rms);
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside all three slices; out is borrowed mutably, so it aliases
        // neither input.
        unsafe {
            let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(px.add(i)), s), _mm256_loadu_ps(pw.add(i)));
            _mm256_storeu_ps(po.add(i), v);
        }
        i += W;
    }
    for ((o, &xi), &wi) in out[i..].iter_mut().zip(&x[i..]).zip(&weight[i..]) {
        *o = xi * inv_rms * wi;
    }
    inv_rms
}

/// One step of PyTorch's AdamW on a flat parameter; see [`super::adamw_update`] for the formula.
/// The same arithmetic as [`super::scalar::adamw_update`], 8 elements at a time, except that the
/// moment updates use fused multiply-adds; the tail is the scalar code.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    check_adamw(param.len(), grad.len(), m.len(), v.len(), h.step);
    let s = AdamWScalars::new(h);
    let n = param.len();
    let (pp, pg, pm, pv) = (param.as_mut_ptr(), grad.as_ptr(), m.as_mut_ptr(), v.as_mut_ptr());
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside all four slices; the three mutable ones are distinct
        // borrows, so no store aliases another slice.
        unsafe {
            let p = _mm256_mul_ps(_mm256_loadu_ps(pp.add(i)), _mm256_set1_ps(s.decay));
            let g = _mm256_loadu_ps(pg.add(i));
            // m = beta1·m + (1-beta1)·g ;  v = beta2·v + (1-beta2)·g·g
            let mm = _mm256_fmadd_ps(
                _mm256_set1_ps(h.beta1),
                _mm256_loadu_ps(pm.add(i)),
                _mm256_mul_ps(_mm256_set1_ps(s.one_minus_beta1), g),
            );
            let g2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(s.one_minus_beta2), g), g);
            let vv = _mm256_fmadd_ps(_mm256_set1_ps(h.beta2), _mm256_loadu_ps(pv.add(i)), g2);
            // denom = sqrt(v)/sqrt(bc2) + eps ;  p -= step_size · m / denom
            let denom = _mm256_add_ps(
                _mm256_div_ps(_mm256_sqrt_ps(vv), _mm256_set1_ps(s.bc2_sqrt)),
                _mm256_set1_ps(h.eps),
            );
            let step = _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(s.step_size), mm), denom);
            _mm256_storeu_ps(pp.add(i), _mm256_sub_ps(p, step));
            _mm256_storeu_ps(pm.add(i), mm);
            _mm256_storeu_ps(pv.add(i), vv);
        }
        i += W;
    }
    for j in i..n {
        scalar::adamw_element(&mut param[j], grad[j], &mut m[j], &mut v[j], h, &s);
    }
}

/// One query's attention over `count` cached positions, as [`super::scalar::attend`]: the
/// scores, the softmax and the weighted sum of values in one call, so the per-position `dot`
/// and `axpy` are inlined here instead of each paying a dispatch (a head is only 32-128 wide).
///
/// # Safety
/// The CPU must support AVX2 and FMA. The slices must hold what the
/// dispatcher checked: `keys`, `values` at least `(count−1)·stride + q.len()`, `scores` at least
/// `count`, `out` exactly `q.len()`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attend(
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
        // SAFETY: same CPU features as this function (the caller's guarantee).
        *s = unsafe { dot(q, &keys[j * stride..j * stride + hd]) } * scale;
    }
    // SAFETY: as above.
    unsafe { softmax_in_place(&mut scores[..count]) };
    out.fill(0.0);
    for (j, &p) in scores[..count].iter().enumerate() {
        // SAFETY: as above.
        unsafe { axpy(p, &values[j * stride..j * stride + hd], out) };
    }
}

/// `out[i] = e^x[i]` through the vector [`exp`], 8 lanes at a time (the last chunk padded
/// with zeros), so that the shared tests in `super::level_tests` can reach it.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_slice(x: &[f32], out: &mut [f32]) {
    for (xc, oc) in x.chunks(W).zip(out.chunks_mut(W)) {
        let (mut lanes, mut y) = ([0.0f32; W], [0.0f32; W]);
        lanes[..xc.len()].copy_from_slice(xc);
        // SAFETY: `lanes` and `y` hold exactly one register of W floats each.
        unsafe { _mm256_storeu_ps(y.as_mut_ptr(), exp(_mm256_loadu_ps(lanes.as_ptr()))) };
        oc.copy_from_slice(&y[..xc.len()]);
    }
}

// The kernels are tested against the scalar reference in `super::level_tests`, one set of
// tests for every level; only the helpers private to this file are tested here.
#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this CPU can run the functions under test; the test passes vacuously if not.
    fn supported() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[test]
    fn hsum_and_hmax_see_every_lane() {
        if !supported() {
            return;
        }
        let lanes = [1.0f32, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, -128.0];
        for rot in 0..W {
            let mut v = lanes;
            v.rotate_left(rot);
            // SAFETY: supported() checked AVX2; v has 8 elements.
            let (s, mx) = unsafe {
                let r = _mm256_loadu_ps(v.as_ptr());
                (hsum(r), hmax(r))
            };
            assert_eq!(s, -1.0);
            assert_eq!(mx, 64.0);
        }
    }
}
