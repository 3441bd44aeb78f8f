//! The [`Tensor`]: an n-dimensional array of `f32` that remembers how it was made.
//!
//! A tensor is a shared handle (`Arc`) to three things:
//!
//! - its **values**, row-major and contiguous, behind an `Arc<Vec<f32>>` so that a clone, a
//!   reshape, or an op that saves its input for the backward pass shares them instead of
//!   copying;
//! - its **shape**, e.g. `[batch, seq, dim]`;
//! - for a tensor made by an op while gradients are recorded, a `GradFn`:
//!   the op's name, its inputs, and a closure that turns the gradient of the output into the
//!   gradients of the inputs. Following these links backwards from a loss is the whole of
//!   reverse-mode autodiff ([`Tensor::backward`] in [`autograd`]).
//!
//! A *leaf* (a parameter, an input) has no `GradFn`; if it `requires_grad`, `backward` leaves
//! the gradient in it, where the optimizer finds it ([`Tensor::grad`]).
//!
//! ```
//! use lego::Tensor;
//! let w = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).requires_grad();
//! let loss = w.mul(&w).sum_all(); // 1 + 4 + 9
//! loss.backward();
//! assert_eq!(loss.item(), 14.0);
//! assert_eq!(w.grad().unwrap(), vec![2.0, 4.0, 6.0]); // d(w²)/dw = 2w
//! ```

pub mod autograd;
pub mod pool;
pub mod shape;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use autograd::GradFn;
pub use autograd::{is_grad_enabled, no_grad};

/// An n-dimensional `f32` array with reverse-mode autodiff. Cloning is cheap: clones share
/// values, gradient and graph.
///
/// Create one, compute with it, call [`backward`](Tensor::backward) on a scalar result, and
/// read the gradient of each parameter:
///
/// ```
/// use lego::Tensor;
/// // A linear model y = x·Wᵀ on a batch of two inputs, and a squared-error loss.
/// let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]); // [batch, in]
/// let w = Tensor::from_vec(vec![0.5, -1.0], &[1, 2]).requires_grad(); // [out, in]
/// let y = x.matmul_t(&w); // [batch, out] = [[-1.5], [-2.5]]
/// assert_eq!(y.to_vec(), vec![-1.5, -2.5]);
/// let loss = y.sqr().mean_all(); // (2.25 + 6.25) / 2
/// assert_eq!(loss.item(), 4.25);
/// loss.backward();
/// // ∂L/∂W = Σᵢ yᵢ·xᵢ (the 2 of the square cancels the mean's 1/2).
/// assert_eq!(w.grad().unwrap(), vec![-1.5 * 1.0 - 2.5 * 3.0, -1.5 * 2.0 - 2.5 * 4.0]);
/// ```
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

struct Inner {
    /// A number unique to this tensor, used to find it in the backward walk.
    id: usize,
    shape: Vec<usize>,
    /// The values. The lock lets the optimizer update a parameter in place; everything else
    /// only reads, and takes a cheap clone of the `Arc`.
    data: RwLock<Arc<Vec<f32>>>,
    /// For a leaf: whether `backward` should compute its gradient.
    requires_grad: AtomicBool,
    /// For a leaf that requires a gradient: the gradient accumulated by `backward` calls.
    grad: Mutex<Option<Vec<f32>>>,
    /// For a tensor made by an op while recording: how to send its gradient to its inputs.
    grad_fn: Option<GradFn>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A shared empty buffer, put in place of the values of a tensor being dropped.
fn empty_storage() -> Arc<Vec<f32>> {
    static EMPTY: std::sync::OnceLock<Arc<Vec<f32>>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::new(Vec::new())).clone()
}

impl Drop for Inner {
    /// Gives the values (if no one else shares them) and the gradient back to the buffer
    /// [`pool`]. Dropping a long graph recursively (each tensor dropping its inputs) would
    /// overflow the stack after some ten thousand ops, so the graph is unlinked iteratively.
    fn drop(&mut self) {
        if let Ok(data) = self.data.get_mut() {
            let values = std::mem::replace(data, empty_storage());
            if let Ok(v) = Arc::try_unwrap(values) {
                pool::recycle(v);
            }
        }
        if let Some(g) = self.grad.get_mut().ok().and_then(Option::take) {
            pool::recycle(g);
        }
        let Some(grad_fn) = self.grad_fn.take() else {
            return;
        };
        let mut pending = grad_fn.inputs.into_inner().unwrap_or_default();
        drop(grad_fn.backward);
        while let Some(tensor) = pending.pop() {
            if let Ok(mut inner) = Arc::try_unwrap(tensor.inner)
                && let Some(g) = inner.grad_fn.take()
            {
                pending.extend(g.inputs.into_inner().unwrap_or_default());
            }
        }
    }
}

impl Tensor {
    // ----- construction -------------------------------------------------------------------

