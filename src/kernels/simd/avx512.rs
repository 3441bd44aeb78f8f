//! AVX-512F kernels: 16 f32 lanes per `__m512` register, 32 registers, masked loads and stores.
//!
//! Each function is an `unsafe fn` compiled with `#[target_feature(enable = "avx512f")]`: the
//! compiler may use AVX-512 instructions in it, so it must only run on a CPU that has them. That is
//! the one safety condition; shapes are checked (with the same panics as [`super::scalar`]) and
//! every memory access stays inside the slices. [`super::level`] decides when these are used.
//!
//! Tails (the last `len % 16` elements) use masks: `_mm512_maskz_loadu_ps(mask, p)` loads only the
//! lanes whose mask bit is set, sets the others to 0, and never touches (or faults on) the memory
//! behind the masked-out lanes. So a tail is one more masked iteration of the main loop, with no
//! scalar code.
//!
//! Since Rust 1.87, intrinsics that do not take pointers are safe to call inside a function with
//! the matching `target_feature`, so `unsafe` blocks below surround only loads and stores.

use std::arch::x86_64::*;

use super::{
    AdamWScalars, AdamWStep, EXP_HI, EXP_LO, EXP_P, LN2_HI, LN2_LO, LOG2_E, check_adamw, check_matmul_xwt,
    check_same_len,
};

/// f32 lanes in one register.
const W: usize = 16;

/// The mask selecting the first `len` lanes (`len < 16`): bits `0..len` set.
#[inline]
fn tail_mask(len: usize) -> __mmask16 {
    debug_assert!(len < W);
    ((1u32 << len) - 1) as __mmask16
}

/// The sum of the 16 lanes of `v` (a horizontal sum).
///
/// `_mm512_reduce_add_ps` is a tree of shuffles and adds: 16 -> 8 -> 4 -> 2 -> 1 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// The dot product `Σ a[i]·b[i]`. Panics if the lengths differ.
///
/// Four independent accumulators of 16 lanes: one FMA has a latency of 4 cycles, so a single
/// accumulator would make every FMA wait for the previous one; with four chains in flight the
/// loop is limited by the two loads per FMA instead. The tail is one masked FMA.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    check_same_len("dot", "a", a.len(), "b", b.len());
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 4 * W <= n {
        for (u, acc_u) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4W <= n, so lanes i + uW .. i + (u+1)W are inside both slices.
            let (va, vb) =
                unsafe { (_mm512_loadu_ps(pa.add(i + u * W)), _mm512_loadu_ps(pb.add(i + u * W))) };
            *acc_u = _mm512_fmadd_ps(va, vb, *acc_u);
        }
        i += 4 * W;
    }
    while i + W <= n {
        // SAFETY: i + W <= n.
        let (va, vb) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
        acc[0] = _mm512_fmadd_ps(va, vb, acc[0]);
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read, all inside both slices.
        let (va, vb) =
            unsafe { (_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i))) };
        acc[1] = _mm512_fmadd_ps(va, vb, acc[1]);
    }
    hsum(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

/// `y += alpha · x` (one fused multiply-add a lane). Panics if the lengths differ.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    check_same_len("axpy", "x", x.len(), "y", y.len());
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(alpha);
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside both slices; y is borrowed mutably, so nothing aliases it.
        unsafe {
            let r = _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), r);
        }
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read and written, inside both slices.
        unsafe {
            let vx = _mm512_maskz_loadu_ps(mask, px.add(i));
            let vy = _mm512_maskz_loadu_ps(mask, py.add(i));
            _mm512_mask_storeu_ps(py.add(i), mask, _mm512_fmadd_ps(va, vx, vy));
        }
    }
}

/// `out_t[j*m + i] = dot(x row i, w row j)`, the small-M product `x · wᵀ` written `(n, m)`.
/// See [`super::matmul_xwt`] for the shapes and panics.
///
/// The output is cut into tiles of `J = 4` rows of `w` by up to `R = 4` rows of `x`. A tile keeps
/// its `J·R = 16` dot products in 16 accumulator registers and walks along `k` 16 lanes at a time:
/// each step loads the R vectors of `x` and, for each row of `w`, one vector of `w` and R FMAs.
/// So every load of `w` feeds R FMAs and every load of `x` feeds J, and the 16 independent chains
/// hide the FMA latency. The four rows of `w` (4·k floats, 22 KB at k = 1376) stay in L1 while
/// all `m` rows of `x` pass over them, so `w`, the big operand, is read from memory once.
///
/// With one row of `x` (m = 1, batch-1 decoding) a 4 × 1 tile would have only 4 accumulators and
/// load 5 vectors per 4 FMAs; 8 × 1 tiles keep 8 loads in flight and reuse the `x` vector 8
/// times (about 10 % faster from L2; from L3 or DRAM both are bandwidth-bound).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
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

