//! Parity of a whole tiny Llama, built from our ops, with JAX (float64): the hidden state
//! after layer 0, the logits, the loss, and the gradient of every parameter.
//!
//! The model is the one `llama_forward` in `tools/gen_fixtures.py` defines, with the
//! configuration in the fixture's metadata (2 layers, dim 16, 2 heads of 8, SwiGLU hidden 24,
//! vocabulary 13, batch 2 × 6 tokens). Linear weights are stored `(out, in)`: `y = x·Wᵀ`.
//!
//! ```text
//! h = tok_embeddings[tokens]                                      (B, T, D)
//! per layer:
//!     x = rmsnorm(h, attention_norm)
//!     q, k, v = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ, each viewed (B, T, H, hd)
//!     q, k = rope(q), rope(k)               positions 0..T−1
//!     h = h + attention(q, k, v)·Woᵀ        causal, viewed back as (B, T, D)
//!     x = rmsnorm(h, ffn_norm)
//!     h = h + (silu(x·W1ᵀ) ∗ x·W3ᵀ)·W2ᵀ
//! logits = rmsnorm(h, norm)·outputᵀ                               (B, T, V)
//! loss = mean over the B·T tokens of −log softmax(logits)[target]
//! ```

mod common;

use std::collections::BTreeMap;

use common::{Fixture, Tol};
use lego::Tensor;

/// The model's sizes, read from the fixture's metadata.
struct Config {
    vocab: usize,
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    head_dim: usize,
    ffn_hidden: usize,
    rope_theta: f32,
    norm_eps: f32,
    batch: usize,
    seq: usize,
}

impl Config {
    fn from_fixture(fx: &Fixture) -> Config {
        let c = Config {
            vocab: fx.meta("vocab"),
            dim: fx.meta("dim"),
            n_layers: fx.meta("n_layers"),
            n_heads: fx.meta("n_heads"),
            head_dim: fx.meta("head_dim"),
            ffn_hidden: fx.meta("ffn_hidden"),
            rope_theta: fx.meta("rope_theta"),
            norm_eps: fx.meta("norm_eps"),
            batch: fx.meta("batch"),
            seq: fx.meta("seq"),
        };
        assert_eq!(c.n_heads * c.head_dim, c.dim, "heads × head_dim must be dim");
        c
    }

    /// Every parameter name with its shape, as `llama_param_shapes` lists them.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.dim, self.ffn_hidden);
        let mut shapes = vec![("tok_embeddings.weight".to_string(), vec![self.vocab, d])];
        for i in 0..self.n_layers {
            let l = format!("layers.{i}.");
            shapes.push((l.clone() + "attention_norm.weight", vec![d]));
            for w in ["wq", "wk", "wv", "wo"] {
                shapes.push((format!("{l}attention.{w}.weight"), vec![d, d]));
            }
            shapes.push((l.clone() + "ffn_norm.weight", vec![d]));
            shapes.push((l.clone() + "feed_forward.w1.weight", vec![f, d]));
            shapes.push((l.clone() + "feed_forward.w2.weight", vec![d, f]));
            shapes.push((l.clone() + "feed_forward.w3.weight", vec![f, d]));
        }
        shapes.push(("norm.weight".to_string(), vec![d]));
        shapes.push(("output.weight".to_string(), vec![self.vocab, d]));
        shapes
    }
}

/// What the forward pass returns: the hidden state after layer 0, the logits and the loss.
struct Forward {
    after_layer0: Tensor,
    logits: Tensor,
    loss: Tensor,
}

/// The forward pass of the module doc, from our ops.
fn forward(c: &Config, p: &BTreeMap<String, Tensor>, tokens: &[usize], targets: &[usize]) -> Forward {
    let (b, t, d, h, hd) = (c.batch, c.seq, c.dim, c.n_heads, c.head_dim);
    let w = |name: &str| &p[name];
    let mut x = w("tok_embeddings.weight").embedding(tokens, &[b, t]); // (B, T, D)
    let mut after_layer0 = None;
    for i in 0..c.n_layers {
        let lw = |name: &str| &p[&format!("layers.{i}.{name}.weight")];

        // Attention block.
        let n = x.rms_norm(lw("attention_norm"), c.norm_eps); // (B, T, D)
        let q = n.matmul_t(lw("attention.wq")).reshape(&[b, t, h, hd]); // (B, T, H, hd)
        let k = n.matmul_t(lw("attention.wk")).reshape(&[b, t, h, hd]);
        let v = n.matmul_t(lw("attention.wv")).reshape(&[b, t, h, hd]);
        let (q, k) = (q.rope(0, c.rope_theta), k.rope(0, c.rope_theta));
        let att = Tensor::attention(&q, &k, &v).reshape(&[b, t, d]); // (B, T, D)
        x = x.add(&att.matmul_t(lw("attention.wo")));

        // Feed-forward block: w2(silu(w1 n) * w3 n).
        let n = x.rms_norm(lw("ffn_norm"), c.norm_eps);
        let gate = n.matmul_t(lw("feed_forward.w1")); // (B, T, F)
        let up = n.matmul_t(lw("feed_forward.w3")); // (B, T, F)
        x = x.add(&Tensor::swiglu(&gate, &up).matmul_t(lw("feed_forward.w2"))); // (B, T, D)

        if i == 0 {
            after_layer0 = Some(x.clone());
        }
    }
    let logits = x.rms_norm(w("norm.weight"), c.norm_eps).matmul_t(w("output.weight")); // (B, T, V)
    let loss = logits
        .reshape(&[b * t, c.vocab]) // (B·T, V)
        .cross_entropy(targets, None);
    Forward { after_layer0: after_layer0.expect("the model has at least one layer"), logits, loss }
}

