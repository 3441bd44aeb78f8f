//! The learned exit gate: trained after phase 1 it routes held-out tokens as the spec's
//! max-softmax confidence does, its calibrated threshold gives the requested exit share, a deep
//! token never runs the exit head and an exiting one never runs an upper layer, a batch routes
//! each row as it would alone, and checkpoints keep it (or its absence). The consistency gate,
//! trained after phase 2, learns where the exit and the deep model agree.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use lego::data::{Batch, SyntheticConfig, Tokenizer, batches, generate_corpus, make_sequences};
use lego::model::transformer::ExtendInit;
use lego::model::{
    ExitGate, ExitMeasure, ExitRule, GateKind, GenerateOptions, LegoConfig, LegoTransformer, UpperCacheFill,
};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    ExitGateOptions, ExitGateReport, OneClass, TrainOptions, Trainer, compute_confidence_threshold,
    compute_gate_threshold, gate_agreement, load_training_checkpoint, save_training_checkpoint,
    train_consistency_gate, train_exit_gate, validation_frontier_ppl,
};
use lego::{Error, Tensor};

const SEQ: usize = 32;
/// The share of validation tokens calibrated to go deep (so half of them exit).
const HARD_RATIO: f32 = 0.5;

/// Train, validation and test batches of the structured synthetic corpus, byte-level, each
/// split its own documents.
struct Splits {
    train: Vec<Batch>,
    val: Vec<Batch>,
    test: Vec<Batch>,
}

fn splits() -> Splits {
    let docs = generate_corpus(&SyntheticConfig { documents: 9, bytes_per_document: 3000, seed: 1 });
    let tok = Tokenizer::Byte;
    let cut = |d: &[lego::data::Document]| {
        let ids: Vec<usize> = d.iter().flat_map(|d| tok.encode(&d.text)).collect();
        batches(&make_sequences(&ids, SEQ), 8, Some(0)).unwrap()
    };
    Splits { train: cut(&docs[..5]), val: cut(&docs[5..7]), test: cut(&docs[7..]) }
}

/// A phase-1 model trained briefly, its calibrated max-softmax threshold, and its gate (once
/// for the whole file: the tests below only read it, or clone it).
struct Trained {
    splits: Splits,
    phase1: LegoTransformer,
    threshold: f32,
    report: ExitGateReport,
}

fn trained() -> &'static Trained {
    static TRAINED: OnceLock<Trained> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let splits = splits();
        let config = LegoConfig {
            vocab_size: 256,
            dim: 32,
            num_layers: 2,
            num_heads: 4,
            ffn_hidden: 64,
            max_seq_len: SEQ,
            exit_layer: 2, // a shallow phase-1 model
            ..LegoConfig::t()
        };
        let mut phase1 = LegoTransformer::new(config, &mut Tensor::rng(3)).unwrap();
        let mut opt = AdamW::new(phase1.params(), AdamWConfig { lr: 3e-3, ..Default::default() });
        let trainer = Trainer::new(TrainOptions {
            max_epochs: 2,
            patience: 2,
            warmup_steps: 2,
            ..TrainOptions::default()
        });
        trainer.train_with_early_stopping(&phase1, &splits.train, &splits.val, &mut opt).unwrap();
        let threshold = compute_confidence_threshold(&phase1, &splits.val, HARD_RATIO).unwrap();
        let (gate, report) = train_exit_gate(
            &phase1,
            &splits.train,
            &splits.val,
            threshold,
            HARD_RATIO,
            &ExitGateOptions::default(),
        )
        .unwrap();
        phase1.exit_gate = Some(gate);
        Trained { splits, phase1, threshold, report }
    })
}

/// The phase-1 model extended to 4 layers (random upper layers: routing does not care how
/// well they were trained), keeping its gate.
fn extended() -> LegoTransformer {
    let t = trained();
    let deep = t.phase1.extend(4, t.threshold, true, &mut Tensor::rng(4)).unwrap();
    assert!(deep.exit_gate.is_some(), "extend keeps the gate");
    deep
}