/// All of `out_t` for the `J` rows of `w` starting at `j0`: tiles of up to 4 rows of `x`.
#[inline]
#[target_feature(enable = "avx512f")]
fn w_rows<const J: usize>(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, out_t: &mut [f32]) {
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(4);
        match rows {
            1 => tile::<J, 1>(x, m, k, w, j0, i0, out_t),
            2 => tile::<J, 2>(x, m, k, w, j0, i0, out_t),
            3 => tile::<J, 3>(x, m, k, w, j0, i0, out_t),
            _ => tile::<J, 4>(x, m, k, w, j0, i0, out_t),
        }
        i0 += rows;
    }
}

/// One `J × R` tile: rows `j0..j0+J` of `w` against rows `i0..i0+R` of `x`.
#[inline]
#[target_feature(enable = "avx512f")]
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
    // each, lie inside the slices. (Pointers, not an array of row slices built by a closure:
    // at k = 64 the closure calls, which are not inlined across the target-feature boundary,
    // took a quarter of the kernel's time.) Row r of the tile's x starts at xp + r·k.
    assert!((i0 + R) * k <= x.len() && (j0 + J) * k <= w.len(), "matmul_xwt tile: rows out of range");
    let (xp, wp) = (x[i0 * k..].as_ptr(), w[j0 * k..].as_ptr());
    // acc[jj][r] holds 16 partial sums of dot(w row j0+jj, x row i0+r).
    let mut acc = [[_mm512_setzero_ps(); R]; J];
    let mut xv = [_mm512_setzero_ps(); R];
    let mut p = 0;
    while p + W <= k {
        for r in 0..R {
            // SAFETY: r < R and p + W <= k: inside the rows checked above.
            xv[r] = unsafe { _mm512_loadu_ps(xp.add(r * k + p)) };
        }
        for jj in 0..J {
            // SAFETY: as above.
            let wv = unsafe { _mm512_loadu_ps(wp.add(jj * k + p)) };
            for r in 0..R {
                acc[jj][r] = _mm512_fmadd_ps(wv, xv[r], acc[jj][r]);
            }
        }
        p += W;
    }
    if p < k {
        // The tail: the same step with the lanes past k masked off (loaded as 0, adding 0).
        let mask = tail_mask(k - p);
        for r in 0..R {
            // SAFETY: only the k - p lanes in the mask are read, inside the row.
            xv[r] = unsafe { _mm512_maskz_loadu_ps(mask, xp.add(r * k + p)) };
        }
        for jj in 0..J {
            // SAFETY: as above.
            let wv = unsafe { _mm512_maskz_loadu_ps(mask, wp.add(jj * k + p)) };
            for r in 0..R {
                acc[jj][r] = _mm512_fmadd_ps(wv, xv[r], acc[jj][r]);
            }
        }
    }
    if J == 8 && R == 1 {
        // One row of x (m = 1): the 8 outputs are contiguous in out_t, and one transposed
        // reduction sums the 8 accumulators at once.
        let sums = hsum8(std::array::from_fn(|jj| acc[jj][0]));
        let at = &mut out_t[j0..j0 + 8];
        // SAFETY: `at` holds the 8 floats the mask selects.
        unsafe { _mm512_mask_storeu_ps(at.as_mut_ptr(), 0xff, sums) };
        return;
    }
    if J == 4 && R == 4 {
        // A full 4 × 4 tile: the 16 sums at once; lanes 4·jj..4·jj+4 are row j0+jj's 4 outputs,
        // contiguous in out_t.
        let sums = hsum16(std::array::from_fn(|i| acc[i / 4][i % 4]));
        let rows = [
            _mm512_extractf32x4_ps::<0>(sums),
            _mm512_extractf32x4_ps::<1>(sums),
            _mm512_extractf32x4_ps::<2>(sums),
            _mm512_extractf32x4_ps::<3>(sums),
        ];
        for (jj, row) in rows.into_iter().enumerate() {
            let at = &mut out_t[(j0 + jj) * m + i0..(j0 + jj) * m + i0 + 4];
            // SAFETY: `at` holds exactly the 4 floats stored.
            unsafe { _mm_storeu_ps(at.as_mut_ptr(), row) };
        }
        return;
    }
    for jj in 0..J {
        for r in 0..R {
            // out_t is (n, m): row j, column i.
            out_t[(j0 + jj) * m + i0 + r] = hsum(acc[jj][r]);
        }
    }
}