    fn build(data: Arc<Vec<f32>>, shape: Vec<usize>, grad_fn: Option<GradFn>) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, data.len(), "Tensor: shape {shape:?} holds {n} values but {} were given", data.len());
        Tensor {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                shape,
                data: RwLock::new(data),
                requires_grad: AtomicBool::new(false),
                grad: Mutex::new(None),
                grad_fn,
            }),
        }
    }

    /// A tensor holding `data` in row-major order. Panics if `data.len()` is not the product
    /// of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::build(Arc::new(data), shape.to_vec(), None)
    }

    /// A tensor sharing an existing buffer (no copy).
    pub fn from_arc(data: Arc<Vec<f32>>, shape: &[usize]) -> Tensor {
        Tensor::build(data, shape.to_vec(), None)
    }

    /// A one-element tensor of shape `[]`.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_vec(vec![value], &[])
    }

    /// All zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    /// All ones.
    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// Every element `value`.
    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor::from_vec(vec![value; shape.iter().product()], shape)
    }

    /// Values drawn from a normal distribution `N(mean, std²)` by `rng`.
    pub fn randn(shape: &[usize], mean: f32, std: f32, rng: &mut StdRng) -> Tensor {
        let normal = Normal::new(mean, std).expect("Tensor::randn: std must be finite and >= 0");
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| normal.sample(rng)).collect(), shape)
    }

    /// Values drawn uniformly from `[low, high)` by `rng`.
    pub fn rand_uniform(shape: &[usize], low: f32, high: f32, rng: &mut StdRng) -> Tensor {
        let uniform = Uniform::new(low, high).expect("Tensor::rand_uniform: need low < high");
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| uniform.sample(rng)).collect(), shape)
    }

    /// A normal distribution truncated to `[-2 std, 2 std]` around `mean` (values outside are
    /// drawn again), as `torch.nn.init.trunc_normal_(std=std, a=-2std, b=2std)` does.
    pub fn trunc_normal(shape: &[usize], mean: f32, std: f32, rng: &mut StdRng) -> Tensor {
        let normal = Normal::new(0.0f32, std).expect("Tensor::trunc_normal: bad std");
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                loop {
                    let v: f32 = normal.sample(rng);
                    if v.abs() <= 2.0 * std {
                        break mean + v;
                    }
                }
            })
            .collect();
        Tensor::from_vec(data, shape)
    }

    /// A seeded random number generator, the one every random constructor takes.
    pub fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    /// The result of an op: `data` with `shape`, and, when gradients are being recorded and
    /// some input needs one, the link back to `inputs` through `backward`.
    ///
    /// `backward(grad_out)` returns one entry per input: the gradient with respect to that
    /// input (same length as the input), or `None` where the input needs none. An op that
    /// knows at this point that an input needs no gradient (a frozen weight, a constant:
    /// `requires_grad_flag()` is false) skips computing it, as PyTorch's `needs_input_grad`
    /// does; a leaf unfrozen after the graph was built therefore gets nothing from it.
    pub(crate) fn from_op<F>(
        data: Vec<f32>,
        shape: &[usize],
        op: &'static str,
        inputs: &[&Tensor],
        backward: F,
    ) -> Tensor
    where
        F: Fn(&[f32]) -> Vec<Option<Vec<f32>>> + Send + Sync + 'static,
    {
        Tensor::from_op_shared(Arc::new(data), shape, op, inputs, backward)
    }

    /// Like [`from_op`](Tensor::from_op) for an op whose output shares its input's buffer
    /// (a reshape): no values are copied.
    pub(crate) fn from_op_shared<F>(
        data: Arc<Vec<f32>>,
        shape: &[usize],
        op: &'static str,
        inputs: &[&Tensor],
        backward: F,
    ) -> Tensor
    where
        F: Fn(&[f32]) -> Vec<Option<Vec<f32>>> + Send + Sync + 'static,
    {
        let record = is_grad_enabled() && inputs.iter().any(|t| t.requires_grad_flag());
        let grad_fn = record.then(|| GradFn {
            op,
            inputs: Mutex::new(inputs.iter().map(|t| (*t).clone()).collect()),
            backward: Mutex::new(Some(Box::new(backward))),
        });
        Tensor::build(data, shape.to_vec(), grad_fn)
    }

    // ----- shape and values ---------------------------------------------------------------

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.inner.shape.len()
    }

    /// The size of dimension `d`.
    pub fn dim(&self, d: usize) -> usize {
        self.inner.shape[d]
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.inner.shape.iter().product()
    }

    /// A shared handle to the values (no copy).
    pub fn data(&self) -> Arc<Vec<f32>> {
        self.inner.data.read().expect("tensor lock poisoned").clone()
    }

    /// The values, copied into a new `Vec`.
    pub fn to_vec(&self) -> Vec<f32> {
        self.data().as_ref().clone()
    }

    /// The value of a one-element tensor. Panics otherwise.
    pub fn item(&self) -> f32 {
        assert_eq!(self.numel(), 1, "item: tensor of shape {:?} is not a single value", self.shape());
        self.data()[0]
    }

    /// Replaces the values (same length), e.g. when loading a checkpoint. The graph is not
    /// told: use it on leaves only.
    pub fn set_data(&self, values: Vec<f32>) {
        assert_eq!(
            values.len(),
            self.numel(),
            "set_data: tensor of shape {:?} cannot take {} values",
            self.shape(),
            values.len()
        );
        *self.inner.data.write().expect("tensor lock poisoned") = Arc::new(values);
    }

    /// Changes the values in place through `f` (the optimizer's update). If another tensor
    /// still shares the buffer (a graph not yet dropped), the buffer is copied first, so that
    /// tensor keeps the old values (copy-on-write).
    pub fn update_data<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let mut guard = self.inner.data.write().expect("tensor lock poisoned");
        f(Arc::make_mut(&mut guard).as_mut_slice())
    }

    /// A unique number for this tensor (not its values): two clones share it.
    pub fn id(&self) -> usize {
        self.inner.id
    }

    // ----- gradients ----------------------------------------------------------------------

    /// Marks this leaf as a parameter whose gradient `backward` should compute, and returns it.
    pub fn requires_grad(self) -> Tensor {
        self.set_requires_grad(true);
        self
    }

    /// Turns gradient computation for this leaf on or off (freezing a layer turns it off).
    /// Panics on a tensor made by an op: only leaves can be frozen.
    pub fn set_requires_grad(&self, on: bool) {
        assert!(
            self.inner.grad_fn.is_none(),
            "set_requires_grad: only a leaf tensor can be marked; this one was made by `{}`",
            self.op_name()
        );
        self.inner.requires_grad.store(on, Ordering::Relaxed);
    }

    /// Whether a gradient flows into this tensor: a leaf marked `requires_grad`, or the output
    /// of an op recorded in a graph.
    pub fn requires_grad_flag(&self) -> bool {
        self.inner.grad_fn.is_some() || self.inner.requires_grad.load(Ordering::Relaxed)
    }

    /// Whether this tensor was made by a recorded op (is not a leaf).
    pub fn is_leaf(&self) -> bool {
        self.inner.grad_fn.is_none()
    }

    /// The name of the op that made this tensor, or `"leaf"`.
    pub fn op_name(&self) -> &'static str {
        self.inner.grad_fn.as_ref().map_or("leaf", |g| g.op)
    }

    /// The gradient accumulated in this leaf by `backward`, if any.
    pub fn grad(&self) -> Option<Vec<f32>> {
        self.inner.grad.lock().expect("grad lock poisoned").clone()
    }

    /// Runs `f` on the accumulated gradient without copying it (`None` if there is none).
    pub fn with_grad<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> R {
        let guard = self.inner.grad.lock().expect("grad lock poisoned");
        f(guard.as_deref())
    }

    /// Runs `f` on the accumulated gradient, mutably (gradient clipping scales it in place).
    pub fn with_grad_mut<R>(&self, f: impl FnOnce(Option<&mut [f32]>) -> R) -> R {
        let mut guard = self.inner.grad.lock().expect("grad lock poisoned");
        f(guard.as_deref_mut())
    }

    /// Forgets the accumulated gradient (before the next step's `backward`).
    pub fn zero_grad(&self) {
        if let Some(g) = self.inner.grad.lock().expect("grad lock poisoned").take() {
            pool::recycle(g);
        }
    }

    /// Adds `g` into the accumulated gradient (backward calls accumulate, as in PyTorch).
    pub(crate) fn accumulate_grad(&self, g: Vec<f32>) {
        let mut guard = self.inner.grad.lock().expect("grad lock poisoned");
        match guard.as_mut() {
            Some(acc) => {
                acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                pool::recycle(g);
            }
            None => *guard = Some(g),
        }
    }

    /// A copy of the values as a new leaf with no graph and no gradient (`torch.detach`,
    /// except that the values are shared, not aliased for writing).
    pub fn detach(&self) -> Tensor {
        Tensor::build(self.data(), self.shape().to_vec(), None)
    }

    /// A deep copy: new buffer, new leaf, same `requires_grad` flag.
    pub fn deep_clone(&self) -> Tensor {
        let t = Tensor::from_vec(self.to_vec(), self.shape());
        if !self.is_leaf() || self.inner.requires_grad.load(Ordering::Relaxed) {
            t.set_requires_grad(true);
        }
        t
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let data = self.data();
        let shown: Vec<f32> = data.iter().take(8).copied().collect();
        write!(
            f,
            "Tensor(shape={:?}, op={}, data={:?}{})",
            self.shape(),
            self.op_name(),
            shown,
            if data.len() > 8 { "…" } else { "" }
        )
    }
}
