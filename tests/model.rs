//! The model's contracts: the cached engine agrees with the training graph, generation agrees
//! with repeated full forwards, `extend` keeps what it should, checkpoints round-trip, and bad
//! input is an error.

use lego::model::{KvCache, LegoConfig, LegoTransformer, Sampling};
use lego::optim::{AdamW, AdamWConfig};
use lego::{Tensor, no_grad};

/// Weights at the prototype's initialisation. (Scaled up 3x, the layers amplify f32 rounding
/// until the two paths differ by ~6e-5 relative; at this scale they agree within 1e-5.)
const SCALE: f32 = 1.0;

fn tiny_config() -> LegoConfig {
    LegoConfig { exit_layer: 1, ..LegoConfig::new(37, 24, 3, 3, 40, 48) }
}

fn model(seed: u64) -> LegoTransformer {
    let m = LegoTransformer::new(tiny_config(), &mut Tensor::rng(seed)).unwrap();
    // Larger weights than the init so that the layers matter and errors would show.
    for p in m.params() {
        let v: Vec<f32> = p.to_vec().iter().map(|x| x * SCALE).collect();
        p.set_data(v);
    }
    m
}

fn tokens(n: usize, seed: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7 + seed * 13 + 3) % 37).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: worst relative difference {worst} > {tol}");
}

#[test]
fn cached_decoding_equals_the_uncached_forward() {
    let m = model(1);
    let seq = tokens(28, 1); // a prompt of 8 and 20 more tokens
    let full = no_grad(|| m.forward(&seq, 1).unwrap()).to_vec();
    let v = m.config.vocab_size;

    // Prompt in one step, then one token at a time.
    let mut cache = KvCache::new(&m.config, 1);
    let mut got = m.forward_with_cache(&seq[..8], 1, &mut cache, true).unwrap().to_vec();
    for &tok in &seq[8..] {
        got.extend(m.forward_with_cache(&[tok], 1, &mut cache, true).unwrap().to_vec());
    }
    assert_close("token by token", &got, &full, 1e-5);

    // The prompt fed in uneven pieces.
    let mut cache = KvCache::new(&m.config, 1);
    let mut got = Vec::new();
    for piece in [&seq[..3], &seq[3..4], &seq[4..15], &seq[15..]] {
        got.extend(m.forward_with_cache(piece, 1, &mut cache, true).unwrap().to_vec());
    }
    assert_close("in pieces", &got, &full, 1e-5);
    assert_eq!(got.len(), 28 * v);
}

#[test]
fn use_cache_false_leaves_the_cache_unchanged() {
    let m = model(2);
    let seq = tokens(10, 2);
    let mut cache = KvCache::new(&m.config, 1);
    m.forward_with_cache(&seq[..6], 1, &mut cache, true).unwrap();
    let a = m.forward_with_cache(&seq[6..], 1, &mut cache, false).unwrap().to_vec();
    let b = m.forward_with_cache(&seq[6..], 1, &mut cache, true).unwrap().to_vec();
    assert_eq!(a, b);
    assert_eq!(cache.positions, vec![10]);
}

#[test]
fn a_batch_of_rows_decodes_like_each_row_alone() {
    let m = model(3);
    let rows = [tokens(9, 3), tokens(9, 4), tokens(9, 5)];
    let flat: Vec<usize> = rows.iter().flatten().copied().collect();
    let mut cache = KvCache::new(&m.config, 3);
    let batched = m.forward_with_cache(&flat, 3, &mut cache, true).unwrap().to_vec();
    let v = m.config.vocab_size;
    for (r, row) in rows.iter().enumerate() {
        let alone = no_grad(|| m.forward(row, 1).unwrap()).to_vec();
        assert_close(&format!("row {r}"), &batched[r * 9 * v..(r + 1) * 9 * v], &alone, 1e-5);
    }
}

#[test]
fn greedy_generate_equals_repeated_argmax_of_the_full_forward() {
    let m = model(4);
    let prompts = vec![tokens(5, 6), tokens(5, 7)];
    let out = m.generate(&prompts, 20, &Sampling::greedy()).unwrap();
    for (prompt, got) in prompts.iter().zip(&out) {
        let mut seq = prompt.clone();
        for _ in 0..20 {
            let logits = no_grad(|| m.forward(&seq, 1).unwrap());
            seq.push(*logits.argmax_last().last().unwrap());
        }
        assert_eq!(got, &seq);
    }
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let m = model(5);
    let prompts = vec![tokens(4, 8)];
    let s = Sampling { temperature: 1.0, top_k: 3, top_p: 0.9, seed: 42 };
    let a = m.generate(&prompts, 15, &s).unwrap();
    let b = m.generate(&prompts, 15, &s).unwrap();
    assert_eq!(a, b);
    // With top_k = 1 sampling is greedy whatever the temperature.
    let k1 = m.generate(&prompts, 15, &Sampling { top_k: 1, ..s }).unwrap();
    assert_eq!(k1, m.generate(&prompts, 15, &Sampling::greedy()).unwrap());
}

