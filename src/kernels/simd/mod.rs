//! SIMD kernels: the hot inner loops of an f32 transformer, in three flavours.
//!
//! - [`scalar`]: portable Rust, always compiled. It is the *reference*: every other level is
//!   tested against it, and it is what runs on a CPU (or a build) without the SIMD code.
//! - `avx2`: hand-written AVX2 + FMA intrinsics, 8 lanes of f32 per register.
//! - `avx512`: hand-written AVX-512F intrinsics, 16 lanes per register, masked loads for tails.
//!
//! The two x86-64 modules exist only with the `simd` cargo feature on an x86-64 target. Which one
//! runs is decided once, at the first call, from the CPU's features (`is_x86_feature_detected!`),
//! and cached. The environment variable `LEGO_SIMD=scalar|avx2|avx512` can force a *lower* level
//! (to benchmark or test the others); it can never select a level the CPU does not have.
//!
//! The functions here are thin dispatchers: they check the shapes (panicking with a message that
//! names the kernel, as every op in this crate does) and call the chosen level. Data flows in
//! plain `&[f32]` slices; nothing here allocates.
//!
//! | kernel | what it computes |
//! |---|---|
//! | [`dot`] | `Σ a[i]·b[i]` |
//! | [`axpy`] | `y += α·x` |
//! | [`matmul_xwt`] | `x · wᵀ` for few rows of `x` (the decode step), written transposed |
//! | [`softmax_in_place`] | `exp(x - max) / Σ exp(x - max)` |
//! | [`attend`] | one query's attention over cached keys and values |
//! | [`rmsnorm`] | `x / sqrt(mean(x²) + ε) · weight` |
//! | [`adamw_update`] | one step of PyTorch's AdamW on a flat parameter |

use std::sync::atomic::{AtomicU8, Ordering};

pub mod scalar;

#[cfg(all(feature = "simd", target_arch = "x86_64"))]
pub mod avx2;
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
pub mod avx512;

#[cfg(test)]
mod level_tests;

/// An instruction-set level a kernel can run at, from the most portable to the widest.
///
/// The order (`Scalar < Avx2 < Avx512`) is meaningful: `LEGO_SIMD` can only move *down* it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable Rust ([`scalar`]); always available.
    Scalar,
    /// AVX2 + FMA, 256-bit registers (8 × f32).
    Avx2,
    /// AVX-512F, 512-bit registers (16 × f32).
    Avx512,
}

/// The cached level: 0 = not decided yet, otherwise `1 + Level as u8`.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The level the kernels run at: the best the CPU supports, possibly lowered by `LEGO_SIMD`.
///
/// Decided at the first call and cached; later calls are one atomic load. An unknown value of
/// `LEGO_SIMD` is reported once on stderr and ignored.
///
/// ```
/// # use lego::kernels::simd::{level, Level};
/// println!("kernels run at {:?}", level()); // e.g. Avx512
/// // Asking again costs one atomic load and gives the same answer.
/// assert_eq!(level(), level());
/// ```
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Scalar,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let forced = std::env::var("LEGO_SIMD").ok();
            let chosen = choose_level(detect(), forced.as_deref());
            // Two threads racing here compute the same answer, so a relaxed store is enough.
            LEVEL.store(1 + chosen as u8, Ordering::Relaxed);
            chosen
        }
    }
}

