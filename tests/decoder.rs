//! The decoder's contracts: it computes what the training graph computes, a row's numbers do
//! not depend on the rows beside it, rollback forgets exactly, runs repeat bit for bit, two
//! models decode at once on two threads, and bad input or non-finite numbers are errors.

use lego::model::{
    Decoder, ExitRule, GenerateOptions, KvCache, LegoConfig, LegoTransformer, Sampling, Tokens,
    UpperCacheFill,
};
use lego::{Error, Tensor, no_grad};

fn config() -> LegoConfig {
    LegoConfig { exit_layer: 2, ..LegoConfig::new(53, 32, 4, 4, 72, 48) }
}

fn model(seed: u64) -> LegoTransformer {
    LegoTransformer::new(config(), &mut Tensor::rng(seed)).unwrap()
}

fn tokens(n: usize, seed: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 11 + seed * 19 + 2) % 53).collect()
}

/// Runs `f` in a rayon pool of `threads` threads.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

fn worst_relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max)
}

/// Every token's logits, for rows fed to one decoder in steps of `pieces` tokens each, its
/// work split over `threads` threads of the decode team.
fn decoder_logits(
    m: &LegoTransformer,
    rows: &[Vec<usize>],
    pieces: &[usize],
    threads: usize,
) -> Vec<Vec<f32>> {
    let batch = rows.len();
    let v = m.config.vocab_size;
    let mut dec = Decoder::new(m, batch, batch * pieces.iter().max().unwrap());
    dec.set_threads(threads);
    let mut out = vec![Vec::new(); batch];
    let all: Vec<usize> = (0..batch).collect();
    let mut start = 0;
    for &n in pieces {
        let ids: Vec<usize> = rows.iter().flat_map(|r| r[start..start + n].iter().copied()).collect();
        dec.begin(&all, &vec![n; batch], &ids).unwrap();
        dec.layers(0..m.layers.len());
        let got = dec.logits(&m.head, Tokens::All).unwrap();
        assert_eq!(got, batch * n);
        for (b, o) in out.iter_mut().enumerate() {
            for t in 0..n {
                o.extend_from_slice(dec.logits_row(b * n + t));
            }
        }
        start += n;
    }
    assert!(out.iter().all(|o| o.len() == start * v));
    out
}

#[test]
fn the_decoder_matches_the_training_graph_whole_and_in_pieces_at_1_and_2_threads() {
    let m = model(1);
    for batch in [1, 8] {
        let rows: Vec<Vec<usize>> = (0..batch).map(|s| tokens(30, s)).collect();
        let flat: Vec<usize> = rows.iter().flatten().copied().collect();
        let full = no_grad(|| m.forward(&flat, batch).unwrap()).to_vec();
        let per_row = full.len() / batch;
        for threads in [1, 2] {
            for pieces in [vec![30], vec![7, 1, 12, 10], [vec![5], vec![1; 25]].concat()] {
                let got = with_threads(threads, || decoder_logits(&m, &rows, &pieces, threads));
                for (b, g) in got.iter().enumerate() {
                    let w = worst_relative(g, &full[b * per_row..(b + 1) * per_row]);
                    assert!(w <= 1e-5, "batch {batch}, {threads} threads, pieces {pieces:?}, row {b}: {w:e}");
                }
            }
        }
    }
}

#[test]
fn a_row_decodes_bit_for_bit_as_it_does_alone_whatever_its_neighbours() {
    let m = model(2);
    let rows: Vec<Vec<usize>> = (0..8).map(|s| tokens(24, s + 3)).collect();
    let pieces = [9, 1, 1, 13];
    let alone: Vec<Vec<f32>> =
        rows.iter().map(|r| decoder_logits(&m, std::slice::from_ref(r), &pieces, 1).remove(0)).collect();
    // In a batch of 8, of 3, and with the rows in another order; on one thread or two.
    for threads in [1, 2] {
        assert_eq!(decoder_logits(&m, &rows, &pieces, threads), alone, "{threads} threads");
        assert_eq!(decoder_logits(&m, &rows[2..5], &pieces, threads), alone[2..5], "{threads} threads");
        let reversed: Vec<Vec<usize>> = rows.iter().rev().cloned().collect();
        let mut got = decoder_logits(&m, &reversed, &pieces, threads);
        got.reverse();
        assert_eq!(got, alone, "{threads} threads, reversed");
    }

    // Ragged: rows bring different numbers of tokens in one step (here 9, 4, 1 and 6).
    let counts = [9, 4, 1, 6];
    let mut dec = Decoder::new(&m, 4, 20);
    dec.set_threads(2);
    let ids: Vec<usize> = (0..4).flat_map(|b| rows[b][..counts[b]].iter().copied()).collect();
    dec.begin(&[0, 1, 2, 3], &counts, &ids).unwrap();
    dec.layers(0..4);
    dec.logits(&m.head, Tokens::All).unwrap();
    let mut i = 0;
    for (b, &n) in counts.iter().enumerate() {
        for t in 0..n {
            assert_eq!(dec.logits_row(i), &alone[b][t * 53..(t + 1) * 53], "ragged row {b}, token {t}");
            i += 1;
        }
    }
}

