//! [`Dataset`]: a document [`Split`] turned into the batches and windows that training and
//! evaluation take, in one call.
//!
//! ```text
//! Split { train, val, test } ──sequences_from_documents──▶ windows of seq_len + 1 tokens
//!                            ──batches───────────────────▶ train (shuffled, seeded), val, test (in order)
//! ```

use super::batches::{Batch, batches, sequences_from_documents};
use super::split::Split;
use super::text::Document;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// The three splits as batches, and the test windows for token-by-token evaluation.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Training batches, in a seeded shuffled order.
    pub train: Vec<Batch>,
    /// Validation batches, in document order.
    pub val: Vec<Batch>,
    /// Test batches, in document order.
    pub test: Vec<Batch>,
    /// The test windows of `seq_len + 1` tokens, in document order.
    pub test_windows: Vec<Vec<usize>>,
    /// Targets (tokens predicted) in train, val and test: windows × `seq_len`.
    pub tokens: [usize; 3],
    /// Tokens of input per window.
    pub seq_len: usize,
}

impl Dataset {
    /// Encodes every document of `split` with `tokenizer`, cuts each into windows of
    /// `seq_len + 1` tokens (never across a document boundary) and batches them by
    /// `batch_size`; the training batches are shuffled with `seed`.
    ///
    /// Errors ([`Error::Input`]): a split shorter than one window (the message names it), or
    /// the batching errors of [`batches`].
    ///
    /// ```
    /// use lego::data::{Dataset, SyntheticConfig, Tokenizer, generate_corpus, split_documents};
    ///
    /// let docs = generate_corpus(&SyntheticConfig { documents: 6, bytes_per_document: 1_000, seed: 1 });
    /// let split = split_documents(docs, 1, 1, 0).unwrap();
    /// let data = Dataset::new(&Tokenizer::Byte, &split, 16, 4, 0).unwrap();
    /// assert_eq!(data.test_windows[0].len(), 17);
    /// assert_eq!(data.tokens[2], 16 * data.test_windows.len());
    /// ```
    pub fn new(
        tokenizer: &Tokenizer,
        split: &Split,
        seq_len: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Dataset> {
        if seq_len == 0 {
            return Err(Error::Input("seq_len must be at least 1".into()));
        }
        let windows = |docs: &[Document], what: &str| {
            let w = sequences_from_documents(tokenizer, docs, seq_len);
            if w.is_empty() {
                Err(Error::Input(format!(
                    "the {what} split is shorter than one window of {} tokens",
                    seq_len + 1
                )))
            } else {
                Ok(w)
            }
        };
        let (train, val, test) = (
            windows(&split.train, "training")?,
            windows(&split.val, "validation")?,
            windows(&split.test, "test")?,
        );
        Ok(Dataset {
            tokens: [train.len() * seq_len, val.len() * seq_len, test.len() * seq_len],
            train: batches(&train, batch_size, Some(seed))?,
            val: batches(&val, batch_size, None)?,
            test: batches(&test, batch_size, None)?,
            test_windows: test,
            seq_len,
        })
    }

    /// The first `limit` test windows (all with `None`) cut to `seq_len` tokens, for
    /// [`LegoTransformer::evaluate_with_early_exit`], which feeds at most `max_seq_len`
    /// (= `seq_len`) tokens: `seq_len − 1` predictions a window.
    ///
    /// [`LegoTransformer::evaluate_with_early_exit`]: crate::model::LegoTransformer::evaluate_with_early_exit
    pub fn test_sequences(&self, limit: Option<usize>) -> Vec<Vec<usize>> {
        let n = limit.unwrap_or(self.test_windows.len());
        self.test_windows.iter().take(n).map(|w| w[..self.seq_len].to_vec()).collect()
    }

    /// Up to `limit` validation sequences (all with `None`), evenly spaced over the split: a
    /// batch row's `seq_len` inputs followed by its last target, so that
    /// [`LegoTransformer::evaluate_with_early_exit`] predicts every target of the row.
    ///
    /// [`LegoTransformer::evaluate_with_early_exit`]: crate::model::LegoTransformer::evaluate_with_early_exit
    pub fn val_sequences(&self, limit: Option<usize>) -> Vec<Vec<usize>> {
        let rows: Vec<Vec<usize>> = self
            .val
            .iter()
            .flat_map(|b| {
                (0..b.batch).map(move |r| {
                    let mut s = b.x[r * b.seq..(r + 1) * b.seq].to_vec();
                    s.push(b.y[(r + 1) * b.seq - 1]);
                    s
                })
            })
            .collect();
        let n = limit.unwrap_or(rows.len()).min(rows.len());
        (0..n).map(|i| rows[i * rows.len() / n.max(1)].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticConfig, generate_corpus, split_documents};

    #[test]
    fn a_split_too_short_for_one_window_is_named() {
        let docs = generate_corpus(&SyntheticConfig { documents: 4, bytes_per_document: 300, seed: 2 });
        let split = split_documents(docs, 1, 1, 0).unwrap();
        let err = Dataset::new(&Tokenizer::Byte, &split, 5_000, 4, 0).unwrap_err().to_string();
        assert!(err.contains("training split is shorter than one window of 5001"), "{err}");
        let data = Dataset::new(&Tokenizer::Byte, &split, 16, 4, 0).unwrap();
        let seqs = data.test_sequences(Some(2));
        assert_eq!((seqs.len(), seqs[0].len()), (2, 16));
        assert_eq!(seqs[0][..], data.test_windows[0][..16]);
        // Validation rows: the inputs, then the last target (the next token of the text).
        let val = data.val_sequences(None);
        let rows: usize = data.val.iter().map(|b| b.batch).sum();
        assert_eq!((val.len(), val[0].len()), (rows, 17));
        assert_eq!(val[0][..16], data.val[0].x[..16]);
        assert_eq!(val[0][16], data.val[0].y[15]);
        let two = data.val_sequences(Some(2));
        assert_eq!((two[0].clone(), two[1].clone()), (val[0].clone(), val[rows / 2].clone()));
    }
}
