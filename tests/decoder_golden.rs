//! The decoder held to a golden record of the decoder it replaced.
//!
//! `tests/fixtures/decoder/` holds a small model (`model.safetensors`) and what the graph-free
//! decoder of commit `152dce3` (the one before the single `Decoder`) computed with it
//! (`golden.safetensors`): logits of prompts fed whole and in pieces at batch 1 and 8, logits of
//! tokens decoded one at a time after a prompt, greedy `generate` tokens, and the tokens and
//! routes of `generate_with_early_exit` in both upper-cache fills. The record was written once,
//! by `LEGO_WRITE_GOLDEN=1 cargo test --release --test decoder_golden -- --ignored` on that
//! commit; rewriting it with a later decoder would prove nothing.
//!
//! **Tolerance.** Logits: `|got − want| <= 1e-5·(1 + |want|)`. The old decoder sent a product
//! of more than 16 token rows to `sgemm` and fewer to the streaming kernel; the new one uses the
//! streaming kernel for every row count (so a row's numbers never depend on its batch), which
//! changes the order of the f32 sums for the batch-8 prefills: about 1e-6 relative, measured
//! in the failure message if it ever grows. Tokens and routes must be equal: the early-exit
//! threshold sits halfway between two recorded confidences, far (relative to 1e-6) from every
//! one, and the greedy argmaxes have no near-ties in this record.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lego::Tensor;
use lego::io::safetensors;
use lego::model::{KvCache, LegoConfig, LegoTransformer, Sampling, UpperCacheFill};

fn fixture(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", "decoder", name].iter().collect()
}

/// A prompt of `n` tokens, different for each `seed`.
fn prompt(n: usize, seed: usize, vocab: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 17 + seed * 29 + 5) % vocab).collect()
}

/// Logits of `ids` (`batch` rows of equal length) fed to a fresh cache in pieces of the given
/// lengths, concatenated per row: `[batch, Σ pieces, V]` flattened.
fn logits_in_pieces(m: &LegoTransformer, rows: &[Vec<usize>], pieces: &[usize]) -> Vec<f32> {
    let (batch, v) = (rows.len(), m.config.vocab_size);
    let total: usize = pieces.iter().sum();
    let mut cache = KvCache::new(&m.config, batch);
    let mut out = vec![0.0f32; batch * total * v];
    let mut start = 0;
    for &len in pieces {
        let ids: Vec<usize> = rows.iter().flat_map(|r| r[start..start + len].iter().copied()).collect();
        let got = m.forward_with_cache(&ids, batch, &mut cache, true).unwrap().to_vec();
        for b in 0..batch {
            let dst = (b * total + start) * v;
            out[dst..dst + len * v].copy_from_slice(&got[b * len * v..(b + 1) * len * v]);
        }
        start += len;
    }
    out
}

/// One recorded tensor: name, shape, values.
type Entry = (String, Vec<usize>, Vec<f32>);

/// Everything the record holds, computed by the decoder under test, and the threshold used.
fn record(m: &LegoTransformer, threshold: Option<f32>) -> (Vec<Entry>, f32) {
    let v = m.config.vocab_size;
    let mut out: Vec<Entry> = Vec::new();
    let b1 = vec![prompt(13, 0, v)];
    out.push(("b1_whole".into(), vec![1, 13, v], logits_in_pieces(m, &b1, &[13])));
    out.push(("b1_pieces".into(), vec![1, 13, v], logits_in_pieces(m, &b1, &[5, 1, 7])));
    let b8: Vec<Vec<usize>> = (0..8).map(|s| prompt(21, s + 1, v)).collect();
    out.push(("b8_whole".into(), vec![8, 9, v], logits_in_pieces(m, &b8, &[9])));
    out.push(("b8_pieces".into(), vec![8, 9, v], logits_in_pieces(m, &b8, &[4, 1, 4])));
    // A prompt of 9, then 12 tokens one at a time.
    let mut steps = vec![9];
    steps.extend([1; 12]);
    out.push(("b8_decode".into(), vec![8, 21, v], logits_in_pieces(m, &b8, &steps)));

    let gen_prompts: Vec<Vec<usize>> = (0..8).map(|s| prompt(6, s + 20, v)).collect();
    let greedy = m.generate(&gen_prompts, 20, &Sampling::greedy()).unwrap();
    let as_f32 = |rows: &[Vec<usize>]| rows.iter().flatten().map(|&t| t as f32).collect::<Vec<f32>>();
    out.push(("gen_greedy".into(), vec![8, 26], as_f32(&greedy)));

    // The threshold: halfway between the two recorded confidences nearest the median (so about
    // half the tokens exit), unless given.
    let threshold = threshold.unwrap_or_else(|| {
        let (_, stats) = m
            .generate_with_early_exit(&gen_prompts, 20, 2.0, &Sampling::greedy(), UpperCacheFill::Skip)
            .unwrap();
        let mut c: Vec<f32> = stats.confidences.iter().flatten().copied().collect();
        c.sort_by(f32::total_cmp);
        let mid = c.len() / 2;
        0.5 * (c[mid - 1] + c[mid])
    });
    for (name, fill) in [("skip", UpperCacheFill::Skip), ("propagate", UpperCacheFill::Propagate)] {
        let (tokens, stats) =
            m.generate_with_early_exit(&gen_prompts, 20, threshold, &Sampling::greedy(), fill).unwrap();
        out.push((format!("ee_{name}_tokens"), vec![8, 26], as_f32(&tokens)));
        let routes: Vec<f32> = stats.routes.iter().flatten().map(|&deep| deep as u8 as f32).collect();
        out.push((format!("ee_{name}_routes"), vec![8, 20], routes));
    }
    (out, threshold)
}

#[test]
#[ignore = "writes the golden record; run once, on the decoder being recorded"]
fn write_golden() {
    if std::env::var("LEGO_WRITE_GOLDEN").as_deref() != Ok("1") {
        return;
    }
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(61, 32, 4, 4, 72, 40) };
    let m = LegoTransformer::new(config, &mut Tensor::rng(2024)).unwrap();
    std::fs::create_dir_all(fixture("")).unwrap();
    m.save(&fixture("model.safetensors"), &BTreeMap::new()).unwrap();
    let (entries, threshold) = record(&m, None);
    let meta = BTreeMap::from([
        ("threshold".to_string(), threshold.to_string()),
        ("written_by".to_string(), "the decoder of commit 152dce3".to_string()),
    ]);
    let refs: Vec<(&str, &[usize], &[f32])> =
        entries.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())).collect();
    safetensors::save(&fixture("golden.safetensors"), &refs, &meta).unwrap();
}

#[test]
fn the_decoder_reproduces_the_golden_record() {
    let (m, _) = LegoTransformer::load(&fixture("model.safetensors")).unwrap();
    let golden = safetensors::load(&fixture("golden.safetensors")).unwrap();
    let threshold: f32 = golden.metadata["threshold"].parse().unwrap();
    let (entries, _) = record(&m, Some(threshold));
    for (name, shape, got) in entries {
        let want = golden.get(&name).unwrap();
        assert_eq!(want.shape, shape, "{name}: shape");
        if name.starts_with("b") {
            let worst = got
                .iter()
                .zip(&want.data)
                .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{name}: worst relative difference {worst:e} > 1e-5");
        } else {
            assert_eq!(got, want.data, "{name}: tokens or routes differ from the golden record");
        }
    }
}