#[test]
fn the_partial_forward_in_two_parts_equals_the_forward() {
    let m = model(6);
    let seq = tokens(12, 9);
    let want = no_grad(|| m.forward(&seq, 1).unwrap()).to_vec();
    let mut cache = KvCache::new(&m.config, 1);
    let h0 = no_grad(|| m.embed(&seq, 1).unwrap());
    let e = m.config.exit_layer;
    let h = m.forward_with_cache_partial(&h0, &mut cache, 0, e).unwrap();
    let h = m.forward_with_cache_partial(&h, &mut cache, e, m.layers.len()).unwrap();
    let got = no_grad(|| m.head.forward(&h)).to_vec();
    assert_close("partial 0..e, e..L", &got, &want, 1e-5);
    // get_hidden_states then forward_upper_layers is the same function too.
    let h = no_grad(|| m.get_hidden_states(&seq, 1).unwrap());
    let got = no_grad(|| m.forward_upper_layers(&h, e)).to_vec();
    assert_close("hidden states + upper layers", &got, &want, 1e-6);
}

#[test]
fn a_token_at_position_p_is_the_same_in_one_pass_or_after_a_cache() {
    let m = model(7);
    let seq = tokens(17, 10);
    let full = no_grad(|| m.forward(&seq, 1).unwrap()).to_vec();
    let v = m.config.vocab_size;
    let p = 16;
    let mut cache = KvCache::new(&m.config, 1);
    m.forward_with_cache(&seq[..p], 1, &mut cache, true).unwrap();
    let last = m.forward_with_cache(&seq[p..], 1, &mut cache, true).unwrap().to_vec();
    assert_close("position 16", &last, &full[p * v..], 1e-5);
}

#[test]
fn extend_keeps_the_lower_outputs_and_frozen_parameters_do_not_move() {
    let shallow = LegoTransformer::new(
        LegoConfig { exit_layer: 2, ..LegoConfig::new(37, 24, 2, 3, 40, 48) },
        &mut Tensor::rng(8),
    )
    .unwrap();
    let deep = shallow.extend(4, 0.3, true, &mut Tensor::rng(9)).unwrap();
    assert_eq!((deep.config.num_layers, deep.config.exit_layer), (4, 2));
    let seq = tokens(10, 11);
    // The lower outputs and the exit logits are bit-identical to the shallow model's.
    let h_shallow = no_grad(|| shallow.get_hidden_states(&seq, 1).unwrap());
    let h_deep = no_grad(|| deep.get_hidden_states(&seq, 1).unwrap());
    assert_eq!(h_shallow.to_vec(), h_deep.to_vec());
    let (c1, l1) = shallow.compute_confidence(&h_shallow);
    let (c2, l2) = deep.compute_confidence(&h_deep);
    assert_eq!((c1, l1.to_vec()), (c2, l2.to_vec()));

    // Train a step: the embedding, lower layers and exit head stay put; the upper layers move.
    let before: Vec<(String, Vec<f32>, bool)> =
        deep.named_params().into_iter().map(|(n, t)| (n, t.to_vec(), t.requires_grad_flag())).collect();
    let mut opt = AdamW::new(deep.params(), AdamWConfig::default());
    let logits = deep.forward(&seq, 1).unwrap();
    logits.cross_entropy(&tokens(10, 12), None).backward();
    opt.step();
    for ((name, old, trainable), (_, t)) in before.iter().zip(deep.named_params()) {
        let frozen = name.starts_with("tok_embeddings")
            || name.starts_with("layers.0.")
            || name.starts_with("layers.1.")
            || name.starts_with("exit_");
        assert_eq!(!frozen, *trainable, "{name}: requires_grad");
        if frozen {
            assert_eq!(&t.to_vec(), old, "{name} is frozen but changed");
        } else {
            assert_ne!(&t.to_vec(), old, "{name} trains but did not change");
        }
    }
    // The shallow model is untouched by all this (extend copied, it did not share).
    assert_eq!(no_grad(|| shallow.get_hidden_states(&seq, 1).unwrap()).to_vec(), h_shallow.to_vec());
}

#[test]
fn extend_by_stacking_copies_the_top_lower_layers() {
    let shallow = LegoTransformer::new(
        LegoConfig { exit_layer: 2, ..LegoConfig::new(37, 24, 2, 3, 40, 48) },
        &mut Tensor::rng(8),
    )
    .unwrap();
    let deep = shallow
        .extend_with(4, 0.3, false, lego::model::transformer::ExtendInit::Stack, &mut Tensor::rng(9))
        .unwrap();
    assert_eq!(deep.layers[2].attention.wq.weight.to_vec(), shallow.layers[0].attention.wq.weight.to_vec());
    assert_eq!(
        deep.layers[3].feed_forward.w2.weight.to_vec(),
        shallow.layers[1].feed_forward.w2.weight.to_vec()
    );
}

