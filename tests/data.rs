//! The data module's contracts, end to end through the public API: files become documents,
//! documents split disjointly and reproducibly, tokenizers fit on training text only and
//! round-trip (through JSON too), batches are shifted by one, the synthetic corpus has its
//! easy/hard structure, and bad input is an error that says what is wrong.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use lego::Error;
use lego::data::synthetic::{SyntheticConfig, generate_corpus};
use lego::data::{
    self, Document, Tokenizer, UNK_ID, batches, create_synthetic_data, load_texts, make_sequences,
    split_blocks, split_documents,
};

/// A fresh directory for one test, under the system's temporary directory.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lego-data-test-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn input_message<T: std::fmt::Debug>(result: lego::Result<T>) -> String {
    match result {
        Err(Error::Input(msg)) => msg,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

#[test]
fn files_to_batches_end_to_end() {
    let dir = temp_dir("pipeline");
    for i in 0..6 {
        let text = format!("Work {i} begins. The king speaks; the fool answers.\n").repeat(20);
        fs::write(dir.join(format!("work{i}.txt")), text).unwrap();
    }
    let docs = load_texts(&dir).unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["work0.txt", "work1.txt", "work2.txt", "work3.txt", "work4.txt", "work5.txt"]);

    let split = split_documents(docs, 1, 1, 3).unwrap();
    let tokenizer = Tokenizer::word(&split.train, 64).unwrap();
    // "Work <n> begins.": the number of a held-out work was never seen in training.
    let test_ids = tokenizer.encode(&split.test[0].text);
    assert_eq!(test_ids[1], UNK_ID, "{}", split.test[0].name);
    assert_ne!(test_ids[0], UNK_ID);

    let sequences = data::sequences_from_documents(&tokenizer, &split.train, 8);
    let train = batches(&sequences, 16, Some(0)).unwrap();
    let rows: usize = train.iter().map(|b| b.batch).sum();
    assert_eq!(rows, sequences.len());
    assert!(train.iter().all(|b| b.seq == 8 && b.x.iter().all(|&id| id < tokenizer.vocab_size())));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_paths_and_empty_corpora_are_errors() {
    let dir = temp_dir("errors");
    for missing in [dir.join("no-such-file.txt"), dir.join("no-such-dir")] {
        let err = load_texts(&missing).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-"), "{err}");
    }
    let msg = input_message(load_texts(&dir));
    assert!(msg.contains("empty corpus"), "{msg}");
    fs::write(dir.join("blank.txt"), "\n\n   \n").unwrap();
    assert!(input_message(load_texts(&dir)).contains("empty corpus"));
    fs::write(dir.join("bytes.bin"), [0x66, 0x6f, 0xff, 0x6f]).unwrap();
    let err = load_texts(&dir).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
    assert!(err.to_string().contains("bytes.bin"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_file_corpora_split_into_blocks() {
    let doc = Document::new("all.txt", "a b\nc\n\nd e\n\n\n\nf\n");
    let blocks = split_blocks(&doc);
    let names: Vec<&str> = blocks.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["all.txt#1", "all.txt#2", "all.txt#3"]);
    assert_eq!(blocks[0].text, "a b\nc");
    // A single document cannot be split three ways; its blocks can.
    let msg = input_message(split_documents(vec![doc], 1, 1, 0));
    assert!(msg.contains("1 given") && msg.contains("at least 3"), "{msg}");
    assert!(split_documents(blocks, 1, 1, 0).is_ok());
}

#[test]
fn the_split_is_reproducible_disjoint_and_complete() {
    let docs: Vec<Document> =
        (0..30).map(|i| Document::new(format!("d{i:02}"), format!("text {i}"))).collect();
    let a = split_documents(docs.clone(), 4, 3, 2024).unwrap();
    let b = split_documents(docs.clone(), 4, 3, 2024).unwrap();
    assert_eq!(a, b, "same seed, same split");
    assert_eq!((a.train.len(), a.val.len(), a.test.len()), (23, 3, 4));

    let sets = [a.train_names(), a.val_names(), a.test_names()];
    let mut seen = HashSet::new();
    for name in sets.iter().flatten() {
        assert!(seen.insert(*name), "{name} is in two sets");
    }
    assert_eq!(seen.len(), 30, "every document is used");

    let json = a.to_json().to_string_compact();
    assert!(json.starts_with(r#"{"train":["d"#) && json.contains(r#""test":["#), "{json}");

    let msg = input_message(split_documents(docs[..7].to_vec(), 4, 3, 0));
    assert!(msg.contains("7 given") && msg.contains("at least 8"), "{msg}");
}

#[test]
fn word_tokenizer_round_trips_known_words_and_caps_its_vocabulary() {
    let train = [
        Document::new("a", "The quick brown fox jumps over the lazy dog"),
        Document::new("b", "THE DOG sleeps; the fox runs"),
    ];
    let tok = Tokenizer::word(&train, 6).unwrap();
    // the x4, dog x2, fox x2, then one-timers alphabetically: brown, jumps (cap 6 with <unk>).
    let words: Vec<String> = (0..tok.vocab_size()).map(|id| tok.token_text(id).unwrap()).collect();
    assert_eq!(words, ["<unk>", "the", "dog", "fox", "brown", "jumps"]);
    assert_eq!(tok, Tokenizer::word(&[train[1].clone(), train[0].clone()], 6).unwrap());

    let ids = tok.encode("the brown fox jumps the dog");
    assert!(!ids.contains(&UNK_ID));
    assert_eq!(tok.decode(&ids).unwrap(), "the brown fox jumps the dog");
    // Lowercasing, and unknown words.
    assert_eq!(tok.encode("The DOG"), tok.encode("the dog"));
    assert_eq!(tok.encode("the cat"), [1, UNK_ID]);
    assert_eq!(tok.decode(&tok.encode("A Fox, a fox")).unwrap(), "<unk> <unk> <unk> fox");

    // The default cap, 8192 including <unk>, on a text of 10,000 distinct words.
    let many: String = (0..10_000).map(|i| format!("w{i} ")).collect();
    let big = Tokenizer::word(&[Document::new("many", many)], data::DEFAULT_WORD_VOCAB).unwrap();
    assert_eq!(big.vocab_size(), 8192);
}

#[test]
fn byte_tokenizer_round_trips_utf8() {
    let tok = Tokenizer::Byte;
    assert_eq!(tok.vocab_size(), 256);
    for text in ["", "plain ascii", "Ünïcödé — ≠ 日本語 🦀\r\n\t"] {
        assert_eq!(tok.decode(&tok.encode(text)).unwrap(), text);
    }
}

#[test]
fn tokenizers_round_trip_through_json_text() {
    let docs = generate_corpus(&SyntheticConfig { documents: 3, bytes_per_document: 3_000, seed: 4 });
    for tok in [Tokenizer::Byte, Tokenizer::word(&docs, 300).unwrap()] {
        // As it would sit in a checkpoint's string metadata.
        let stored: String = tok.to_json().to_string_compact();
        let back = Tokenizer::from_json_str(&stored).unwrap();
        assert_eq!(back, tok);
        assert_eq!(back.encode(&docs[0].text), tok.encode(&docs[0].text));
    }
    let err = Tokenizer::from_json_str(r#"{"kind":"word","vocab":["the"]}"#).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
    assert!(err.to_string().contains("tokenizer JSON"), "{err}");
}

#[test]
fn sequences_and_batches_are_shifted_by_one() {
    let tokens: Vec<usize> = (0..1000).map(|i| (i * 7919) % 101).collect();
    let seqs = make_sequences(&tokens, 16);
    assert_eq!(seqs.len(), 1000 / 17);
    assert!(seqs.iter().all(|s| s.len() == 17));
    assert_eq!(seqs[2][..], tokens[34..51]);

    let out = batches(&seqs, 10, Some(7)).unwrap();
    assert_eq!(out.len(), 6, "58 sequences: five full batches and a partial one");
    assert_eq!(out.last().unwrap().batch, 8);
    for b in &out {
        assert_eq!(b.x.len(), b.batch * b.seq);
        for r in 0..b.batch {
            let (x, y) = (b.x_row(r), b.y_row(r));
            for i in 0..b.seq - 1 {
                assert_eq!(y[i], x[i + 1]);
            }
        }
    }
    assert!(input_message(batches(&seqs, 0, None)).contains("batch size"));

    let random = create_synthetic_data(5, 4, 32, 100, 1);
    assert_eq!(random, create_synthetic_data(5, 4, 32, 100, 1));
    assert!(random.iter().all(|b| b.x.len() == 128 && b.y.iter().all(|&id| id < 100)));
}

#[test]
fn synthetic_corpus_is_deterministic_sized_and_has_easy_and_hard_words() {
    let start = std::time::Instant::now();
    let docs = generate_corpus(&SyntheticConfig::default());
    let elapsed = start.elapsed();
    assert_eq!(docs, generate_corpus(&SyntheticConfig::default()));
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    assert!((300_000..=600_000).contains(&bytes), "{bytes} bytes");
    assert!(elapsed.as_secs_f64() < 1.0, "took {elapsed:?}");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for doc in &docs {
        for w in data::tokenizer::words(&doc.text) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    let mut sorted: Vec<usize> = counts.values().copied().collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let total: usize = sorted.iter().sum();
    let top_tenth: usize = sorted[..sorted.len() / 10].iter().sum();
    assert!(2 * top_tenth > total, "top 10% of types: {top_tenth} of {total} tokens");
    assert!(sorted.len() > 1000, "a long tail: {} types", sorted.len());

    // Frames are deterministic: "upon" is always followed by "a time".
    for doc in &docs {
        let words: Vec<String> = data::tokenizer::words(&doc.text).collect();
        for w in words.windows(3).filter(|w| w[0] == "upon") {
            assert_eq!((w[1].as_str(), w[2].as_str()), ("a", "time"));
        }
    }

    // The split works on it and a held-out story has few words the training stories lack.
    let split = split_documents(docs, 4, 4, 0).unwrap();
    let tok = Tokenizer::word(&split.train, 8192).unwrap();
    let test: Vec<usize> = split.test.iter().flat_map(|d| tok.encode(&d.text)).collect();
    let unknown = test.iter().filter(|&&id| id == UNK_ID).count();
    assert!(unknown * 20 < test.len(), "{unknown} of {} test tokens are <unk>", test.len());
}

/// Reads the real corpus if `scripts/fetch-shakespeare.sh` has fetched it.
#[test]
#[ignore = "needs data/shakespeare/ (run scripts/fetch-shakespeare.sh)"]
fn shakespeare_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare");
    let docs = load_texts(&dir).unwrap();
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    assert_eq!(docs.len(), 42);
    assert!(bytes > 4_500_000, "{bytes} bytes");
    let split = split_documents(docs, 4, 4, 0).unwrap();
    let tok = Tokenizer::word(&split.train, data::DEFAULT_WORD_VOCAB).unwrap();
    assert_eq!(tok.vocab_size(), data::DEFAULT_WORD_VOCAB);
}
