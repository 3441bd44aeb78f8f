//! Tokenizers: text to token ids and back.
//!
//! Two kinds, both fitted (if at all) on the **training** documents only, so that nothing about
//! the validation and test text (not even which words it uses) leaks into the model:
//!
//! - [`Tokenizer::Byte`]: the UTF-8 bytes of the text, vocabulary 256. Needs no fitting, never
//!   meets an unknown token, and decodes any sequence of ids below 256 (invalid UTF-8 becomes
//!   `U+FFFD`); an id of 256 or more is an error.
//! - [`Tokenizer::Word`]: the specification's word level, as its prototype ran on WikiText-2. A
//!   word is a maximal run of non-whitespace, lowercased ([`words`]): punctuation stays on the
//!   word (`"lord,"` and `"lord"` are two words). The vocabulary is `<unk>` (id 0) followed by
//!   the training split's most frequent words, most frequent first (id 1 is the commonest
//!   word), equally frequent words in lexicographic order, capped at `max_vocab` entries
//!   including `<unk>` ([`DEFAULT_WORD_VOCAB`] = 8192 by default). Every other word encodes to
//!   `<unk>`. Decoding joins the words with single spaces, so it gives back the text's words
//!   but not its line breaks or capitals.
//!
//! A tokenizer is stored beside the model as JSON ([`Tokenizer::to_json`]), e.g. as a string in
//! a checkpoint's metadata:
//!
//! ```text
//! {"kind":"byte"}
//! {"kind":"word","vocab":["<unk>","the",".","and",...]}      // vocab[id] is the word of id
//! ```

use std::collections::HashMap;

use super::text::Document;
use crate::error::{Error, Result};
use crate::io::json::{self, Json};

/// The word standing for every word outside the vocabulary.
pub const UNK: &str = "<unk>";

/// The id of [`UNK`] in every word vocabulary.
pub const UNK_ID: usize = 0;

/// The default cap on the word vocabulary, `<unk>` included.
pub const DEFAULT_WORD_VOCAB: usize = 8192;

/// The size of the byte vocabulary.
const BYTE_VOCAB: usize = 256;

/// Splits text into the word level's words: runs of non-whitespace, lowercased.
///
/// ```
/// let words: Vec<String> = lego::data::tokenizer::words("To be,\tor NOT\n").collect();
/// assert_eq!(words, ["to", "be,", "or", "not"]);
/// ```
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split_whitespace().map(str::to_lowercase)
}

/// Turns text into token ids and ids back into text. See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub enum Tokenizer {
    /// UTF-8 bytes, ids 0..256.
    Byte,
    /// Lowercased whitespace-separated words, ids into a vocabulary fitted on training text.
    Word(WordVocab),
}

/// The word tokenizer's vocabulary: `<unk>` and the words it knows, in id order.
#[derive(Debug, Clone, PartialEq)]
pub struct WordVocab {
    /// `words[id]` is the word of `id`; `words[0]` is `<unk>`.
    words: Vec<String>,
    /// The inverse of `words`.
    ids: HashMap<String, usize>,
}

impl WordVocab {
    /// Builds the vocabulary from its words in id order, checking that it is one this module
    /// could have made: `<unk>` first and nowhere else, every word non-empty, without
    /// whitespace, lowercase, and listed once. The message says what is wrong.
    fn from_words(words: Vec<String>) -> std::result::Result<WordVocab, String> {
        if words.first().map(String::as_str) != Some(UNK) {
            return Err(format!("the first word must be {UNK:?}"));
        }
        let mut ids = HashMap::with_capacity(words.len());
        for (id, word) in words.iter().enumerate() {
            if word.is_empty() || word.chars().any(char::is_whitespace) {
                return Err(format!("word {id} ({word:?}) is empty or holds whitespace"));
            }
            if id > 0 && (word == UNK || word.to_lowercase() != *word) {
                return Err(format!(
                    "word {id} ({word:?}) could never be produced (not lowercase, or {UNK:?})"
                ));
            }
            if ids.insert(word.clone(), id).is_some() {
                return Err(format!("word {id} ({word:?}) is listed twice"));
            }
        }
        Ok(WordVocab { words, ids })
    }