/// The widest level this CPU and this build support.
fn detect() -> Level {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    {
        if is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Parses a `LEGO_SIMD` value (`scalar`, `avx2`, `avx512`; case and surrounding spaces ignored).
fn parse_level(s: &str) -> Option<Level> {
    match s.trim().to_ascii_lowercase().as_str() {
        "scalar" => Some(Level::Scalar),
        "avx2" => Some(Level::Avx2),
        "avx512" => Some(Level::Avx512),
        _ => None,
    }
}

/// The level to use given the `detected` one and the value of `LEGO_SIMD`, if any: the forced
/// level, but never above what was detected (asking for AVX-512 on an AVX2 machine gives AVX2).
fn choose_level(detected: Level, forced: Option<&str>) -> Level {
    match forced {
        None => detected,
        Some(s) => match parse_level(s) {
            Some(wanted) => wanted.min(detected),
            None => {
                eprintln!("lego: ignoring LEGO_SIMD={s:?} (expected scalar, avx2 or avx512)");
                detected
            }
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Shape checks, shared by every level so that each one panics with the same message.
// ---------------------------------------------------------------------------------------------

/// Panics unless the two inputs of `op` have the same length.
#[track_caller]
fn check_same_len(op: &str, what_a: &str, a: usize, what_b: &str, b: usize) {
    assert!(a == b, "{op}: {what_a} has length {a} but {what_b} has length {b}");
}

/// Checks the shapes of [`matmul_xwt`] and returns `n`, the number of rows of `w`.
#[track_caller]
fn check_matmul_xwt(x: usize, m: usize, k: usize, w: usize, out_t: usize) -> usize {
    assert!(x == m * k, "matmul_xwt: x has length {x}, expected m*k = {m}*{k}");
    if k == 0 {
        // Every dot product is empty (= 0); w must be empty and out_t is filled with zeros.
        assert!(w == 0, "matmul_xwt: k = 0 but w has length {w}");
        return out_t.checked_div(m).unwrap_or(0);
    }
    assert!(w.is_multiple_of(k), "matmul_xwt: w has length {w}, not a multiple of k = {k}");
    let n = w / k;
    assert!(out_t == n * m, "matmul_xwt: out_t has length {out_t}, expected n*m = {n}*{m}");
    n
}

/// Panics unless `step >= 1` (the bias corrections divide by `1 - beta^step`).
#[track_caller]
fn check_adamw(param: usize, grad: usize, m: usize, v: usize, step: u64) {
    check_same_len("adamw_update", "param", param, "grad", grad);
    check_same_len("adamw_update", "param", param, "m", m);
    check_same_len("adamw_update", "param", param, "v", v);
    assert!(step >= 1, "adamw_update: step counts from 1, got 0");
}

// ---------------------------------------------------------------------------------------------
// The vectorised exp, shared constants.
//
// e^x = 2^(x·log2 e). Write x = n·ln2 + r with n = round(x / ln2), so |r| <= ln2/2 ≈ 0.347. Then
//
//     e^x = 2^n · e^r.
//
// * 2^n costs nothing: an f32 is sign | 8-bit biased exponent | 23-bit mantissa, so the float
//   whose exponent field holds n + 127 and whose mantissa is 0 *is* 2^n. We build it with an
//   integer add and a shift by 23, valid for n in [-126, 127] (normal numbers).
// * e^r on the small interval is a polynomial. We use Cephes' `expf` minimax fit,
//     e^r ≈ 1 + r + r²·(P5 + r·(P4 + r·(P3 + r·(P2 + r·(P1 + r·P0))))),
//   which is within about 1 ulp of e^r on |r| <= ln2/2.
// * r = x - n·ln2 must be computed carefully: n·ln2 is up to ~88 and r is small, so any error in
//   ln2 is multiplied by n. Cody and Waite's trick splits ln2 = LN2_HI + LN2_LO, where LN2_HI
//   has few mantissa bits so n·LN2_HI is exact; r = (x - n·LN2_HI) - n·LN2_LO loses nothing.
//
// Range: below EXP_LO = ln(2^-126) the true result is subnormal; we return 0 there (and for
// -inf), which is what softmax wants. Above EXP_HI = ln(f32::MAX) we return +inf. Just below
// it n would be 128; n is clamped to 127 and r grows up to ~0.69, where the polynomial is still
// good to ~1e-6. Softmax only ever feeds x <= 0, where the relative error is ~1e-7.
// ---------------------------------------------------------------------------------------------

/// Below this, e^x is not a normal f32: the vector exp returns 0.
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const EXP_LO: f32 = -87.336_55;
/// Above this, e^x overflows f32: the vector exp returns +inf.
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const EXP_HI: f32 = 88.722_84;
/// log2(e), to find n = round(x · log2 e).
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 rounded to 9 mantissa bits (0.693359375), so that n · LN2_HI is exact for |n| <= 2^15.
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const LN2_HI: f32 = 0.693_359_4;
/// ln 2 - LN2_HI.
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes expf coefficients P0..P5 (a minimax fit of (e^r - 1 - r) / r² on |r| <= ln2/2).
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes gives 5.0000001201e-1, which rounds to 0.5 in f32
];

// ---------------------------------------------------------------------------------------------
// The dispatchers.
// ---------------------------------------------------------------------------------------------

/// The dot product `Σ a[i]·b[i]`.
///
/// Panics if the lengths differ. The summation order depends on the level, so results agree
/// across levels to rounding (~1e-6 relative), not bit for bit.
///
/// ```
/// # use lego::kernels::simd::dot;
/// assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
/// ```
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    check_same_len("dot", "a", a.len(), "b", b.len());
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::dot(a, b) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::dot(a, b) },
        Level::Scalar => {}
    }
    scalar::dot(a, b)
}

/// `y += alpha · x`, element by element. Panics if the lengths differ.
///
/// ```
/// # use lego::kernels::simd::axpy;
/// let mut y = [1.0, 1.0];
/// axpy(2.0, &[3.0, 4.0], &mut y);
/// assert_eq!(y, [7.0, 9.0]);
/// ```
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    check_same_len("axpy", "x", x.len(), "y", y.len());
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::axpy(alpha, x, y) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::axpy(alpha, x, y) },
        Level::Scalar => {}
    }
    scalar::axpy(alpha, x, y)
}