#[test]
fn generation_of_a_batch_equals_each_row_alone_in_tokens_and_routes() {
    let m = model(3);
    let prompts: Vec<Vec<usize>> = (0..8).map(|s| tokens(6, s + 9)).collect();
    for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
        let options = GenerateOptions::greedy(20).with_exit(ExitRule::new(0.11, fill));
        let (batched, stats) = m.generate_with(&prompts, &options).unwrap();
        assert!(
            stats.shallow_count > 10 && stats.deep_count > 10,
            "{fill:?}: routes {stats:?} are not mixed"
        );
        for (r, p) in prompts.iter().enumerate() {
            let (alone, s) = m.generate_with(std::slice::from_ref(p), &options).unwrap();
            assert_eq!(alone[0], batched[r], "{fill:?}: row {r}'s tokens");
            assert_eq!(s.routes[0], stats.routes[r], "{fill:?}: row {r}'s routes");
            assert_eq!(
                s.confidences[0], stats.confidences[r],
                "{fill:?}: row {r}'s confidences, bit for bit"
            );
        }
    }
}

#[test]
fn rollback_leaves_the_cache_of_a_run_that_never_saw_the_rolled_back_tokens() {
    let m = model(4);
    let seq = tokens(30, 1);
    let rule = ExitRule::new(0.11, UpperCacheFill::Skip);
    // Feeds seq[..n] token by token with early-exit routing (so the upper cache has gaps).
    let run = |dec: &mut Decoder, n: usize| {
        let mut routes = lego::model::early_exit::Routes::with_capacity(1);
        let (mut timer, mut time) = (lego::model::early_exit::Timer::new(false), Default::default());
        for &t in &seq[dec.position(0)..n] {
            dec.begin(&[0], &[1], &[t]).unwrap();
            dec.routed_step(
                Some(&rule),
                lego::model::early_exit::UpperRows::Deep,
                &mut routes,
                &mut timer,
                &mut time,
                |_, _| {},
            )
            .unwrap();
        }
    };
    let mut long = Decoder::new(&m, 1, 1);
    run(&mut long, 30);
    let upper_len = long.cache().upper.len(0);
    assert!(upper_len > 3 && upper_len < 27, "the upper cache should have gaps, holds {upper_len} of 30");
    long.rollback(0, 17).unwrap();
    let mut short = Decoder::new(&m, 1, 1);
    run(&mut short, 17);
    assert_same_cache(long.cache(), short.cache());
    // And decoding on from there gives the same numbers.
    run(&mut long, 30);
    run(&mut short, 30);
    assert_same_cache(long.cache(), short.cache());
    assert!(long.rollback(0, 31).is_err(), "past the row's position");
    assert!(long.rollback(1, 0).is_err(), "outside the batch");
}

/// Two caches hold the same entries (what lies past each row's length is never read).
fn assert_same_cache(a: &KvCache, b: &KvCache) {
    assert_eq!(a.positions, b.positions);
    for (l, (x, y)) in a
        .lower
        .layers
        .iter()
        .chain(&a.upper.layers)
        .zip(b.lower.layers.iter().chain(&b.upper.layers))
        .enumerate()
    {
        assert_eq!(x.len, y.len, "layer {l}: lengths");
        for row in 0..a.batch {
            let (n, at) = (x.len[row], row * a.max_seq_len * a.dim);
            assert_eq!(x.positions(row), y.positions(row), "layer {l} row {row}: positions");
            assert_eq!(x.k[at..at + n * a.dim], y.k[at..at + n * a.dim], "layer {l} row {row}: keys");
            assert_eq!(x.v[at..at + n * a.dim], y.v[at..at + n * a.dim], "layer {l} row {row}: values");
        }
    }
}