/// Each row of the batches as a sequence of SEQ + 1 tokens (inputs, then the last target).
fn sequences(bs: &[Batch]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for b in bs {
        for r in 0..b.batch {
            let mut s = b.x[r * b.seq..(r + 1) * b.seq].to_vec();
            s.push(b.y[(r + 1) * b.seq - 1]);
            out.push(s);
        }
    }
    out
}

#[test]
fn the_imitation_gate_routes_held_out_tokens_as_the_softmax_does_and_its_threshold_hits_the_exit_share() {
    let t = trained();
    let r = &t.report;
    eprintln!("exit gate: {r:?}");
    assert!(r.train_tokens > 1000 && r.iterations >= 2, "{r:?}");
    // Calibrated on validation: half its tokens exit (to ties).
    assert!((r.validation.gate_exit_share - 0.5).abs() < 0.01, "{r:?}");
    // Held out from both the fit and the calibration: the test split.
    let test = gate_agreement(&t.phase1, &t.splits.test, t.threshold).unwrap();
    eprintln!("exit gate on the test split: {test:?}");
    // The issue asks for 90 %. This gate measures 90.5 % here at a 50 % exit share (91.0 % on
    // the training tokens). A purely linear one (no square weights) measured 88.8 % (89.2 % on
    // the training tokens: the limit was the linear map, not overfitting); least squares on
    // the confidence, its log or its logit, and the norm of h as a feature, did no better.
    assert!(test.agreement >= 0.90, "the gate agrees with the softmax routing on only {test:?}");
    assert!(
        (test.gate_exit_share - (1.0 - HARD_RATIO as f64)).abs() <= 0.02,
        "the calibrated threshold lets {:.2} % of held-out tokens exit, not 50 ± 2 %",
        100.0 * test.gate_exit_share
    );

    // The extended model routes by the same gate through the frozen copy of the exit head's
    // norm: the same decisions.
    let deep = extended();
    assert_eq!(gate_agreement(&deep, &t.splits.test, t.threshold).unwrap(), test);

    // TRUE early exit (teacher-forced, the decoder's numbers) and the fake early exit of
    // Trainer::evaluate route the test tokens as the gate does above.
    let rule = deep.exit_gate.as_ref().unwrap().rule(UpperCacheFill::Skip);
    let true_exit = deep.evaluate_with_early_exit(&sequences(&t.splits.test), &rule).unwrap();
    assert!((true_exit.shallow_ratio - test.gate_exit_share).abs() < 0.005, "{true_exit:?} vs {test:?}");
    let fake = Trainer::default().evaluate_with_rule(&deep, &t.splits.test, Some(&rule)).unwrap();
    assert_eq!(fake.shallow as f64 / fake.tokens as f64, test.gate_exit_share);
    // The FLOP count: no token pays two heads, so the gate costs less than the softmax at the
    // same exit share.
    let softmax = Trainer::default().evaluate(&deep, &t.splits.test, Some(t.threshold)).unwrap();
    let per_shallow = (1.0 - fake.flop_cost) / fake.shallow_ratio;
    let per_shallow_softmax = (1.0 - softmax.flop_cost) / softmax.shallow_ratio;
    assert!(per_shallow > per_shallow_softmax, "{fake:?} vs {softmax:?}");
}

