//! TRUE early exit: the invariants of `generate_with_early_exit`.

use lego::Tensor;
use lego::model::{ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling, UpperCacheFill};

/// A 4-layer model, exit at 2, with weights large enough that confidences spread out.
fn model(vocab: usize, scale: f32, seed: u64) -> LegoTransformer {
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(vocab, 32, 4, 4, 64, 64) };
    let m = LegoTransformer::new(config, &mut Tensor::rng(seed)).unwrap();
    for p in m.params() {
        let v: Vec<f32> = p.to_vec().iter().map(|x| x * scale).collect();
        p.set_data(v);
    }
    m
}

fn prompts(n: usize, len: usize, vocab: usize) -> Vec<Vec<usize>> {
    (0..n).map(|r| (0..len).map(|i| (i * 11 + r * 29 + 5) % vocab).collect()).collect()
}

#[test]
fn a_threshold_above_one_never_exits_and_equals_generate() {
    let m = model(50, 3.0, 1);
    let p = prompts(3, 6, 50);
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let (tokens, stats) = m.generate_with_early_exit(&p, 20, 1.5, &Sampling::greedy(), fill).unwrap();
        assert_eq!(tokens, m.generate(&p, 20, &Sampling::greedy()).unwrap());
        assert_eq!((stats.deep_count, stats.shallow_count), (60, 0));
        assert_eq!(stats.actual_compute_cost, 1.0);
    }
}

#[test]
fn threshold_zero_always_exits_and_never_runs_an_upper_layer_after_the_prompt() {
    let m = model(50, 3.0, 2);
    let p = prompts(2, 5, 50);
    m.reset_layer_calls();
    let (tokens, stats) =
        m.generate_with_early_exit(&p, 16, 0.0, &Sampling::greedy(), UpperCacheFill::Skip).unwrap();
    assert_eq!((stats.shallow_count, stats.deep_count), (32, 0));
    assert_eq!(stats.actual_compute_cost, 0.5);
    // The upper layers ran once, for the prompt; the lower ones once per step.
    assert_eq!((m.layer_calls(2), m.layer_calls(3)), (1, 1));
    assert_eq!(m.layer_calls(0), 16);
    // And the tokens are those of the shallow model: the first two layers and the exit head.
    let shallow = LegoTransformer::from_parts(
        LegoConfig { num_layers: 2, ..m.config.clone() },
        m.tok_embeddings.clone(),
        m.layers[..2].to_vec(),
        m.exit().clone(),
        None,
    );
    assert_eq!(tokens, shallow.generate(&p, 16, &Sampling::greedy()).unwrap());
}

#[test]
fn each_row_of_a_batch_routes_and_decodes_as_it_would_alone() {
    let m = model(40, 3.0, 3);
    let p = prompts(6, 7, 40);
    // A threshold near the middle of the confidences, so rows really differ.
    let (_, probe) =
        m.generate_with_early_exit(&p, 12, 2.0, &Sampling::greedy(), UpperCacheFill::Skip).unwrap();
    let mut all: Vec<f32> = probe.confidences.iter().flatten().copied().collect();
    all.sort_by(f32::total_cmp);
    let threshold = all[all.len() / 2];
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let (batch_tokens, batch_stats) =
            m.generate_with_early_exit(&p, 12, threshold, &Sampling::greedy(), fill).unwrap();
        let mixed = batch_stats.routes.iter().any(|r| r.iter().any(|&d| d))
            && batch_stats.routes.iter().any(|r| r.iter().any(|&d| !d));
        assert!(mixed, "the test needs rows that go both ways");
        let mut skipped = 0;
        for (r, prompt) in p.iter().enumerate() {
            let (alone_tokens, alone_stats) = m
                .generate_with_early_exit(
                    std::slice::from_ref(prompt),
                    12,
                    threshold,
                    &Sampling::greedy(),
                    fill,
                )
                .unwrap();
            // A confidence within 1e-5 of the threshold may route either way by rounding.
            if alone_stats.confidences[0].iter().any(|c| (c - threshold).abs() < 1e-5)
                && alone_stats.routes[0] != batch_stats.routes[r]
            {
                skipped += 1;
                continue;
            }
            assert_eq!(
                alone_stats.routes[0], batch_stats.routes[r],
                "{fill:?}: row {r} routes differently in the batch"
            );
            assert_eq!(
                alone_tokens[0], batch_tokens[r],
                "{fill:?}: row {r} decodes differently in the batch"
            );
        }
        eprintln!(
            "{fill:?}: skipped {skipped} of {} rows (confidence within 1e-5 of the threshold)",
            p.len()
        );
        assert!(skipped < p.len() / 2);
    }
}

