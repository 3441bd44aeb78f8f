//! The LEGO pipeline on tiny data: phase 1, calibration, hard examples, phase 2, evaluation.

use lego::data::{
    Batch, SyntheticConfig, Tokenizer, batches, create_synthetic_data, generate_corpus, make_sequences,
};
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    Phase2Mode, TrainOptions, Trainer, collect_hard_examples, compute_confidence_threshold,
    create_hard_example_loader, evaluate_on_hard_examples,
};
use lego::{Tensor, no_grad};

/// Small batches of the structured synthetic corpus, byte-level.
fn corpus_batches(seq: usize) -> (Vec<Batch>, Vec<Batch>) {
    let docs = generate_corpus(&SyntheticConfig { documents: 6, bytes_per_document: 3000, seed: 1 });
    let tok = Tokenizer::Byte;
    let train: Vec<usize> = docs[..5].iter().flat_map(|d| tok.encode(&d.text)).collect();
    let val: Vec<usize> = tok.encode(&docs[5].text);
    let b = |t: &[usize]| batches(&make_sequences(t, seq), 8, Some(0)).unwrap();
    (b(&train), b(&val))
}

fn shallow_model() -> LegoTransformer {
    let config = LegoConfig {
        vocab_size: 256,
        dim: 32,
        num_layers: 2,
        num_heads: 4,
        ffn_hidden: 64,
        max_seq_len: 32,
        exit_layer: 2, // the exit at the top: a shallow phase-1 model
        ..LegoConfig::t()
    };
    LegoTransformer::new(config, &mut Tensor::rng(3)).unwrap()
}

fn quiet(epochs: usize) -> Trainer {
    Trainer::new(TrainOptions { max_epochs: epochs, patience: 2, warmup_steps: 2, ..TrainOptions::default() })
}

#[test]
fn the_pipeline_runs_end_to_end_and_phase_2_moves_only_the_upper_part() {
    let (train, val) = corpus_batches(32);
    let model = shallow_model();
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: 3e-3, ..Default::default() });
    let history = quiet(2).train_with_early_stopping(&model, &train, &val, &mut opt).unwrap();
    assert!(!history.epochs.is_empty() && history.best_epoch >= 1);
    assert!(history.epochs[0].val_ppl < 256.0, "phase 1 learned nothing: {:?}", history.epochs[0]);

    let threshold = compute_confidence_threshold(&model, &val, 0.5).unwrap();
    let hard = collect_hard_examples(&model, &train, threshold).unwrap();
    assert!(!hard.is_empty());
    let deep = model.extend(4, threshold, true, &mut Tensor::rng(4)).unwrap();
    let frozen_before: Vec<(String, Vec<f32>)> = deep
        .named_params()
        .into_iter()
        .filter(|(_, t)| !t.requires_grad_flag())
        .map(|(n, t)| (n, t.to_vec()))
        .collect();
    assert!(frozen_before.len() >= 1 + 2 * 9 + 2, "embedding, lower layers, exit head");

    for mode in [Phase2Mode::Sequence, Phase2Mode::SequenceSkip, Phase2Mode::Token] {
        let hard_batches = create_hard_example_loader(&hard, 8, 5, mode).unwrap();
        // Sequence-skip batches let the upper layers see exactly their hard positions.
        for b in &hard_batches {
            let hard_positions: Vec<bool> = b.weights.iter().map(|&w| w > 0.0).collect();
            let want = (mode == Phase2Mode::SequenceSkip).then_some(&hard_positions[..]);
            assert_eq!(b.upper_visible.as_deref(), want, "{mode:?}");
        }
        let mut opt2 = AdamW::new(deep.trainable_params(), AdamWConfig { lr: 1e-3, ..Default::default() });
        deep.reset_layer_calls();
        let h2 = quiet(2)
            .train_upper_layers_with_early_stopping(
                &deep,
                &hard_batches,
                &val,
                &hard,
                &mut opt2,
                2,
                threshold,
                mode,
            )
            .unwrap();
        assert!(h2.epochs.len() >= 2 && h2.epochs[0].epoch == 0 && h2.epochs[0].train_loss.is_nan());
        // The lower layers ran only to cache the validation split's hidden states, once per batch.
        assert_eq!(deep.layer_calls(0), val.len(), "{mode:?}: the lower layers ran inside the epochs");
        assert_eq!(deep.layer_calls(1), val.len());
        assert!(deep.layer_calls(2) >= hard_batches.len(), "the upper layers trained");
        for (name, before) in &frozen_before {
            let now = deep.named_params().into_iter().find(|(n, _)| n == name).unwrap().1.to_vec();
            assert_eq!(&now, before, "{mode:?}: frozen {name} changed in phase 2");
        }
    }

    // Evaluation: routing statistics are consistent.
    let trainer = quiet(1);
    let full = trainer.evaluate(&deep, &val, None).unwrap();
    assert_eq!((full.shallow, full.layer_cost, full.flop_cost), (0, 1.0, 1.0));
    let routed = trainer.evaluate(&deep, &val, Some(threshold)).unwrap();
    assert!(routed.shallow_ratio > 0.2 && routed.shallow_ratio < 0.8, "{routed:?}");
    assert!((routed.layer_cost - (1.0 - 0.5 * routed.shallow_ratio)).abs() < 1e-9);
    assert!(routed.flop_cost < 1.0);
    let (_, hard_ppl) = evaluate_on_hard_examples(&deep, &hard, Phase2Mode::Sequence).unwrap();
    assert!(hard_ppl.is_finite());
}