#[test]
fn repeated_runs_are_bit_identical_at_a_fixed_thread_count() {
    let m = model(5);
    let prompts: Vec<Vec<usize>> = (0..4).map(|s| tokens(5, s)).collect();
    let sampling = Sampling { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 7 };
    let options = GenerateOptions { sampling, ..GenerateOptions::greedy(25) }
        .with_exit(ExitRule::new(0.03, UpperCacheFill::Propagate));
    for threads in [1, 2] {
        let a = with_threads(threads, || m.generate_with(&prompts, &options).unwrap());
        let b = with_threads(threads, || m.generate_with(&prompts, &options).unwrap());
        assert_eq!(a.0, b.0, "{threads} threads: tokens");
        assert_eq!(a.1.confidences, b.1.confidences, "{threads} threads: confidences");
    }
}

#[test]
fn two_models_decode_at_once_on_two_threads() {
    let (a, b) = (model(6), model(7));
    let prompts: Vec<Vec<usize>> = (0..3).map(|s| tokens(4, s)).collect();
    let want_a = a.generate(&prompts, 30, &Sampling::greedy()).unwrap();
    let want_b = b.generate(&prompts, 30, &Sampling::greedy()).unwrap();
    assert_ne!(want_a, want_b);
    std::thread::scope(|s| {
        let ha = s.spawn(|| {
            (0..5).map(|_| a.generate(&prompts, 30, &Sampling::greedy()).unwrap()).collect::<Vec<_>>()
        });
        let hb = s.spawn(|| {
            (0..5).map(|_| b.generate(&prompts, 30, &Sampling::greedy()).unwrap()).collect::<Vec<_>>()
        });
        assert!(ha.join().unwrap().iter().all(|g| *g == want_a));
        assert!(hb.join().unwrap().iter().all(|g| *g == want_b));
    });
}

#[test]
fn non_finite_numbers_are_errors_not_tokens() {
    let prompts = vec![tokens(4, 0)];
    // A NaN in the deep head's output weights: the logits of full-depth decoding.
    let m = model(8);
    let mut w = m.head.output.weight.to_vec();
    w[5] = f32::NAN;
    m.head.output.weight.set_data(w);
    let e = m.generate(&prompts, 5, &Sampling::greedy()).unwrap_err();
    assert!(matches!(e, Error::NonFinite(_)), "{e}");
    // An infinite weight in a lower layer: every path's logits.
    let m = model(9);
    let mut w = m.layers[0].feed_forward.w2.weight.to_vec();
    w[0] = f32::INFINITY;
    m.layers[0].feed_forward.w2.weight.set_data(w);
    for rule in [ExitRule::new(0.5, UpperCacheFill::Skip), ExitRule::new(2.0, UpperCacheFill::Propagate)] {
        let e = m.generate_with(&prompts, &GenerateOptions::greedy(5).with_exit(rule)).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
        let e = m.evaluate_with_early_exit(&[tokens(6, 1)], &rule).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)), "{e}");
    }
}

#[test]
fn bad_steps_are_errors_that_change_nothing() {
    let m = model(10);
    let mut dec = Decoder::new(&m, 2, 8);
    let msg = |r: lego::Result<()>| r.unwrap_err().to_string();
    assert!(msg(dec.begin(&[0], &[2], &[1, 99])).contains("outside the vocabulary"));
    assert!(msg(dec.begin(&[2], &[1], &[1])).contains("outside the batch"));
    assert!(msg(dec.begin(&[0, 0], &[1, 1], &[1, 2])).contains("twice"));
    assert!(msg(dec.begin(&[0, 1], &[0, 1], &[1])).contains("no token"));
    assert!(msg(dec.begin(&[0], &[2], &[1, 2, 3])).contains("do not add up"));
    assert!(msg(dec.begin(&[0, 1], &[5, 4], &[1; 9])).contains("holds 8"));
    assert_eq!((dec.position(0), dec.position(1)), (0, 0), "a failed step changes nothing");
    // max_seq_len (48): a row with 45 tokens has room for 3 more.
    for _ in 0..9 {
        dec.begin(&[0], &[5], &[1; 5]).unwrap();
        dec.layers(0..4);
    }
    assert!(msg(dec.begin(&[0], &[4], &[1; 4])).contains("max_seq_len"));
    dec.begin(&[0], &[3], &[1; 3]).unwrap();
}
