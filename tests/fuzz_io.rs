//! A seeded fuzz test of everything that reads a file: the safetensors reader, the JSON parser,
//! and the loaders on top of them (model config, tokenizer, model and training checkpoints).
//!
//! Each case starts from a valid input and mutates it the way corruption, a bad tool or a
//! hostile file would: bit flips, truncations, a wrong header length, edited numbers (shapes,
//! data offsets, the config's sizes inside the metadata), other dtypes, stray bytes and
//! characters. Every result must be `Ok` or `Err`; a panic fails the test, which then prints
//! the seed and case that reproduce it. The generator is seeded, so a run is repeatable; the
//! whole test takes a second or two in `cargo test --release`.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use lego::Tensor;
use lego::data::{Document, Tokenizer};
use lego::io::{json, safetensors};
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{TrainingCheckpoint, save_training_checkpoint};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many mutated inputs each test tries.
const CASES: usize = 10_000;

/// Numbers worth writing where a number was: sizes at and beyond every limit the reader must
/// guard (the data section, 2^32, 2^53 where f64 stops being exact, u64 and usize overflow),
/// and things that are not sizes at all.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "4",
    "7",
    "64",
    "65536",
    "4294967295",
    "4294967296",
    "9007199254740991",
    "9007199254740992",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "-1",
    "-0",
    "0.5",
    "1e3",
    "1e308",
    "1e400",
    "NaN",
    "",
];

/// Dtypes and non-dtypes to write where `"F32"` was.
const DTYPES: &[&str] =
    &["\"F16\"", "\"BF16\"", "\"F64\"", "\"I32\"", "\"U8\"", "\"f32\"", "\"\"", "7", "null", "[]"];

/// Characters that mean something to JSON, or to UTF-8 handling, to drop into text.
const CHARS: &[&str] = &[
    "\"",
    "\\",
    "\\u",
    "\\ud83d",
    "\\udc00",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "-",
    "+",
    ".",
    "e",
    "0",
    "9",
    " ",
    "\n",
    "\u{0}",
    "\u{1f}",
    "é",
    "😀",
    "null",
    "true",
    "__metadata__",
];

/// A small but complete training checkpoint: a word tokenizer, an extended model (so it has
/// an exit head and frozen parameters) and AdamW moments after one step.
fn training_checkpoint_bytes() -> Vec<u8> {
    let tok = Tokenizer::word(&[Document::new("t", "a b c d e f g")], 16).unwrap();
    let config = LegoConfig {
        vocab_size: tok.vocab_size(),
        dim: 4,
        num_layers: 1,
        num_heads: 1,
        ffn_hidden: 4,
        max_seq_len: 8,
        exit_layer: 1,
        ..LegoConfig::t()
    };
    let shallow = LegoTransformer::new(config, &mut Tensor::rng(1)).unwrap();
    let model = shallow.extend(2, 0.5, true, &mut Tensor::rng(2)).unwrap();
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default());
    model.forward(&[1, 2, 3], 1).unwrap().cross_entropy(&[2, 3, 4], None).backward();
    opt.step();
    // One file per call: the tests run in parallel, in one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("lego-fuzz-{}-{call}.safetensors", std::process::id()));
    save_training_checkpoint(&path, &model, &tok, &opt, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

/// Splits a safetensors file into its header text and its data section, if an earlier
/// mutation has left it splittable.
fn split(bytes: &[u8]) -> Option<(String, Vec<u8>)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().unwrap())).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    Some((String::from_utf8(header.to_vec()).ok()?, bytes[8 + n..].to_vec()))
}

