//! From token streams to training batches.
//!
//! A language model learns to predict each token from the ones before it. A window of
//! `seq_len + 1` consecutive tokens gives `seq_len` such lessons at once: the input `x` is the
//! first `seq_len` tokens and the target `y` the last `seq_len`, so `y[t] == x[t + 1]` and
//! `y[t]` is what the model should predict after reading `x[..=t]`:
//!
//! ```text
//! tokens   t0 t1 t2 t3 t4 | t5 t6 t7 t8 t9 | t10 ...        (seq_len = 4: windows of 5)
//! x        t0 t1 t2 t3      t5 t6 t7 t8
//! y        t1 t2 t3 t4      t6 t7 t8 t9
//! ```
//!
//! [`make_sequences`] cuts a stream into such windows, [`batches`] stacks them `batch_size` at a
//! time into [`Batch`]es, row-major `[batch, seq]`, optionally in a seeded shuffled order.
//! [`create_synthetic_data`] makes batches of uniform random ids, the specification's test data.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::text::Document;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Inputs and next-token targets for `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input token ids, row-major `[batch, seq]`: row `b` is `x[b * seq..(b + 1) * seq]`.
    pub x: Vec<usize>,
    /// Target ids, `[batch, seq]`: `y[b * seq + t]` is the token that follows
    /// `x[b * seq + t]`, so within a row `y[t] == x[t + 1]`.
    pub y: Vec<usize>,
    /// How many sequences (rows) the batch holds.
    pub batch: usize,
    /// How many tokens each sequence holds.
    pub seq: usize,
}

impl Batch {
    /// How many target tokens the batch holds, `batch * seq`.
    pub fn num_tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Row `b` of the inputs, `seq` ids.
    pub fn x_row(&self, b: usize) -> &[usize] {
        &self.x[b * self.seq..(b + 1) * self.seq]
    }

    /// Row `b` of the targets, `seq` ids.
    pub fn y_row(&self, b: usize) -> &[usize] {
        &self.y[b * self.seq..(b + 1) * self.seq]
    }
}

/// Cuts `tokens` into non-overlapping windows of `seq_len + 1` tokens, each one input/target
/// pair for [`batches`]. A tail shorter than a window is dropped (at most `seq_len` tokens).
///
/// Windows do not overlap, so the pair across a boundary (a window's last token, the next
/// window's first) is never a target; in exchange every token appears in one window only.
///
/// # Panics
///
/// If `seq_len` is 0 (a window must predict at least one token). Check configs before this.
///
/// ```
/// let seqs = lego::data::make_sequences(&[0, 1, 2, 3, 4, 5, 6, 7], 2);
/// assert_eq!(seqs, vec![vec![0, 1, 2], vec![3, 4, 5]]); // 6 and 7 are too few for a window
/// ```
pub fn make_sequences(tokens: &[usize], seq_len: usize) -> Vec<Vec<usize>> {
    assert!(seq_len > 0, "make_sequences: seq_len must be at least 1");
    tokens.chunks_exact(seq_len + 1).map(<[usize]>::to_vec).collect()
}

/// Encodes each document on its own and cuts it into windows ([`make_sequences`]), so that no
/// sequence runs from the end of one document into the start of another. The windows come in
/// document order.
///
/// # Panics
///
/// If `seq_len` is 0.
pub fn sequences_from_documents(tokenizer: &Tokenizer, docs: &[Document], seq_len: usize) -> Vec<Vec<usize>> {
    docs.iter().flat_map(|doc| make_sequences(&tokenizer.encode(&doc.text), seq_len)).collect()
}

