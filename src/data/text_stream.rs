//! Text from a stream of token ids, one piece as each token arrives.
//!
//! A byte-level model emits UTF-8 one byte at a time, so a character of two to four bytes
//! arrives in as many tokens. Printing each byte as it comes would show broken characters;
//! [`TextStream`] holds back the bytes of a character until it is whole:
//!
//! ```text
//! bytes in:   0x68  0xC3  0xA9  0xF0 0x9F 0x8E 0x89
//! text out:   "h"   ""    "é"   ""   ""   ""   "🎉"
//! ```
//!
//! Bytes that can never become a character (a stray continuation byte, a sequence cut short
//! by another start) come out as `U+FFFD`, one for each maximal invalid piece, exactly as
//! [`String::from_utf8_lossy`] shows them: the pieces of a whole stream, joined, equal the lossy
//! decoding of all its bytes at once. Words (the word tokenizer) come out whole, each after a
//! space.

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Turns one row's token ids into text as they arrive (see the [module docs](self)). The
/// buffers are kept between tokens, so a stream allocates only while its longest piece grows.
#[derive(Debug)]
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    /// Bytes of a character still incomplete (at most 3).
    pending: Vec<u8>,
    /// The text of the last token.
    piece: String,
}

impl<'t> TextStream<'t> {
    /// A stream for ids of `tokenizer`.
    pub fn new(tokenizer: &'t Tokenizer) -> TextStream<'t> {
        TextStream { tokenizer, pending: Vec::with_capacity(8), piece: String::with_capacity(64) }
    }

    /// The text that token `id` completes: `""` while a character is unfinished. An error
    /// names an id outside the tokenizer's vocabulary.
    ///
    /// ```
    /// use lego::data::{TextStream, Tokenizer};
    ///
    /// let mut stream = TextStream::new(&Tokenizer::Byte);
    /// let pieces: Vec<String> =
    ///     "né".bytes().map(|b| stream.push(b as usize).unwrap().to_string()).collect();
    /// assert_eq!(pieces, ["n", "", "é"]);
    /// ```
    pub fn push(&mut self, id: usize) -> Result<&str> {
        self.piece.clear();
        let v = self.tokenizer.vocab_size();
        if id >= v {
            return Err(Error::Input(format!(
                "token id {id} is outside the {} tokenizer's vocabulary of {v} ids",
                self.tokenizer.kind()
            )));
        }
        match self.tokenizer {
            Tokenizer::Word(vocab) => {
                self.piece.push(' ');
                self.piece.push_str(&vocab.words()[id]);
            }
            Tokenizer::Byte => {
                self.pending.push(id as u8); // below 256: checked above
                self.emit_complete();
            }
        }
        Ok(&self.piece)
    }

    /// What is left at the end of the stream: a character cut short, as `U+FFFD`, or `""`.
    pub fn finish(&mut self) -> &str {
        self.piece.clear();
        if !self.pending.is_empty() {
            self.piece.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        &self.piece
    }

    /// Moves every whole character (and every invalid piece, as `U+FFFD`) from `pending` to
    /// `piece`, leaving only the start of an unfinished character.
    fn emit_complete(&mut self) {
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    self.piece.push_str(text);
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    let text = std::str::from_utf8(&self.pending[..valid]).expect("checked valid");
                    self.piece.push_str(text);
                    match e.error_len() {
                        // The bytes after `valid` may still become a character: wait.
                        None => {
                            self.pending.drain(..valid);
                            return;
                        }
                        // They never will: one replacement character for them, and go on.
                        Some(bad) => {
                            self.piece.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `bytes` one at a time; returns the pieces (the last from `finish`).
    fn pieces(bytes: &[u8]) -> Vec<String> {
        let tok = Tokenizer::Byte;
        let mut s = TextStream::new(&tok);
        let mut out: Vec<String> = bytes.iter().map(|&b| s.push(b as usize).unwrap().to_string()).collect();
        out.push(s.finish().to_string());
        out
    }

    #[test]
    fn characters_split_over_tokens_come_out_whole() {
        let text = "aé世🎉z";
        let got = pieces(text.as_bytes());
        assert_eq!(got, ["a", "", "é", "", "", "世", "", "", "", "🎉", "z", ""]);
        assert_eq!(got.concat(), text);
    }

    #[test]
    fn invalid_bytes_come_out_as_the_lossy_decoding_does() {
        let cases: [&[u8]; 6] = [
            &[0x80, b'a'],                   // a stray continuation byte
            &[0xE4, 0xB8, b'a'],             // a character cut short by ASCII
            &[0xE4, 0xB8, 0xE4, 0xB8, 0x96], // cut short by another start
            &[0xF0, 0x9F, 0x8E],             // cut short by the end of the stream
            &[0xFF, 0xFE, 0xC3, 0xA9],       // bytes that are never UTF-8
            &[0xED, 0xA0, 0x80],             // an encoded surrogate
        ];
        for bytes in cases {
            let got = pieces(bytes);
            assert_eq!(got.concat(), String::from_utf8_lossy(bytes), "{bytes:x?}");
        }
    }

    #[test]
    fn words_come_out_after_a_space_and_bad_ids_are_errors() {
        let docs = [crate::data::Document::new("a", "to be or not to be")];
        let tok = Tokenizer::word(&docs, 10).unwrap();
        let mut s = TextStream::new(&tok);
        let ids = tok.encode("not to be");
        let got: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap().to_string()).collect();
        assert_eq!(got.concat(), " not to be");
        assert!(s.push(99).is_err());
        assert!(TextStream::new(&Tokenizer::Byte).push(256).unwrap_err().to_string().contains("256"));
    }
}
