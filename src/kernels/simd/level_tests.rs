//! Every SIMD level against the scalar reference: one set of tests, run for each level this CPU
//! (and this build) can execute.
//!
//! A level's kernels are gathered into a [`Kernels`] table of plain functions, so each test is
//! written once and loops over the tables. The lengths ([`TEST_LENGTHS`]) sit around the
//! register widths (8 for AVX2, 16 for AVX-512) and the unrolled loops (32, 64), so that every
//! tail path runs at every level. Without the `simd` feature, or on a CPU without AVX2, there is
//! no level to test and the tests pass vacuously (the scalar kernels have their own tests
//! against f64 in `scalar.rs`).

use super::{AdamWStep, Level, TEST_LENGTHS, assert_all_close, assert_close, scalar, test_data};

/// One level's kernels, as plain functions with the signatures of [`scalar`]'s.
#[allow(clippy::type_complexity)] // the signatures spelled out, as in `scalar.rs`
struct Kernels {
    level: Level,
    dot: fn(&[f32], &[f32]) -> f32,
    axpy: fn(f32, &[f32], &mut [f32]),
    matmul_xwt: fn(&[f32], usize, usize, &[f32], &mut [f32]),
    softmax_in_place: fn(&mut [f32]),
    rmsnorm: fn(&[f32], &[f32], f32, &mut [f32]) -> f32,
    adamw_update: fn(&mut [f32], &[f32], &mut [f32], &mut [f32], &AdamWStep),
    attend: fn(&[f32], &[f32], &[f32], usize, usize, f32, &mut [f32], &mut [f32]),
    /// The level's vector `eˣ` (private to its file), applied to a slice.
    exp: fn(&[f32], &mut [f32]),
    swiglu_in_place: fn(&mut [f32], &[f32]),
    sigmoid_in_place: fn(&mut [f32]),
}

/// The SIMD levels this CPU can run, widest last.
fn simd_levels() -> Vec<Kernels> {
    #[allow(unused_mut)] // nothing is pushed in a build without the `simd` feature
    let mut levels = Vec::new();
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    {
        use super::{avx2, avx512};
        // SAFETY (every `unsafe` call in this entry): it exists only on a CPU with AVX2 and FMA,
        // and the AVX2 functions check their slices as the scalar ones do.
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            levels.push(Kernels {
                level: Level::Avx2,
                dot: |a, b| unsafe { avx2::dot(a, b) },
                axpy: |alpha, x, y| unsafe { avx2::axpy(alpha, x, y) },
                matmul_xwt: |x, m, k, w, out_t| unsafe { avx2::matmul_xwt(x, m, k, w, out_t) },
                softmax_in_place: |x| unsafe { avx2::softmax_in_place(x) },
                rmsnorm: |x, w, eps, out| unsafe { avx2::rmsnorm(x, w, eps, out) },
                adamw_update: |p, g, m, v, h| unsafe { avx2::adamw_update(p, g, m, v, h) },
                attend: |q, k, v, stride, count, scale, s, o| unsafe {
                    avx2::attend(q, k, v, stride, count, scale, s, o)
                },
                exp: |x, out| unsafe { avx2::exp_slice(x, out) },
                swiglu_in_place: |g, u| unsafe { avx2::swiglu_in_place(g, u) },
                sigmoid_in_place: |x| unsafe { avx2::sigmoid_in_place(x) },
            });
        }
        // SAFETY (likewise): this entry exists only on a CPU with AVX-512F.
        if is_x86_feature_detected!("avx512f") {
            levels.push(Kernels {
                level: Level::Avx512,
                dot: |a, b| unsafe { avx512::dot(a, b) },
                axpy: |alpha, x, y| unsafe { avx512::axpy(alpha, x, y) },
                matmul_xwt: |x, m, k, w, out_t| unsafe { avx512::matmul_xwt(x, m, k, w, out_t) },
                softmax_in_place: |x| unsafe { avx512::softmax_in_place(x) },
                rmsnorm: |x, w, eps, out| unsafe { avx512::rmsnorm(x, w, eps, out) },
                adamw_update: |p, g, m, v, h| unsafe { avx512::adamw_update(p, g, m, v, h) },
                attend: |q, k, v, stride, count, scale, s, o| unsafe {
                    avx512::attend(q, k, v, stride, count, scale, s, o)
                },
                exp: |x, out| unsafe { avx512::exp_slice(x, out) },
                swiglu_in_place: |g, u| unsafe { avx512::swiglu_in_place(g, u) },
                sigmoid_in_place: |x| unsafe { avx512::sigmoid_in_place(x) },
            });
        }
    }
    levels
}

#[test]
fn the_level_in_use_is_among_those_tested() {
    let tested: Vec<Level> = simd_levels().iter().map(|k| k.level).collect();
    let used = super::level();
    assert!(used == Level::Scalar || tested.contains(&used), "{used:?} runs but is not tested");
}

