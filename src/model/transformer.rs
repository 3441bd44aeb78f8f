//! [`LegoTransformer`]: the parameters of the model and its training-path methods.
//!
//! ```text
//! tokens ─ tok_embeddings ─► h ─ layers 0..exit_layer ─► h_exit ─┬─ exit head (norm, output) ─► shallow logits, confidence
//!                                 (lower, always run)            │
//!                                                                └─ layers exit_layer..N ─ norm ─ output ─► deep logits
//!                                                                     (upper, skipped by confident tokens)
//! ```
//!
//! **The exit head.** A confident token leaves with the logits of the *exit head* applied to its
//! hidden state after the lower layers. In a shallow model (`exit_layer == num_layers`, phase 1)
//! the exit head is the model's own final norm and output layer. [`LegoTransformer::extend`]
//! gives the deeper model a **frozen copy** of them as its exit head, while the deep path keeps a
//! trainable final norm and output. So phase 2 can train the deep path freely and the
//! confidence at the exit (on which the routing threshold was calibrated) cannot move: this is
//! how we avoid the prototype's weakness 3, where the shared, still-trainable head moved the
//! confidences and 50 % "hard" became 30 %.
//!
//! **Initialisation** (the prototype's): every linear weight, the output layer included, from a
//! normal distribution with standard deviation `1/√dim` truncated at ±2 std; the embedding from
//! one with std 0.02 (also truncated at ±2 std); RMSNorm scales 1.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::StdRng;

use super::config::{LegoConfig, check_threshold};
use super::exit_gate::ExitGate;
use crate::error::{Error, Result};
use crate::nn::{Block, Linear, RmsNorm};
use crate::tensor::Tensor;

/// A norm and an output projection: what turns a hidden state into logits.
#[derive(Clone, Debug)]
pub struct ExitHead {
    /// The final RMSNorm.
    pub norm: RmsNorm,
    /// The projection to the vocabulary, `[V, D]`.
    pub output: Linear,
}

impl ExitHead {
    /// Logits for hidden states `h` (`[..., D]` → `[..., V]`).
    pub fn forward(&self, h: &Tensor) -> Tensor {
        self.output.forward(&self.norm.forward(h))
    }

    /// A copy with its own weight buffers (the same frozen state).
    pub fn deep_clone(&self) -> ExitHead {
        let mut e = self.clone();
        e.norm.weight = e.norm.weight.deep_clone();
        e.output.weight = e.output.weight.deep_clone();
        e
    }

    /// Freezes (`true`) or unfreezes both weights.
    pub fn set_frozen(&self, frozen: bool) {
        self.norm.weight.set_requires_grad(!frozen);
        self.output.weight.set_requires_grad(!frozen);
    }
}

/// How [`LegoTransformer::extend`] initialises the new upper layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtendInit {
    /// Fresh random weights, as the spec does.
    Random,
    /// Copies of the top lower layers, in order: growing L layers by k copies layers
    /// `L−k .. L` (cycling through them again if k > L). "Stacking" starts the new layers from
    /// weights that already compute something useful, instead of noise.
    Stack,
    /// Random weights, except each new block's two output projections (attention `wo`, MLP
    /// `w2`), which start at zero. A pre-norm block adds `attention(·)·woᵀ` and `mlp(·)·w2ᵀ` to
    /// the residual stream, so with both zero it adds exactly nothing: the extended model's deep
    /// logits equal phase 1's, bit for bit, and phase 2 starts where phase 1 ended instead of
    /// from a model made worse by random layers. (The gradients still flow: `∂L/∂wo =
    /// dOutᵀ·att` is not zero, and once `wo` moves, so do the block's other weights.)
    Identity,
}

impl std::str::FromStr for ExtendInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<ExtendInit> {
        match s {
            "random" => Ok(ExtendInit::Random),
            "stack" => Ok(ExtendInit::Stack),
            "identity" => Ok(ExtendInit::Identity),
            _ => Err(Error::Input(format!("extend init must be 'random', 'stack' or 'identity', got '{s}'"))),
        }
    }
}