#[test]
fn the_threshold_puts_the_target_share_of_tokens_under_it_and_hard_examples_are_exactly_those() {
    let model = shallow_model();
    let data = create_synthetic_data(3, 4, 16, 256, 7);
    for ratio in [0.1f32, 0.25, 0.5, 0.9] {
        let threshold = compute_confidence_threshold(&model, &data, ratio).unwrap();
        let mut confs = Vec::new();
        for b in &data {
            let h = no_grad(|| model.get_hidden_states(&b.x, b.batch).unwrap());
            confs.extend(model.compute_confidence(&h).0);
        }
        let n = confs.len();
        let under = confs.iter().filter(|&&c| c < threshold).count();
        let ties = confs.iter().filter(|&&c| c == threshold).count();
        let want = (ratio as f64 * n as f64).round() as usize;
        assert!(
            under <= want && want <= under + ties,
            "ratio {ratio}: {under} under (+{ties} tied) of {n}, want {want}"
        );

        let hard = collect_hard_examples(&model, &data, threshold).unwrap();
        assert_eq!(hard.len(), under);
        // Each stored hard token is a token below the threshold, with its hidden state and target.
        let (h0, t0) = hard.token(0);
        assert_eq!(h0.len(), model.config.dim);
        assert!(t0 < 256);
        let marked = hard.hard.iter().filter(|&&h| h).count();
        assert_eq!(marked, under);
    }
}

#[test]
fn bad_inputs_are_errors_with_a_message() {
    let model = shallow_model();
    let data = create_synthetic_data(1, 2, 8, 256, 1);
    for bad in [0.0f32, 1.0, -0.2, f32::NAN] {
        let e = compute_confidence_threshold(&model, &data, bad).unwrap_err().to_string();
        assert!(e.contains("ratio must be in (0, 1)"), "{e}");
    }
    let hard = collect_hard_examples(&model, &data, 2.0).unwrap();
    assert!(
        create_hard_example_loader(&hard, 0, 0, Phase2Mode::Token)
            .unwrap_err()
            .to_string()
            .contains("batch size")
    );
    let long = create_synthetic_data(1, 1, 40, 256, 1);
    let mut opt = AdamW::new(model.params(), AdamWConfig::default());
    let e = quiet(1).train_with_early_stopping(&model, &long, &long, &mut opt).unwrap_err().to_string();
    assert!(e.contains("max_seq_len"), "{e}");
    assert!(batches(&[vec![1, 2, 3]], 0, None).unwrap_err().to_string().contains("batch size"));
}

#[test]
fn phase_2_starts_from_phase_1_with_identity_blocks_and_keeps_the_start_if_nothing_beats_it() {
    let (train, val) = corpus_batches(32);
    let model = shallow_model();
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: 3e-3, ..Default::default() });
    quiet(1).train_with_early_stopping(&model, &train, &val, &mut opt).unwrap();
    let threshold = compute_confidence_threshold(&model, &val, 0.5).unwrap();
    let hard = collect_hard_examples(&model, &train, threshold).unwrap();
    let init = lego::model::transformer::ExtendInit::Identity;
    let deep = model.extend_with(4, threshold, true, init, &mut Tensor::rng(4)).unwrap();
    // Epoch 0 is phase 1's model: its routed validation PPL is phase 1's PPL (every token
    // leaves with phase 1's logits, from the exit or from the identity upper layers).
    let phase1 = quiet(1).evaluate(&model, &val, None).unwrap();
    let start: Vec<Vec<f32>> = deep.params().iter().map(|p| p.to_vec()).collect();
    let hard_batches = create_hard_example_loader(&hard, 8, 5, Phase2Mode::Sequence).unwrap();
    // A learning rate of 0: no epoch can beat the start, so early stopping must keep it.
    let mut opt2 = AdamW::new(deep.trainable_params(), AdamWConfig { lr: 0.0, ..Default::default() });
    let h = quiet(2)
        .train_upper_layers_with_early_stopping(
            &deep,
            &hard_batches,
            &val,
            &hard,
            &mut opt2,
            2,
            threshold,
            Phase2Mode::Sequence,
        )
        .unwrap();
    let e0 = &h.epochs[0];
    assert_eq!(e0.epoch, 0);
    assert!(
        (e0.val_ppl_routed - phase1.ppl).abs() <= 1e-9 * phase1.ppl,
        "{} vs {}",
        e0.val_ppl_routed,
        phase1.ppl
    );
    assert_eq!(h.best_epoch, 0);
    let end: Vec<Vec<f32>> = deep.params().iter().map(|p| p.to_vec()).collect();
    assert_eq!(start, end, "the starting weights were not kept");
}
