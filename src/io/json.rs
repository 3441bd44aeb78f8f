//! A small JSON value type, with a strict parser and a writer.
//!
//! Enough JSON for the safetensors header and for our own configs and reports, written by hand
//! so the crate needs no serde. [`parse`] turns text into a [`Json`] tree; the
//! [`Json::to_string_compact`] and [`Json::to_string_pretty`] writers turn it back.
//!
//! The parser follows RFC 8259 strictly: no comments, no trailing commas, no leading zeros or
//! `+` signs, no control characters inside strings, nothing but whitespace after the value.
//! Errors say at which byte the text went wrong and what was expected there. Nesting deeper
//! than [`MAX_DEPTH`] is refused, so hostile input cannot overflow the stack.
//!
//! Numbers are held as `f64`, as JavaScript holds them. Integers up to 2^53 are exact, which is
//! plenty for tensor shapes and byte offsets; [`Json::as_u64`] refuses anything from there on
//! rather than hand back a rounded value.
//!
//! ```
//! use lego::io::json::{self, Json};
//!
//! let v = json::parse(r#"{"dim": 64, "name": "tiny", "layers": [1, 2]}"#).unwrap();
//! assert_eq!(v.get("dim").and_then(Json::as_u64), Some(64));
//! assert_eq!(v.get("name").and_then(Json::as_str), Some("tiny"));
//! assert_eq!(v.to_string_compact(), r#"{"dim":64,"name":"tiny","layers":[1,2]}"#);
//! ```

use std::fmt::{self, Write as _};

use crate::error::{Error, Result};

/// How deeply arrays and objects may nest before [`parse`] gives up.
///
/// The parser is recursive; this bound keeps a file of ten thousand `[`s from overflowing the
/// stack. Real headers and configs nest two or three levels.
pub const MAX_DEPTH: usize = 128;

/// 2^53: every integer below it is held exactly by an `f64`, and parsing never rounds another
/// number onto one of them. (2^53 itself is where `9007199254740993` rounds to.)
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// A JSON value.
///
/// Objects keep their keys in the order they were written (a `Vec` of pairs, not a map), so
/// that a file read and written again keeps its layout. Duplicate keys are kept as they are;
/// [`Json::get`] returns the first.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number. JSON has no separate integer type; see [`Json::as_u64`].
    Number(f64),
    /// A string, with its escapes already decoded.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object: its key/value pairs in the order written.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs, in their order.
    ///
    /// ```
    /// use lego::io::json::Json;
    /// let v = Json::object([("a", Json::from(1usize)), ("b", Json::Null)]);
    /// assert_eq!(v.to_string_compact(), r#"{"a":1,"b":null}"#);
    /// ```
    pub fn object<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Object(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// An `f32` as the shortest decimal that reads back as it (`0.001`), where
    /// [`From<f32>`](Json#impl-From<f32>-for-Json) keeps the exact binary value widened to
    /// `f64` (`0.0010000000474974513`).
    ///
    /// ```
    /// use lego::io::json::Json;
    /// assert_eq!(Json::f32_decimal(0.001).to_string_compact(), "0.001");
    /// ```
    pub fn f32_decimal(x: f32) -> Json {
        Json::Number(x.to_string().parse::<f64>().unwrap_or(f64::NAN))
    }

    /// The value under `key` if this is an object that has it (the first, if it appears twice).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Number(x) => Some(*x),
            _ => None,
        }
    }

    /// The number as an unsigned integer, if it is a whole number from 0 to 2^53 - 1.
    ///
    /// From 2^53 on an `f64` can no longer hold every integer, so the text `9007199254740993`
    /// would silently come back as `...992`; such numbers give `None` instead.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(x) if x.fract() == 0.0 && *x >= 0.0 && *x < EXACT_INTEGER_LIMIT => Some(*x as u64),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The key/value pairs in written order, if this is an object.
    pub fn as_object(&self) -> Option<&[(String, Json)]> {
        match self {
            Json::Object(pairs) => Some(pairs),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The value as JSON text on one line, with no spaces: `{"a":[1,2]}`.
    ///
    /// Numbers are written so that [`parse`] gives back the same `f64` bit for bit (whole
    /// numbers without a `.0`). JSON has no NaN or infinity: a non-finite number is written as
    /// `null`, so check for them first if they matter.
    pub fn to_string_compact(&self) -> String {
        let mut out = String::new();
        write_value(&mut out, self, None, 0);
        out
    }

    /// The value as JSON text indented by two spaces a level, one element or key per line,
    /// ending without a newline. Numbers are written as by [`Json::to_string_compact`].
    pub fn to_string_pretty(&self) -> String {
        let mut out = String::new();
        write_value(&mut out, self, Some(2), 0);
        out
    }
}

/// Writes the compact form, as [`Json::to_string_compact`].
impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_compact())
    }
}