#[test]
fn an_untrained_model_exits_at_a_low_threshold_and_not_at_a_high_one() {
    // Spec lesson 1: the prototype's initialisation, vocabulary 100.
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(100, 64, 4, 4, 172, 64) };
    let m = LegoTransformer::new(config, &mut Tensor::rng(4)).unwrap();
    let p = prompts(2, 4, 100);
    let (_, low) =
        m.generate_with_early_exit(&p, 16, 0.02, &Sampling::greedy(), UpperCacheFill::Skip).unwrap();
    let (_, high) =
        m.generate_with_early_exit(&p, 16, 0.5, &Sampling::greedy(), UpperCacheFill::Skip).unwrap();
    assert!(low.shallow_count > 0, "no token exited at 0.02");
    assert_eq!(high.shallow_count, 0, "a token exited at 0.5");
}

#[test]
fn propagate_pays_for_its_fill_and_still_saves_flops() {
    let m = model(50, 3.0, 5);
    let p = prompts(1, 5, 50);
    let rule = ExitRule::new(0.0, UpperCacheFill::Propagate);
    let profiled = GenerateOptions { profile: true, ..GenerateOptions::greedy(10) }.with_exit(rule);
    let (_, stats) = m.generate_with(&p, &profiled).unwrap();
    assert_eq!(stats.shallow_count, 10);
    assert!(stats.flop_cost > 0.0 && stats.flop_cost < 1.0);
    assert!(stats.time.upper_fill > 0.0);
    // Without `profile` the clock is never read: every phase time is 0, the result the same.
    let (_, quiet) = m.generate_with(&p, &GenerateOptions { profile: false, ..profiled }).unwrap();
    assert_eq!(quiet.time, Default::default());
    assert_eq!((quiet.routes, quiet.flop_cost), (stats.routes, stats.flop_cost));
}

#[test]
fn bad_inputs_are_errors() {
    let m = model(50, 1.0, 6);
    let p = prompts(1, 5, 50);
    let g = |t: f32| {
        m.generate_with_early_exit(&p, 4, t, &Sampling::greedy(), UpperCacheFill::Skip)
            .unwrap_err()
            .to_string()
    };
    assert!(g(f32::NAN).contains("routing threshold"));
    assert!(g(-0.5).contains("routing threshold"));
    assert!(
        m.generate_with_early_exit(&[vec![]], 4, 0.5, &Sampling::greedy(), UpperCacheFill::Skip).is_err()
    );
    assert!(m.generate_with_early_exit(&p, 60, 0.5, &Sampling::greedy(), UpperCacheFill::Skip).is_err());
    assert!("sideways".parse::<UpperCacheFill>().is_err());
}