    /// The words in id order (`<unk>` first).
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// The id of `word` (already lowercased), if it is in the vocabulary.
    pub fn id(&self, word: &str) -> Option<usize> {
        self.ids.get(word).copied()
    }
}

impl Tokenizer {
    /// Fits a word tokenizer on `docs` (pass the **training** split): `<unk>` and the
    /// `max_vocab - 1` most frequent words, by count and then lexicographically.
    ///
    /// The result does not depend on the order of `docs`. The vocabulary is smaller than
    /// `max_vocab` if the text has fewer distinct words.
    ///
    /// Errors ([`Error::Input`]): `max_vocab` below 2 (room for `<unk>` and one word); no word
    /// at all in `docs`.
    ///
    /// ```
    /// use lego::data::{Document, Tokenizer};
    ///
    /// let train = [Document::new("a", "The cat saw the dog. the end")];
    /// let tok = Tokenizer::word(&train, 4).unwrap();
    /// // "the" (3 times), then the one-timers "cat" and "dog." alphabetically; the rest is <unk>.
    /// assert_eq!(tok.encode("the dog. saw THE cat"), [1, 3, 0, 1, 2]);
    /// assert_eq!(tok.decode(&[1, 2, 0]).unwrap(), "the cat <unk>");
    /// ```
    pub fn word(docs: &[Document], max_vocab: usize) -> Result<Tokenizer> {
        if max_vocab < 2 {
            return Err(Error::Input(format!(
                "word vocabulary cap {max_vocab} leaves no room for a word beside {UNK}; use at least 2"
            )));
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for doc in docs {
            for word in words(&doc.text) {
                *counts.entry(word).or_insert(0) += 1;
            }
        }
        // A training text could itself contain "<unk>"; it is the unknown word already.
        counts.remove(UNK);
        if counts.is_empty() {
            return Err(Error::Input(
                "no words to build a vocabulary from: the training documents are empty".into(),
            ));
        }
        let mut ranked: Vec<(String, usize)> = counts.into_iter().collect();
        // Most frequent first; ties in lexicographic order, so the result is the same whatever
        // order the hash map handed the words out in.
        ranked.sort_unstable_by(|(wa, ca), (wb, cb)| cb.cmp(ca).then_with(|| wa.cmp(wb)));
        ranked.truncate(max_vocab - 1);
        let vocab = std::iter::once(UNK.to_string()).chain(ranked.into_iter().map(|(w, _)| w)).collect();
        let vocab = WordVocab::from_words(vocab).expect("words from `words` are well formed");
        Ok(Tokenizer::Word(vocab))
    }

    /// How many distinct ids this tokenizer produces: 256 for bytes, the vocabulary's length
    /// (`<unk>` included) for words. The model's embedding and output have this many rows.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => BYTE_VOCAB,
            Tokenizer::Word(vocab) => vocab.words.len(),
        }
    }

    /// `"byte"` or `"word"`, as in the JSON form.
    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Word(_) => "word",
        }
    }

    /// The token ids of `text`, each below [`Tokenizer::vocab_size`].
    pub fn encode(&self, text: &str) -> Vec<usize> {
        match self {
            Tokenizer::Byte => text.bytes().map(usize::from).collect(),
            Tokenizer::Word(vocab) => words(text).map(|w| vocab.id(&w).unwrap_or(UNK_ID)).collect(),
        }
    }

    /// The text of `ids`.
    ///
    /// Bytes are decoded as UTF-8, lossily: a sequence that is not valid UTF-8 (the model cut a
    /// character in half) becomes `U+FFFD`, as a text viewer would show it. Words are joined
    /// with single spaces.
    ///
    /// Errors ([`Error::Input`]): an id at or above [`Tokenizer::vocab_size`], naming it and its
    /// position. Such an id did not come from this tokenizer or from a model over its
    /// vocabulary (a mismatched checkpoint, a corrupt file), and a stand-in character would
    /// hide that.
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        self.check_ids(ids)?;
        Ok(match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect(); // all < 256, checked
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Word(vocab) => {
                let words: Vec<&str> = ids.iter().map(|&id| vocab.words[id].as_str()).collect();
                words.join(" ")
            }
        })
    }

    /// One token as a reader should see it in a report: the word itself, or for bytes the
    /// character if it is printable ASCII and `<0xNN>` otherwise (`<0x0A>` for a newline).
    /// Errors as [`Tokenizer::decode`] does for an id outside the vocabulary.
    pub fn token_text(&self, id: usize) -> Result<String> {
        self.check_ids(&[id])?;
        Ok(match self {
            Tokenizer::Byte => match id as u8 {
                b if b.is_ascii_graphic() || b == b' ' => char::from(b).to_string(),
                b => format!("<0x{b:02X}>"),
            },
            Tokenizer::Word(vocab) => vocab.words[id].clone(),
        })
    }

    /// An error naming the first id of `ids` outside the vocabulary, if there is one.
    fn check_ids(&self, ids: &[usize]) -> Result<()> {
        let v = self.vocab_size();
        match ids.iter().position(|&id| id >= v) {
            None => Ok(()),
            Some(i) => Err(Error::Input(format!(
                "token id {} at position {i} is outside the {} tokenizer's vocabulary of {v} ids",
                ids[i],
                self.kind()
            ))),
        }
    }

    /// The tokenizer as JSON: `{"kind":"byte"}`, or `{"kind":"word","vocab":[...]}` with the
    /// words in id order. [`Tokenizer::from_json`] reads it back.
    pub fn to_json(&self) -> Json {
        let mut pairs = vec![("kind".to_string(), Json::from(self.kind()))];
        if let Tokenizer::Word(vocab) = self {
            pairs.push(("vocab".into(), Json::from(vocab.words.clone())));
        }
        Json::Object(pairs)
    }

    /// Reads a tokenizer written by [`Tokenizer::to_json`].
    ///
    /// Errors ([`Error::Format`], starting `tokenizer JSON:`): not an object; a missing or
    /// unknown `kind`; for words, a missing `vocab`, a non-string entry, or a vocabulary this
    /// module could not have made (`<unk>` not first, a repeated, empty, uppercase or spaced
    /// word).
    pub fn from_json(value: &Json) -> Result<Tokenizer> {
        let bad = |what: String| Error::Format(format!("tokenizer JSON: {what}"));
        if value.as_object().is_none() {
            return Err(bad(format!("expected an object, found {value}")));
        }
        let kind =
            value.get("kind").and_then(Json::as_str).ok_or_else(|| bad("no \"kind\" string".into()))?;
        match kind {
            "byte" => Ok(Tokenizer::Byte),
            "word" => {
                let items = value
                    .get("vocab")
                    .and_then(Json::as_array)
                    .ok_or_else(|| bad("a word tokenizer needs a \"vocab\" array".into()))?;
                let words = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        item.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("vocab entry {i} is {item}, not a string")))
                    })
                    .collect::<Result<Vec<String>>>()?;
                let vocab = WordVocab::from_words(words).map_err(|e| bad(format!("vocab: {e}")))?;
                Ok(Tokenizer::Word(vocab))
            }
            other => Err(bad(format!("unknown kind {other:?} (expected \"byte\" or \"word\")"))),
        }
    }

    /// Reads a tokenizer from JSON text, as stored in a checkpoint's metadata: parses it, then
    /// [`Tokenizer::from_json`]. Errors are [`Error::Format`].
    pub fn from_json_str(text: &str) -> Result<Tokenizer> {
        Tokenizer::from_json(&json::parse(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fitted(text: &str, max_vocab: usize) -> Tokenizer {
        Tokenizer::word(&[Document::new("train", text)], max_vocab).unwrap()
    }

    fn vocab(tok: &Tokenizer) -> Vec<&str> {
        match tok {
            Tokenizer::Word(v) => v.words().iter().map(String::as_str).collect(),
            Tokenizer::Byte => panic!("not a word tokenizer"),
        }
    }

    #[test]
    fn word_vocabulary_is_ranked_by_count_then_alphabetically_and_capped() {
        let tok = fitted("b a c a b a d <unk> e", 4);
        // a x3, b x2, then c, d, e once each: c wins the tie alphabetically; <unk> in the text
        // is not a word of its own.
        assert_eq!(vocab(&tok), ["<unk>", "a", "b", "c"]);
        assert_eq!(tok.vocab_size(), 4);
        // The order of the documents does not matter.
        let docs = [Document::new("1", "e d c"), Document::new("2", "b a b a a")];
        let reversed = [docs[1].clone(), docs[0].clone()];
        assert_eq!(Tokenizer::word(&docs, 4).unwrap(), Tokenizer::word(&reversed, 4).unwrap());
        // A cap above the number of words keeps them all.
        assert_eq!(fitted("x y", 100).vocab_size(), 3);
    }

    #[test]
    fn words_are_lowercased_and_unknown_words_are_unk() {
        let tok = fitted("Hello World hello", 10);
        assert_eq!(vocab(&tok), ["<unk>", "hello", "world"]);
        assert_eq!(tok.encode("HELLO\tnew  world\n"), [1, 0, 2]);
        assert_eq!(tok.decode(&[1, 0, 2]).unwrap(), "hello <unk> world");
        assert_eq!(tok.token_text(2).unwrap(), "world");
    }

    #[test]
    fn bytes_round_trip_utf8_and_decode_lossily() {
        let tok = Tokenizer::Byte;
        let text = "héllo, 世界! 😀\n";
        let ids = tok.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| id < 256));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Half a character is the model's to produce, and reads as U+FFFD.
        assert_eq!(tok.decode(&[0x68, 0xC3]).unwrap(), "h\u{fffd}");
        assert_eq!(tok.token_text(b'a' as usize).unwrap(), "a");
        assert_eq!(tok.token_text(10).unwrap(), "<0x0A>");
    }

    #[test]
    fn ids_outside_the_vocabulary_are_errors_naming_the_id() {
        let word = fitted("hello world", 10);
        for (tok, ids, want) in [
            (
                Tokenizer::Byte,
                vec![0x61, 300],
                "token id 300 at position 1 is outside the byte tokenizer's vocabulary of 256 ids",
            ),
            (
                word.clone(),
                vec![1, 0, 2, 3],
                "token id 3 at position 3 is outside the word tokenizer's vocabulary of 3 ids",
            ),
        ] {
            let err = tok.decode(&ids).unwrap_err();
            assert!(matches!(err, Error::Input(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err}");
        }
        assert!(Tokenizer::Byte.token_text(256).unwrap_err().to_string().contains("token id 256"));
        assert!(word.token_text(usize::MAX).is_err());
    }

    #[test]
    fn json_round_trips() {
        for tok in [Tokenizer::Byte, fitted("the \"quoted\" é word\\ the", 16)] {
            let text = tok.to_json().to_string_compact();
            assert_eq!(Tokenizer::from_json_str(&text).unwrap(), tok, "{text}");
        }
        assert_eq!(
            fitted("b a a", 8).to_json().to_string_compact(),
            r#"{"kind":"word","vocab":["<unk>","a","b"]}"#
        );
    }

    #[test]
    fn malformed_json_is_a_format_error() {
        let cases = [
            ("[1]", "expected an object"),
            (r#"{"vocab":[]}"#, "kind"),
            (r#"{"kind":"bpe"}"#, "unknown kind"),
            (r#"{"kind":"word"}"#, "vocab"),
            (r#"{"kind":"word","vocab":["<unk>",3]}"#, "not a string"),
            (r#"{"kind":"word","vocab":["a","<unk>"]}"#, "first word"),
            (r#"{"kind":"word","vocab":["<unk>","a","a"]}"#, "twice"),
            (r#"{"kind":"word","vocab":["<unk>","A"]}"#, "never be produced"),
            (r#"{"kind":"word","vocab":["<unk>","a b"]}"#, "whitespace"),
            ("{", "JSON"),
        ];
        for (text, expected) in cases {
            let err = Tokenizer::from_json_str(text).unwrap_err();
            assert!(matches!(err, Error::Format(_)), "{text}: {err:?}");
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn bad_fitting_inputs_are_errors() {
        let docs = [Document::new("a", "some words")];
        assert!(matches!(Tokenizer::word(&docs, 1), Err(Error::Input(_))));
        let empty = [Document::new("a", "  \n")];
        let err = Tokenizer::word(&empty, 10).unwrap_err();
        assert!(err.to_string().contains("no words"), "{err}");
    }
}
