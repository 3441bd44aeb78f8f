//! Bad input, tried as a user would meet it: each case used to load, run or print something
//! wrong in silence (or panic later), and is now an error that says what was wrong and where.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lego::data::{Batch, Tokenizer};
use lego::io::safetensors;
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    HardBatch, Phase2Mode, TrainOptions, Trainer, collect_hard_examples, compute_confidence_threshold,
    load_training_checkpoint, save_training_checkpoint,
};
use lego::{Error, Tensor};

/// A path in a directory of this test binary's own, created on first use.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lego-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A two-layer model over 32 ids, its exit after both layers (phase 1's shape).
fn shallow() -> LegoTransformer {
    let config = LegoConfig {
        vocab_size: 32,
        dim: 16,
        num_layers: 2,
        num_heads: 2,
        ffn_hidden: 32,
        max_seq_len: 8,
        exit_layer: 2,
        ..LegoConfig::t()
    };
    LegoTransformer::new(config, &mut Tensor::rng(1)).unwrap()
}

/// Two batches of 2 sequences of 8 tokens, ids below `below`.
fn batches(below: usize) -> Vec<Batch> {
    (0..2)
        .map(|k| {
            let ids: Vec<usize> = (0..2 * 9).map(|i| (i * 5 + k * 3) % below).collect();
            let (x, y) =
                ids.chunks(9).flat_map(|r| r[..8].iter().copied().zip(r[1..].iter().copied())).unzip();
            Batch { x, y, batch: 2, seq: 8 }
        })
        .collect()
}

/// Every parameter's values as bits (NaN included), by name.
fn bits(model: &LegoTransformer) -> Vec<(String, Vec<u32>)> {
    model
        .named_params()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec().iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Sets value `index` of the tensor `name` in the safetensors file at `path` to `value`.
fn poison(path: &Path, name: &str, index: usize, value: f32) {
    let mut st = safetensors::load(path).unwrap();
    st.tensors.get_mut(name).unwrap().data[index] = value;
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    safetensors::save(path, &entries, &st.metadata).unwrap();
}

#[test]
fn a_checkpoint_holding_a_nan_or_an_infinite_weight_is_refused_naming_the_tensor() {
    let model = shallow();
    for (name, value, shown) in [
        ("layers.0.attention.wq.weight", f32::NAN, "holds NaN at index 7"),
        ("output.weight", f32::INFINITY, "holds inf at index 7"),
        ("norm.weight", f32::NEG_INFINITY, "holds -inf at index 7"),
    ] {
        let path = temp("poisoned-model.safetensors");
        model.save(&path, &BTreeMap::new()).unwrap();
        LegoTransformer::load(&path).unwrap();
        poison(&path, name, 7, value);
        let e = LegoTransformer::load(&path).unwrap_err();
        assert!(matches!(e, Error::Format(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("poisoned-model.safetensors"), "{msg}");
        assert!(msg.contains(&format!("tensor '{name}' {shown}")), "{msg}");
    }

    // The training checkpoint reads the model the same way, and checks the moments too.
    let tok = Tokenizer::word(&[lego::data::Document::new("t", "a b c d e f g h")], 32).unwrap();
    let model = LegoTransformer::new(
        LegoConfig { vocab_size: tok.vocab_size(), ..shallow().config },
        &mut Tensor::rng(2),
    )
    .unwrap();
    let mut opt = AdamW::new(model.params(), AdamWConfig::default());
    model.forward(&[1, 2, 3], 1).unwrap().cross_entropy(&[2, 3, 4], None).backward();
    opt.step();
    for (name, value) in
        [("tok_embeddings.weight", f32::NAN), ("optim.v.layers.1.ffn_norm.weight", f32::INFINITY)]
    {
        let path = temp("poisoned-training.safetensors");
        save_training_checkpoint(&path, &model, &tok, &opt, &BTreeMap::new()).unwrap();
        load_training_checkpoint(&path).unwrap();
        poison(&path, name, 0, value);
        let msg = load_training_checkpoint(&path).unwrap_err().to_string();
        assert!(msg.contains(&format!("tensor '{name}' holds {value} at index 0")), "{msg}");
    }
}

#[test]
fn a_nan_in_the_exit_head_is_an_error_not_confidence_zero() {
    let model = shallow();
    let data = batches(32);
    // Row 5 of the exit head's projection: every token's logit for id 5 becomes NaN.
    let mut w = model.head.output.weight.to_vec();
    w[5 * 16 + 3] = f32::NAN;
    model.head.output.weight.set_data(w);

    let e = compute_confidence_threshold(&model, &data, 0.5).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "non-finite value: compute_confidence_threshold: the exit head's logit for id 5 is NaN"
        ),
        "{e}"
    );
    assert!(e.contains("at batch 0, row 0, position 0"), "{e}");
    let e = collect_hard_examples(&model, &data, 0.5).unwrap_err().to_string();
    assert!(e.contains("collect_hard_examples: the exit head's logit for id 5 is NaN"), "{e}");
    for threshold in [None, Some(0.5)] {
        let e = Trainer::default().evaluate(&model, &data, threshold).unwrap_err().to_string();
        assert!(e.contains("evaluation: the exit head's logit for id 5 is NaN"), "{e}");
    }
}

#[test]
fn a_non_finite_deep_path_is_an_error_in_evaluation() {
    let deep = shallow().extend(4, 0.5, true, &mut Tensor::rng(3)).unwrap();
    let w = &deep.layers[3].feed_forward.w2.weight;
    let mut values = w.to_vec();
    values[0] = f32::INFINITY;
    w.set_data(values);
    let e = Trainer::default().evaluate(&deep, &batches(32), Some(0.5)).unwrap_err().to_string();
    assert!(e.contains("evaluation: the deep path's logit for id"), "{e}");
    assert!(e.contains("at batch 0, token 0"), "{e}");
}

#[test]
fn exit_layer_zero_is_refused_with_the_reason() {
    let why = "exit_layer is 0, but it must be at least 1";
    let config = LegoConfig { exit_layer: 0, ..LegoConfig::t() };
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains(why) && e.contains("embedding alone"), "{e}");
    assert!(LegoTransformer::new(config, &mut Tensor::rng(0)).is_err());

    // A one-layer model by the spec's constructor exits after its only layer.
    let one = LegoConfig::new(32, 16, 1, 2, 32, 8);
    assert_eq!(one.exit_layer, 1);
    LegoTransformer::new(one, &mut Tensor::rng(0)).unwrap();

    // A checkpoint whose config says exit_layer 0 does not load.
    let path = temp("exit0.safetensors");
    shallow().save(&path, &BTreeMap::new()).unwrap();
    let mut st = safetensors::load(&path).unwrap();
    let config = st.metadata["config"].replace("\"exit_layer\":2", "\"exit_layer\":0");
    assert_ne!(config, st.metadata["config"]);
    st.metadata.insert("config".into(), config);
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    safetensors::save(&path, &entries, &st.metadata).unwrap();
    let e = LegoTransformer::load(&path).unwrap_err().to_string();
    assert!(e.contains(why), "{e}");
}