#[test]
fn with_a_gate_a_deep_token_never_runs_the_exit_head_and_an_exiting_one_never_runs_an_upper_layer() {
    let deep = extended();
    let t = trained();
    let prompt = vec![t.splits.test[0].x[..6].to_vec()];
    let (exit, n) = (deep.config.exit_layer, deep.config.num_layers);
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        // A threshold that mixes the routes of this prompt's continuation.
        let options = GenerateOptions::greedy(24).with_exit(ExitRule::gate(0.5, fill));
        deep.reset_layer_calls();
        let (_, stats) = deep.generate_with(&prompt, &options).unwrap();
        assert!(stats.shallow_count >= 3 && stats.deep_count >= 3, "{fill:?}: routes not mixed: {stats:?}");
        let (exit_head_rows, head_rows) = deep.head_rows();
        // Only the tokens that exit run the exit head; only those that go deep the deep head.
        assert_eq!(exit_head_rows, stats.shallow_count, "{fill:?}");
        assert_eq!(head_rows, stats.deep_count, "{fill:?}");
        // The prefill runs every layer once; after it, an upper layer runs once per deep token.
        let first_deep = stats.routes[0][0] as usize;
        for l in 0..exit {
            assert_eq!(deep.layer_calls(l), 1 + 23, "{fill:?}: lower layer {l} runs for every token");
        }
        for l in exit..n {
            assert_eq!(deep.layer_calls(l), 1 + stats.deep_count - first_deep, "{fill:?}: upper layer {l}");
        }
        // The statistics hold the gate's probabilities.
        let gate = deep.exit_gate.as_ref().unwrap();
        assert!(stats.confidences[0].iter().zip(&stats.routes[0]).all(|(&p, &d)| (p < gate.threshold) == d));
        assert!(stats.flop_cost < 1.0, "{stats:?}");
    }
    // The spec's measure, for contrast: every token runs the exit head.
    deep.reset_layer_calls();
    let options = GenerateOptions::greedy(24).with_exit(ExitRule::new(t.threshold, UpperCacheFill::Skip));
    let (_, stats) = deep.generate_with(&prompt, &options).unwrap();
    assert_eq!(deep.head_rows(), (24, stats.deep_count));
}

#[test]
fn with_a_gate_a_batch_decodes_each_row_as_it_would_alone_in_tokens_and_routes() {
    let deep = extended();
    let t = trained();
    let prompts: Vec<Vec<usize>> =
        (0..8).map(|i| t.splits.test[i % 4].x[(i / 4) * SEQ..][..6].to_vec()).collect();
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let options = GenerateOptions::greedy(20).with_exit(ExitRule::gate(0.5, fill));
        let (batched, stats) = deep.generate_with(&prompts, &options).unwrap();
        assert!(
            stats.shallow_count > 10 && stats.deep_count > 10,
            "{fill:?}: routes {stats:?} are not mixed"
        );
        for (r, p) in prompts.iter().enumerate() {
            let (alone, s) = deep.generate_with(std::slice::from_ref(p), &options).unwrap();
            assert_eq!(alone[0], batched[r], "{fill:?}: row {r}'s tokens");
            assert_eq!(s.routes[0], stats.routes[r], "{fill:?}: row {r}'s routes");
            assert_eq!(
                s.confidences[0], stats.confidences[r],
                "{fill:?}: row {r}'s gate scores, bit for bit"
            );
        }
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lego-exit-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn assert_same_gate(a: &LegoTransformer, b: &LegoTransformer) {
    match (&a.exit_gate, &b.exit_gate) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            assert_eq!(x.weight.to_vec(), y.weight.to_vec());
            assert_eq!(x.weight.shape(), &[1, a.config.dim]);
            assert_eq!(x.bias.to_vec(), y.bias.to_vec());
            assert_eq!(x.threshold.to_bits(), y.threshold.to_bits());
            assert!(
                !y.weight.requires_grad_flag() && !y.bias.requires_grad_flag(),
                "a loaded gate is frozen"
            );
        }
        _ => panic!("one model has a gate, the other not"),
    }
}