// ----- Many horizontal sums at once -------------------------------------------------------------
//
// [`hsum`] (`_mm512_reduce_add_ps`) adds a register's 16 lanes in a fixed tree: lanes `l + l+8`,
// then `+ l+4`, then `+ l+2`, then `+ l+1`. Summing 8 or 16 registers one at a time costs about
// 8 instructions each. The steps below take the same tree a level at a time for two registers
// A and B together: shuffles put the halves that level adds side by side, so one add serves
// both, and every sum comes out bit for bit as `hsum` gives it. (`_mm512_shuffle_f32x4::<I>(a,
// b)` takes its 128-bit chunks 0, 1 from a and 2, 3 from b; `_mm512_shuffle_ps::<I>(a, b)` does
// the same with lanes inside each chunk; the 2-bit fields of I choose.)

/// Level 1, lanes `l + l+8`: `[A0 A1 B0 B1] + [A2 A3 B2 B3]` (chunks of 128 bits): A's partial
/// sums in chunks 0, 1 and B's in chunks 2, 3.
#[inline]
#[target_feature(enable = "avx512f")]
fn add_halves(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
}

/// Level 2, `+ l+4`, on two results of [`add_halves`] (sums A, B and C, D): chunks 0, 2 plus
/// chunks 1, 3, so that chunk 0 holds A's 4 partial sums, then B, C, D.
#[inline]
#[target_feature(enable = "avx512f")]
fn add_quarters(ab: __m512, cd: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(ab, cd), _mm512_shuffle_f32x4::<0xDD>(ab, cd))
}

/// Level 3, `+ l+2`, on two results of [`add_quarters`] (one sum a chunk): in each chunk c,
/// lanes 0, 1 + lanes 2, 3, so chunk c holds the first's sum c in lanes 0, 1 and the second's
/// in lanes 2, 3.
#[inline]
#[target_feature(enable = "avx512f")]
fn add_pairs(s: __m512, t: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_ps::<0x44>(s, t), _mm512_shuffle_ps::<0xEE>(s, t))
}

/// The horizontal sums of 8 registers at once: lane `i < 8` of the result is `hsum(v[i])`, bit
/// for bit (see above): about 25 instructions instead of 8 × 8.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum8(v: [__m512; 8]) -> __m512 {
    let s: [__m512; 4] = std::array::from_fn(|i| add_halves(v[2 * i], v[2 * i + 1]));
    // Chunk c of u: sum c in lanes 0, 1, sum 4 + c in lanes 2, 3.
    let u = add_pairs(add_quarters(s[0], s[1]), add_quarters(s[2], s[3]));
    // Level 4, lane 0 + lane 1 (and 2 + 3): sum c lands in lane 4c, sum 4 + c in lane 4c + 2.
    let w = _mm512_add_ps(u, _mm512_movehdup_ps(u));
    // Gather sums 0-7 into lanes 0-7.
    _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), w)
}

/// The horizontal sums of 16 registers at once: lane `i` of the result is `hsum(v[i])`, bit for
/// bit (see above): about 40 instructions instead of 16 × 8.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum16(v: [__m512; 16]) -> __m512 {
    let s: [__m512; 8] = std::array::from_fn(|i| add_halves(v[2 * i], v[2 * i + 1]));
    // t[k] chunk c holds sum 4k + c.
    let t: [__m512; 4] = std::array::from_fn(|k| add_quarters(s[2 * k], s[2 * k + 1]));
    // Chunk c of u0: sums c and 4 + c (two lanes each); of u1: sums 8 + c and 12 + c.
    let (u0, u1) = (add_pairs(t[0], t[1]), add_pairs(t[2], t[3]));
    // Level 4, lane 0 + lane 1 of each pair: lane 4c + k holds sum 4k + c.
    let w = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(u0, u1), _mm512_shuffle_ps::<0xDD>(u0, u1));
    // Lane i = sum i (a 4 × 4 transpose).
    _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), w)
}

