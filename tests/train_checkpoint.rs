//! Training checkpoints: a round trip keeps every bit (model, tokenizer, optimizer), resuming
//! from one takes exactly the step that not stopping would have taken, and a bad file is an
//! error that names it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lego::Tensor;
use lego::data::{Document, Tokenizer};
use lego::io::safetensors;
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{load_training_checkpoint, save_training_checkpoint};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lego-train-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A word tokenizer (so its vocabulary has to survive the trip) and a 2-layer model over it.
fn setup() -> (LegoTransformer, Tokenizer) {
    let text = "the cat sat on the mat . the dog saw the cat . a bird sang on the roof .";
    let tok = Tokenizer::word(&[Document::new("train", text)], 64).unwrap();
    let config = LegoConfig {
        vocab_size: tok.vocab_size(),
        dim: 32,
        num_layers: 2,
        num_heads: 4,
        ffn_hidden: 64,
        max_seq_len: 16,
        exit_layer: 2,
        ..LegoConfig::t()
    };
    (LegoTransformer::new(config, &mut Tensor::rng(5)).unwrap(), tok)
}

/// One fixed batch of ids below `vocab`, `[4, 16]`.
fn batch(vocab: usize, step: usize) -> (Vec<usize>, Vec<usize>) {
    let ids: Vec<usize> = (0..4 * 17).map(|i| (i * 7 + step * 3) % vocab).collect();
    ids.chunks(17).flat_map(|r| r[..16].iter().copied().zip(r[1..].iter().copied())).unzip()
}

/// One training step; returns the loss (before the update) as bits.
fn step(model: &LegoTransformer, opt: &mut AdamW, n: usize) -> u32 {
    let (x, y) = batch(model.config.vocab_size, n);
    opt.zero_grad();
    let loss = model.forward(&x, 4).unwrap().cross_entropy(&y, None);
    loss.backward();
    opt.step();
    loss.item().to_bits()
}

fn bits(model: &LegoTransformer) -> Vec<(String, Vec<u32>, bool)> {
    model
        .named_params()
        .into_iter()
        .map(|(n, t)| {
            let b = t.to_vec().iter().map(|x| x.to_bits()).collect();
            (n, b, t.requires_grad_flag())
        })
        .collect()
}

