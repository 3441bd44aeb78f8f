//! Tensor basics: train a small neural network with nothing but `Tensor`, autodiff and AdamW.
//!
//! Run it with `cargo run --release --example tensor_basics` (a few seconds).
//!
//! The problem is the classic *two spirals*: points in the plane on two interleaved spiral
//! arms, one arm class 0 and the other class 1. No straight line separates them, so a linear
//! model fails; a small multi-layer perceptron (MLP) learns to. The network is
//!
//! ```text
//! x [N, 2] ─ Linear(2→32) ─ tanh ─ Linear(32→32) ─ tanh ─ Linear(32→2) ─ logits [N, 2]
//! ```
//!
//! and the loss is the cross-entropy of the logits against the true class. Every step:
//!
//! 1. **forward**: compute the loss from the parameters; each op also records how to send a
//!    gradient back to its inputs (the *graph*);
//! 2. **backward**: `loss.backward()` walks that graph from the loss back to the parameters
//!    and leaves `∂loss/∂parameter` in each of them;
//! 3. **step**: the optimizer moves each parameter a little against its gradient;
//! 4. **zero_grad**: gradients *accumulate* across `backward` calls (as in PyTorch), so they
//!    are cleared before the next step.
//!
//! Nothing here is specific to transformers: the same four lines train the big model.

use lego::optim::{AdamW, AdamWConfig, CosineSchedule};
use lego::{Tensor, no_grad};
use rand::Rng;
use rand::rngs::StdRng;

/// Points on each arm in the training set (the test set has as many, drawn separately).
const POINTS_PER_ARM: usize = 200;
/// How many times each spiral arm winds around the centre (more turns, harder problem).
const TURNS: f32 = 2.5;
/// Width of the two hidden layers.
const HIDDEN: usize = 32;
/// Optimisation steps (each one sees the whole training set: "full-batch" training).
const STEPS: u64 = 1000;
/// Print the loss every this many steps.
const LOG_EVERY: u64 = 100;

/// `n` points per arm of the two spirals, with a little noise: the inputs `[2n, 2]` and the
/// class of each point (0 or 1).
///
/// Arm 0 at angle θ sits at radius r = θ/(2π·TURNS), arm 1 is arm 0 rotated by half a turn.
/// Inputs stay within about [-1, 1], a scale that suits `tanh`.
fn two_spirals(n: usize, rng: &mut StdRng) -> (Tensor, Vec<usize>) {
    let mut xy = Vec::with_capacity(2 * n * 2);
    let mut class = Vec::with_capacity(2 * n);
    for arm in 0..2 {
        for _ in 0..n {
            // Uniform in √ along the arm, so the outer turns are not sparser than the inner.
            let t: f32 = rng.random::<f32>().sqrt();
            let theta = 0.25 * std::f32::consts::PI + t * TURNS * 2.0 * std::f32::consts::PI;
            let r = theta / (TURNS * 2.0 * std::f32::consts::PI);
            let sign = if arm == 0 { 1.0 } else { -1.0 }; // half a turn: (x, y) → (−x, −y)
            let mut noise = || 0.04 * (rng.random::<f32>() - 0.5);
            xy.push(sign * r * theta.cos() + noise());
            xy.push(sign * r * theta.sin() + noise());
            class.push(arm);
        }
    }
    (Tensor::from_vec(xy, &[2 * n, 2]), class)
}

/// A fully connected layer `y = x·Wᵀ + b`, its parameters as two leaf tensors.
///
/// A **leaf** is a tensor that no op made: it was built from plain numbers. Calling
/// `.requires_grad()` on it marks it as a *parameter*: `backward` computes the gradient of
/// the loss with respect to it and stores it there (`w.grad()`), where the optimizer finds it.
struct Linear {
    /// `[out, in]`: one row per output, PyTorch's layout (so the product is `x·Wᵀ`).
    w: Tensor,
    /// `[out]`, added to every row.
    b: Tensor,
}

impl Linear {
    /// Weights drawn from N(0, 1/in), so the output has about the variance of the input
    /// (Xavier/LeCun initialisation); biases start at zero.
    fn new(inputs: usize, outputs: usize, rng: &mut StdRng) -> Linear {
        let std = 1.0 / (inputs as f32).sqrt();
        Linear {
            w: Tensor::randn(&[outputs, inputs], 0.0, std, rng).requires_grad(),
            b: Tensor::zeros(&[outputs]).requires_grad(),
        }
    }

    /// `x [N, in] → [N, out]`. Both ops record themselves in the graph (when some input
    /// requires a gradient and we are not inside `no_grad`).
    fn forward(&self, x: &Tensor) -> Tensor {
        // [N, in]·[out, in]ᵀ = [N, out], then + b broadcast over the N rows.
        x.matmul_t(&self.w).add(&self.b)
    }
}

