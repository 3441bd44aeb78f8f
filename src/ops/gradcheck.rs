//! Finite-difference gradient checks, shared by every op's tests.
//!
//! For an op `y = f(x₁, …, xₙ)` and a random upstream gradient `g`, the scalar
//! `L = Σ y·g` has `∂L/∂xᵢ[j] ≈ (L(xᵢ[j] + ε) − L(xᵢ[j] − ε)) / 2ε` (central differences,
//! error O(ε²)). The analytic gradient from `backward` must agree with it at every checked
//! element. L is summed in f64 so that f32 rounding in the sum does not swamp the difference.
//!
//! Two more checks: [`check_twins`] holds a fused op equal (values and gradients) to its slow
//! twin built from simple ops, and [`check_skips_unneeded_gradients`] checks that an op's
//! backward computes nothing for an input that needs no gradient.

use crate::tensor::Tensor;

/// Deterministic pseudo-random values in [-1, 1) (no RNG state to thread through tests).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    // xorshift64, seeded through a multiplication so that nearby seeds give unrelated streams.
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 // top 24 bits → [-1, 1)
        })
        .collect()
}

/// Checks the gradients of `f` with respect to inputs of the given shapes, drawn from
/// [-1, 1). See [`check_gradients_with`].
pub fn check_gradients(shapes: &[&[usize]], f: impl Fn(&[Tensor]) -> Tensor) {
    // Each input its own stream of values (seeds 17, 18, ...).
    let inputs: Vec<Vec<f32>> =
        shapes.iter().enumerate().map(|(i, s)| values(s.iter().product(), 17 + i as u64)).collect();
    check_gradients_with(shapes, &inputs, f);
}

/// Checks the gradients of `f` at the given input values against central differences.
/// Panics naming the input, the element, and both values on a mismatch.
///
/// Inputs of up to 64 values are checked at every element, larger ones at about 64 elements
/// spread evenly. Choose the values away from kinks and poles (`relu` at 0, `log` near 0),
/// where a difference quotient does not approximate the derivative.
pub fn check_gradients_with(shapes: &[&[usize]], inputs: &[Vec<f32>], f: impl Fn(&[Tensor]) -> Tensor) {
    let make = |vals: &[Vec<f32>]| -> Vec<Tensor> {
        shapes.iter().zip(vals).map(|(s, v)| Tensor::from_vec(v.clone(), s).requires_grad()).collect()
    };
    // The analytic gradients: one backward of L = Σ y·upstream.
    let xs = make(inputs);
    let y = f(&xs);
    let upstream = values(y.numel(), 99);
    y.backward_with(upstream.clone());

    // L at other input values, recomputed from scratch without a graph.
    let loss = |vals: &[Vec<f32>]| -> f64 {
        let y = crate::no_grad(|| f(&make(vals)));
        y.data().iter().zip(&upstream).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    // ε trades truncation error (O(ε²), small for these smooth ops) against f32 rounding in
    // L(x ± ε), which grows as ε shrinks; 1e-2 keeps both near 1e-4.
    let eps = 1e-2f32;
    // Nudge one element of one input at a time, both ways, and compare the slope of L.
    for (i, x) in xs.iter().enumerate() {
        let analytic = x.grad().unwrap_or_else(|| vec![0.0; x.numel()]);
        // Check every element of small inputs, a spread of them for larger ones.
        let step = (x.numel() / 64).max(1);
        for j in (0..x.numel()).step_by(step) {
            let mut plus = inputs.to_vec();
            plus[i][j] += eps;
            let mut minus = inputs.to_vec();
            minus[i][j] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
            let a = analytic[j] as f64;
            // Relative for large gradients, absolute near 0.
            assert!(
                (a - numeric).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "gradient of input {i} (shape {:?}) at element {j}: backward gives {a}, finite \
                 differences {numeric}",
                shapes[i]
            );
        }
    }
}

/// Checks that the op `f` computes a gradient only for the inputs that require one: with one
/// input at a time requiring a gradient, its backward returns `None` for every other input,
/// and for that one exactly (bit for bit) what it returns when all inputs require one.
pub fn check_skips_unneeded_gradients(shapes: &[&[usize]], f: impl Fn(&[Tensor]) -> Tensor) {
    let inputs: Vec<Vec<f32>> =
        shapes.iter().enumerate().map(|(i, s)| values(s.iter().product(), 17 + i as u64)).collect();
    let make = |needs: &[bool]| -> Vec<Tensor> {
        shapes
            .iter()
            .zip(&inputs)
            .zip(needs)
            .map(|((s, v), &need)| {
                let t = Tensor::from_vec(v.clone(), s);
                if need { t.requires_grad() } else { t }
            })
            .collect()
    };
    // What the op's backward returns when every input requires a gradient...
    let n = shapes.len();
    let all = f(&make(&vec![true; n]));
    let upstream = values(all.numel(), 99);
    let full = all.op_input_grads(&upstream);
    // ...and when only input i does.
    for i in 0..n {
        let needs: Vec<bool> = (0..n).map(|j| j == i).collect();
        let got = f(&make(&needs)).op_input_grads(&upstream);
        for j in 0..n {
            if j == i {
                assert!(
                    got[j] == full[j],
                    "input {i} alone: its gradient differs from the one computed with all"
                );
            } else {
                assert!(
                    got[j].is_none(),
                    "input {i} alone requires a gradient, yet one was computed for input {j}"
                );
            }
        }
    }
}

/// Checks that a fused op `fast` and its slow twin `slow` (the same function written with
/// simple ops) agree at the given inputs: the same output, and, for one upstream gradient, the
/// same gradient of every input, each value to `tol` relative to `max(1, |slow's value|)`.
pub fn check_twins(
    shapes: &[&[usize]],
    inputs: &[Vec<f32>],
    fast: impl Fn(&[Tensor]) -> Tensor,
    slow: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    // The output's values and every input's gradient, with the same upstream gradient. Each
    // run builds its own leaves, so the two graphs share nothing.
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| -> (Vec<f32>, Vec<Vec<f32>>) {
        let xs: Vec<Tensor> =
            shapes.iter().zip(inputs).map(|(s, v)| Tensor::from_vec(v.clone(), s).requires_grad()).collect();
        let y = f(&xs);
        y.backward_with(values(y.numel(), 99));
        (y.to_vec(), xs.iter().map(|x| x.grad().unwrap_or_else(|| vec![0.0; x.numel()])).collect())
    };
    let (y_fast, g_fast) = run(&fast);
    let (y_slow, g_slow) = run(&slow);
    // Relative to max(1, |slow|): the slow twin, written with simple ops, is the reference.
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what} at element {j}: fused {x}, slow twin {y}"
            );
        }
    };
    close("output", &y_fast, &y_slow);
    for (i, (a, b)) in g_fast.iter().zip(&g_slow).enumerate() {
        close(&format!("gradient of input {i} (shape {:?})", shapes[i]), a, b);
    }
}