/// e^x on 16 lanes, to ~1 ulp for x <= 0 (see the derivation above `EXP_LO` in [`super`]):
/// x = n·ln2 + r, e^x = 2^n · p(r), with 2^n built in the exponent bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    // Where the answer is 0 (x < EXP_LO, including -inf) or +inf (x > EXP_HI); NaN is neither.
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
    let overflow = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(EXP_HI));
    // Clamp so the arithmetic below stays finite. (max/min return their second operand when one
    // is NaN, so x goes second: NaN passes through and comes out NaN.)
    let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), _mm512_max_ps(_mm512_set1_ps(EXP_LO), x));
    // n = round(x / ln2), at most 127 so that 2^n is a normal float.
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(LOG2_E),
    ));
    let n = _mm512_min_ps(n, _mm512_set1_ps(127.0));
    // r = x - n·ln2, in two steps (Cody-Waite): n·LN2_HI is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    // e^r ≈ 1 + r + r²·P(r), P evaluated by Horner's rule.
    let mut poly = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let e_r = _mm512_add_ps(_mm512_fmadd_ps(poly, r2, r), _mm512_set1_ps(1.0));
    // 2^n: put n + 127 in the exponent field (bits 23..31), mantissa 0.
    let biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased));
    let y = _mm512_mul_ps(e_r, two_n);
    let y = _mm512_mask_mov_ps(y, underflow, _mm512_setzero_ps());
    _mm512_mask_mov_ps(y, overflow, _mm512_set1_ps(f32::INFINITY))
}

/// σ(v) = 1 / (1 + e^(−v)) on 16 lanes, in the scalar version's order.
#[inline]
#[target_feature(enable = "avx512f")]
fn sigmoid(v: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), v))))
}

/// The sigmoid in place, 16 lanes at a time through the vector `exp`; see
/// [`super::sigmoid_in_place`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn sigmoid_in_place(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside the slice.
        unsafe { _mm512_storeu_ps(p.add(i), sigmoid(_mm512_loadu_ps(p.add(i)))) };
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read and written.
        unsafe { _mm512_mask_storeu_ps(p.add(i), mask, sigmoid(_mm512_maskz_loadu_ps(mask, p.add(i)))) };
    }
}

/// SwiGLU in place, 16 lanes at a time through the vector `exp`; see
/// [`super::swiglu_in_place`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    check_same_len("swiglu_in_place", "gate", gate.len(), "up", up.len());
    // g · σ(g) · u, in the scalar order.
    let lanes = |g: __m512, u: __m512| _mm512_mul_ps(_mm512_mul_ps(g, sigmoid(g)), u);
    let n = gate.len();
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside both slices.
        unsafe { _mm512_storeu_ps(pg.add(i), lanes(_mm512_loadu_ps(pg.add(i)), _mm512_loadu_ps(pu.add(i)))) };
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read and written.
        unsafe {
            let y = lanes(_mm512_maskz_loadu_ps(mask, pg.add(i)), _mm512_maskz_loadu_ps(mask, pu.add(i)));
            _mm512_mask_storeu_ps(pg.add(i), mask, y);
        }
    }
}

/// Softmax over the whole slice, in place; see [`super::softmax_in_place`].
///
/// Three passes as in the scalar version (max; exp and sum; scale), each 16 lanes at a time
/// with a masked tail.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_in_place(x: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let px = x.as_mut_ptr();
    let tail = n % W;
    let main = n - tail;
    let mask = tail_mask(tail);

    // Pass 1: the max. Masked-off tail lanes are loaded as -inf, which never wins.
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut vmax = neg_inf;
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= main <= n.
        vmax = _mm512_max_ps(vmax, unsafe { _mm512_loadu_ps(px.add(i)) });
    }
    if tail > 0 {
        // SAFETY: only the `tail` lanes in the mask are read, inside the slice.
        vmax = _mm512_max_ps(vmax, unsafe { _mm512_mask_loadu_ps(neg_inf, mask, px.add(main)) });
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));

    // Pass 2: x = exp(x - max), and their sum.
    let mut vsum = _mm512_setzero_ps();
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= n; x is borrowed mutably, so nothing aliases it.
        unsafe {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(px.add(i)), max));
            _mm512_storeu_ps(px.add(i), e);
            vsum = _mm512_add_ps(vsum, e);
        }
    }
    if tail > 0 {
        // SAFETY: only the `tail` lanes in the mask are read and written.
        unsafe {
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, px.add(main)), max));
            _mm512_mask_storeu_ps(px.add(main), mask, e);
            // Add only the real lanes (the others hold exp(0 - max)).
            vsum = _mm512_mask_add_ps(vsum, mask, vsum, e);
        }
    }

    // Pass 3: divide by the sum (one division, then multiplies).
    let inv_sum = _mm512_set1_ps(1.0 / hsum(vsum));
    for i in (0..main).step_by(W) {
        // SAFETY: i + W <= n.
        unsafe { _mm512_storeu_ps(px.add(i), _mm512_mul_ps(_mm512_loadu_ps(px.add(i)), inv_sum)) };
    }
    if tail > 0 {
        // SAFETY: only the `tail` lanes in the mask are read and written.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, px.add(main));
            _mm512_mask_storeu_ps(px.add(main), mask, _mm512_mul_ps(v, inv_sum));
        }
    }
}