/// The small-M matrix product `x · wᵀ`, written transposed:
/// `out_t[j*m + i] = dot(x[i*k..(i+1)*k], w[j*k..(j+1)*k])` for `i < m`, `j < n = w.len()/k`.
///
/// `x` is `(m, k)` row-major (m = batch rows when decoding, typically 1..=16, any m works), `w`
/// is `(n, k)` row-major (a `Linear` weight, one output feature a row), and `out_t` is `(n, m)`.
/// The output is transposed so that a caller can split the `n` rows of `w` across threads and
/// hand each thread a contiguous chunk of `out_t`.
///
/// Each row of `w` is read from memory once and dotted with all `m` rows of `x` while it is in
/// cache, which is what makes this bandwidth-bound rather than latency-bound.
///
/// Panics unless `x.len() == m*k`, `w.len()` is a multiple of `k` and `out_t.len() == n*m`.
/// If `k == 0`, `w` must be empty and `out_t` is filled with zeros.
///
/// ```
/// # use lego::kernels::simd::matmul_xwt;
/// // x = [[1, 2]], w = [[1, 0], [0, 1], [1, 1]]  ->  x·wᵀ = [[1, 2, 3]]
/// let mut out_t = [0.0; 3];
/// matmul_xwt(&[1.0, 2.0], 1, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &mut out_t);
/// assert_eq!(out_t, [1.0, 2.0, 3.0]);
/// ```
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    check_matmul_xwt(x.len(), m, k, w.len(), out_t.len());
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::matmul_xwt(x, m, k, w, out_t) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::matmul_xwt(x, m, k, w, out_t) },
        Level::Scalar => {}
    }
    scalar::matmul_xwt(x, m, k, w, out_t)
}

/// Softmax over the whole slice, in place: `x[i] = exp(x[i] - max) / Σ_j exp(x[j] - max)`.
///
/// Subtracting the max first makes every exponent `<= 0`, so nothing overflows however large the
/// inputs, and the largest term is exactly 1, so the sum is at least 1. Entries equal to `-inf`
/// (masked positions) become 0. An empty slice is left alone; a slice of only `-inf` becomes NaN
/// (0/0), as in PyTorch.
///
/// ```
/// # use lego::kernels::simd::softmax_in_place;
/// let mut x = [1000.0, 1000.0, f32::NEG_INFINITY];
/// softmax_in_place(&mut x);
/// assert_eq!(x, [0.5, 0.5, 0.0]);
/// ```
pub fn softmax_in_place(x: &mut [f32]) {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::softmax_in_place(x) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::softmax_in_place(x) },
        Level::Scalar => {}
    }
    scalar::softmax_in_place(x)
}

/// The logistic sigmoid in place: `x[i] = σ(x[i]) = 1 / (1 + e^(−x[i]))` (SwiGLU's backward
/// needs it for every element). The vector levels use the same vector `eˣ` as the softmax.
///
/// ```
/// # use lego::kernels::simd::sigmoid_in_place;
/// let mut x = [0.0, 30.0, -30.0];
/// sigmoid_in_place(&mut x);
/// assert_eq!(x[0], 0.5);
/// assert!((x[1] - 1.0).abs() < 1e-6 && x[2] < 1e-12);
/// ```
pub fn sigmoid_in_place(x: &mut [f32]) {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::sigmoid_in_place(x) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::sigmoid_in_place(x) },
        Level::Scalar => {}
    }
    scalar::sigmoid_in_place(x)
}

