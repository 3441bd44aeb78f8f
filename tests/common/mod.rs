//! Shared helpers of the parity tests: loading a JAX fixture and comparing our numbers to it.
//!
//! The fixtures (`tests/fixtures/`, written by `tools/gen_fixtures.py`, listed in
//! `tests/fixtures/README.md`) hold float32 inputs and the float64 reference results of JAX,
//! rounded to float32. A comparison passes when every element satisfies
//!
//! ```text
//! |got − want| <= atol·rms(want) + rtol·|want|
//! ```
//!
//! where `rms(want)` is the root-mean-square of the whole reference tensor: the absolute
//! tolerance scales with the tensor's typical magnitude, because an entry much smaller than
//! its neighbours is the result of cancellation (a sum of terms of the typical size) and
//! carries an error of that size, not of its own. For values of order 1 this is the plain
//! `atol + rtol·|want|`. A failure names the tensor and its worst element: index, got, want,
//! errors.

#![allow(dead_code)] // each test binary uses its own subset of the helpers

use std::path::PathBuf;

use lego::Tensor;
use lego::io::safetensors::{self, SafeTensors};

/// The tolerance of a comparison: `|got − want| <= atol·rms(want) + rtol·|want|`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rtol: f32,
    pub atol: f32,
}

impl Tol {
    /// The default: 1e-5 relative, plus 1e-6 of the tensor's RMS absolute (1e-6 for values
    /// of order 1).
    pub const DEFAULT: Tol = Tol { rtol: 1e-5, atol: 1e-6 };
}

/// The outcome of a passing comparison, for the report: the largest `|got − want|` and the
/// largest relative error `|got − want| / |want|` over elements with `|want| >= 1e-3` (below
/// that the relative error of a value near zero says nothing about the op).
#[derive(Clone, Copy, Debug)]
pub struct Errors {
    pub max_abs: f32,
    pub max_rel: f32,
}

/// One fixture file: its tensors by name and its metadata.
pub struct Fixture {
    /// The path relative to `tests/fixtures/`, e.g. `ops/matmul_2d.safetensors`.
    pub name: String,
    pub file: SafeTensors,
}

impl Fixture {
    /// Loads `tests/fixtures/<relative>` (e.g. `"ops/matmul_2d.safetensors"`).
    pub fn load(relative: &str) -> Fixture {
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", relative].iter().collect();
        let file = safetensors::load(&path)
            .unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", path.display()));
        Fixture { name: relative.to_string(), file }
    }

    /// The shape of the tensor `name` as stored.
    pub fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).shape
    }

    /// The values of the tensor `name`.
    pub fn values(&self, name: &str) -> &[f32] {
        &self.get(name).data
    }

    /// The tensor `name` as a constant leaf (no gradient).
    pub fn tensor(&self, name: &str) -> Tensor {
        let t = self.get(name);
        Tensor::from_vec(t.data.clone(), &t.shape)
    }

    /// The tensor `name` as a leaf that requires a gradient (an input we differentiate).
    pub fn leaf(&self, name: &str) -> Tensor {
        self.tensor(name).requires_grad()
    }

    /// The tensor `name`, float32 holding exact non-negative integers (ids, targets), as
    /// `usize`s. Panics on a value that is not such an integer.
    pub fn ids(&self, name: &str) -> Vec<usize> {
        self.values(name)
            .iter()
            .map(|&v| {
                assert!(v >= 0.0 && v.fract() == 0.0, "{}: '{name}' holds {v}, not an id", self.name);
                v as usize
            })
            .collect()
    }

    /// The metadata entry `key`, parsed (it is stored as a string).
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> T {
        let s = self.file.metadata.get(key).unwrap_or_else(|| panic!("{}: no metadata '{key}'", self.name));
        s.parse().unwrap_or_else(|_| panic!("{}: metadata '{key}' = {s:?} does not parse", self.name))
    }

    /// The metadata entry `key`, a comma-separated list of integers (e.g. `"0,2,1,3"`).
    pub fn meta_list(&self, key: &str) -> Vec<usize> {
        let s: String = self.meta(key);
        s.split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: metadata '{key}' = {s:?} is not a list", self.name))
            })
            .collect()
    }

    /// Compares `got` (with shape `got_shape`) to the fixture's tensor `want` at the default
    /// tolerance.
    pub fn check(&self, want: &str, got_shape: &[usize], got: &[f32]) -> Errors {
        self.check_tol(want, got_shape, got, Tol::DEFAULT)
    }

    /// Compares `got` (with shape `got_shape`) to the fixture's tensor `want` at `tol`.
    ///
    /// The shapes must agree, except that our scalars (shape `[]`) are stored as `[1]`.
    pub fn check_tol(&self, want: &str, got_shape: &[usize], got: &[f32], tol: Tol) -> Errors {
        let w = self.get(want);
        let scalar_as_1 = got_shape.is_empty() && w.shape == [1];
        assert!(
            got_shape == w.shape.as_slice() || scalar_as_1,
            "{} '{want}': shape {got_shape:?}, fixture has {:?}",
            self.name,
            w.shape
        );
        assert_close_tol(&format!("{} '{want}'", self.name), &w.shape, got, &w.data, tol)
    }

    /// Compares a tensor's values and shape to the fixture's tensor `want` (default tolerance).
    pub fn check_tensor(&self, want: &str, got: &Tensor) -> Errors {
        self.check_tol(want, got.shape(), &got.to_vec(), Tol::DEFAULT)
    }

    /// Compares the gradient accumulated in leaf `leaf` to the fixture's tensor `want`.
    pub fn check_grad(&self, want: &str, leaf: &Tensor, tol: Tol) -> Errors {
        let g =
            leaf.grad().unwrap_or_else(|| panic!("{}: no gradient reached the input of '{want}'", self.name));
        self.check_tol(want, leaf.shape(), &g, tol)
    }

    fn get(&self, name: &str) -> &safetensors::TensorData {
        self.file.get(name).unwrap_or_else(|e| panic!("fixture {}: {e}", self.name))
    }
}