impl From<bool> for Json {
    fn from(b: bool) -> Self {
        Json::Bool(b)
    }
}

impl From<f64> for Json {
    fn from(x: f64) -> Self {
        Json::Number(x)
    }
}

impl From<f32> for Json {
    fn from(x: f32) -> Self {
        Json::Number(x as f64)
    }
}

/// Exact for counts below 2^53, beyond any tensor or file this crate handles.
impl From<usize> for Json {
    fn from(n: usize) -> Self {
        Json::Number(n as f64)
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Self {
        Json::String(s.to_string())
    }
}

impl From<String> for Json {
    fn from(s: String) -> Self {
        Json::String(s)
    }
}

impl<T: Into<Json>> From<Vec<T>> for Json {
    fn from(items: Vec<T>) -> Self {
        Json::Array(items.into_iter().map(Into::into).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Appends `value` to `out`. `indent` is `None` for the compact form, or the number of spaces a
/// level for the pretty form; `level` is how deep `value` sits.
fn write_value(out: &mut String, value: &Json, indent: Option<usize>, level: usize) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(x) => write_number(out, *x),
        Json::String(s) => write_string(out, s),
        Json::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, level + 1);
                write_value(out, item, indent, level + 1);
            }
            newline(out, indent, level);
            out.push(']');
        }
        Json::Object(pairs) => {
            if pairs.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (key, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent, level + 1);
                write_string(out, key);
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_value(out, item, indent, level + 1);
            }
            newline(out, indent, level);
            out.push('}');
        }
    }
}

/// In the pretty form, starts a new line indented to `level`; in the compact form, nothing.
fn newline(out: &mut String, indent: Option<usize>, level: usize) {
    if let Some(width) = indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', width * level));
    }
}

/// Writes a number so that it parses back to the same bits.
///
/// Rust's float formatting already prints the shortest digits that round-trip. `Display`
/// never uses an exponent, which suits whole numbers (`3`, `-0`, not `3.0`) but would spell
/// 1e300 with 301 digits; `Debug` switches to an exponent for very large and very small values
/// (`1e300`, `1e-7`) and is used for everything but moderate whole numbers.
fn write_number(out: &mut String, x: f64) {
    if !x.is_finite() {
        out.push_str("null");
    } else if x.fract() == 0.0 && x.abs() < 1e17 {
        write!(out, "{x}").unwrap();
    } else {
        write!(out, "{x:?}").unwrap();
    }
}

/// Writes a string in quotes, escaping what JSON requires: `"`, `\` and control characters.
/// Everything else, including non-ASCII text, is written as it is (the output is UTF-8).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Parses JSON text into a [`Json`] value.
///
/// The whole of `text` must be one value, with only whitespace around it. On failure the
/// error is [`Error::Format`], naming the byte offset and what was expected there, e.g.
/// `JSON: at byte 7: expected ':' after an object key`.
pub fn parse(text: &str) -> Result<Json> {
    let mut parser = Parser { text, bytes: text.as_bytes(), pos: 0, depth: 0 };
    parser.skip_whitespace();
    let value = parser.value()?;
    parser.skip_whitespace();
    if parser.pos != parser.bytes.len() {
        return Err(parser.error("end of input after the value"));
    }
    Ok(value)
}

/// A recursive-descent parser: one method per rule of the grammar, each starting at `pos`
/// and leaving `pos` just past what it read.
struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    /// How many arrays and objects enclose the current position.
    depth: usize,
}