/// The LEGO early-exit transformer.
#[derive(Debug)]
pub struct LegoTransformer {
    /// Sizes and constants.
    pub config: LegoConfig,
    /// Token embedding table `[V, D]`.
    pub tok_embeddings: Tensor,
    /// The layers; `0..exit_layer` are the lower part, the rest the upper part.
    pub layers: Vec<Block>,
    /// The deep path's final norm and output layer.
    pub head: ExitHead,
    /// A separate, frozen head for the exit confidence, once the model has been extended
    /// (`None`: the exit uses [`head`](LegoTransformer::head), as in a shallow model).
    pub exit_head: Option<ExitHead>,
    /// The learned exit gate, if one was trained ([`ExitGate`]: `2D + 1` frozen weights read by
    /// [`ExitMeasure::Gate`](super::ExitMeasure::Gate)). `None` until
    /// [`train_exit_gate`](crate::train::train_exit_gate) gives it one.
    pub exit_gate: Option<ExitGate>,
    /// How many times each layer has run (both paths), so tests and benches can check which
    /// layers really ran.
    layer_calls: Vec<AtomicUsize>,
    /// Tokens the decoder turned into logits through the separate exit head / through
    /// [`head`](LegoTransformer::head) (see [`head_rows`](LegoTransformer::head_rows)).
    exit_head_rows: AtomicUsize,
    deep_head_rows: AtomicUsize,
}

impl Clone for LegoTransformer {
    /// A shallow clone: the parameters are shared (see [`LegoTransformer::deep_clone`]).
    fn clone(&self) -> Self {
        LegoTransformer {
            config: self.config.clone(),
            tok_embeddings: self.tok_embeddings.clone(),
            layers: self.layers.clone(),
            head: self.head.clone(),
            exit_head: self.exit_head.clone(),
            exit_gate: self.exit_gate.clone(),
            layer_calls: (0..self.layers.len()).map(|_| AtomicUsize::new(0)).collect(),
            exit_head_rows: AtomicUsize::new(0),
            deep_head_rows: AtomicUsize::new(0),
        }
    }
}

impl LegoTransformer {
    /// A freshly initialised model (see the module doc) from a seeded `rng`.
    pub fn new(config: LegoConfig, rng: &mut StdRng) -> Result<LegoTransformer> {
        config.validate()?;
        let c = &config;
        let std = 1.0 / (c.dim as f32).sqrt();
        let tok_embeddings = Tensor::trunc_normal(&[c.vocab_size, c.dim], 0.0, 0.02, rng).requires_grad();
        let layers = (0..c.num_layers).map(|_| Block::new(c, rng)).collect();
        let head = ExitHead {
            norm: RmsNorm::new(c.dim, c.norm_eps),
            output: Linear::new(c.dim, c.vocab_size, std, rng),
        };
        Ok(LegoTransformer::from_parts(config, tok_embeddings, layers, head, None))
    }

    /// Assembles a model from its parts (used by `new`, `extend` and checkpoint loading), with
    /// no exit gate.
    pub fn from_parts(
        config: LegoConfig,
        tok_embeddings: Tensor,
        layers: Vec<Block>,
        head: ExitHead,
        exit_head: Option<ExitHead>,
    ) -> LegoTransformer {
        let n = layers.len();
        LegoTransformer {
            config,
            tok_embeddings,
            layers,
            head,
            exit_head,
            exit_gate: None,
            layer_calls: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            exit_head_rows: AtomicUsize::new(0),
            deep_head_rows: AtomicUsize::new(0),
        }
    }

    /// A copy with its own parameter buffers.
    pub fn deep_clone(&self) -> LegoTransformer {
        let mut copy = LegoTransformer::from_parts(
            self.config.clone(),
            self.tok_embeddings.deep_clone(),
            self.layers.iter().map(Block::deep_clone).collect(),
            self.head.deep_clone(),
            self.exit_head.as_ref().map(ExitHead::deep_clone),
        );
        copy.exit_gate = self.exit_gate.as_ref().map(ExitGate::deep_clone);
        copy
    }

    /// The head that computes the exit confidence and the shallow logits.
    pub fn exit(&self) -> &ExitHead {
        self.exit_head.as_ref().unwrap_or(&self.head)
    }

