//! Self-speculative decoding is lossless: greedy, it returns `generate`'s tokens; sampling, its
//! tokens have the full model's distribution.

use lego::Tensor;
use lego::model::{
    Decoder, GenerateOptions, LegoConfig, LegoTransformer, Sampling, Speculation, Tokens, generate::Sampler,
};

fn model(seed: u64, vocab: usize) -> LegoTransformer {
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(vocab, 32, 4, 4, 72, 64) };
    LegoTransformer::new(config, &mut Tensor::rng(seed)).unwrap()
}

fn tokens(n: usize, seed: usize, vocab: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 13 + seed * 7 + 1) % vocab).collect()
}

#[test]
fn greedy_self_speculation_returns_generates_tokens_for_any_k_and_threshold() {
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..4 {
        let m = model(seed, 53);
        let prompts: Vec<Vec<usize>> =
            [5, 1, 9, 3].iter().enumerate().map(|(s, &n)| tokens(n, s + seed as usize, 53)).collect();
        let want = m.generate(&prompts, 30, &Sampling::greedy()).unwrap();
        // Stop at row 2's 12th new token, so rows also end early.
        let stop = [want[2][9 + 11]];
        let (want_stopped, _) =
            m.generate_with(&prompts, &GenerateOptions::greedy(30).with_stop_tokens(&stop)).unwrap();
        for k in [1, 2, 3, 5, 8] {
            // Threshold 0: always draft k; above 1: never draft (every round is one plain step).
            let specs = [
                Speculation::fixed(k),
                Speculation::adaptive(k, 0.0),
                Speculation::adaptive(k, 0.05),
                Speculation::adaptive(k, 1.5),
            ];
            for spec in specs {
                let options = GenerateOptions::greedy(30).with_speculation(spec);
                let (got, stats) = m.generate_with(&prompts, &options).unwrap();
                assert_eq!(got, want, "model {seed}, {spec:?}");
                let s = &stats.speculation;
                assert_eq!(stats.shallow_count, s.accepted, "{spec:?}");
                assert_eq!(stats.shallow_count + stats.deep_count, 4 * 30, "{spec:?}");
                // The draft's counts (the bench's cost model reads them): every position fed
                // through the lower layers is checked; a row feeds one more than it drafts each
                // round; every draft came from an exit-head row (fixed k: one draft each).
                assert_eq!(s.draft_positions, s.checked, "{spec:?}");
                let (lo, hi) = (s.drafted + s.rounds, s.drafted + prompts.len() * s.rounds);
                assert!((lo..=hi).contains(&s.draft_positions), "{spec:?}: {s:?}");
                assert!(s.draft_steps >= s.rounds && s.draft_steps <= s.draft_positions, "{spec:?}: {s:?}");
                assert!(
                    s.exit_head_rows >= s.drafted && s.exit_head_steps <= s.draft_steps,
                    "{spec:?}: {s:?}"
                );
                if spec.stop_below.is_none() {
                    assert_eq!(s.exit_head_rows, s.drafted, "{spec:?}");
                }
                if spec.stop_below == Some(1.5) {
                    assert_eq!(s.drafted, 0, "{spec:?}: a threshold above 1 never drafts");
                }
                if spec.stop_below.is_none_or(|t| t == 0.0) {
                    assert!(s.drafted > 0);
                }
                drafted += s.drafted;
                accepted += s.accepted;
                let (got, _) = m.generate_with(&prompts, &options.with_stop_tokens(&stop)).unwrap();
                assert_eq!(got, want_stopped, "model {seed}, {spec:?}, with a stop token");
            }
        }
    }
    // Both paths were taken: drafts kept and drafts rejected.
    assert!(accepted > 50 && accepted < drafted, "accepted {accepted} of {drafted}");
}

#[test]
fn sampled_rows_in_a_batch_equal_each_row_alone() {
    let m = model(7, 53);
    let prompts: Vec<Vec<usize>> = [4, 2, 7].iter().enumerate().map(|(s, &n)| tokens(n, s, 53)).collect();
    let sampling = Sampling { temperature: 0.8, top_k: 20, top_p: 0.95, seed: 9 };
    let options =
        GenerateOptions { sampling, ..GenerateOptions::greedy(25) }.with_speculation(Speculation::fixed(3));
    let (batched, stats) = m.generate_with(&prompts, &options).unwrap();
    assert!(stats.speculation.accepted > 0);
    for (r, p) in prompts.iter().enumerate() {
        let alone =
            GenerateOptions { sampling: Sampling { seed: 9 + r as u64, ..sampling }, ..options.clone() };
        let (got, s) = m.generate_with(std::slice::from_ref(p), &alone).unwrap();
        assert_eq!(got[0], batched[r], "row {r}");
        assert_eq!(s.routes[0], stats.routes[r], "row {r}");
    }
}

/// The sampling distribution of the next token after `ids`, by the full model (`exit`: by the
/// lower layers and the exit head), as a sampler with `sampling` draws it.
fn next_distribution(m: &LegoTransformer, ids: &[usize], sampling: Sampling, exit: bool) -> Vec<f32> {
    let v = m.config.vocab_size;
    let mut dec = Decoder::new(m, 1, ids.len());
    dec.begin(&[0], &[ids.len()], ids).unwrap();
    if exit {
        dec.layers(0..m.config.exit_layer);
        dec.logits(m.exit(), Tokens::LastOfEach).unwrap();
    } else {
        dec.layers(0..m.layers.len());
        dec.logits(&m.head, Tokens::LastOfEach).unwrap();
    }
    let mut p = vec![0.0; v];
    Sampler::new(sampling, v).distribution(dec.logits_row(0), &mut p);
    p
}