impl Parser<'_> {
    /// An error at the current position: "expected `what`".
    fn error(&self, what: &str) -> Error {
        let found = match self.text[self.pos..].chars().next() {
            Some(c) => format!("found {c:?}"),
            None => "found the end of input".to_string(),
        };
        Error::Format(format!("JSON: at byte {}: expected {what}, {found}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// JSON whitespace is exactly space, tab, newline and carriage return.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Consumes `literal` (`true`, `false`, `null`) or fails.
    fn literal(&mut self, literal: &str, value: Json) -> Result<Json> {
        if self.bytes[self.pos..].starts_with(literal.as_bytes()) {
            self.pos += literal.len();
            Ok(value)
        } else {
            Err(self.error(&format!("'{literal}'")))
        }
    }

    /// value = object | array | string | number | true | false | null
    fn value(&mut self) -> Result<Json> {
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            _ => Err(self.error("a value")),
        }
    }

    /// Steps into an array or object, refusing to go deeper than [`MAX_DEPTH`].
    fn enter(&mut self) -> Result<()> {
        if self.depth == MAX_DEPTH {
            return Err(Error::Format(format!(
                "JSON: at byte {}: arrays and objects nest deeper than {MAX_DEPTH} levels",
                self.pos
            )));
        }
        self.depth += 1;
        self.pos += 1; // the '[' or '{'
        Ok(())
    }

    /// array = '[' ( value ( ',' value )* )? ']'
    fn array(&mut self) -> Result<Json> {
        self.enter()?;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value()?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => break,
                _ => return Err(self.error("',' or ']' in an array")),
            }
        }
        self.pos += 1;
        self.depth -= 1;
        Ok(Json::Array(items))
    }

    /// object = '{' ( string ':' value ( ',' string ':' value )* )? '}'
    fn object(&mut self) -> Result<Json> {
        self.enter()?;
        let mut pairs = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Json::Object(pairs));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("a string as an object key"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("':' after an object key"));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value()?;
            pairs.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => break,
                _ => return Err(self.error("',' or '}' in an object")),
            }
        }
        self.pos += 1;
        self.depth -= 1;
        Ok(Json::Object(pairs))
    }

    /// number = '-'? ( '0' | [1-9][0-9]* ) ( '.' [0-9]+ )? ( [eE] [+-]? [0-9]+ )?
    ///
    /// The grammar is checked here; the digits are then converted by `str::parse::<f64>`,
    /// which rounds correctly. A number too large for an `f64` is refused rather than turned
    /// into infinity, which JSON cannot write back.
    fn number(&mut self) -> Result<Json> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("a digit after the decimal point"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("a digit in the exponent"));
            }
            self.digits();
        }
        let literal = &self.text[start..self.pos];
        let x: f64 = literal.parse().expect("the grammar above only admits valid floats");
        if !x.is_finite() {
            return Err(Error::Format(format!(
                "JSON: at byte {start}: number {literal} is too large for an f64"
            )));
        }
        Ok(Json::Number(x))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    /// string = '"' ( unescaped character | '\' escape )* '"'
    ///
    /// Runs of plain characters are copied as whole slices of the (already valid UTF-8) input.
    fn string(&mut self) -> Result<String> {
        self.pos += 1; // the opening quote
        let mut out = String::new();
        let mut run_start = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.error("'\"' to close the string")),
                Some(b'"') => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    out.push(self.escape()?);
                    run_start = self.pos;
                }
                Some(0x00..=0x1F) => {
                    return Err(self.error("no raw control character in a string (escape it)"));
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// The character after a backslash: one of `"\/bfnrt`, or `uXXXX`. A `\uXXXX` in the
    /// high-surrogate range must be followed by a `\uXXXX` low surrogate; the pair encodes one
    /// character beyond U+FFFF (UTF-16's scheme). A lone surrogate is not a character.
    fn escape(&mut self) -> Result<char> {
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{08}',
            Some(b'f') => '\u{0C}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let first = self.hex4()?;
                return match first {
                    0xD800..=0xDBFF => {
                        if !self.bytes[self.pos..].starts_with(b"\\u") {
                            return Err(self.error("'\\u' and a low surrogate after a high one"));
                        }
                        self.pos += 2;
                        let low_at = self.pos;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            self.pos = low_at;
                            return Err(self.error("a low surrogate (DC00-DFFF)"));
                        }
                        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                        Ok(char::from_u32(code).expect("a surrogate pair is a valid char"))
                    }
                    0xDC00..=0xDFFF => {
                        self.pos -= 4;
                        Err(self.error("a high surrogate before a low one"))
                    }
                    _ => Ok(char::from_u32(first).expect("a non-surrogate BMP code is a char")),
                };
            }
            _ => return Err(self.error("an escape: one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u")),
        };
        self.pos += 1;
        Ok(c)
    }

    /// Four hex digits, as after `\u`.
    fn hex4(&mut self) -> Result<u32> {
        let mut code = 0;
        for _ in 0..4 {
            let digit = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.error("four hex digits after '\\u'")),
            };
            code = code * 16 + digit as u32;
            self.pos += 1;
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(v) => panic!("{text:?} should not parse, got {v:?}"),
            Err(Error::Format(msg)) => msg,
            Err(other) => panic!("expected Error::Format, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_kind_of_value() {
        let v = parse(r#" { "a": [1, -2.5, 3e2, true, false, null], "b": {"c": "d"}, "e": {} } "#).unwrap();
        assert_eq!(
            v,
            Json::Object(vec![
                (
                    "a".into(),
                    Json::Array(vec![
                        Json::Number(1.0),
                        Json::Number(-2.5),
                        Json::Number(300.0),
                        Json::Bool(true),
                        Json::Bool(false),
                        Json::Null,
                    ])
                ),
                ("b".into(), Json::Object(vec![("c".into(), Json::String("d".into()))])),
                ("e".into(), Json::Object(vec![])),
            ])
        );
        assert_eq!(parse("[]").unwrap(), Json::Array(vec![]));
        assert_eq!(parse("\"\"").unwrap(), Json::String(String::new()));
        assert_eq!(parse("-0").unwrap().as_f64().unwrap().to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn objects_keep_insertion_order() {
        let v = parse(r#"{"z": 1, "a": 2, "m": 3}"#).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "a", "m"]);
        assert_eq!(v.to_string_compact(), r#"{"z":1,"a":2,"m":3}"#);
    }

    #[test]
    fn get_returns_the_first_of_duplicate_keys() {
        let v = parse(r#"{"k": 1, "k": 2}"#).unwrap();
        assert_eq!(v.get("k"), Some(&Json::Number(1.0)));
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert_eq!(v.get("missing"), None);
        assert_eq!(Json::Null.get("k"), None);
    }

    #[test]
    fn string_escapes_decode() {
        let v = parse(r#""q\" b\\ s\/ \b\f\n\r\t \u0041\u00e9\u20AC \ud83d\ude00 raw é€😀""#).unwrap();
        assert_eq!(v.as_str().unwrap(), "q\" b\\ s/ \u{8}\u{c}\n\r\t Aé€ 😀 raw é€😀");
    }

    #[test]
    fn bad_escapes_and_surrogates_are_rejected() {
        assert!(err(r#""\x""#).contains("an escape"));
        assert!(err(r#""\u12""#).contains("four hex digits"));
        assert!(err(r#""\ud83d""#).contains("low surrogate"));
        assert!(err(r#""\ud83d\u0041""#).contains("a low surrogate (DC00-DFFF)"));
        assert!(err(r#""\ude00""#).contains("a high surrogate before a low one"));
        assert!(err("\"tab\there\"").contains("control character"));
        assert!(err("\"open").contains("to close the string"));
    }

    #[test]
    fn number_grammar_is_strict() {
        for bad in ["01", "+1", "1.", ".5", "1e", "1e+", "-", "- 1", "0x10", "NaN", "Infinity"] {
            let _ = err(bad);
        }
        assert!(err("1e400").contains("too large"));
        assert_eq!(parse("1E+2").unwrap(), Json::Number(100.0));
        assert_eq!(parse("-0.25e-1").unwrap(), Json::Number(-0.025));
    }

    #[test]
    fn errors_name_the_byte_and_what_was_expected() {
        assert_eq!(err(r#"{"a" 1}"#), "JSON: at byte 5: expected ':' after an object key, found '1'");
        assert_eq!(err("[1,]"), "JSON: at byte 3: expected a value, found ']'");
        assert_eq!(err("{\"a\":1,}"), "JSON: at byte 7: expected a string as an object key, found '}'");
        assert_eq!(err("[1 2]"), "JSON: at byte 3: expected ',' or ']' in an array, found '2'");
        assert_eq!(err(""), "JSON: at byte 0: expected a value, found the end of input");
        assert!(err("tru").contains("'true'"));
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        assert!(err("{} x").contains("end of input after the value"));
        assert!(err("1 2").contains("at byte 2"));
        assert!(parse(" {}\n\t\r ").is_ok());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
        let too_deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(err(&too_deep).contains("deeper than 128"));
        let hostile = "[{\"a\":".repeat(100_000);
        assert!(err(&hostile).contains("deeper than"));
    }

    #[test]
    fn numbers_round_trip_bit_exactly() {
        let values = [
            0.0,
            -0.0,
            1.0,
            -3.0,
            0.1,
            1.0 / 3.0,
            1e-7,
            123456.789,
            9_007_199_254_740_993.0,
            1e16,
            1e17,
            1e300,
            -2.5e-300,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::MIN,
            f32::MAX as f64,
            std::f64::consts::PI,
        ];
        for x in values {
            let text = Json::Number(x).to_string_compact();
            let back = parse(&text).unwrap().as_f64().unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x:e} written as {text}");
        }
    }

    #[test]
    fn numbers_are_written_plainly() {
        let text = |x: f64| Json::Number(x).to_string_compact();
        assert_eq!(text(3.0), "3");
        assert_eq!(text(-0.0), "-0");
        assert_eq!(text(0.5), "0.5");
        assert_eq!(text(1e16), "10000000000000000");
        assert_eq!(text(1e300), "1e300");
        assert_eq!(text(1e-7), "1e-7");
        assert_eq!(text(f64::NAN), "null");
        assert_eq!(text(f64::NEG_INFINITY), "null");
    }

    #[test]
    fn strings_round_trip_through_the_writer() {
        let s = "quote\" backslash\\ nl\n cr\r tab\t bell\u{7} nul\0 del\u{7f} é 😀 /";
        let text = Json::String(s.into()).to_string_compact();
        assert_eq!(
            text,
            "\"quote\\\" backslash\\\\ nl\\n cr\\r tab\\t bell\\u0007 nul\\u0000 del\u{7f} é 😀 /\""
        );
        assert_eq!(parse(&text).unwrap().as_str(), Some(s));
    }

    #[test]
    fn pretty_printing_indents_and_round_trips() {
        let v = parse(r#"{"a":[1,{"b":null}],"c":{},"d":[]}"#).unwrap();
        let pretty = v.to_string_pretty();
        assert_eq!(
            pretty,
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": null\n    }\n  ],\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(parse(&pretty).unwrap(), v);
        assert_eq!(format!("{v}"), v.to_string_compact());
    }

    #[test]
    fn accessors() {
        let v =
            parse(r#"{"n": 7, "f": 1.5, "neg": -1, "big": 9007199254740993, "s": "x", "b": true, "a": [1]}"#)
                .unwrap();
        assert_eq!(v.get("n").unwrap().as_u64(), Some(7));
        assert_eq!(v.get("f").unwrap().as_u64(), None);
        assert_eq!(v.get("f").unwrap().as_f64(), Some(1.5));
        assert_eq!(v.get("neg").unwrap().as_u64(), None);
        assert_eq!(v.get("big").unwrap().as_u64(), None, "beyond 2^53 is not exact");
        assert_eq!(Json::Number(9_007_199_254_740_991.0).as_u64(), Some((1 << 53) - 1));
        assert_eq!(Json::Number(9_007_199_254_740_992.0).as_u64(), None);
        assert_eq!(v.get("s").unwrap().as_str(), Some("x"));
        assert_eq!(v.get("s").unwrap().as_f64(), None);
        assert_eq!(v.get("b").unwrap().as_bool(), Some(true));
        assert_eq!(v.get("a").unwrap().as_array(), Some(&[Json::Number(1.0)][..]));
        assert!(v.get("a").unwrap().as_object().is_none());
        assert!(Json::Null.is_null());
    }

    #[test]
    fn from_conversions_build_values() {
        let v = Json::Object(vec![
            ("dims".into(), vec![2usize, 3].into()),
            ("lr".into(), 0.5f32.into()),
            ("name".into(), "tiny".into()),
            ("ok".into(), true.into()),
        ]);
        assert_eq!(v.to_string_compact(), r#"{"dims":[2,3],"lr":0.5,"name":"tiny","ok":true}"#);
    }
}