/// Panics unless `got` and `want` have the same length and agree within [`Tol::DEFAULT`].
pub fn assert_close(name: &str, got: &[f32], want: &[f32]) -> Errors {
    assert_close_tol(name, &[want.len()], got, want, Tol::DEFAULT)
}

/// Panics unless every `|got[i] − want[i]| <= tol.atol·rms(want) + tol.rtol·|want[i]|`
/// (`rms(want)` taken as 1 if `want` is all zeros), naming the worst
/// element (the one furthest past its tolerance) with its index in `shape`. Prints the
/// errors of a passing comparison (`cargo test -- --nocapture` shows them).
pub fn assert_close_tol(name: &str, shape: &[usize], got: &[f32], want: &[f32], tol: Tol) -> Errors {
    assert_eq!(got.len(), want.len(), "{name}: {} values, expected {}", got.len(), want.len());
    let rms = (want.iter().map(|&w| (w as f64) * (w as f64)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let atol = tol.atol as f64 * if rms > 0.0 { rms } else { 1.0 };
    // The worst element is the one with the largest ratio error / allowed error.
    let mut worst = (0usize, -1.0f64);
    let mut errors = Errors { max_abs: 0.0, max_rel: 0.0 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let allowed = atol + tol.rtol as f64 * (w as f64).abs();
        let ratio = if err.is_nan() { f64::INFINITY } else { err / allowed };
        if ratio > worst.1 {
            worst = (i, ratio);
        }
        errors.max_abs = errors.max_abs.max(err as f32);
        if w.abs() >= 1e-3 {
            errors.max_rel = errors.max_rel.max((err / (w as f64).abs()) as f32);
        }
    }
    if worst.1 > 1.0 {
        let i = worst.0;
        let (g, w) = (got[i], want[i]);
        panic!(
            "{name}: mismatch at index {:?} (flat {i}): got {g:e}, want {w:e}, |diff| {:e} \
             (rel {:e}) > atol {:e} (= {:e} x rms {rms:.3e}) + rtol {:e}·|want| ({:.1}x over); \
             worst |diff| overall {:e}",
            unravel(i, shape),
            (g - w).abs(),
            (g - w).abs() / w.abs(),
            atol,
            tol.atol,
            tol.rtol,
            worst.1,
            errors.max_abs,
        );
    }
    println!(
        "{name}: ok, rms {rms:.2e}, max |diff| {:.2e}, max rel {:.2e}, worst {:.2}x of tolerance",
        errors.max_abs,
        errors.max_rel,
        worst.1.max(0.0)
    );
    errors
}

/// The multi-dimensional index of flat (row-major) position `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = i % n;
        i /= n;
    }
    idx
}