/// A safetensors file from a header text and a data section, with the right header length.
fn join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// The byte ranges of the runs of digits in `text`.
fn digit_runs(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

/// A random char boundary of `text` (0 and `len` included).
fn boundary(rng: &mut StdRng, text: &str) -> usize {
    let mut at = rng.random_range(0..=text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// One random edit of JSON-ish text: a number replaced, a character sequence inserted, a
/// stretch deleted or duplicated, `"F32"` replaced, or the text cut short. `kind` picks the
/// edit (0 to 5), at random if it is `None`.
fn mutate_text(rng: &mut StdRng, text: &mut String, kind: Option<u32>) {
    match kind.unwrap_or_else(|| rng.random_range(0..6)) {
        0 => {
            // Half the time a number of the model config inside the metadata (a size the loader
            // might allocate by), else any number: a shape, a data offset, a count.
            let mut runs = digit_runs(text);
            if let Some(start) = text.find("\"config\":\"")
                && rng.random_bool(0.5)
            {
                let end = text[start..].find("}\"").map_or(text.len(), |e| start + e);
                runs.retain(|&(a, _)| a > start && a < end);
            }
            if let Some(&(a, b)) = runs.get(rng.random_range(0..runs.len().max(1))) {
                text.replace_range(a..b, NUMBERS[rng.random_range(0..NUMBERS.len())]);
            }
        }
        1 => {
            let at = boundary(rng, text);
            text.insert_str(at, CHARS[rng.random_range(0..CHARS.len())]);
        }
        2 => {
            let (a, b) = (boundary(rng, text), boundary(rng, text));
            let (a, b) = (a.min(b), a.max(b).min(a.min(b) + 16));
            let b = (b..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap();
            text.replace_range(a..b, "");
        }
        3 => {
            let (a, b) = (boundary(rng, text), boundary(rng, text));
            let piece = text[a.min(b)..a.max(b)].to_string();
            let at = boundary(rng, text);
            text.insert_str(at, &piece);
        }
        4 => {
            let hits: Vec<usize> = text.match_indices("\"F32\"").map(|(i, _)| i).collect();
            if let Some(&i) = hits.get(rng.random_range(0..hits.len().max(1))) {
                text.replace_range(i..i + 5, DTYPES[rng.random_range(0..DTYPES.len())]);
            }
        }
        _ => {
            let at = boundary(rng, text);
            text.truncate(at);
        }
    }
}

/// One random corruption of a safetensors file's bytes.
fn mutate_file(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    match rng.random_range(0..10) {
        // Bit flips anywhere.
        0 => {
            for _ in 0..rng.random_range(1..=8) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // Cut short.
        1 => bytes.truncate(rng.random_range(0..bytes.len())),
        // A header length that does not fit: small changes, and wild ones.
        2 => {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            let wild = [
                0,
                1,
                7,
                n.wrapping_sub(1),
                n + 1,
                n + 8,
                bytes.len() as u64,
                u64::MAX,
                1 << 63,
                rng.random(),
            ];
            bytes[..8].copy_from_slice(&wild[rng.random_range(0..wild.len())].to_le_bytes());
        }
        // Random bytes appended or removed at the end (the data section no longer tiles).
        3 => {
            if rng.random_bool(0.5) {
                bytes.extend((0..rng.random_range(1..9)).map(|_| rng.random::<u8>()));
            } else {
                let keep = bytes.len().saturating_sub(rng.random_range(1..9));
                bytes.truncate(keep.max(8));
            }
        }
        // A value in the data section becomes NaN or infinite.
        4 => {
            let Some((header, mut data)) = split(bytes) else { return };
            if data.len() >= 4 {
                let at = rng.random_range(0..data.len() / 4) * 4;
                let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.random_range(0..3)];
                data[at..at + 4].copy_from_slice(&bad.to_le_bytes());
            }
            *bytes = join(&header, &data);
        }
        // Edits of the header text, the header length kept right so the reader gets past it
        // and into the JSON and the entries: mostly numbers (shapes, offsets, the config's
        // sizes) and dtypes, which keep the JSON valid and so reach the checks behind it.
        _ => {
            let Some((mut header, data)) = split(bytes) else { return };
            let kind = match rng.random_range(0..10) {
                0..6 => Some(0),
                6..8 => Some(4),
                _ => None,
            };
            mutate_text(rng, &mut header, kind);
            *bytes = join(&header, &data);
        }
    }
}

/// Runs every reader on `bytes`; the results do not matter, only that none panics.
fn read_everything(bytes: &[u8]) {
    let Ok(st) = safetensors::deserialize(bytes, "fuzz") else { return };
    let _ = LegoTransformer::take_from(&mut st.clone(), "fuzz");
    if let Ok(ckpt) = TrainingCheckpoint::from_safetensors(st) {
        let _ = ckpt.optimizer.to_optimizer(&ckpt.model);
        let _ = ckpt.routing_threshold();
    }
}

/// Runs `f` on each of `CASES` inputs made by `make`, and fails listing the cases that panicked.
fn fuzz<T: std::fmt::Debug>(seed: u64, mut make: impl FnMut(&mut StdRng) -> T, f: impl Fn(&T)) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut panics = Vec::new();
    for case in 0..CASES {
        let input = make(&mut rng);
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            panics.push(format!("seed {seed}, case {case}: {input:?}"));
        }
    }
    assert!(panics.is_empty(), "{} of {CASES} inputs panicked:\n{}", panics.len(), panics.join("\n"));
}

#[test]
fn mutated_safetensors_files_are_ok_or_err_never_a_panic() {
    let valid = training_checkpoint_bytes();
    read_everything(&valid);
    assert!(TrainingCheckpoint::from_safetensors(safetensors::deserialize(&valid, "valid").unwrap()).is_ok());
    let mut seen_ok = 0;
    fuzz(
        11,
        |rng| {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..=3) {
                if bytes.len() <= 8 {
                    break;
                }
                mutate_file(rng, &mut bytes);
            }
            bytes
        },
        |bytes| read_everything(bytes),
    );
    // The mutations must not all be rejected at the first check: some get deep into the reader.
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..200 {
        let mut bytes = valid.clone();
        mutate_file(&mut rng, &mut bytes);
        seen_ok += safetensors::deserialize(&bytes, "f").is_ok() as usize;
    }
    assert!(seen_ok > 10, "only {seen_ok} of 200 mutated files parsed: the mutations are too blunt");
}

#[test]
fn mutated_json_is_ok_or_err_never_a_panic() {
    let valid = training_checkpoint_bytes();
    let (header, _) = split(&valid).unwrap();
    let header = json::parse(&header).unwrap();
    let meta = header.get("__metadata__").unwrap();
    let seeds: Vec<String> = vec![
        header.to_string_compact(),
        header.to_string_pretty(),
        meta.get("config").unwrap().as_str().unwrap().to_string(),
        meta.get("tokenizer").unwrap().as_str().unwrap().to_string(),
        r#"{"s":"q\" \\ \/ \b\f\n\r\t \u00e9 \ud83d\ude00 é😀","n":[-0.25e-1,1E+2,0,9007199254740991],"e":{},"a":[[[]]]}"#
            .to_string(),
    ];
    for s in &seeds {
        json::parse(s).unwrap();
    }
    fuzz(
        12,
        |rng| {
            let mut text = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..=4) {
                mutate_text(rng, &mut text, None);
            }
            text
        },
        |text| {
            if let Ok(value) = json::parse(text) {
                let _ = LegoConfig::from_json(&value, "fuzz");
                let _ = Tokenizer::from_json(&value);
                let _ = value.to_string_pretty();
            }
        },
    );
}