#[test]
fn identity_extension_reproduces_the_shallow_models_logits_bit_for_bit() {
    let shallow = LegoTransformer::new(
        LegoConfig { exit_layer: 2, ..LegoConfig::new(37, 24, 2, 3, 40, 48) },
        &mut Tensor::rng(12),
    )
    .unwrap();
    let deep = shallow
        .extend_with(4, 0.3, true, lego::model::transformer::ExtendInit::Identity, &mut Tensor::rng(13))
        .unwrap();
    let seq = tokens(20, 7);
    let want = no_grad(|| shallow.forward(&seq, 1).unwrap()).to_vec();
    // The training graph, the cached decoder, and generation all see phase 1's model.
    assert_eq!(no_grad(|| deep.forward(&seq, 1).unwrap()).to_vec(), want);
    let mut cache = KvCache::new(&deep.config, 1);
    let mut shallow_cache = KvCache::new(&shallow.config, 1);
    assert_eq!(
        deep.forward_with_cache(&seq, 1, &mut cache, true).unwrap().to_vec(),
        shallow.forward_with_cache(&seq, 1, &mut shallow_cache, true).unwrap().to_vec()
    );
    let prompt = vec![seq[..5].to_vec()];
    assert_eq!(
        deep.generate(&prompt, 20, &Sampling::greedy()).unwrap(),
        shallow.generate(&prompt, 20, &Sampling::greedy()).unwrap()
    );
    // The new blocks are not dead weights: their other matrices are random, and they train.
    assert!(deep.layers[2].attention.wq.weight.to_vec().iter().any(|&w| w != 0.0));
    assert!(deep.layers[3].feed_forward.w2.weight.requires_grad_flag());
}

#[test]
fn checkpoints_round_trip_bit_exactly_and_bad_files_are_errors() {
    let dir = std::env::temp_dir().join(format!("lego-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    let shallow = model(10);
    let m = shallow.extend(5, 0.25, true, &mut Tensor::rng(1)).unwrap();
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("note".to_string(), "hello".to_string());
    m.save(&path, &extra).unwrap();
    let (back, meta) = LegoTransformer::load(&path).unwrap();
    assert_eq!(meta.get("note").map(String::as_str), Some("hello"));
    assert_eq!(back.config, m.config);
    for ((n1, a), (n2, b)) in m.named_params().iter().zip(back.named_params()) {
        assert_eq!(n1, &n2);
        assert_eq!(
            a.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{n1}"
        );
        assert_eq!(a.requires_grad_flag(), b.requires_grad_flag(), "{n1} frozen flag");
    }
    // Truncated: an error that names the file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = LegoTransformer::load(&path).unwrap_err().to_string();
    assert!(err.contains("m.safetensors"), "{err}");
    // Missing file.
    assert!(LegoTransformer::load(&dir.join("nope.safetensors")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_errors_with_a_message() {
    let m = model(11);
    let msg = |r: lego::Result<Tensor>| r.unwrap_err().to_string();
    assert!(msg(m.forward(&[0, 37], 1)).contains("token id 37"));
    assert!(msg(m.forward(&[], 1)).contains("empty"));
    assert!(msg(m.forward(&tokens(49, 0), 1)).contains("max_seq_len"));
    let g = |p: Vec<Vec<usize>>, n: usize| m.generate(&p, n, &Sampling::greedy()).unwrap_err().to_string();
    assert!(g(vec![vec![]], 3).contains("empty prompt"));
    assert!(g(vec![tokens(40, 0)], 9).contains("exceeds max_seq_len"));
    // A length that would wrap around is an error too, not a panic.
    assert!(g(vec![tokens(3, 0)], usize::MAX).contains("exceeds max_seq_len"));
    // Prompts of different lengths are a ragged batch, but an empty one among them is an error.
    assert!(m.generate(&[tokens(3, 0), tokens(4, 0)], 1, &Sampling::greedy()).is_ok());
    assert!(g(vec![tokens(3, 0), vec![]], 1).contains("empty prompt (row 1 of 2)"));
    assert!(g(vec![vec![99]], 1).contains("outside the vocabulary"));
    let mut rng = Tensor::rng(0);
    assert!(m.extend(3, 0.5, true, &mut rng).unwrap_err().to_string().contains("only grow"));
    assert!(m.extend(4, f32::NAN, true, &mut rng).unwrap_err().to_string().contains("routing threshold"));
    assert!(m.extend(4, -1.0, true, &mut rng).unwrap_err().to_string().contains("routing threshold"));
    assert!(m.extend(4, 1.5, true, &mut rng).is_ok(), "a threshold above 1 means never exit");
    let bad = Sampling { temperature: -1.0, ..Sampling::greedy() };
    assert!(m.generate(&[tokens(3, 0)], 2, &bad).is_err());
    let mut cache = KvCache::new(&m.config, 2);
    assert!(
        m.forward_with_cache(&[1, 2], 1, &mut cache, true).unwrap_err().to_string().contains("does not fit")
    );
}