/// The speculative-sampling rule keeps the full model's distribution. On a 3-token vocabulary,
/// the joint distribution of 3 new tokens (27 outcomes) is computed exactly from the full
/// model, and compared with 20,000 seeded self-speculative draws (k = 2: the second token is a
/// draft, accepted, or rejected and drawn from the residual; the third a bonus or a plain step).
///
/// Tolerance: the expected total-variation distance of an empirical distribution of N draws
/// over K outcomes is at most ½·Σ√(p_i/N) ≤ ½·√(K/N) = 0.018; one draw moves it by at most 1/N,
/// so (McDiarmid) it exceeds its mean by t with probability at most exp(−2Nt²): for t = 0.022,
/// e^-19. A tolerance of 0.04 can fail by chance about never; and the test has the power to
/// see a wrong rule: drawing the second token from the draft's distribution instead is
/// checked to be more than 0.1 away.
#[test]
fn speculative_sampling_has_the_full_models_distribution() {
    let v = 3;
    let mut m = model(11, v);
    // An exit head of its own (another random model's), and both heads sharpened (a random
    // model's next-token distributions are nearly uniform), so that the draft's q and the full
    // model's p differ clearly.
    m.exit_head = Some(model(12, v).head);
    for head in [&m.head, m.exit()] {
        let w: Vec<f32> = head.output.weight.to_vec().iter().map(|x| x * 4.0).collect();
        head.output.weight.set_data(w);
    }
    let prompt = vec![0, 2, 1];
    for sampling in [
        Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 },
        Sampling { temperature: 0.7, top_k: 2, top_p: 1.0, seed: 0 },
    ] {
        // Exact: P(a, b, c) = p(a | prompt) p(b | prompt a) p(c | prompt a b); and the wrong
        // rule's, with q in place of p for the second token.
        let (mut exact, mut wrong) = (vec![0.0f64; 27], vec![0.0f64; 27]);
        let p1 = next_distribution(&m, &prompt, sampling, false);
        for a in 0..v {
            let ids_a = [&prompt[..], &[a]].concat();
            let (p2, q2) = (
                next_distribution(&m, &ids_a, sampling, false),
                next_distribution(&m, &ids_a, sampling, true),
            );
            for b in 0..v {
                let ids_b = [&ids_a[..], &[b]].concat();
                let p3 = next_distribution(&m, &ids_b, sampling, false);
                for c in 0..v {
                    exact[a * 9 + b * 3 + c] = (p1[a] * p2[b] * p3[c]) as f64;
                    wrong[a * 9 + b * 3 + c] = (p1[a] * q2[b] * p3[c]) as f64;
                }
            }
        }
        let tv = |x: &[f64], y: &[f64]| 0.5 * x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum::<f64>();
        assert!(
            tv(&exact, &wrong) > 0.1,
            "{sampling:?}: the test cannot tell a wrong rule: {}",
            tv(&exact, &wrong)
        );

        let (n, chunk) = (20_000, 5_000);
        let mut counts = vec![0usize; 27];
        let (mut drafted, mut accepted) = (0, 0);
        for c in 0..n / chunk {
            let seeded = Sampling { seed: (c * chunk) as u64, ..sampling };
            let options = GenerateOptions { sampling: seeded, ..GenerateOptions::greedy(3) }
                .with_speculation(Speculation::fixed(2));
            let (out, stats) = m.generate_with(&vec![prompt.clone(); chunk], &options).unwrap();
            for o in out {
                counts[o[3] * 9 + o[4] * 3 + o[5]] += 1;
            }
            drafted += stats.speculation.drafted;
            accepted += stats.speculation.accepted;
        }
        let empirical: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
        let d = tv(&empirical, &exact);
        assert!(d < 0.04, "{sampling:?}: total variation {d} (wrong rule: {})", tv(&exact, &wrong));
        assert!(accepted > 100 && accepted < drafted, "{sampling:?}: accepted {accepted} of {drafted}");
    }
}

#[test]
fn bad_speculation_settings_are_errors() {
    let m = model(1, 53);
    let e = |spec: Speculation| {
        m.generate_with(&[vec![1, 2]], &GenerateOptions::greedy(4).with_speculation(spec))
            .unwrap_err()
            .to_string()
    };
    assert!(e(Speculation::fixed(0)).contains("k = 0"));
    assert!(e(Speculation::adaptive(0, 0.5)).contains("k = 0"));
    assert!(e(Speculation::adaptive(2, f32::NAN)).contains("threshold"));
    assert!(e(Speculation::adaptive(2, -0.5)).contains("threshold"));
}

#[test]
fn a_profiled_speculative_run_splits_its_time_and_an_unprofiled_one_reads_no_clock() {
    let m = model(7, 53);
    let prompts = vec![tokens(6, 1, 53), tokens(3, 2, 53)];
    let options = GenerateOptions { profile: true, ..GenerateOptions::greedy(20) }
        .with_speculation(Speculation::fixed(3));
    let (out, stats) = m.generate_with(&prompts, &options).unwrap();
    let t = stats.time;
    assert!(stats.speculation.rounds > 0);
    for (name, v) in [
        ("prefill", t.prefill),
        ("lower", t.lower),
        ("exit_check", t.exit_check),
        ("upper", t.upper),
        ("head", t.head),
    ] {
        assert!(v > 0.0, "{name} took no time: {t:?}");
    }
    assert!(t.prefill + t.lower + t.exit_check + t.upper + t.head + t.sampling <= stats.seconds);
    let (quiet_out, quiet) =
        m.generate_with(&prompts, &GenerateOptions { profile: false, ..options }).unwrap();
    assert_eq!(quiet.time, Default::default());
    assert_eq!(quiet_out, out);
}