#[test]
fn checkpoints_with_and_without_a_gate_round_trip() {
    let with = extended();
    let mut without = extended();
    without.exit_gate = None;
    for (name, m) in [("with", &with), ("without", &without)] {
        let path = temp(&format!("{name}.safetensors"));
        m.save(&path, &BTreeMap::new()).unwrap();
        let (back, meta) = LegoTransformer::load(&path).unwrap();
        assert_same_gate(m, &back);
        assert!(!meta.contains_key(ExitGate::THRESHOLD_KEY), "the threshold belongs to the model");
        for ((n1, a), (n2, b)) in m.named_params().iter().zip(back.named_params()) {
            assert_eq!((n1, a.to_vec()), (&n2, b.to_vec()));
        }

        // A training checkpoint too.
        let opt = AdamW::new(m.trainable_params(), AdamWConfig::default());
        let path = temp(&format!("{name}-training.safetensors"));
        save_training_checkpoint(&path, m, &Tokenizer::Byte, &opt, &BTreeMap::new()).unwrap();
        let ckpt = load_training_checkpoint(&path).unwrap();
        assert_same_gate(m, &ckpt.model);
        // Its leftover metadata can be written again as `extra`.
        let opt = ckpt.optimizer.to_optimizer(&ckpt.model).unwrap();
        save_training_checkpoint(&path, &ckpt.model, &Tokenizer::Byte, &opt, &ckpt.metadata).unwrap();
    }

    // A gate's tensors without its threshold, or a threshold without the tensors, is an error.
    let path = temp("with.safetensors");
    let mut st = lego::io::safetensors::load(&path).unwrap();
    st.metadata.remove(ExitGate::THRESHOLD_KEY);
    let entries: Vec<(&str, &[usize], &[f32])> =
        st.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    let bad = temp("no-threshold.safetensors");
    lego::io::safetensors::save(&bad, &entries, &st.metadata).unwrap();
    let e = LegoTransformer::load(&bad).unwrap_err().to_string();
    assert!(e.contains("exit_gate.threshold"), "{e}");
    let extra = BTreeMap::from([(ExitGate::THRESHOLD_KEY.to_string(), "0.5".to_string())]);
    without.save(&bad, &extra).unwrap();
    let e = LegoTransformer::load(&bad).unwrap_err().to_string();
    assert!(e.contains("without the exit gate's tensors"), "{e}");

    // A file written by a linear gate (no square weights, as before the squares) loads with
    // q = 0: the same linear weights, bias and threshold.
    let st = lego::io::safetensors::load(&path).unwrap();
    let entries: Vec<(&str, &[usize], &[f32])> = st
        .tensors
        .iter()
        .filter(|(n, _)| n.as_str() != "exit_gate.square_weight")
        .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice()))
        .collect();
    let linear = temp("linear-gate.safetensors");
    lego::io::safetensors::save(&linear, &entries, &st.metadata).unwrap();
    let (back, _) = LegoTransformer::load(&linear).unwrap();
    let (g, b) = (with.exit_gate.as_ref().unwrap(), back.exit_gate.as_ref().unwrap());
    assert_eq!(
        (g.weight.to_vec(), g.bias.to_vec(), g.threshold),
        (b.weight.to_vec(), b.bias.to_vec(), b.threshold)
    );
    assert!(
        b.square_weight.to_vec().iter().all(|&q| q == 0.0)
            && b.square_weight.shape() == g.square_weight.shape()
    );
    assert!(g.square_weight.to_vec().iter().any(|&q| q != 0.0), "the trained gate uses its squares");
}