/// RMSNorm: `out = x · inv_rms · weight`, `inv_rms = 1/sqrt(mean(x²) + eps)`; returns `inv_rms`.
/// See [`super::rmsnorm`].
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    check_same_len("rmsnorm", "x", x.len(), "weight", weight.len());
    check_same_len("rmsnorm", "x", x.len(), "out", out.len());
    // SAFETY: this function's own precondition (AVX-512F) is dot's.
    let sum_sq = unsafe { dot(x, x) };
    let inv_rms = super::scalar::inv_rms(sum_sq, x.len(), eps);
    let n = x.len();
    let (px, pw, po) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    let s = _mm512_set1_ps(inv_rms);
    let mut i = 0;
    while i + W <= n {
        // SAFETY: i + W <= n, inside all three slices; out is borrowed mutably, so it aliases
        // neither input.
        unsafe {
            let v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(px.add(i)), s), _mm512_loadu_ps(pw.add(i)));
            _mm512_storeu_ps(po.add(i), v);
        }
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read and written.
        unsafe {
            let vx = _mm512_maskz_loadu_ps(mask, px.add(i));
            let vw = _mm512_maskz_loadu_ps(mask, pw.add(i));
            _mm512_mask_storeu_ps(po.add(i), mask, _mm512_mul_ps(_mm512_mul_ps(vx, s), vw));
        }
    }
    inv_rms
}

/// One step of PyTorch's AdamW on a flat parameter; see [`super::adamw_update`] for the formula.
/// The same arithmetic as [`super::scalar::adamw_update`], 16 elements at a time, except that
/// the moment updates use fused multiply-adds.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
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
            let (p, mm, vv) = adamw_lanes(
                _mm512_loadu_ps(pp.add(i)),
                _mm512_loadu_ps(pg.add(i)),
                _mm512_loadu_ps(pm.add(i)),
                _mm512_loadu_ps(pv.add(i)),
                h,
                &s,
            );
            _mm512_storeu_ps(pp.add(i), p);
            _mm512_storeu_ps(pm.add(i), mm);
            _mm512_storeu_ps(pv.add(i), vv);
        }
        i += W;
    }
    if i < n {
        let mask = tail_mask(n - i);
        // SAFETY: only the n - i lanes in the mask are read and written.
        unsafe {
            let (p, mm, vv) = adamw_lanes(
                _mm512_maskz_loadu_ps(mask, pp.add(i)),
                _mm512_maskz_loadu_ps(mask, pg.add(i)),
                _mm512_maskz_loadu_ps(mask, pm.add(i)),
                _mm512_maskz_loadu_ps(mask, pv.add(i)),
                h,
                &s,
            );
            _mm512_mask_storeu_ps(pp.add(i), mask, p);
            _mm512_mask_storeu_ps(pm.add(i), mask, mm);
            _mm512_mask_storeu_ps(pv.add(i), mask, vv);
        }
    }
}

/// The AdamW update of 16 lanes: returns the new (param, m, v).
#[inline]
#[target_feature(enable = "avx512f")]
fn adamw_lanes(
    p: __m512,
    g: __m512,
    m: __m512,
    v: __m512,
    h: &AdamWStep,
    s: &AdamWScalars,
) -> (__m512, __m512, __m512) {
    let p = _mm512_mul_ps(p, _mm512_set1_ps(s.decay));
    // m = beta1·m + (1-beta1)·g ;  v = beta2·v + (1-beta2)·g·g
    let m = _mm512_fmadd_ps(_mm512_set1_ps(h.beta1), m, _mm512_mul_ps(_mm512_set1_ps(s.one_minus_beta1), g));
    let g2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(s.one_minus_beta2), g), g);
    let v = _mm512_fmadd_ps(_mm512_set1_ps(h.beta2), v, g2);
    // denom = sqrt(v)/sqrt(bc2) + eps ;  p -= step_size · m / denom
    let denom =
        _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), _mm512_set1_ps(s.bc2_sqrt)), _mm512_set1_ps(h.eps));
    let step = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(s.step_size), m), denom);
    (_mm512_sub_ps(p, step), m, v)
}