/// SwiGLU of one MLP row, in place: `gate[i] = silu(gate[i]) · up[i]`, where
/// `silu(g) = g · σ(g)` and `σ(g) = 1 / (1 + e^(−g))` (the decoder's hidden state from the
/// `W1` and `W3` products). The vector levels use the same vector `eˣ` as the softmax.
///
/// Panics if the slices differ in length.
///
/// ```
/// # use lego::kernels::simd::swiglu_in_place;
/// let mut gate = [0.0, 20.0];
/// swiglu_in_place(&mut gate, &[5.0, 0.5]);
/// assert_eq!(gate[0], 0.0); // silu(0) = 0
/// assert!((gate[1] - 10.0).abs() < 1e-5); // silu(20) ≈ 20
/// ```
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::swiglu_in_place(gate, up) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::swiglu_in_place(gate, up) },
        Level::Scalar => {}
    }
    scalar::swiglu_in_place(gate, up)
}

/// One query's attention over `count` cached positions: `scores[j] = scale·(q·k_j)` where
/// `k_j = keys[j·stride ..][..q.len()]`, a softmax over `scores[..count]`, and
/// `out = Σ_j scores[j]·v_j` with the values laid out like the keys. The decoding loop calls it
/// once per (token, head), so the many short dot products stay inside one SIMD function.
///
/// Panics (naming the kernel) if a slice is too short for `count` positions.
///
/// ```
/// # use lego::kernels::simd::attend;
/// // Two cached positions of a 2-wide head, stored with stride 2.
/// let (keys, values) = ([1.0, 0.0, 0.0, 1.0], [10.0, 0.0, 0.0, 20.0]);
/// let (mut scores, mut out) = ([0.0; 2], [0.0; 2]);
/// attend(&[0.0, 0.0], &keys, &values, 2, 2, 1.0, &mut scores, &mut out);
/// assert_eq!(scores, [0.5, 0.5]); // equal scores: equal weights
/// assert_eq!(out, [5.0, 10.0]);
/// ```
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
    let need = if count == 0 { 0 } else { (count - 1) * stride + hd };
    assert!(
        keys.len() >= need
            && values.len() >= need
            && scores.len() >= count
            && out.len() == hd
            && (count <= 1 || stride >= hd),
        "attend: {count} positions of width {hd} with stride {stride} need keys/values of {need} (got {}, {}), scores of {count} (got {}), out of {hd} (got {})",
        keys.len(),
        values.len(),
        scores.len(),
        out.len()
    );
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F; bounds checked above.
        Level::Avx512 => {
            return unsafe { avx512::attend(q, keys, values, stride, count, scale, scores, out) };
        }
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA; bounds checked above.
        Level::Avx2 => {
            return unsafe { avx2::attend(q, keys, values, stride, count, scale, scores, out) };
        }
        Level::Scalar => {}
    }
    scalar::attend(q, keys, values, stride, count, scale, scores, out)
}

/// RMSNorm: `out = x · inv_rms · weight` with `inv_rms = 1 / sqrt(mean(x²) + eps)`; returns
/// `inv_rms` (the backward pass needs it).
///
/// Panics unless `x`, `weight` and `out` have the same length. For an empty `x` the mean is taken
/// as 0, so it returns `1/sqrt(eps)` and writes nothing.
///
/// ```
/// # use lego::kernels::simd::rmsnorm;
/// let mut out = [0.0; 2];
/// let inv_rms = rmsnorm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
/// // mean(x²) = 12.5
/// assert!((inv_rms - 1.0 / 12.5f32.sqrt()).abs() < 1e-7);
/// assert!((out[1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-6);
/// ```
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    check_same_len("rmsnorm", "x", x.len(), "weight", weight.len());
    check_same_len("rmsnorm", "x", x.len(), "out", out.len());
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::rmsnorm(x, weight, eps, out) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::rmsnorm(x, weight, eps, out) },
        Level::Scalar => {}
    }
    scalar::rmsnorm(x, weight, eps, out)
}