#[test]
fn the_gate_measure_without_a_gate_or_with_a_non_finite_score_is_an_error() {
    let mut deep = extended();
    let gate = deep.exit_gate.take().unwrap();
    let prompt = vec![vec![1, 2, 3]];
    let options = GenerateOptions::greedy(4).with_exit(ExitRule::gate(0.5, UpperCacheFill::Skip));
    let e = deep.generate_with(&prompt, &options).unwrap_err().to_string();
    assert!(e.contains("no exit gate"), "{e}");
    let e = deep.evaluate_with_early_exit(&[vec![1, 2, 3]], &ExitRule::gate(0.5, UpperCacheFill::Skip));
    assert!(e.unwrap_err().to_string().contains("no exit gate"));
    assert!("gate".parse::<ExitMeasure>().unwrap() == ExitMeasure::Gate);
    assert!("tree".parse::<ExitMeasure>().unwrap_err().to_string().contains("'softmax' or 'gate'"));

    // A gate of the wrong width.
    deep.exit_gate = Some(ExitGate::linear(vec![0.1; 7], 0.0, 0.5).unwrap());
    let e = deep.generate_with(&prompt, &options).unwrap_err().to_string();
    assert!(e.contains("7 weights"), "{e}");

    // A gate whose weights went bad in memory (ExitGate::new would refuse them): its score is
    // not a number to route on.
    let d = deep.config.dim;
    deep.exit_gate = Some(ExitGate { weight: Tensor::from_vec(vec![f32::NAN; d], &[1, d]), ..gate });
    match deep.generate_with(&prompt, &options) {
        Err(Error::NonFinite(msg)) => assert!(msg.contains("gate"), "{msg}"),
        other => panic!("expected a non-finite gate score error, got {other:?}"),
    }
}

/// For each token of `bs`: whether the exit head's most likely token (on the lower layers'
/// states) equals the whole model's (its ordinary forward pass), computed apart from the gate
/// code; and the exit states.
fn consistency_labels(model: &LegoTransformer, bs: &[Batch]) -> (Vec<bool>, Vec<Vec<f32>>) {
    let argmax = |r: &[f32]| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b });
    let (v, d) = (model.config.vocab_size, model.config.dim);
    let (mut labels, mut states) = (Vec::new(), Vec::new());
    for b in bs {
        let h = lego::no_grad(|| model.get_hidden_states(&b.x, b.batch)).unwrap();
        let exit = lego::no_grad(|| model.exit().forward(&h)).to_vec();
        let deep = lego::no_grad(|| model.forward(&b.x, b.batch)).unwrap().to_vec();
        for ((e, g), s) in exit.chunks(v).zip(deep.chunks(v)).zip(h.to_vec().chunks(d)) {
            labels.push(argmax(e) == argmax(g));
            states.push(s.to_vec());
        }
    }
    (labels, states)
}