/// One query's attention over `count` cached positions, as [`super::scalar::attend`]: the
/// scores, the softmax and the weighted sum of values in one call, so the per-position `dot`
/// and `axpy` are inlined here instead of each paying a dispatch (a head is only 32-128 wide).
///
/// # Safety
/// The CPU must support AVX512F. The slices must hold what the
/// dispatcher checked: `keys`, `values` at least `(count−1)·stride + q.len()`, `scores` at least
/// `count`, `out` exactly `q.len()`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
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
    // Heads of 16 to 64 (whole registers): the query and the output stay in registers.
    // SAFETY (each arm): same CPU features and slice sizes as this function.
    match (hd % W, hd / W) {
        (0, 1) => {
            return unsafe { attend_in_registers::<1>(q, keys, values, stride, count, scale, scores, out) };
        }
        (0, 2) => {
            return unsafe { attend_in_registers::<2>(q, keys, values, stride, count, scale, scores, out) };
        }
        (0, 3) => {
            return unsafe { attend_in_registers::<3>(q, keys, values, stride, count, scale, scores, out) };
        }
        (0, 4) => {
            return unsafe { attend_in_registers::<4>(q, keys, values, stride, count, scale, scores, out) };
        }
        _ => {}
    }
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

/// [`attend`] for a head of `N` registers (`N·16` wide): the query is loaded once and kept in
/// registers, and so is the output while the values are summed into it (through memory, each
/// position's add would wait for the previous one's store). Each score is the query's
/// registers times the key's, summed into one register in order and reduced; each output lane
/// is `Σⱼ pⱼ·vⱼ` in position order: the general path's values to rounding, and for any batch
/// the same bits (a (token, head) pair never depends on another).
///
/// # Safety
/// As [`attend`], and `q.len() == N·16`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn attend_in_registers<const N: usize>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    count: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    debug_assert!(q.len() == N * W && out.len() == N * W && scores.len() >= count);
    debug_assert!(
        count == 0
            || (keys.len() >= (count - 1) * stride + N * W && values.len() >= (count - 1) * stride + N * W)
    );
    // SAFETY: every load and store below is within the slices' checked sizes (the dispatcher's
    // guarantee, restated in the debug assertions).
    unsafe {
        let qv: [__m512; N] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(c * W)));
        for (j, s) in scores[..count].iter_mut().enumerate() {
            let k = keys.as_ptr().add(j * stride);
            let mut acc = _mm512_setzero_ps();
            for (c, qc) in qv.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(k.add(c * W)), *qc, acc);
            }
            *s = hsum(acc) * scale;
        }
        softmax_in_place(&mut scores[..count]);
        let mut o = [_mm512_setzero_ps(); N];
        for (j, &p) in scores[..count].iter().enumerate() {
            let (v, pv) = (values.as_ptr().add(j * stride), _mm512_set1_ps(p));
            for (c, oc) in o.iter_mut().enumerate() {
                *oc = _mm512_fmadd_ps(_mm512_loadu_ps(v.add(c * W)), pv, *oc);
            }
        }
        for (c, oc) in o.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(c * W), *oc);
        }
    }
}

/// `out[i] = e^x[i]` through the vector [`exp`], 16 lanes at a time (the last chunk padded
/// with zeros), so that the shared tests in `super::level_tests` can reach it.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_slice(x: &[f32], out: &mut [f32]) {
    for (xc, oc) in x.chunks(W).zip(out.chunks_mut(W)) {
        let (mut lanes, mut y) = ([0.0f32; W], [0.0f32; W]);
        lanes[..xc.len()].copy_from_slice(xc);
        // SAFETY: `lanes` and `y` hold exactly one register of W floats each.
        unsafe { _mm512_storeu_ps(y.as_mut_ptr(), exp(_mm512_loadu_ps(lanes.as_ptr()))) };
        oc.copy_from_slice(&y[..xc.len()]);
    }
}
