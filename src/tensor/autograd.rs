//! Reverse-mode automatic differentiation: the walk from a loss back to its parameters.
//!
//! Every op that runs while gradients are recorded leaves a `GradFn` in its output: the
//! op's inputs and a closure that maps the gradient of the output, `∂L/∂out`, to the gradient
//! of each input, `∂L/∂in = (∂out/∂in)ᵀ · ∂L/∂out` (a vector-Jacobian product; each op's
//! file derives its own). The graph is made of these links and lives exactly as long as the
//! tensors do: there is no global tape to leak.
//!
//! [`Tensor::backward`] then does three things:
//!
//! 1. orders the graph so that every tensor comes after all the tensors it was made from
//!    (a depth-first topological sort from the loss);
//! 2. seeds `∂L/∂L = 1` and walks that order in reverse, so that when a tensor is reached,
//!    every consumer has already added its share to the tensor's gradient;
//! 3. leaves each leaf's gradient in the leaf (adding to what is there: gradients accumulate
//!    until [`Tensor::zero_grad`]).
//!
//! Gradients of intermediate tensors are dropped as soon as they have been passed on, so the
//! walk holds at most the gradients of one "frontier" of the graph at a time.
//!
//! **No-grad mode.** Inside [`no_grad`], ops record nothing: no closure, no saved inputs, no
//! graph. Decoding and evaluation run there and pay nothing for autodiff.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;

use super::Tensor;

/// The closure that maps `∂L/∂out` to `[∂L/∂input_i]` (`None` where an input needs none).
pub(crate) type BackwardFn = Box<dyn Fn(&[f32]) -> Vec<Option<Vec<f32>>> + Send + Sync>;

/// The backward link of a tensor made by an op.
///
/// `backward` walks each link once and then **frees** it (the closure with the buffers it
/// saved, and the links to the inputs), as PyTorch does by default: the activations go back to
/// the buffer pool at once, and the parameters' values are no longer shared with a saved
/// closure, so the optimizer updates them in place instead of copying them.
pub(crate) struct GradFn {
    /// The op's name, for error messages and debugging.
    pub op: &'static str,
    /// The tensors the op read, in the order `backward` returns their gradients (emptied once
    /// `backward` has passed through).
    pub inputs: Mutex<Vec<Tensor>>,
    /// The gradient closure (`None` once `backward` has used it).
    pub backward: Mutex<Option<BackwardFn>>,
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread currently record a graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` with gradient recording off on this thread (and restores the previous mode after,
/// even if `f` panics). Nothing `f` computes carries a graph.
///
/// ```
/// use lego::{Tensor, no_grad};
/// let w = Tensor::ones(&[2]).requires_grad();
/// let y = no_grad(|| w.mul_scalar(3.0));
/// assert!(!y.requires_grad_flag());
/// ```
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

impl Tensor {
    /// Computes the gradient of this scalar with respect to every leaf that requires one, and
    /// adds it to that leaf's [`grad`](Tensor::grad).
    ///
    /// Panics if the tensor is not a single value, or if no gradient can flow from it (it was
    /// computed from no parameter, or under [`no_grad`]).
    ///
    /// ```
    /// use lego::Tensor;
    /// // L = Σ (w·x)² for a parameter w and a constant x: ∂L/∂w = 2·(w·x)·x.
    /// let w = Tensor::from_vec(vec![1.0, -2.0], &[2]).requires_grad();
    /// let x = Tensor::from_vec(vec![3.0, 0.5], &[2]);
    /// let loss = w.mul(&x).sqr().sum_all();
    /// loss.backward();
    /// assert_eq!(w.grad().unwrap(), vec![18.0, -1.0]);
    /// assert!(x.grad().is_none()); // a constant gets no gradient
    /// ```
    pub fn backward(&self) {
        assert_eq!(
            self.numel(),
            1,
            "backward: the loss must be a single value, got a tensor of shape {:?}",
            self.shape()
        );
        assert!(
            self.requires_grad_flag(),
            "backward: this tensor (op `{}`, shape {:?}) has no graph: it was computed from no \
             tensor that requires a gradient, or under no_grad",
            self.op_name(),
            self.shape()
        );
        self.backward_with(vec![1.0]);
    }