#[test]
fn dot_equals_scalar() {
    for k in simd_levels() {
        for len in TEST_LENGTHS {
            let (a, b) = (test_data(len, 1), test_data(len, 2));
            assert_close((k.dot)(&a, &b), scalar::dot(&a, &b), 1e-5, &format!("{:?} dot len {len}", k.level));
        }
    }
}

#[test]
fn axpy_equals_scalar() {
    for k in simd_levels() {
        for len in TEST_LENGTHS {
            let x = test_data(len, 3);
            let mut y = test_data(len, 4);
            let mut y_ref = y.clone();
            (k.axpy)(0.75, &x, &mut y);
            scalar::axpy(0.75, &x, &mut y_ref);
            assert_all_close(&y, &y_ref, 1e-6, &format!("{:?} axpy len {len}", k.level));
        }
    }
}

#[test]
fn matmul_xwt_equals_scalar() {
    for kern in simd_levels() {
        // Rows of x around the register tiles; k around both register widths.
        for m in [1, 2, 3, 5, 8, 9, 16, 17] {
            for (k, n) in [(1, 1), (3, 2), (7, 5), (15, 5), (17, 7), (33, 9), (100, 4), (1377, 6)] {
                let x = test_data(m * k, 5);
                let w = test_data(n * k, 6);
                // NaN first: every output must be written.
                let mut out = vec![f32::NAN; n * m];
                let mut out_ref = vec![f32::NAN; n * m];
                (kern.matmul_xwt)(&x, m, k, &w, &mut out);
                scalar::matmul_xwt(&x, m, k, &w, &mut out_ref);
                assert_all_close(
                    &out,
                    &out_ref,
                    1e-5,
                    &format!("{:?} matmul_xwt m={m} k={k} n={n}", kern.level),
                );
            }
        }
    }
}

#[test]
fn matmul_xwt_gives_a_row_the_same_bits_alone_or_among_others() {
    // Batch invariance at the kernel: a row of x alone (m = 1: 8-row tiles of w and the
    // 8-at-once horizontal sums) and the same row among m rows (4 × 4 tiles, one sum at a
    // time) give the same bits.
    for kern in simd_levels() {
        for (k, n) in [(16, 8), (64, 24), (100, 19), (256, 40), (1377, 17)] {
            let w = test_data(n * k, 8);
            for m in [2, 3, 5, 8] {
                let x = test_data(m * k, 9);
                let mut out_t = vec![f32::NAN; n * m];
                (kern.matmul_xwt)(&x, m, k, &w, &mut out_t);
                for i in 0..m {
                    let mut alone = vec![f32::NAN; n];
                    (kern.matmul_xwt)(&x[i * k..(i + 1) * k], 1, k, &w, &mut alone);
                    let among: Vec<f32> = (0..n).map(|j| out_t[j * m + i]).collect();
                    assert_eq!(
                        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        among.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{:?} matmul_xwt row {i} of {m}, k={k} n={n}",
                        kern.level
                    );
                }
            }
        }
    }
}