/// The hyper-parameters of one AdamW step, as in `torch.optim.AdamW`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// Decay rate of the first moment (the running mean of the gradient), e.g. 0.9.
    pub beta1: f32,
    /// Decay rate of the second moment (the running mean of the squared gradient), e.g. 0.999.
    pub beta2: f32,
    /// Added to the denominator so that it never vanishes, e.g. 1e-8.
    pub eps: f32,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr * weight_decay`.
    pub weight_decay: f32,
    /// The number of this step, counting from 1 (it sets the bias corrections).
    pub step: u64,
}

/// The per-step scalars of AdamW, computed once in f64 (as PyTorch does, in Python floats) and
/// rounded to f32 for the element loop.
#[derive(Debug, Clone, Copy)]
struct AdamWScalars {
    /// `1 - lr * weight_decay`.
    decay: f32,
    /// `1 - beta1`.
    one_minus_beta1: f32,
    /// `1 - beta2`.
    one_minus_beta2: f32,
    /// `lr / (1 - beta1^step)`.
    step_size: f32,
    /// `sqrt(1 - beta2^step)`.
    bc2_sqrt: f32,
}

impl AdamWScalars {
    /// The scalars for step `h`.
    fn new(h: &AdamWStep) -> Self {
        let step = h.step as f64;
        let bc1 = 1.0 - (h.beta1 as f64).powf(step);
        let bc2 = 1.0 - (h.beta2 as f64).powf(step);
        AdamWScalars {
            decay: (1.0 - h.lr as f64 * h.weight_decay as f64) as f32,
            one_minus_beta1: (1.0 - h.beta1 as f64) as f32,
            one_minus_beta2: (1.0 - h.beta2 as f64) as f32,
            step_size: (h.lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
        }
    }
}

/// One step of PyTorch's AdamW (`torch.optim.AdamW`, `amsgrad=False`, `maximize=False`) on a flat
/// parameter, updating `param`, and the moment buffers `m` and `v`, in place:
///
/// ```text
/// param *= 1 - lr·weight_decay                  (decoupled weight decay, before the step)
/// m      = beta1·m + (1 - beta1)·g               (running mean of the gradient)
/// v      = beta2·v + (1 - beta2)·g²              (running mean of its square)
/// bc1    = 1 - beta1^step,  bc2 = 1 - beta2^step  (both moments start at 0 and are biased
///                                                  towards it; dividing by bc undoes that)
/// param -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
/// ```
///
/// Panics unless all four slices have the same length and `h.step >= 1`.
///
/// ```
/// # use lego::kernels::simd::{adamw_update, AdamWStep};
/// let h = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
/// let (mut p, mut m, mut v) = ([1.0], [0.0], [0.0]);
/// adamw_update(&mut p, &[0.5], &mut m, &mut v, &h);
/// // On the first step m/bc1 = g and sqrt(v/bc2) = |g|, so the step is lr·sign(g).
/// assert!((p[0] - 0.9).abs() < 1e-6);
/// ```
pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    check_adamw(param.len(), grad.len(), m.len(), v.len(), h.step);
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    match level() {
        // SAFETY: level() returns Avx512 only if the CPU has AVX-512F.
        Level::Avx512 => return unsafe { avx512::adamw_update(param, grad, m, v, h) },
        // SAFETY: level() returns Avx2 only if the CPU has AVX2 and FMA.
        Level::Avx2 => return unsafe { avx2::adamw_update(param, grad, m, v, h) },
        Level::Scalar => {}
    }
    scalar::adamw_update(param, grad, m, v, h)
}

// ---------------------------------------------------------------------------------------------
// Helpers for the tests of every level.
// ---------------------------------------------------------------------------------------------

/// The lengths every kernel is tested at: around each multiple of 8 and 16 (the vector widths)
/// and of 32 and 64 (the unrolled loops), so that every tail path runs.
#[cfg(test)]
const TEST_LENGTHS: [usize; 16] = [0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1000, 1377];