/// Stacks `sequences` (each `seq + 1` tokens, as from [`make_sequences`]) into batches of
/// `batch_size` rows: `x` takes each window's first `seq` tokens, `y` its last `seq`.
///
/// With `shuffle_seed` `Some(seed)` the sequences are first put in an order shuffled by
/// rand's `StdRng::seed_from_u64(seed)` (pass a new seed each epoch for a new order); with
/// `None` they keep their order.
///
/// **The last batch is kept even if partial**: it holds the remaining `len % batch_size` rows
/// and its `batch` field says so. Evaluation then sees every token; a trainer that wants equal
/// batches can skip a last batch with `batch < batch_size`.
///
/// Errors ([`Error::Input`]): `batch_size` 0; no sequences (the text was shorter than one
/// window); sequences of different lengths, or of fewer than 2 tokens.
///
/// ```
/// use lego::data::batches;
///
/// let seqs = vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]];
/// let b = batches(&seqs, 2, None).unwrap();
/// assert_eq!(b.len(), 2);
/// assert_eq!((b[0].batch, b[0].seq), (2, 2));
/// assert_eq!(b[0].x, [1, 2, 4, 5]);
/// assert_eq!(b[0].y, [2, 3, 5, 6]);
/// assert_eq!(b[1].batch, 1); // the partial last batch
/// ```
pub fn batches(sequences: &[Vec<usize>], batch_size: usize, shuffle_seed: Option<u64>) -> Result<Vec<Batch>> {
    if batch_size == 0 {
        return Err(Error::Input("batch size must be at least 1, got 0".into()));
    }
    let Some(first) = sequences.first() else {
        return Err(Error::Input(
            "no sequences to batch: the text is shorter than one window of seq_len + 1 tokens".into(),
        ));
    };
    let window = first.len();
    if window < 2 {
        return Err(Error::Input(format!(
            "sequences of {window} token(s) hold no input/target pair; they need at least 2"
        )));
    }
    if let Some((i, s)) = sequences.iter().enumerate().find(|(_, s)| s.len() != window) {
        return Err(Error::Input(format!(
            "sequence {i} has {} tokens, sequence 0 has {window}: all must be equally long",
            s.len()
        )));
    }
    let seq = window - 1;

    let mut order: Vec<usize> = (0..sequences.len()).collect();
    if let Some(seed) = shuffle_seed {
        order.shuffle(&mut StdRng::seed_from_u64(seed));
    }
    let out = order
        .chunks(batch_size)
        .map(|rows| {
            let mut x = Vec::with_capacity(rows.len() * seq);
            let mut y = Vec::with_capacity(rows.len() * seq);
            for &r in rows {
                let s = &sequences[r];
                x.extend_from_slice(&s[..seq]); // tokens 0 .. seq-1
                y.extend_from_slice(&s[1..]); //   tokens 1 .. seq: shifted by one
            }
            Batch { x, y, batch: rows.len(), seq }
        })
        .collect();
    Ok(out)
}