#[test]
fn a_checkpoint_whose_config_is_not_json_names_the_file_and_the_entry() {
    let path = temp("bad-config.safetensors");
    shallow().save(&path, &BTreeMap::new()).unwrap();
    let mut st = safetensors::load(&path).unwrap();
    st.metadata.insert("config".into(), "{\"dim\": 16,".into());
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    safetensors::save(&path, &entries, &st.metadata).unwrap();
    let e = LegoTransformer::load(&path).unwrap_err().to_string();
    assert!(e.contains("bad-config.safetensors: metadata 'config': JSON: at byte 11"), "{e}");
}

#[test]
fn an_output_directory_that_is_a_file_fails_before_any_work() {
    let file = temp("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let e = lego::io::output_dir::prepare_output_dir(&file).unwrap_err().to_string();
    assert!(e.contains("not-a-directory") && e.contains("not a directory"), "{e}");
}

#[test]
fn a_nan_loss_in_phase_1_restores_the_best_weights_then_names_the_step() {
    let model = shallow();
    // Row 31 of the embedding is NaN, and only the second batch uses id 31: the first step is
    // a normal one (it moves the weights), the second meets a NaN loss.
    let mut e = model.tok_embeddings.to_vec();
    e[31 * 16] = f32::NAN;
    model.tok_embeddings.set_data(e);
    let mut train = batches(31);
    train[1].x[3] = 31;
    let start = bits(&model);
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: 1e-2, ..Default::default() });
    let trainer =
        Trainer::new(TrainOptions { max_epochs: 2, label: "phase 1".into(), ..TrainOptions::default() });
    let e =
        trainer.train_with_early_stopping(&model, &train, &batches(31), &mut opt).unwrap_err().to_string();
    assert!(e.contains("phase 1: the loss became NaN at epoch 1, step 2 of 2"), "{e}");
    assert!(e.contains("put back to the weights it started this phase with"), "{e}");
    assert_eq!(opt.step_count(), 1, "the NaN loss never reached the optimizer");
    assert!(bits(&model) == start, "the model holds the weights it started with, not the stepped ones");
}

#[test]
fn a_nan_loss_in_phase_2_restores_the_best_weights_then_names_the_step() {
    let shallow = shallow();
    let val = batches(32);
    let deep = shallow.extend(4, 0.5, true, &mut Tensor::rng(4)).unwrap();
    let hard = collect_hard_examples(&deep, &val, 1.5).unwrap(); // every token hard
    // Two batches of hidden states entering the upper layers; the second holds a NaN.
    let (d, seq) = (16, 8);
    let batch = |nan: bool| {
        let mut hidden: Vec<f32> = (0..seq * d).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5).collect();
        if nan {
            hidden[20] = f32::NAN;
        }
        HardBatch {
            hidden: Arc::new(hidden),
            batch: 1,
            seq,
            dim: d,
            targets: vec![3; seq],
            weights: vec![1.0; seq],
            upper_visible: None,
        }
    };
    let hard_batches = [batch(false), batch(true)];
    let start = bits(&deep);
    let mut opt = AdamW::new(deep.trainable_params(), AdamWConfig { lr: 1e-2, ..Default::default() });
    let trainer =
        Trainer::new(TrainOptions { max_epochs: 2, label: "phase 2".into(), ..TrainOptions::default() });
    let e = trainer
        .train_upper_layers_with_early_stopping(
            &deep,
            &hard_batches,
            &val,
            &hard,
            &mut opt,
            2,
            0.5,
            Phase2Mode::Sequence,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("phase 2: the loss became NaN at epoch 1, step 2 of 2"), "{e}");
    assert!(e.contains("put back to the weights it started this phase with"), "{e}");
    assert_eq!(opt.step_count(), 1);
    assert!(bits(&deep) == start, "the model holds the weights it started with, not the stepped ones");
}

#[test]
fn decoding_an_id_outside_the_vocabulary_is_an_error() {
    let e = Tokenizer::Byte.decode(&[104, 105, 256]).unwrap_err();
    assert!(matches!(e, Error::Input(_)));
    assert!(e.to_string().contains("token id 256 at position 2"), "{e}");
    assert_eq!(Tokenizer::Byte.decode(&[104, 105]).unwrap(), "hi");
}