/// `len` pseudo-random numbers in [-1, 1), a fixed function of `seed` (a 64-bit LCG; the tests
/// need varied data, not good randomness).
#[cfg(test)]
fn test_data(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // The top 24 bits, as a fraction in [0, 1), mapped to [-1, 1).
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Asserts `|got - want| <= tol · max(|want|, 1)`, naming `what` on failure. (Relative for large
/// values, absolute near 0, where a sum of mixed-sign terms has no meaningful relative error.)
#[cfg(test)]
#[track_caller]
fn assert_close(got: f32, want: f32, tol: f32, what: &str) {
    let scale = want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol * scale || (got.is_nan() && want.is_nan()) || got == want,
        "{what}: got {got}, want {want} (tolerance {tol})"
    );
}

/// [`assert_close`] on each element of two slices of equal length.
#[cfg(test)]
#[track_caller]
fn assert_all_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_close(g, w, tol, &format!("{what}[{i}]"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_level_accepts_the_three_names() {
        assert_eq!(parse_level("scalar"), Some(Level::Scalar));
        assert_eq!(parse_level("avx2"), Some(Level::Avx2));
        assert_eq!(parse_level(" AVX512 "), Some(Level::Avx512));
        assert_eq!(parse_level("sse"), None);
        assert_eq!(parse_level(""), None);
    }

    #[test]
    fn forced_level_is_used_but_never_above_the_detected_one() {
        assert_eq!(choose_level(Level::Avx512, None), Level::Avx512);
        assert_eq!(choose_level(Level::Avx512, Some("scalar")), Level::Scalar);
        assert_eq!(choose_level(Level::Avx512, Some("avx2")), Level::Avx2);
        assert_eq!(choose_level(Level::Avx512, Some("avx512")), Level::Avx512);
        // A level the CPU lacks is never chosen.
        assert_eq!(choose_level(Level::Avx2, Some("avx512")), Level::Avx2);
        assert_eq!(choose_level(Level::Scalar, Some("avx2")), Level::Scalar);
        // Garbage is ignored.
        assert_eq!(choose_level(Level::Avx2, Some("fast")), Level::Avx2);
    }

    #[test]
    fn level_is_at_most_what_the_cpu_has_and_is_cached() {
        let l = level();
        assert!(l <= detect());
        assert_eq!(level(), l);
        if cfg!(not(all(feature = "simd", target_arch = "x86_64"))) {
            assert_eq!(l, Level::Scalar);
        }
    }

    #[test]
    fn dispatchers_agree_with_the_scalar_reference() {
        let a = test_data(1001, 1);
        let b = test_data(1001, 2);
        assert_close(dot(&a, &b), scalar::dot(&a, &b), 1e-5, "dot");

        let mut y = b.clone();
        let mut y_ref = b.clone();
        axpy(0.5, &a, &mut y);
        scalar::axpy(0.5, &a, &mut y_ref);
        assert_all_close(&y, &y_ref, 1e-6, "axpy");

        let (m, k, n) = (3, 37, 11);
        let x = test_data(m * k, 3);
        let w = test_data(n * k, 4);
        let mut out = vec![0.0; n * m];
        let mut out_ref = vec![0.0; n * m];
        matmul_xwt(&x, m, k, &w, &mut out);
        scalar::matmul_xwt(&x, m, k, &w, &mut out_ref);
        assert_all_close(&out, &out_ref, 1e-5, "matmul_xwt");

        let mut s = a.clone();
        let mut s_ref = a.clone();
        softmax_in_place(&mut s);
        scalar::softmax_in_place(&mut s_ref);
        assert_all_close(&s, &s_ref, 1e-5, "softmax");

        let mut o = vec![0.0; a.len()];
        let mut o_ref = vec![0.0; a.len()];
        let r = rmsnorm(&a, &b, 1e-5, &mut o);
        let r_ref = scalar::rmsnorm(&a, &b, 1e-5, &mut o_ref);
        assert_close(r, r_ref, 1e-5, "rmsnorm inv_rms");
        assert_all_close(&o, &o_ref, 1e-5, "rmsnorm");

        let h = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 5 };
        let (mut p, mut mm, mut vv) = (a.clone(), b.clone(), vec![0.01; a.len()]);
        let (mut p_ref, mut mm_ref, mut vv_ref) = (p.clone(), mm.clone(), vv.clone());
        adamw_update(&mut p, &b, &mut mm, &mut vv, &h);
        scalar::adamw_update(&mut p_ref, &b, &mut mm_ref, &mut vv_ref, &h);
        assert_all_close(&p, &p_ref, 1e-5, "adamw param");
    }

    #[test]
    #[should_panic(expected = "dot: a has length 3 but b has length 2")]
    fn dot_panics_on_length_mismatch() {
        dot(&[1.0, 2.0, 3.0], &[1.0, 2.0]);
    }

    #[test]
    #[should_panic(expected = "matmul_xwt: out_t has length 5")]
    fn matmul_xwt_panics_on_bad_output() {
        let mut out = [0.0; 5];
        matmul_xwt(&[0.0; 4], 2, 2, &[0.0; 6], &mut out);
    }

    #[test]
    #[should_panic(expected = "adamw_update: step counts from 1")]
    fn adamw_panics_on_step_zero() {
        let h = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 0 };
        adamw_update(&mut [0.0], &[0.0], &mut [0.0], &mut [0.0], &h);
    }
}