/// `num_batches` batches of `[batch, seq]` uniformly random ids below `vocab`, deterministic
/// from `seed`: the specification's `create_synthetic_data`, for tests and benchmarks that need
/// shapes rather than meaning.
///
/// Each row is drawn as `seq + 1` random ids and split like a real window, so `y` is still `x`
/// shifted by one; there is nothing to learn beyond the uniform distribution.
///
/// # Panics
///
/// If `batch`, `seq` or `vocab` is 0.
///
/// ```
/// let data = lego::data::create_synthetic_data(3, 4, 8, 100, 0);
/// assert_eq!(data.len(), 3);
/// assert!(data[0].x.iter().all(|&id| id < 100));
/// assert_eq!(data[0].x[1], data[0].y[0]);
/// ```
pub fn create_synthetic_data(
    num_batches: usize,
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
) -> Vec<Batch> {
    assert!(
        batch > 0 && seq > 0 && vocab > 0,
        "create_synthetic_data: batch ({batch}), seq ({seq}) and vocab ({vocab}) must all be at least 1"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    (0..num_batches)
        .map(|_| {
            let mut x = Vec::with_capacity(batch * seq);
            let mut y = Vec::with_capacity(batch * seq);
            for _ in 0..batch {
                let row: Vec<usize> = (0..=seq).map(|_| rng.random_range(0..vocab)).collect();
                x.extend_from_slice(&row[..seq]);
                y.extend_from_slice(&row[1..]);
            }
            Batch { x, y, batch, seq }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_cut_without_overlap_and_targets_are_shifted_by_one() {
        let tokens: Vec<usize> = (0..23).collect();
        let seqs = make_sequences(&tokens, 4);
        assert_eq!(seqs.len(), 4); // 23 / 5, the 3-token tail dropped
        assert_eq!(seqs[1], [5, 6, 7, 8, 9]);
        let b = batches(&seqs, 3, None).unwrap();
        assert_eq!(b.len(), 2);
        for batch in &b {
            assert_eq!(batch.x.len(), batch.num_tokens());
            for r in 0..batch.batch {
                let (x, y) = (batch.x_row(r), batch.y_row(r));
                assert_eq!(&x[1..], &y[..batch.seq - 1]);
                assert_eq!(y[batch.seq - 1], x[batch.seq - 1] + 1);
            }
        }
        assert_eq!(b[1].batch, 1);
        assert_eq!(b[1].x, [15, 16, 17, 18]);
        assert!(make_sequences(&tokens[..4], 4).is_empty());
    }

    #[test]
    fn shuffling_is_seeded_and_keeps_every_sequence() {
        let seqs: Vec<Vec<usize>> = (0..40).map(|i| vec![i, i + 100]).collect();
        let a = batches(&seqs, 8, Some(3)).unwrap();
        assert_eq!(a, batches(&seqs, 8, Some(3)).unwrap());
        assert_ne!(a, batches(&seqs, 8, Some(4)).unwrap());
        assert_ne!(a, batches(&seqs, 8, None).unwrap());
        let mut firsts: Vec<usize> = a.iter().flat_map(|b| b.x.clone()).collect();
        firsts.sort();
        assert_eq!(firsts, (0..40).collect::<Vec<_>>());
        // Rows stay whole: each target is its input + 100.
        assert!(a.iter().all(|b| b.x.iter().zip(&b.y).all(|(x, y)| y - x == 100)));
    }

    #[test]
    fn bad_batching_inputs_are_errors() {
        let seqs = vec![vec![1, 2, 3]];
        let msg = |r: Result<Vec<Batch>>| match r {
            Err(Error::Input(m)) => m,
            other => panic!("expected Error::Input, got {other:?}"),
        };
        assert!(msg(batches(&seqs, 0, None)).contains("batch size"));
        assert!(msg(batches(&[], 4, None)).contains("no sequences"));
        assert!(msg(batches(&[vec![1]], 4, None)).contains("at least 2"));
        assert!(msg(batches(&[vec![1, 2], vec![1, 2, 3]], 4, None)).contains("sequence 1"));
    }

    #[test]
    fn synthetic_batches_are_deterministic_in_range_and_shifted() {
        let a = create_synthetic_data(4, 2, 16, 50, 9);
        assert_eq!(a, create_synthetic_data(4, 2, 16, 50, 9));
        assert_ne!(a, create_synthetic_data(4, 2, 16, 50, 10));
        for b in &a {
            assert_eq!((b.batch, b.seq, b.x.len(), b.y.len()), (2, 16, 32, 32));
            assert!(b.x.iter().chain(&b.y).all(|&id| id < 50));
            for r in 0..2 {
                assert_eq!(&b.x_row(r)[1..], &b.y_row(r)[..15]);
            }
        }
    }

    #[test]
    fn documents_are_windowed_separately() {
        let tok = Tokenizer::Byte;
        let docs = [Document::new("a", "abcde"), Document::new("b", "fgh")];
        // "abcde" gives one window of 3 ("abc", tail "de" dropped); "fgh" one; none spans both.
        let seqs = sequences_from_documents(&tok, &docs, 2);
        assert_eq!(seqs, vec![vec![97, 98, 99], vec![102, 103, 104]]);
    }
}