/// The MLP: three linear layers with `tanh` between them.
struct Mlp {
    layers: [Linear; 3],
}

impl Mlp {
    fn new(rng: &mut StdRng) -> Mlp {
        Mlp {
            layers: [
                Linear::new(2, HIDDEN, rng),
                Linear::new(HIDDEN, HIDDEN, rng),
                Linear::new(HIDDEN, 2, rng),
            ],
        }
    }

    /// `x [N, 2] → logits [N, 2]` (one score per class; the larger wins).
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layers[0].forward(x).tanh(); // [N, 32]
        let h = self.layers[1].forward(&h).tanh(); // [N, 32]
        self.layers[2].forward(&h) // [N, 2]
    }

    /// Every parameter, for the optimizer. Cloning a `Tensor` is cheap and shares the
    /// values and the gradient: the optimizer updates the very tensors the model uses.
    fn parameters(&self) -> Vec<Tensor> {
        self.layers.iter().flat_map(|l| [l.w.clone(), l.b.clone()]).collect()
    }
}

/// The fraction of points whose larger logit is their class.
fn accuracy(logits: &Tensor, class: &[usize]) -> f32 {
    let predicted = logits.argmax_last();
    let right = predicted.iter().zip(class).filter(|(p, c)| p == c).count();
    right as f32 / class.len() as f32
}

fn main() {
    // One seed makes the whole run reproducible: data, initial weights, everything.
    let mut rng = Tensor::rng(42);
    let (x_train, y_train) = two_spirals(POINTS_PER_ARM, &mut rng);
    let (x_test, y_test) = two_spirals(POINTS_PER_ARM, &mut rng);
    println!(
        "two spirals: {} training points, {} test points, inputs {:?}",
        y_train.len(),
        y_test.len(),
        x_train.shape()
    );

    let model = Mlp::new(&mut rng);
    let params = model.parameters();
    let count: usize = params.iter().map(Tensor::numel).sum();
    println!("MLP 2 → {HIDDEN} → {HIDDEN} → 2 (tanh), {count} parameters\n");

    // AdamW keeps, for each parameter, running averages of its gradient and of the gradient's
    // square, and scales each step by them. Its learning rate follows a schedule: a short
    // linear warm-up (large first steps from random weights can be erratic), then a cosine
    // decay, so the last steps are small and settle into a minimum.
    let schedule = CosineSchedule { max_lr: 0.02, min_lr: 0.0005, warmup: 50, total: STEPS };
    let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 1e-4, ..Default::default() });

    let mut first_loss = None;
    let mut last_loss = f32::NAN;
    for step in 0..STEPS {
        // Forward. `logits` and `loss` are not leaves: each remembers the op that made it and
        // its inputs, back to the parameters. That chain is the graph `backward` will walk.
        let logits = model.forward(&x_train); // [400, 2]
        let loss = logits.cross_entropy(&y_train, None); // [] (a scalar): mean over points

        // Clear the gradients left by the previous step, then fill them afresh: `backward`
        // computes ∂loss/∂p for every parameter p by the chain rule, walking the graph from
        // the loss to the leaves, and *adds* it into p's gradient.
        opt.zero_grad();
        loss.backward();

        // The update: every parameter moves against its gradient, scaled by AdamW.
        opt.config.lr = schedule.lr(step);
        opt.step();

        last_loss = loss.item();
        first_loss.get_or_insert(last_loss);
        if step % LOG_EVERY == 0 || step + 1 == STEPS {
            println!(
                "step {step:>5}  lr {:.4}  loss {last_loss:.4}  train acc {:>5.1}%",
                opt.config.lr,
                100.0 * accuracy(&logits, &y_train)
            );
        }
        // `logits` and `loss` are dropped here, and the graph with them: nothing global holds
        // on to it.
    }

    // Evaluation. Inside `no_grad` no op records anything: no graph is built (less memory,
    // less time), and the result cannot be differentiated. Use it whenever you only want
    // the numbers, here on points the model never trained on.
    let test_logits = no_grad(|| model.forward(&x_test));
    let test_loss = no_grad(|| test_logits.cross_entropy(&y_test, None)).item();
    let test_acc = accuracy(&test_logits, &y_test);
    let first_loss = first_loss.expect("trained for at least one step");
    println!(
        "\nloss {first_loss:.4} → {last_loss:.4}; test loss {test_loss:.4}, test accuracy {:.1}%",
        100.0 * test_acc
    );

    // Fail loudly if training broke (a wrong gradient shows up here first).
    assert!(
        last_loss < first_loss / 5.0,
        "the training loss did not fall enough: {first_loss} → {last_loss}"
    );
    assert!(test_acc > 0.9, "test accuracy {test_acc} is too low: the model did not learn the spirals");
}
