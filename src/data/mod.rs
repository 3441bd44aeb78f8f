//! Data: from text files to the `[batch, seq]` token batches the trainer eats.
//!
//! The data flows through this module in one direction, one step a file:
//!
//! ```text
//! files ──load_texts──▶ Vec<Document> ──split_documents──▶ Split { train, val, test }
//!                                                               │
//!            Tokenizer::word(&split.train, ..) / Tokenizer::Byte ◀┘  (fitted on train only)
//!                                                               │
//! each document ──Tokenizer::encode──▶ token stream (Vec<usize>)
//!               ──make_sequences────▶ windows of seq_len + 1 tokens
//!               ──batches───────────▶ Vec<Batch>: x and y, row-major [batch, seq], y shifted by one
//! ```
//!
//! - [`text`]: [`Document`] (a named text), [`load_texts`] (a file, or a directory of files, one
//!   document a file) and [`split_blocks`] (one file cut at its blank lines, for corpora that
//!   come as a single file);
//! - [`split`]: [`split_documents`], a seeded, disjoint train / validation / test split of whole
//!   documents, so that no test text leaks into training through a shared document;
//! - [`tokenizer`]: [`Tokenizer`], bytes (vocabulary 256) or the specification's word level
//!   (lowercased whitespace-separated words, `<unk>` = 0, the most frequent words of the
//!   *training* split), with JSON serialisation for a checkpoint's metadata;
//! - [`text_stream`]: [`TextStream`], generated ids back to text as they arrive, a UTF-8
//!   character split over byte tokens held back until it is whole;
//! - [`batches`](mod@batches): [`make_sequences`], [`Batch`], [`batches()`] and the
//!   specification's random [`create_synthetic_data`];
//! - [`dataset`]: [`Dataset`], a whole split as training, validation and test batches in one
//!   call;
//! - [`synthetic`]: a small generated language with easy and hard tokens, the examples' default
//!   corpus when no download is wanted.
//!
//! The unit of the split is the **document**: whole documents go to train, validation or test,
//! never pieces of one. A corpus of many files (Shakespeare, one work a file, fetched by
//! `scripts/fetch-shakespeare.sh`) splits by file; a corpus that is one file can be cut into its
//! blank-line-separated blocks first with [`split_blocks`].
//!
//! Sequences never cross a document boundary: each document is encoded and windowed on its own
//! ([`sequences_from_documents`]).
//!
//! ```
//! use lego::data::{self, Tokenizer};
//!
//! let docs = data::synthetic::generate_corpus(&data::synthetic::SyntheticConfig {
//!     documents: 6,
//!     bytes_per_document: 2_000,
//!     seed: 7,
//! });
//! let split = data::split_documents(docs, 1, 1, 42).unwrap();
//! let tokenizer = Tokenizer::word(&split.train, 512).unwrap();
//! let sequences = data::sequences_from_documents(&tokenizer, &split.train, 16);
//! let train = data::batches(&sequences, 8, Some(0)).unwrap();
//! assert_eq!((train[0].batch, train[0].seq), (8, 16));
//! assert_eq!(train[0].x[1], train[0].y[0]); // y is x shifted by one
//! ```

pub mod batches;
pub mod dataset;
pub mod split;
pub mod synthetic;
pub mod text;
pub mod text_stream;
pub mod tokenizer;

pub use batches::{Batch, batches, create_synthetic_data, make_sequences, sequences_from_documents};
pub use dataset::Dataset;
pub use split::{Split, split_documents};
pub use synthetic::{SyntheticConfig, generate_corpus};
pub use text::{Document, load_texts, split_blocks};
pub use text_stream::TextStream;
pub use tokenizer::{DEFAULT_WORD_VOCAB, Tokenizer, UNK, UNK_ID};