#[test]
fn the_skip_fill_is_the_upper_layers_attending_only_to_the_deep_tokens() {
    // What phase 2's sequence-skip mode trains on: one batched pass of the upper layers whose
    // attention sees only the tokens that go deep (and each token itself) gives the logits of
    // teacher-forced TRUE early exit with the Skip fill, token by token through the decoder.
    let m = model(50, 2.0, 7);
    let seqs = prompts(3, 12, 50);
    let flat: Vec<usize> = seqs.iter().flat_map(|s| s[..11].iter().copied()).collect();
    let targets: Vec<usize> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
    let h = lego::no_grad(|| m.get_hidden_states(&flat, 3).unwrap());
    let (confidence, exit_logits) = m.compute_confidence(&h);
    let mut sorted = confidence.clone();
    sorted.sort_by(f32::total_cmp);
    // About half the tokens exit; the threshold halfway between two confidences, so that the
    // decoder's own (equal up to rounding) confidences route every token the same way.
    let threshold = 0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]);
    let deep: std::sync::Arc<[bool]> = confidence.iter().map(|&c| c < threshold).collect();
    let routed = deep.iter().filter(|&&d| d).count();
    assert!(routed > 5 && routed < 28, "{routed} of 33 deep: too one-sided for this test");
    let deep_logits = lego::no_grad(|| m.forward_upper_layers_masked(&h, 2, Some(&deep))).to_vec();
    let (ex, v) = (exit_logits.to_vec(), 50);
    let mut loss = 0.0f64;
    for (t, &y) in targets.iter().enumerate() {
        let row = if deep[t] { &deep_logits[t * v..(t + 1) * v] } else { &ex[t * v..(t + 1) * v] };
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f32>().ln();
        loss += (lse - row[y]) as f64;
    }
    loss /= targets.len() as f64;
    let skip = m.evaluate_with_early_exit(&seqs, &ExitRule::new(threshold, UpperCacheFill::Skip)).unwrap();
    assert_eq!(skip.shallow_count, 33 - routed);
    assert!((skip.loss - loss).abs() < 1e-5, "decoder {} vs masked pass {loss}", skip.loss);
    // Without the mask the deep tokens would also see the ones that exited: another loss.
    let unmasked = lego::no_grad(|| m.forward_upper_layers(&h, 2)).to_vec();
    assert_ne!(unmasked, deep_logits);
}

#[test]
fn teacher_forced_early_exit_at_full_depth_equals_the_forward_and_at_zero_the_exit_head() {
    let m = model(50, 2.0, 7);
    let seqs = prompts(3, 12, 50);
    let flat: Vec<usize> = seqs.iter().flat_map(|s| s[..11].iter().copied()).collect();
    let targets: Vec<usize> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
    let want = lego::no_grad(|| m.forward(&flat, 3).unwrap().cross_entropy(&targets, None).item()) as f64;
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let deep = m.evaluate_with_early_exit(&seqs, &ExitRule::new(1.5, fill)).unwrap();
        assert_eq!((deep.tokens, deep.shallow_count), (33, 0));
        assert!((deep.loss - want).abs() < 1e-4, "{} vs {want}", deep.loss);
    }
    // Threshold 0: every token exits; the loss is the shallow model's.
    let h = lego::no_grad(|| m.get_hidden_states(&flat, 3).unwrap());
    let (_, exit_logits) = m.compute_confidence(&h);
    let want = exit_logits.cross_entropy(&targets, None).item() as f64;
    let shallow = m.evaluate_with_early_exit(&seqs, &ExitRule::new(0.0, UpperCacheFill::Skip)).unwrap();
    assert_eq!(shallow.shallow_count, 33);
    assert!((shallow.loss - want).abs() < 1e-4, "{} vs {want}", shallow.loss);
}

#[test]
fn teacher_forcing_takes_windows_of_max_seq_len_plus_one_and_checks_targets() {
    let m = model(50, 1.0, 8);
    let max = m.config.max_seq_len;
    let seq: Vec<usize> = (0..max + 1).map(|i| i % 50).collect();
    assert_eq!(
        m.evaluate_with_early_exit(std::slice::from_ref(&seq), &ExitRule::new(0.5, UpperCacheFill::Skip))
            .unwrap()
            .tokens,
        max
    );
    let mut too_long = seq.clone();
    too_long.push(1);
    assert!(m.evaluate_with_early_exit(&[too_long], &ExitRule::new(0.5, UpperCacheFill::Skip)).is_err());
    let mut bad_target = seq;
    *bad_target.last_mut().unwrap() = 50;
    let e = m
        .evaluate_with_early_exit(&[bad_target], &ExitRule::new(0.5, UpperCacheFill::Skip))
        .unwrap_err()
        .to_string();
    assert!(e.contains("target token id 50"), "{e}");
}
