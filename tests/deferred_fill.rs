//! The deferred upper-cache fill is exact: the upper layers see every position with its true
//! keys and values, as at full depth.

use lego::Tensor;
use lego::data::Batch;
use lego::model::early_exit::{Routes, TimeSplit, Timer, UpperRows};
use lego::model::{Decoder, ExitRule, LegoConfig, LegoTransformer, UpperCacheFill};
use lego::train::Trainer;

fn model(seed: u64) -> LegoTransformer {
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(53, 32, 4, 4, 72, 48) };
    LegoTransformer::new(config, &mut Tensor::rng(seed)).unwrap()
}

fn sequence(n: usize, seed: usize) -> Vec<usize> {
    (0..n).map(|i| (i * i * 7 + i * 13 + seed * 29 + 3) % 53).collect()
}

/// A threshold between two exit confidences of `seqs`' inputs, far from every one (the widest
/// gap among the middle half), so that rounding can route no token differently on the two
/// paths compared.
fn threshold_in_a_gap(m: &LegoTransformer, seqs: &[Vec<usize>]) -> f32 {
    let inputs: Vec<usize> = seqs.iter().flat_map(|s| s[..s.len() - 1].iter().copied()).collect();
    let h = lego::no_grad(|| m.get_hidden_states(&inputs, seqs.len())).unwrap();
    let (mut c, _) = m.compute_confidence(&h);
    c.sort_by(f32::total_cmp);
    let (lo, hi) = (c.len() / 4, 3 * c.len() / 4);
    let i = (lo..hi).max_by(|&a, &b| (c[a + 1] - c[a]).total_cmp(&(c[b + 1] - c[b]))).unwrap();
    0.5 * (c[i] + c[i + 1])
}

#[test]
fn deferred_teacher_forced_ppl_equals_the_fake_early_exit_of_trainer_evaluate() {
    let m = model(1);
    let seqs: Vec<Vec<usize>> = (0..6).map(|s| sequence(33, s)).collect();
    let threshold = threshold_in_a_gap(&m, &seqs);
    let batch = Batch {
        x: seqs.iter().flat_map(|s| s[..32].iter().copied()).collect(),
        y: seqs.iter().flat_map(|s| s[1..].iter().copied()).collect(),
        batch: 6,
        seq: 32,
    };
    let fake = Trainer::default().evaluate(&m, &[batch], Some(threshold)).unwrap();
    let deferred =
        m.evaluate_with_early_exit(&seqs, &ExitRule::new(threshold, UpperCacheFill::Deferred)).unwrap();
    assert!(deferred.shallow_ratio > 0.2 && deferred.shallow_ratio < 0.8, "{deferred:?}");
    assert_eq!(deferred.shallow_count, fake.shallow, "the same tokens exit");
    let rel = (deferred.ppl - fake.ppl).abs() / fake.ppl;
    assert!(rel <= 1e-4, "deferred PPL {} vs fake early exit {}: relative {rel:e}", deferred.ppl, fake.ppl);
    // Skip and Propagate see fewer or other upper states: their PPL differs.
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let other = m.evaluate_with_early_exit(&seqs, &ExitRule::new(threshold, fill)).unwrap();
        assert!((other.ppl - fake.ppl).abs() / fake.ppl > 1e-3, "{fill:?}: {} vs {}", other.ppl, fake.ppl);
    }
}

#[test]
fn the_upper_cache_holds_full_depths_entries_for_every_filled_position() {
    let m = model(2);
    let seqs: Vec<Vec<usize>> = (0..3).map(|s| sequence(40, s + 4)).collect();
    let rule = ExitRule::new(threshold_in_a_gap(&m, &seqs), UpperCacheFill::Deferred);
    // Token by token, routed, with the deferred fill.
    let mut dec = Decoder::new(&m, 3, 3 * 40);
    let mut routes = Routes::with_capacity(3);
    let (mut timer, mut time) = (Timer::new(false), TimeSplit::default());
    let (mut last_deep, mut exited) = ([None; 3], 0);
    for pos in 0..40 {
        let ids: Vec<usize> = seqs.iter().map(|s| s[pos]).collect();
        dec.begin(&[0, 1, 2], &[1, 1, 1], &ids).unwrap();
        dec.routed_step(Some(&rule), UpperRows::Deep, &mut routes, &mut timer, &mut time, |_, _| {}).unwrap();
        for (r, &deep) in routes.deep.iter().enumerate() {
            if deep {
                last_deep[r] = Some(pos);
            } else {
                exited += 1;
            }
        }
    }
    assert!(exited > 20 && exited < 100, "routes should mix: {exited} of 120 exited");
    // Full depth, all at once.
    let mut full = Decoder::new(&m, 3, 3 * 40);
    let flat: Vec<usize> = seqs.iter().flatten().copied().collect();
    full.begin(&[0, 1, 2], &[40, 40, 40], &flat).unwrap();
    full.layers(0..4);
    let (a, b, d) = (dec.cache(), full.cache(), m.config.dim);
    for l in 2..4 {
        let (x, y) = (a.layer(l), b.layer(l));
        for (row, last) in last_deep.iter().enumerate() {
            // Every position up to the row's last deep token is there, and nothing else.
            let want: Vec<usize> = (0..last.map_or(0, |p| p + 1)).collect();
            assert_eq!(x.positions(row), want, "layer {l} row {row}");
            let (at, n) = (row * a.max_seq_len * d, want.len() * d);
            let worst = x.k[at..at + n]
                .iter()
                .chain(&x.v[at..at + n])
                .zip(y.k[at..at + n].iter().chain(&y.v[at..at + n]))
                .map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "layer {l} row {row}: worst relative difference {worst:e}");
        }
    }
}