#[test]
fn the_consistency_gate_learns_where_the_exit_and_the_deep_model_agree_and_hits_the_exit_share() {
    let t = trained();
    let options = ExitGateOptions::default();
    // A shallow model has no deep model to agree with.
    let e = train_consistency_gate(&t.phase1, &t.splits.train, &t.splits.val, HARD_RATIO, &options);
    assert!(e.unwrap_err().to_string().contains("no deep model"));

    // Upper layers grown as the identity, before any step: the deep model is the exit, the two
    // heads agree on every token, and there is nothing to learn (an outcome, not an error).
    let identity =
        t.phase1.extend_with(4, t.threshold, true, ExtendInit::Identity, &mut Tensor::rng(4)).unwrap();
    let one =
        train_consistency_gate(&identity, &t.splits.train, &t.splits.val, HARD_RATIO, &options).unwrap();
    let tokens = t.splits.train.iter().map(|b| b.batch * b.seq).sum::<usize>();
    assert_eq!(one.unwrap_err(), OneClass { tokens, exits: true });
    // The imitation gate's one-sided labels stay an error: a threshold no token reaches.
    let e =
        train_exit_gate(&t.phase1, &t.splits.train, &t.splits.val, 2.0, HARD_RATIO, &options).unwrap_err();
    assert!(e.to_string().contains("labelled 'go deep'"), "{e}");

    let mut deep = extended();
    let (gate, report) =
        train_consistency_gate(&deep, &t.splits.train, &t.splits.val, HARD_RATIO, &options).unwrap().unwrap();
    eprintln!("consistency gate: {report:?}");
    assert_eq!(gate.kind, GateKind::Consistency);
    // Its labels are the agreement of the two heads, token for token.
    let (train_labels, _) = consistency_labels(&deep, &t.splits.train);
    let share = train_labels.iter().filter(|&&l| l).count() as f64 / train_labels.len() as f64;
    assert_eq!(report.train_tokens, train_labels.len());
    assert!((report.train_exit_labels - share).abs() < 1e-12, "{report:?} vs {share}");
    assert!(share > 0.05 && share < 0.95, "the heads agree on {share}: labels too one-sided for this test");
    // Calibrated on validation: half of its tokens exit; held out (test): 50 ± 2 %.
    assert!((report.validation.gate_exit_share - 0.5).abs() < 0.01, "{report:?}");
    let (test_labels, states) = consistency_labels(&deep, &t.splits.test);
    let norm = &deep.exit().norm;
    let mut normed = vec![0.0; deep.config.dim];
    let exits: Vec<bool> =
        states.iter().map(|h| gate.probability(norm, h, &mut normed) >= gate.threshold).collect();
    let exit_share = exits.iter().filter(|&&e| e).count() as f64 / exits.len() as f64;
    assert!((exit_share - 0.5).abs() <= 0.02, "held-out exit share {exit_share}");
    // It learned something: the held-out tokens it lets exit agree more often than those it
    // sends deep.
    let agree = |want: bool| {
        let (n, k) = exits
            .iter()
            .zip(&test_labels)
            .filter(|(e, _)| **e == want)
            .fold((0, 0), |(n, k), (_, &l)| (n + 1, k + l as usize));
        k as f64 / n as f64
    };
    assert!(agree(true) > agree(false) + 0.05, "exiting {:.3} vs deep {:.3}", agree(true), agree(false));

    // The validation frontier measure: at one ratio, the routed PPL of TRUE early exit at the
    // threshold calibrated there.
    let seqs = sequences(&t.splits.val[..2]);
    let ppl = validation_frontier_ppl(&deep, &gate, &t.splits.val, &seqs, &[0.5]).unwrap();
    deep.exit_gate = Some(gate.clone());
    let threshold = compute_gate_threshold(&deep, &t.splits.val, 0.5).unwrap();
    let rule = ExitRule::gate(threshold, UpperCacheFill::Skip);
    assert_eq!(ppl, deep.evaluate_with_early_exit(&seqs, &rule).unwrap().ppl);
    assert!(validation_frontier_ppl(&deep, &gate, &t.splits.val, &seqs, &[]).is_err());

    // Checkpoints keep the kind; a file without it holds an imitation gate; a bad name is an
    // error naming it.
    let path = temp("consistency.safetensors");
    deep.save(&path, &BTreeMap::new()).unwrap();
    let (back, _) = LegoTransformer::load(&path).unwrap();
    assert_same_gate(&deep, &back);
    assert_eq!(back.exit_gate.as_ref().unwrap().kind, GateKind::Consistency);
    let mut st = lego::io::safetensors::load(&path).unwrap();
    let entries: Vec<(String, Vec<usize>, Vec<f32>)> =
        st.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.data.clone())).collect();
    let entries: Vec<(&str, &[usize], &[f32])> =
        entries.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    st.metadata.remove(ExitGate::KIND_KEY);
    let old = temp("no-kind.safetensors");
    lego::io::safetensors::save(&old, &entries, &st.metadata).unwrap();
    assert_eq!(LegoTransformer::load(&old).unwrap().0.exit_gate.unwrap().kind, GateKind::Imitation);
    st.metadata.insert(ExitGate::KIND_KEY.into(), "oracle".into());
    lego::io::safetensors::save(&old, &entries, &st.metadata).unwrap();
    let e = LegoTransformer::load(&old).unwrap_err().to_string();
    assert!(e.contains("'oracle'") && e.contains("consistency"), "{e}");
}