#[test]
fn tiny_llama_forward_and_gradients() {
    let fx = Fixture::load("model/tiny_llama.safetensors");
    let c = Config::from_fixture(&fx);

    let mut params = BTreeMap::new();
    for (name, shape) in c.param_shapes() {
        assert_eq!(fx.shape(&name), shape.as_slice(), "parameter {name}");
        params.insert(name.clone(), fx.leaf(&name));
    }
    let (tokens, targets) = (fx.ids("tokens"), fx.ids("targets"));
    assert_eq!(fx.shape("tokens"), [c.batch, c.seq]);
    assert_eq!(fx.shape("targets"), [c.batch, c.seq]);

    let out = forward(&c, &params, &tokens, &targets);
    fx.check_tensor("hidden.after_layer0", &out.after_layer0);
    fx.check_tensor("logits", &out.logits);
    fx.check_tensor("loss", &out.loss);

    out.loss.backward();
    // Every gradient in the file is checked: one per parameter.
    let grads_in_file = fx.file.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads_in_file, params.len());
    // Looser than the default (1e-6 of the RMS absolute): these gradients are of order
    // 0.02-0.1 (RMS), each the sum over 12 tokens of products taken back through two layers
    // (dot products of length 16-24 in the forward, attention over up to 6 keys, three
    // RMSNorms), so float32 cancellation leaves an absolute error of ~1e-7 on every entry,
    // large or small. Measured: at most 6.4e-6 of the RMS (layers.1.feed_forward.w1: 2.4e-7
    // on an RMS of 3.7e-2), while the forward values (hidden, logits) match within 1e-6 of
    // their RMS. This still catches an error of 1e-3 relative (scaling the loss by 1 + 1e-3
    // before `backward` fails it 70x over); a wrong derivative is off by far more.
    let grad_tol = Tol { rtol: 1e-5, atol: 2e-5 };
    for (name, param) in &params {
        fx.check_grad(&format!("grad.{name}"), param, grad_tol);
    }
}

/// The same fixture loaded into a [`LegoTransformer`](lego::model::LegoTransformer): its
/// `forward` (the training graph), its cached engine (`forward_with_cache`) and its gradients
/// all agree with JAX.
#[test]
fn lego_transformer_matches_the_fixture() {
    use lego::model::{KvCache, LegoConfig, LegoTransformer};

    let fx = Fixture::load("model/tiny_llama.safetensors");
    let c = Config::from_fixture(&fx);
    let config = LegoConfig {
        rope_theta: c.rope_theta,
        norm_eps: c.norm_eps,
        exit_layer: 1,
        ..LegoConfig::new(c.vocab, c.dim, c.n_layers, c.n_heads, c.ffn_hidden, c.seq)
    };
    let model = LegoTransformer::new(config, &mut Tensor::rng(0)).unwrap();
    let named = model.named_params();
    assert_eq!(named.len(), c.param_shapes().len());
    for (name, param) in &named {
        assert_eq!(param.shape(), fx.shape(name), "{name}");
        param.set_data(fx.values(name).to_vec());
    }
    let (tokens, targets) = (fx.ids("tokens"), fx.ids("targets"));

    let logits = model.forward(&tokens, c.batch).unwrap();
    fx.check_tensor("logits", &logits);
    let loss = logits.cross_entropy(&targets, None);
    fx.check_tensor("loss", &loss);

    // The graph-free engine, with its split cache, gives the same logits.
    let mut cache = KvCache::new(&model.config, c.batch);
    let cached = model.forward_with_cache(&tokens, c.batch, &mut cache, true).unwrap();
    fx.check_tensor("logits", &cached);

    loss.backward();
    // Same tolerance as the op-built model above, for the same reasons.
    let grad_tol = Tol { rtol: 1e-5, atol: 2e-5 };
    for (name, param) in &named {
        fx.check_grad(&format!("grad.{name}"), param, grad_tol);
    }
}