#[test]
fn exp_is_within_a_few_ulp() {
    // A dense sweep of the range softmax uses (x <= 0), and some positive values.
    let xs: Vec<f32> =
        (0..=87_000).map(|i| -(i as f32) * 1e-3).chain((0..=880).map(|i| i as f32 * 0.1)).collect();
    for k in simd_levels() {
        let mut y = vec![0.0; xs.len()];
        (k.exp)(&xs, &mut y);
        for (&x, &got) in xs.iter().zip(&y) {
            let want = (x as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            let tol = if x <= 0.0 { 2.5e-7 } else { 1e-6 };
            assert!(rel < tol, "{:?}: exp({x}) = {got}, want {want}, rel err {rel}", k.level);
        }
        // The edges: underflow to 0, overflow to inf, NaN stays NaN.
        let edges = [-88.0, f32::NEG_INFINITY, 89.0, f32::INFINITY, f32::NAN, 0.0];
        let mut y = [0.0; 6];
        (k.exp)(&edges, &mut y);
        assert_eq!(&y[..4], &[0.0, 0.0, f32::INFINITY, f32::INFINITY], "{:?}", k.level);
        assert!(y[4].is_nan(), "{:?}: exp(NaN) = {}", k.level, y[4]);
        assert_eq!(y[5], 1.0, "{:?}", k.level);
    }
}

#[test]
fn softmax_equals_scalar() {
    for k in simd_levels() {
        for len in TEST_LENGTHS {
            // Spread to ±30 so that the exponentials span many orders of magnitude.
            let x0: Vec<f32> = test_data(len, 7).iter().map(|v| v * 30.0).collect();
            let (mut x, mut x_ref) = (x0.clone(), x0);
            (k.softmax_in_place)(&mut x);
            scalar::softmax_in_place(&mut x_ref);
            assert_all_close(&x, &x_ref, 1e-5, &format!("{:?} softmax len {len}", k.level));
            if len > 0 {
                let total: f64 = x.iter().map(|&v| v as f64).sum();
                assert!((total - 1.0).abs() < 1e-5, "{:?} softmax len {len} sums to {total}", k.level);
            }
        }
    }
}

#[test]
fn softmax_edge_cases() {
    for k in simd_levels() {
        // Large inputs do not overflow.
        let mut x = vec![1000.0f32; 33];
        (k.softmax_in_place)(&mut x);
        assert_all_close(&x, &[1.0 / 33.0; 33], 1e-6, &format!("{:?} constant 1000", k.level));
        // A masked row: all -inf except one entry, in the main loop and in the tail.
        for (len, hot) in [(20, 3), (20, 18), (7, 0)] {
            let mut x = vec![f32::NEG_INFINITY; len];
            x[hot] = 5.0;
            (k.softmax_in_place)(&mut x);
            let mut want = vec![0.0; len];
            want[hot] = 1.0;
            assert_eq!(x, want, "{:?} one-hot len {len} at {hot}", k.level);
        }
    }
}

#[test]
fn rmsnorm_equals_scalar() {
    for k in simd_levels() {
        for len in TEST_LENGTHS {
            let (x, w) = (test_data(len, 8), test_data(len, 9));
            let (mut out, mut out_ref) = (vec![0.0; len], vec![0.0; len]);
            let inv = (k.rmsnorm)(&x, &w, 1e-6, &mut out);
            let inv_ref = scalar::rmsnorm(&x, &w, 1e-6, &mut out_ref);
            assert_close(inv, inv_ref, 1e-5, &format!("{:?} inv_rms len {len}", k.level));
            assert_all_close(&out, &out_ref, 1e-5, &format!("{:?} rmsnorm len {len}", k.level));
        }
    }
}

#[test]
fn adamw_equals_scalar() {
    for k in simd_levels() {
        for len in TEST_LENGTHS {
            let mut p = test_data(len, 10);
            let (mut m, mut v) = (vec![0.0; len], vec![0.0; len]);
            let (mut p_ref, mut m_ref, mut v_ref) = (p.clone(), m.clone(), v.clone());
            // Three steps: the bias corrections change with the step.
            for step in 1..=3 {
                let h = AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
                let g = test_data(len, 100 + step);
                (k.adamw_update)(&mut p, &g, &mut m, &mut v, &h);
                scalar::adamw_update(&mut p_ref, &g, &mut m_ref, &mut v_ref, &h);
                let what = format!("{:?} len {len} step {step}", k.level);
                assert_all_close(&p, &p_ref, 1e-5, &format!("param {what}"));
                assert_all_close(&m, &m_ref, 1e-5, &format!("m {what}"));
                assert_all_close(&v, &v_ref, 1e-5, &format!("v {what}"));
            }
        }
    }
}

#[test]
fn attend_equals_scalar() {
    for k in simd_levels() {
        // (head width, stride between positions, positions): odd widths, wide strides, one
        // position; heads of one to four whole registers (AVX-512 keeps them in registers).
        let cases = [
            (1, 1, 1),
            (7, 9, 5),
            (16, 48, 33),
            (32, 256, 77),
            (33, 40, 1),
            (48, 96, 20),
            (64, 512, 130),
            (32, 32, 1),
        ];
        for &(hd, stride, count) in &cases {
            let q = test_data(hd, 5);
            let keys = test_data((count - 1) * stride + hd, 6);
            let values = test_data((count - 1) * stride + hd, 7);
            let (mut s1, mut o1) = (vec![0.0; count], vec![0.0; hd]);
            let (mut s2, mut o2) = (vec![0.0; count], vec![0.0; hd]);
            (k.attend)(&q, &keys, &values, stride, count, 0.3, &mut s1, &mut o1);
            scalar::attend(&q, &keys, &values, stride, count, 0.3, &mut s2, &mut o2);
            let what = format!("{:?} attend hd {hd} count {count}", k.level);
            assert_all_close(&s1, &s2, 1e-5, &format!("{what} scores"));
            assert_all_close(&o1, &o2, 1e-5, &format!("{what} out"));
        }
    }
}

#[test]
fn sigmoid_equals_scalar() {
    for k in simd_levels() {
        for n in TEST_LENGTHS {
            // From -40 to 40: both saturated ends and the middle.
            let x: Vec<f32> = test_data(n, 10).iter().map(|v| 40.0 * v).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            (k.sigmoid_in_place)(&mut a);
            scalar::sigmoid_in_place(&mut b);
            assert_all_close(&a, &b, 1e-6, &format!("{:?} sigmoid n {n}", k.level));
        }
    }
}

#[test]
fn swiglu_equals_scalar() {
    for k in simd_levels() {
        for n in TEST_LENGTHS {
            // Gates from -12 to 12 (σ saturates at both ends), ups in [-1, 1].
            let gate: Vec<f32> = test_data(n, 8).iter().map(|g| 12.0 * g).collect();
            let up = test_data(n, 9);
            let (mut a, mut b) = (gate.clone(), gate.clone());
            (k.swiglu_in_place)(&mut a, &up);
            scalar::swiglu_in_place(&mut b, &up);
            assert_all_close(&a, &b, 1e-5, &format!("{:?} swiglu n {n}", k.level));
        }
    }
}