#[test]
fn a_round_trip_keeps_every_bit_and_resuming_takes_the_same_next_step() {
    let (model, tok) = setup();
    let config = AdamWConfig { lr: 3e-3, weight_decay: 0.05, ..Default::default() };
    let mut opt = AdamW::new(model.params(), config);
    for n in 0..3 {
        step(&model, &mut opt, n);
    }
    let path = temp("roundtrip.safetensors");
    let extra = BTreeMap::from([
        ("epoch".to_string(), "3".to_string()),
        ("routing_threshold".to_string(), "0.375".to_string()),
    ]);
    save_training_checkpoint(&path, &model, &tok, &opt, &extra).unwrap();
    let ckpt = load_training_checkpoint(&path).unwrap();

    assert_eq!(ckpt.model.config, model.config);
    assert_eq!(bits(&ckpt.model), bits(&model));
    assert_eq!(ckpt.tokenizer, tok);
    assert_eq!(ckpt.phase(), "phase1");
    assert_eq!(ckpt.routing_threshold().unwrap(), 0.375);
    assert_eq!(ckpt.number::<usize>("epoch").unwrap(), 3);
    assert_eq!(ckpt.optimizer.step, 3);
    assert_eq!(ckpt.optimizer.config, config);
    let state = opt.state();
    assert_eq!(ckpt.optimizer.param_steps, state.param_steps);
    assert_eq!(ckpt.optimizer.m, state.m);
    assert_eq!(ckpt.optimizer.v, state.v);

    // Resume: the loaded model and optimizer take the same steps as the ones that never stopped.
    let mut resumed = ckpt.optimizer.to_optimizer(&ckpt.model).unwrap();
    for n in 3..6 {
        assert_eq!(step(&ckpt.model, &mut resumed, n), step(&model, &mut opt, n), "step {n}");
    }
    assert_eq!(bits(&ckpt.model), bits(&model));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_extended_model_keeps_its_exit_head_its_frozen_part_and_omits_unused_moments() {
    let (shallow, tok) = setup();
    let deep = shallow.extend(4, 0.25, true, &mut Tensor::rng(9)).unwrap();
    let mut opt = AdamW::new(deep.trainable_params(), AdamWConfig::default());
    for n in 0..2 {
        step(&deep, &mut opt, n);
    }
    let path = temp("extended.safetensors");
    save_training_checkpoint(&path, &deep, &tok, &opt, &BTreeMap::new()).unwrap();

    // Frozen parameters are not the optimizer's: no moments are stored for them.
    let raw = safetensors::load(&path).unwrap();
    assert!(raw.tensors.contains_key("optim.m.layers.3.attention.wq.weight"));
    assert!(!raw.tensors.contains_key("optim.m.layers.0.attention.wq.weight"));
    assert!(!raw.tensors.contains_key("optim.m.exit_output.weight"));

    let ckpt = load_training_checkpoint(&path).unwrap();
    assert_eq!(ckpt.phase(), "phase2");
    assert_eq!(ckpt.routing_threshold().unwrap(), 0.25);
    assert!(ckpt.model.exit_head.is_some());
    assert_eq!(bits(&ckpt.model), bits(&deep));
    let mut resumed = ckpt.optimizer.to_optimizer(&ckpt.model).unwrap();
    assert_eq!(resumed.params().len(), deep.trainable_params().len());
    assert_eq!(step(&ckpt.model, &mut resumed, 2), step(&deep, &mut opt, 2));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn missing_corrupt_and_foreign_files_are_errors_that_name_the_file() {
    let (model, tok) = setup();
    let opt = AdamW::new(model.params(), AdamWConfig::default());
    let message = |p: &PathBuf| load_training_checkpoint(p).unwrap_err().to_string();

    let missing = temp("missing.safetensors");
    let e = message(&missing);
    assert!(e.contains("missing.safetensors"), "{e}");

    let good = temp("good.safetensors");
    save_training_checkpoint(&good, &model, &tok, &opt, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = temp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = message(&truncated);
    assert!(e.contains("truncated.safetensors"), "{e}");

    let garbled = temp("garbled.safetensors");
    let mut g = bytes.clone();
    g[12] = b'!';
    std::fs::write(&garbled, &g).unwrap();
    let e = message(&garbled);
    assert!(e.contains("garbled.safetensors"), "{e}");

    // A plain model checkpoint is not a training checkpoint, and says so.
    let plain = temp("plain.safetensors");
    model.save(&plain, &BTreeMap::new()).unwrap();
    let e = message(&plain);
    assert!(e.contains("plain.safetensors") && e.contains("not a training checkpoint"), "{e}");

    // A moment of the wrong shape, hand-made.
    let mut st = safetensors::load(&good).unwrap();
    st.tensors
        .insert("optim.m.norm.weight".into(), safetensors::TensorData { shape: vec![3], data: vec![0.0; 3] });
    st.tensors
        .insert("optim.v.norm.weight".into(), safetensors::TensorData { shape: vec![3], data: vec![0.0; 3] });
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    let wrong = temp("wrong-shape.safetensors");
    safetensors::save(&wrong, &entries, &st.metadata).unwrap();
    let e = message(&wrong);
    assert!(e.contains("wrong-shape.safetensors") && e.contains("optim.m.norm.weight"), "{e}");

    // Keys the checkpoint writes itself cannot come in as extras.
    let clash = BTreeMap::from([("tokenizer".to_string(), "x".to_string())]);
    let e = save_training_checkpoint(&temp("clash.safetensors"), &model, &tok, &opt, &clash)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'tokenizer'"), "{e}");

    for p in [&good, &truncated, &garbled, &plain, &wrong] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn per_parameter_step_counts_are_stored_and_format_1_files_still_load() {
    // An optimizer whose parameters have had different numbers of updates: `norm.weight` is
    // frozen for the first two steps, then joins.
    let (model, tok) = setup();
    // `model.params()` is `named_params()` without the names, so the index is the optimizer's.
    let late_index = model.named_params().iter().position(|(n, _)| n == "norm.weight").unwrap();
    let late = model.params()[late_index].clone();
    late.set_requires_grad(false);
    let mut opt = AdamW::new(model.params(), AdamWConfig::default());
    for n in 0..2 {
        step(&model, &mut opt, n);
    }
    late.set_requires_grad(true);
    step(&model, &mut opt, 2);
    let counts = opt.param_steps().to_vec();
    assert_eq!(counts[late_index], 1);
    assert_eq!(counts.iter().filter(|&&c| c == 3).count(), counts.len() - 1);

    let path = temp("param-steps.safetensors");
    save_training_checkpoint(&path, &model, &tok, &opt, &BTreeMap::new()).unwrap();
    let ckpt = load_training_checkpoint(&path).unwrap();
    assert_eq!(ckpt.optimizer.param_steps, counts);
    assert_eq!(ckpt.optimizer.to_optimizer(&ckpt.model).unwrap().param_steps(), counts);

    // The same file as format 1 wrote it: no per-parameter counts. Format 1 counted globally,
    // so each parameter with moments gets the global count, one without gets 0.
    let mut st = safetensors::load(&path).unwrap();
    assert!(st.metadata.remove("optim.param_steps").is_some());
    st.metadata.insert("format".into(), "lego-training-checkpoint/1".into());
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    let old = temp("format-1.safetensors");
    safetensors::save(&old, &entries, &st.metadata).unwrap();
    let ckpt = load_training_checkpoint(&old).unwrap();
    assert_eq!(ckpt.optimizer.param_steps, vec![3; counts.len()]);
    let mut resumed = ckpt.optimizer.to_optimizer(&ckpt.model).unwrap();
    step(&ckpt.model, &mut resumed, 3);

    // Format 2 without the counts, or with the wrong number of them, is an error.
    st.metadata.insert("format".into(), "lego-training-checkpoint/2".into());
    safetensors::save(&old, &entries, &st.metadata).unwrap();
    let e = load_training_checkpoint(&old).unwrap_err().to_string();
    assert!(e.contains("no 'optim.param_steps' in the metadata"), "{e}");
    st.metadata.insert("optim.param_steps".into(), "1,2".into());
    safetensors::save(&old, &entries, &st.metadata).unwrap();
    let e = load_training_checkpoint(&old).unwrap_err().to_string();
    assert!(e.contains("'optim.param_steps' has 2 counts for the"), "{e}");
    for p in [&path, &old] {
        std::fs::remove_file(p).unwrap();
    }
}
