//! Generation as a user calls it: ragged batches, stop tokens, streaming.

use lego::Tensor;
use lego::data::{TextStream, Tokenizer};
use lego::model::{
    ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling, TokenEvent, UpperCacheFill,
};

fn model(seed: u64) -> LegoTransformer {
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(53, 32, 4, 4, 72, 64) };
    LegoTransformer::new(config, &mut Tensor::rng(seed)).unwrap()
}

fn tokens(n: usize, seed: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 13 + seed * 7 + 1) % 53).collect()
}

/// Every mode a test runs through: full depth and both early-exit fills, greedy and sampled.
fn modes(new: usize) -> Vec<GenerateOptions> {
    let sampled = Sampling { temperature: 0.9, top_k: 12, top_p: 0.95, seed: 11 };
    let mut out = Vec::new();
    for sampling in [Sampling::greedy(), sampled] {
        let base = GenerateOptions { sampling, ..GenerateOptions::greedy(new) };
        out.push(base.clone());
        for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate, UpperCacheFill::Deferred] {
            out.push(base.clone().with_exit(ExitRule::new(0.09, fill)));
        }
    }
    out
}

#[test]
fn ragged_rows_equal_each_row_alone_bit_for_bit() {
    let m = model(1);
    let prompts: Vec<Vec<usize>> = [3, 11, 1, 7, 20].iter().enumerate().map(|(s, &n)| tokens(n, s)).collect();
    for options in modes(17) {
        let (batched, stats) = m.generate_with(&prompts, &options).unwrap();
        if options.exit_rule().is_some() {
            assert!(
                stats.shallow_count > 5 && stats.deep_count > 5,
                "{options:?}: routes not mixed: {stats:?}"
            );
        }
        for (r, p) in prompts.iter().enumerate() {
            // Row r alone: with its sampler's seed (seed + row) given to it directly.
            let seed = options.sampling.seed + r as u64;
            let alone_options =
                GenerateOptions { sampling: Sampling { seed, ..options.sampling }, ..options.clone() };
            let (alone, s) = m.generate_with(std::slice::from_ref(p), &alone_options).unwrap();
            assert_eq!(batched[r], alone[0], "{options:?}: row {r}'s tokens");
            assert_eq!(batched[r].len(), p.len() + 17);
            assert_eq!(stats.routes[r], s.routes[0], "{options:?}: row {r}'s routes");
            let bits = |c: &[f32]| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&stats.confidences[r]), bits(&s.confidences[0]), "{options:?}: row {r}");
        }
    }
}

#[test]
fn a_ragged_batch_checks_its_prompts() {
    let m = model(2);
    let err = |p: &[Vec<usize>]| m.generate(p, 4, &Sampling::greedy()).unwrap_err().to_string();
    assert!(err(&[tokens(3, 0), vec![], tokens(2, 0)]).contains("empty prompt (row 1 of 3)"));
    assert!(err(&[tokens(3, 0), vec![1, 60]]).contains("token id 60 (prompt 1, position 1)"));
    // The longest prompt decides whether max_seq_len (64) is reached.
    assert!(err(&[tokens(3, 0), tokens(61, 0)]).contains("exceeds max_seq_len"));
    assert!(m.generate(&[tokens(3, 0), tokens(60, 0)], 4, &Sampling::greedy()).is_ok());
}

#[test]
fn a_stop_token_ends_its_row_while_the_others_go_on() {
    let m = model(3);
    let prompts: Vec<Vec<usize>> = [4, 9, 2].iter().enumerate().map(|(s, &n)| tokens(n, s + 5)).collect();
    for options in modes(30) {
        let (free, _) = m.generate_with(&prompts, &options).unwrap();
        // Stop at row 1's 8th new token: row 1 ends there (or earlier, where that id first
        // appears); each other row ends at its first occurrence, or runs to the end.
        let stop = free[1][prompts[1].len() + 7];
        let (got, stats) = m.generate_with(&prompts, &options.clone().with_stop_tokens(&[stop])).unwrap();
        for (r, p) in prompts.iter().enumerate() {
            let new = &free[r][p.len()..];
            let want = match new.iter().position(|&t| t == stop) {
                Some(i) => &free[r][..p.len() + i + 1],
                None => &free[r][..],
            };
            assert_eq!(got[r], want, "{options:?}: row {r}");
            assert_eq!(stats.stopped[r], want.len() < free[r].len() || new.last() == Some(&stop));
            assert_eq!(stats.routes[r].len(), want.len() - p.len(), "{options:?}: row {r}'s routes");
        }
        assert!(stats.stopped[1], "{options:?}: row 1 met its stop token");
        assert!(got[1].len() <= prompts[1].len() + 8);
    }
    // Several stop ids; and an id outside the vocabulary is an error naming it.
    let options = GenerateOptions::greedy(5).with_stop_tokens(&[3, 53]);
    let e = m.generate_with(&prompts, &options).unwrap_err().to_string();
    assert!(e.contains("stop token id 53 (stop_tokens[1])"), "{e}");
}

#[test]
fn streaming_yields_exactly_the_returned_tokens_in_order() {
    let m = model(4);
    let prompts: Vec<Vec<usize>> = [6, 1, 12].iter().enumerate().map(|(s, &n)| tokens(n, s + 2)).collect();
    for options in modes(25) {
        let (free, _) = m.generate_with(&prompts, &options).unwrap();
        let options = options.with_stop_tokens(&[free[0][6 + 9]]);
        let mut events: Vec<TokenEvent> = Vec::new();
        let (out, stats) = m.generate_streaming(&prompts, &options, |e| events.push(e)).unwrap();
        assert_eq!((out.clone(), stats.clone()), {
            let (o, mut s) = m.generate_with(&prompts, &options).unwrap();
            s.seconds = stats.seconds;
            (o, s)
        });
        for (r, p) in prompts.iter().enumerate() {
            let mine: Vec<&TokenEvent> = events.iter().filter(|e| e.row == r).collect();
            let ids: Vec<usize> = mine.iter().map(|e| e.token).collect();
            assert_eq!(ids, out[r][p.len()..], "{options:?}: row {r}'s tokens");
            let exited: Vec<bool> = mine.iter().map(|e| e.exited).collect();
            let want: Vec<bool> = stats.routes[r].iter().map(|deep| !deep).collect();
            assert_eq!(exited, want, "{options:?}: row {r}'s exits");
        }
    }
}

#[test]
fn a_byte_model_streams_whole_characters() {
    let config = LegoConfig { exit_layer: 1, ..LegoConfig::new(256, 32, 2, 4, 72, 96) };
    let m = LegoTransformer::new(config, &mut Tensor::rng(5)).unwrap();
    let tok = Tokenizer::Byte;
    let prompts: Vec<Vec<usize>> = ["né", "世界 "].iter().map(|t| tok.encode(t)).collect();
    let options = GenerateOptions {
        sampling: Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 },
        ..GenerateOptions::greedy(80)
    };
    let mut streams = [TextStream::new(&tok), TextStream::new(&tok)];
    let mut text = [String::new(), String::new()];
    let (out, _) = m
        .generate_streaming(&prompts, &options, |e| {
            text[e.row].push_str(streams[e.row].push(e.token).unwrap())
        })
        .unwrap();
    for r in 0..2 {
        text[r].push_str(streams[r].finish());
        let bytes: Vec<u8> = out[r][prompts[r].len()..].iter().map(|&b| b as u8).collect();
        assert_eq!(text[r], String::from_utf8_lossy(&bytes), "row {r}");
    }
}