    /// Every parameter with its checkpoint name (Llama conventions; the separate exit head,
    /// if any, as `exit_norm.weight` and `exit_output.weight`; the exit gate, if any, as
    /// `exit_gate.weight`, `exit_gate.square_weight` and `exit_gate.bias`).
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("tok_embeddings.weight".to_string(), self.tok_embeddings.clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(layer.named_params(&format!("layers.{i}")));
        }
        out.push(("norm.weight".into(), self.head.norm.weight.clone()));
        out.push(("output.weight".into(), self.head.output.weight.clone()));
        if let Some(e) = &self.exit_head {
            out.push(("exit_norm.weight".into(), e.norm.weight.clone()));
            out.push(("exit_output.weight".into(), e.output.weight.clone()));
        }
        if let Some(g) = &self.exit_gate {
            out.push(("exit_gate.weight".into(), g.weight.clone()));
            out.push(("exit_gate.square_weight".into(), g.square_weight.clone()));
            out.push(("exit_gate.bias".into(), g.bias.clone()));
        }
        out
    }

    /// Every parameter (for an optimizer: frozen ones are skipped by it).
    pub fn params(&self) -> Vec<Tensor> {
        self.named_params().into_iter().map(|(_, t)| t).collect()
    }

    /// The parameters that currently require a gradient.
    pub fn trainable_params(&self) -> Vec<Tensor> {
        self.params().into_iter().filter(|t| t.requires_grad_flag()).collect()
    }

    /// The number of parameters (elements).
    pub fn num_params(&self) -> usize {
        self.params().iter().map(Tensor::numel).sum()
    }

    /// How many times layer `i` has run since the model was made (or the counters reset).
    pub fn layer_calls(&self, i: usize) -> usize {
        self.layer_calls[i].load(Ordering::Relaxed)
    }

    /// Sets every layer's call counter, and both head counters
    /// ([`head_rows`](LegoTransformer::head_rows)), back to 0.
    pub fn reset_layer_calls(&self) {
        self.layer_calls.iter().for_each(|c| c.store(0, Ordering::Relaxed));
        self.exit_head_rows.store(0, Ordering::Relaxed);
        self.deep_head_rows.store(0, Ordering::Relaxed);
    }

    pub(crate) fn count_layer_call(&self, i: usize) {
        self.layer_calls[i].fetch_add(1, Ordering::Relaxed);
    }

    /// How many tokens the decoder has turned into logits since the model was made (or the
    /// counters reset), as `(through the separate exit head, through`
    /// [`head`](LegoTransformer::head)`)`. In a shallow model the exit head *is* `head`, and its
    /// tokens count in the second number. Tests use this to check that, with an exit gate, a
    /// token that goes deep never runs the exit head.
    pub fn head_rows(&self) -> (usize, usize) {
        (self.exit_head_rows.load(Ordering::Relaxed), self.deep_head_rows.load(Ordering::Relaxed))
    }

    /// Counts `n` tokens turned into logits by `head` (one of this model's heads).
    pub(crate) fn count_head_rows(&self, head: &ExitHead, n: usize) {
        let separate_exit = self.exit_head.as_ref().is_some_and(|e| std::ptr::eq(e, head));
        let counter = if separate_exit { &self.exit_head_rows } else { &self.deep_head_rows };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    // ----- checking input from outside --------------------------------------------------

    /// Checks a batch of token ids laid out `[batch, seq]`: non-empty, a whole number of rows,
    /// ids inside the vocabulary, and `offset + seq <= max_seq_len`. Returns `seq`.
    pub fn check_tokens(&self, ids: &[usize], batch: usize, offset: usize) -> Result<usize> {
        if batch == 0 || ids.is_empty() {
            return Err(Error::Input("empty input: need at least one row of at least one token".into()));
        }
        if !ids.len().is_multiple_of(batch) {
            return Err(Error::Input(format!(
                "{} token ids do not split into {batch} rows of equal length",
                ids.len()
            )));
        }
        let seq = ids.len() / batch;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, id)| **id >= self.config.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} (row {}, position {}) is outside the vocabulary of {}",
                i / seq,
                i % seq,
                self.config.vocab_size
            )));
        }
        if offset + seq > self.config.max_seq_len {
            return Err(Error::Input(format!(
                "sequence of {} tokens (after {offset} cached) exceeds max_seq_len {}",
                seq, self.config.max_seq_len
            )));
        }
        Ok(seq)
    }

    // ----- the training path (autodiff graph) ---------------------------------------------

    /// The embeddings of `ids` (`[batch, seq]` row-major) as `[batch, seq, D]`.
    pub fn embed(&self, ids: &[usize], batch: usize) -> Result<Tensor> {
        let seq = self.check_tokens(ids, batch, 0)?;
        Ok(self.tok_embeddings.embedding(ids, &[batch, seq]))
    }

    /// Hidden states `h` (`[B, T, D]`, positions `0..T`) through layers `range`.
    pub fn run_layers(&self, h: &Tensor, range: std::ops::Range<usize>) -> Tensor {
        self.run_layers_masked(h, range, None)
    }

    /// [`run_layers`](LegoTransformer::run_layers) with each layer's attention seeing only the
    /// earlier positions that `visible` (`[B, T]`) marks, and itself: the upper layers as TRUE
    /// early exit's `Skip` fill leaves them, when `visible` marks the tokens that go deep.
    pub fn run_layers_masked(
        &self,
        h: &Tensor,
        range: std::ops::Range<usize>,
        visible: Option<&std::sync::Arc<[bool]>>,
    ) -> Tensor {
        assert!(
            range.end <= self.layers.len(),
            "run_layers: {range:?} is beyond the model's {} layers",
            self.layers.len()
        );
        let mut h = h.clone();
        for i in range {
            self.count_layer_call(i);
            h = self.layers[i].forward_masked(&h, 0, visible);
        }
        h
    }

    /// **Spec `forward(x)`**: logits `[B, T, V]` for every position, through all layers and the
    /// deep head. This is the training path: it builds the autodiff graph (unless run under
    /// [`no_grad`](crate::no_grad)). Ids laid out `[B, T]` row-major; an id outside the
    /// vocabulary or a sequence longer than `max_seq_len` is an error.
    ///
    /// ```
    /// use lego::Tensor;
    /// use lego::model::{LegoConfig, LegoTransformer};
    ///
    /// let config = LegoConfig { vocab_size: 32, dim: 16, num_heads: 2, ffn_hidden: 32, ..LegoConfig::t() };
    /// let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
    /// let logits = model.forward(&[1, 2, 3, 4, 5, 6], 2).unwrap(); // [B, T] = [2, 3]
    /// assert_eq!(logits.shape(), &[2, 3, 32]); // [B, T, V]
    /// assert_eq!(model.layer_calls(3), 1); // every layer ran
    /// let loss = logits.cross_entropy(&[2, 3, 4, 5, 6, 7], None); // the next tokens
    /// loss.backward();
    /// assert!(model.tok_embeddings.grad().is_some());
    /// assert!(model.forward(&[1, 32], 1).is_err()); // 32 is outside the vocabulary
    /// ```
    pub fn forward(&self, ids: &[usize], batch: usize) -> Result<Tensor> {
        let h = self.embed(ids, batch)?;
        let h = self.run_layers(&h, 0..self.layers.len());
        Ok(self.head.forward(&h))
    }

    /// **Spec `get_hidden_states(x)`**: hidden states `[B, T, D]` after the lower layers
    /// `0..exit_layer`.
    pub fn get_hidden_states(&self, ids: &[usize], batch: usize) -> Result<Tensor> {
        let h = self.embed(ids, batch)?;
        Ok(self.run_layers(&h, 0..self.config.exit_layer))
    }

    /// **Spec `compute_confidence(h)`**: for hidden states at the exit (`[..., D]`), the
    /// confidence of each position, `max softmax(exit logits)`, and those logits (so they
    /// are never computed twice). Records no graph.
    pub fn compute_confidence(&self, h: &Tensor) -> (Vec<f32>, Tensor) {
        let logits = crate::no_grad(|| self.exit().forward(h));
        let conf = confidence_of_logits(&logits.data(), self.config.vocab_size);
        (conf, logits)
    }

    /// **Spec `forward_upper_layers(h, start_layer)`**: logits from hidden states `h`
    /// (`[B, T, D]`, positions `0..T`) through layers `start_layer..` and the deep head. Phase 2
    /// trains through this, from cached lower hidden states.
    pub fn forward_upper_layers(&self, h: &Tensor, start_layer: usize) -> Tensor {
        self.forward_upper_layers_masked(h, start_layer, None)
    }

    /// [`forward_upper_layers`](LegoTransformer::forward_upper_layers) through
    /// [`run_layers_masked`](LegoTransformer::run_layers_masked).
    pub fn forward_upper_layers_masked(
        &self,
        h: &Tensor,
        start_layer: usize,
        visible: Option<&std::sync::Arc<[bool]>>,
    ) -> Tensor {
        let h = self.run_layers_masked(h, start_layer..self.layers.len(), visible);
        self.head.forward(&h)
    }

    /// **Spec `extend(num_layers, routing_threshold, freeze_lower)`**: a deeper model. The
    /// embedding, the layers and the head are copied; the exit stays where this model ends
    /// (`exit_layer` = this model's `num_layers`), with a frozen copy of this model's exit head;
    /// the new layers are random ([`ExtendInit::Random`], the spec's; see [`extend_with`] for
    /// stacking copies of the lower layers, or identity blocks that start phase 2 exactly at
    /// this model).
    /// With `freeze_lower`, the embedding and the lower layers are frozen.
    ///
    /// ```
    /// use lego::Tensor;
    /// use lego::model::{LegoConfig, LegoTransformer};
    ///
    /// let config = LegoConfig {
    ///     vocab_size: 32, dim: 16, num_layers: 2, num_heads: 2, ffn_hidden: 32, max_seq_len: 16,
    ///     exit_layer: 2, ..LegoConfig::t()
    /// };
    /// let shallow = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap(); // phase 1's model
    /// let deep = shallow.extend(4, 0.3, true, &mut Tensor::rng(1)).unwrap();
    /// assert_eq!((deep.config.num_layers, deep.config.exit_layer), (4, 2));
    /// assert_eq!(deep.config.routing_threshold, 0.3);
    /// // The exit head is a frozen copy of the shallow model's head; the deep head trains.
    /// let exit = deep.exit_head.as_ref().unwrap();
    /// assert_eq!(exit.output.weight.to_vec(), shallow.head.output.weight.to_vec());
    /// assert!(!exit.output.weight.requires_grad_flag() && deep.head.output.weight.requires_grad_flag());
    /// // freeze_lower: the embedding and layers 0..2 are frozen, the new layers train.
    /// assert!(!deep.tok_embeddings.requires_grad_flag());
    /// assert!(!deep.layers[0].attention.wq.weight.requires_grad_flag());
    /// assert!(deep.layers[3].attention.wq.weight.requires_grad_flag());
    /// assert!(shallow.extend(2, 0.3, true, &mut Tensor::rng(1)).is_err()); // it can only grow
    /// ```
    ///
    /// [`extend_with`]: LegoTransformer::extend_with
    pub fn extend(
        &self,
        num_layers: usize,
        routing_threshold: f32,
        freeze_lower: bool,
        rng: &mut StdRng,
    ) -> Result<LegoTransformer> {
        self.extend_with(num_layers, routing_threshold, freeze_lower, ExtendInit::Random, rng)
    }

    /// [`extend`](LegoTransformer::extend) with a choice of how to initialise the new layers
    /// ([`ExtendInit`]). With [`ExtendInit::Identity`] the new blocks add nothing to the
    /// residual stream, so the deeper model computes exactly the logits of this one:
    ///
    /// ```
    /// use lego::{Tensor, no_grad};
    /// use lego::model::transformer::ExtendInit;
    /// use lego::model::{LegoConfig, LegoTransformer};
    ///
    /// let config = LegoConfig {
    ///     vocab_size: 32, dim: 16, num_layers: 2, num_heads: 2, ffn_hidden: 32, max_seq_len: 16,
    ///     exit_layer: 2, ..LegoConfig::t()
    /// };
    /// let shallow = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
    /// let deep = shallow.extend_with(4, 0.3, true, ExtendInit::Identity, &mut Tensor::rng(1)).unwrap();
    /// let ids = [1, 5, 9, 13, 17];
    /// let logits = |m: &LegoTransformer| no_grad(|| m.forward(&ids, 1).unwrap()).to_vec();
    /// assert_eq!(logits(&deep), logits(&shallow)); // bit for bit
    /// // Stack: the new layers are copies of the top lower layers (here layers 0 and 1).
    /// let stacked = shallow.extend_with(4, 0.3, true, ExtendInit::Stack, &mut Tensor::rng(1)).unwrap();
    /// let wq = |m: &LegoTransformer, l: usize| m.layers[l].attention.wq.weight.to_vec();
    /// assert_eq!((wq(&stacked, 2), wq(&stacked, 3)), (wq(&shallow, 0), wq(&shallow, 1)));
    /// ```
    pub fn extend_with(
        &self,
        num_layers: usize,
        routing_threshold: f32,
        freeze_lower: bool,
        init: ExtendInit,
        rng: &mut StdRng,
    ) -> Result<LegoTransformer> {
        let old = self.layers.len();
        if num_layers <= old {
            return Err(Error::Input(format!(
                "extend: the model has {old} layers; it can only grow, not to {num_layers}"
            )));
        }
        check_threshold(routing_threshold)?;
        let mut config = self.config.clone();
        config.num_layers = num_layers;
        config.exit_layer = old;
        config.routing_threshold = routing_threshold;
        config.validate()?;

        let mut layers: Vec<Block> = self.layers.iter().map(Block::deep_clone).collect();
        for i in 0..num_layers - old {
            let block = match init {
                ExtendInit::Random => Block::new(&config, rng),
                ExtendInit::Stack => {
                    let new = num_layers - old;
                    self.layers[old - 1 - (new - 1 - i) % old].deep_clone()
                }
                ExtendInit::Identity => {
                    let block = Block::new(&config, rng);
                    for w in [&block.attention.wo.weight, &block.feed_forward.w2.weight] {
                        w.set_data(vec![0.0; w.numel()]);
                    }
                    block
                }
            };
            // New layers always train, whatever the copied layer's state.
            block.set_requires_grad(true);
            layers.push(block);
        }
        let tok_embeddings = self.tok_embeddings.deep_clone();
        let head = self.head.deep_clone();
        head.set_frozen(false);
        // The exit confidence is computed by a frozen copy of this model's exit head.
        let exit_head = self.exit().deep_clone();
        exit_head.set_frozen(true);
        if freeze_lower {
            tok_embeddings.set_requires_grad(false);
            for layer in &layers[..old] {
                layer.set_requires_grad(false);
            }
        }
        let mut model = LegoTransformer::from_parts(config, tok_embeddings, layers, head, Some(exit_head));
        // The gate reads the exit hidden state through the exit head's norm: both are frozen
        // copies of this model's, so the gate stays valid in the deeper model.
        model.exit_gate = self.exit_gate.as_ref().map(ExitGate::deep_clone);
        Ok(model)
    }
}

/// The confidence of each row of logits: the largest softmax probability,
/// `max softmax(z) = 1 / Σⱼ e^(zⱼ − max z)`. Training-side calibration and decoding use the
/// same kernel ([`confidence_with_scratch`]), so a token routes the same way in both.
pub fn confidence_of_logits(logits: &[f32], vocab: usize) -> Vec<f32> {
    let mut scratch = vec![0.0f32; vocab];
    logits.chunks(vocab).map(|z| confidence_with_scratch(z, &mut scratch)).collect()
}

/// The confidence of one row of logits, through the SIMD softmax on a `scratch` copy (no
/// allocation: the decoding loop keeps the scratch row).
pub fn confidence_with_scratch(z: &[f32], scratch: &mut [f32]) -> f32 {
    let p = &mut scratch[..z.len()];
    p.copy_from_slice(z);
    crate::kernels::simd::softmax_in_place(p);
    p.iter().copied().fold(0.0, f32::max)
}