    /// Backpropagates an explicit upstream gradient `grad_out` (same number of elements as
    /// this tensor): afterwards every leaf holds `∂(Σ self·grad_out)/∂leaf`.
    ///
    /// [`backward`](Tensor::backward) is this with `grad_out = [1]`; the finite-difference
    /// tests use it to check an op with a non-scalar output.
    pub fn backward_with(&self, grad_out: Vec<f32>) {
        assert_eq!(
            grad_out.len(),
            self.numel(),
            "backward_with: tensor of shape {:?} got a gradient of {} values",
            self.shape(),
            grad_out.len()
        );
        // The gradient reaching each tensor not yet processed, by tensor id: consumers add into
        // it, and it is removed (and passed on) when the walk reaches that tensor.
        let order = topological_order(self);
        let mut grads: HashMap<usize, Vec<f32>> = HashMap::new();
        grads.insert(self.id(), grad_out);
        for tensor in order.iter().rev() {
            let Some(grad) = grads.remove(&tensor.id()) else {
                continue; // nothing flowed here (e.g. every path to the loss was cut)
            };
            match &tensor.inner.grad_fn {
                // A leaf: the gradient is complete (every consumer came earlier in the reverse
                // order), so it is handed to the leaf for the optimizer.
                None => tensor.accumulate_grad(grad),
                // Made by an op: take its closure (it runs once), map the gradient through it,
                // and pass each input its share.
                Some(grad_fn) => {
                    let closure = grad_fn.backward.lock().expect("graph lock poisoned").take();
                    let closure = closure.unwrap_or_else(|| {
                        panic!(
                            "backward: the graph through `{}` was already used by an earlier \
                             backward() and freed; build it again (run the forward again)",
                            grad_fn.op
                        )
                    });
                    let inputs = std::mem::take(&mut *grad_fn.inputs.lock().expect("graph lock poisoned"));
                    let input_grads = closure(&grad);
                    drop(closure); // the buffers the op saved for its backward are free now
                    assert_eq!(
                        input_grads.len(),
                        inputs.len(),
                        "backward of `{}`: returned {} gradients for {} inputs",
                        grad_fn.op,
                        input_grads.len(),
                        inputs.len()
                    );
                    for (input, g) in inputs.iter().zip(input_grads) {
                        // `None`: the op skipped an input that needed no gradient.
                        let Some(g) = g else { continue };
                        if !input.requires_grad_flag() {
                            continue;
                        }
                        assert_eq!(
                            g.len(),
                            input.numel(),
                            "backward of `{}`: gradient of {} values for an input of shape {:?}",
                            grad_fn.op,
                            g.len(),
                            input.shape()
                        );
                        // A tensor used by several ops sums their contributions (the chain
                        // rule over every path).
                        match grads.get_mut(&input.id()) {
                            Some(acc) => {
                                acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
                                super::pool::recycle(g);
                            }
                            None => {
                                grads.insert(input.id(), g);
                            }
                        }
                    }
                    // This tensor's gradient has been passed on: its buffer can serve again.
                    super::pool::recycle(grad);
                }
            }
        }
    }
}

/// Every tensor that a gradient can flow into from `root`, each after all its inputs.
///
/// An iterative depth-first search (a deep model's graph would overflow a recursive one): a
/// tensor is appended once all its inputs have been, i.e. in post-order.
fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited = std::collections::HashSet::new();
    // (tensor, whether its inputs have already been pushed)
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !visited.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(grad_fn) = &t.inner.grad_fn {
            for input in grad_fn.inputs.lock().expect("graph lock poisoned").iter() {
                if input.requires_grad_flag() && !visited.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

#[cfg(test)]
impl Tensor {
    /// What this tensor's op returns for each input, given `grad_out`, without walking the
    /// graph or freeing it (for tests of a single op's backward).
    pub(crate) fn op_input_grads(&self, grad_out: &[f32]) -> Vec<Option<Vec<f32>>> {
        let grad_fn = self.inner.grad_fn.as_ref().expect("op_input_grads: a leaf has no backward");
        let closure = grad_fn.backward.lock().expect("graph lock poisoned");
        closure.as_ref().expect("op_input_grads: the backward was already used")(grad_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_accumulate_across_backward_calls_until_zeroed() {
        let w = Tensor::from_vec(vec![1.0, -2.0], &[2]).requires_grad();
        w.mul_scalar(3.0).sum_all().backward();
        w.mul_scalar(3.0).sum_all().backward();
        assert_eq!(w.grad().unwrap(), vec![6.0, 6.0]);
        w.zero_grad();
        assert!(w.grad().is_none());
    }

    #[test]
    fn a_tensor_used_twice_gets_both_contributions() {
        // y = w*w + w  =>  dy/dw = 2w + 1
        let w = Tensor::from_vec(vec![3.0], &[1]).requires_grad();
        w.mul(&w).add(&w).sum_all().backward();
        assert_eq!(w.grad().unwrap(), vec![7.0]);
    }

    #[test]
    fn no_grad_records_nothing_and_restores_the_mode() {
        let w = Tensor::ones(&[3]).requires_grad();
        let y = no_grad(|| w.mul_scalar(2.0).sum_all());
        assert!(y.is_leaf() && !y.requires_grad_flag());
        assert!(is_grad_enabled());
        assert!(w.mul_scalar(2.0).requires_grad_flag());
    }

    #[test]
    fn frozen_leaves_get_no_gradient() {
        let a = Tensor::ones(&[2]).requires_grad();
        let b = Tensor::ones(&[2]).requires_grad();
        b.set_requires_grad(false);
        a.mul(&b).sum_all().backward();
        assert!(a.grad().is_some());
        assert!(b.grad().is_none());
    }

    #[test]
    #[should_panic(expected = "backward: the loss must be a single value")]
    fn backward_of_a_non_scalar_panics_with_the_shape() {
        Tensor::ones(&[2, 3]).requires_grad().mul_scalar(2.0).backward();
    }

    #[test]
    #[should_panic(expected = "has no graph")]
    fn backward_without_a_graph_panics() {
        Tensor::ones(&[1]).sum_all().backward();
    }

    #[test]
    #[should_panic(expected = "was already used by an earlier backward() and freed")]
    fn a_graph_is_freed_by_its_backward() {
        let w = Tensor::ones(&[2]).requires_grad();
        let loss = w.mul_scalar(2.0).sum_all();
        loss.backward();
        loss.backward();
    }

    #[test]
    fn after_backward_the_optimizer_updates_parameters_in_place() {
        // The graph saved w's values for the backward of `mul`; once backward has freed it,
        // an update must not need a copy (copy-on-write) even while `loss` is alive.
        let w = Tensor::ones(&[3]).requires_grad();
        let loss = w.mul(&w).sum_all();
        loss.backward();
        let before = w.data().as_ptr();
        w.update_data(|v| v[0] = 5.0);
        assert_eq!(w.data().as_ptr(), before);
        assert_eq!(loss.item(), 3.0);
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let w = Tensor::ones(&[1]).requires_grad();
        let mut y = w.clone();
        for _ in 0..100_000 {
            y = y.add_scalar(1.0);
        }
        y.sum_all().backward();
        assert_eq!(w.grad().unwrap(), vec![1.0]);
    }
}
