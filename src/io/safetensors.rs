//! The safetensors checkpoint format, read and written by hand.
//!
//! A safetensors file is three parts, one after the other:
//!
//! ```text
//! [ 8 bytes ]  N, the header length, a little-endian u64
//! [ N bytes ]  the header: a JSON object, padded with spaces to a multiple of 8 bytes
//! [ the rest ] the data section: every tensor's raw little-endian values, back to back
//! ```
//!
//! The header maps each tensor name to where its values are, plus an optional
//! `"__metadata__"` object of string-to-string pairs (we store the model config there):
//!
//! ```text
//! {"__metadata__":{"dim":"64"},
//!  "blocks.0.attn.wq":{"dtype":"F32","shape":[64,64],"data_offsets":[0,16384]},
//!  "embed":{"dtype":"F32","shape":[256,64],"data_offsets":[16384,81920]}}
//! ```
//!
//! `data_offsets` are `[begin, end)` byte positions counted from the start of the data
//! section. The format requires the tensors to cover the data section exactly, with no holes
//! and no overlaps (so no other content can hide in the file); we write tensors in sorted name
//! order, each right after the one before.
//!
//! This crate is f32-only, so only the `F32` dtype is read and written. Reading trusts
//! nothing: every length, offset and shape is checked against the file, and a bad file gives
//! [`Error::Format`] naming the file and the problem, never a panic. The reference
//! implementation (the `safetensors` crate) is held against this one by
//! `tests/safetensors_interop.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use super::atomic::write_atomic;
use super::json::{self, Json};
use crate::error::{Error, Result};

/// The header may be at most this long (100 MB), the reference implementation's limit. A
/// larger length is taken as a sign of a corrupt or hostile file rather than read.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The key of the header entry that holds string metadata instead of a tensor.
const METADATA_KEY: &str = "__metadata__";

/// One tensor read from a file: its shape and its values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// The size of each dimension; `[]` is a scalar holding one value.
    pub shape: Vec<usize>,
    /// The values, `shape.iter().product()` of them, the last dimension varying fastest.
    pub data: Vec<f32>,
}

/// The contents of a safetensors file: its tensors by name, and its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeTensors {
    /// Every tensor in the file, by name.
    pub tensors: BTreeMap<String, TensorData>,
    /// The header's `"__metadata__"` pairs (empty if the file has none).
    pub metadata: BTreeMap<String, String>,
    /// Where the tensors came from (a file path, or whatever [`deserialize`] was given), so that
    /// [`SafeTensors::take`] and [`SafeTensors::get`] can name it in their errors.
    pub origin: String,
}

impl SafeTensors {
    /// Removes the tensor `name` and returns its values, checking that it has `shape`.
    ///
    /// Taking tensors out one by one lets a loader check afterwards that none were left over
    /// (`tensors.is_empty()`). Errors, naming the file and the tensor: no such tensor, or a
    /// shape other than `shape` (the tensor is then left in place).
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let found = self.get(name)?;
        if found.shape != shape {
            return Err(Error::Format(format!(
                "{}: tensor '{name}' has shape {:?}, expected {shape:?}",
                self.origin, found.shape
            )));
        }
        Ok(self.tensors.remove(name).expect("found just above").data)
    }

    /// The tensor `name`, or an error naming the file and the tensor if there is none.
    pub fn get(&self, name: &str) -> Result<&TensorData> {
        self.tensors.get(name).ok_or_else(|| {
            Error::Format(format!(
                "{}: no tensor named '{name}' (the file has {} tensors)",
                self.origin,
                self.tensors.len()
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Lays out `tensors` (name, shape, values) and `metadata` as the bytes of a safetensors file.
///
/// Tensors are written in sorted name order whatever order they are given in, so the same
/// model always gives the same bytes. An empty `metadata` writes no `"__metadata__"` entry.
///
/// # Panics
/// If a tensor's shape does not hold exactly its number of values, if two tensors share a
/// name, or if one is named `"__metadata__"`: these are bugs in the caller, not bad input.
///
/// ```
/// use std::collections::BTreeMap;
/// use lego::io::safetensors;
///
/// let bytes = safetensors::serialize(&[("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])], &BTreeMap::new());
/// let read = safetensors::deserialize(&bytes, "in memory").unwrap();
/// assert_eq!(read.tensors["w"].shape, [2, 2]);
/// assert_eq!(read.tensors["w"].data, [1.0, 2.0, 3.0, 4.0]);
/// ```
pub fn serialize(tensors: &[(&str, &[usize], &[f32])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut sorted: Vec<&(&str, &[usize], &[f32])> = tensors.iter().collect();
    sorted.sort_by_key(|(name, _, _)| *name);
    for pair in sorted.windows(2) {
        assert_ne!(pair[0].0, pair[1].0, "safetensors::serialize: two tensors named '{}'", pair[0].0);
    }

    // The header: metadata first, then each tensor with its byte range, one after another.
    let mut entries = Vec::with_capacity(sorted.len() + 1);
    if !metadata.is_empty() {
        let pairs = metadata.iter().map(|(k, v)| (k.clone(), Json::from(v.as_str())));
        entries.push((METADATA_KEY.to_string(), Json::Object(pairs.collect())));
    }
    let mut offset = 0;
    for &&(name, shape, data) in &sorted {
        assert_ne!(name, METADATA_KEY, "safetensors::serialize: '{METADATA_KEY}' is reserved");
        let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        assert_eq!(
            count,
            Some(data.len()),
            "safetensors::serialize: tensor '{name}' has shape {shape:?} but {} values",
            data.len()
        );
        let end = offset + 4 * data.len();
        let entry = Json::Object(vec![
            ("dtype".into(), "F32".into()),
            ("shape".into(), shape.to_vec().into()),
            ("data_offsets".into(), vec![offset, end].into()),
        ]);
        entries.push((name.to_string(), entry));
        offset = end;
    }
    let mut header = Json::Object(entries).to_string_compact().into_bytes();
    // Pad with spaces (JSON whitespace) so the data section starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for &&(_, _, data) in &sorted {
        let start = bytes.len();
        bytes.resize(start + 4 * data.len(), 0);
        for (out, x) in bytes[start..].chunks_exact_mut(4).zip(data) {
            out.copy_from_slice(&x.to_le_bytes());
        }
    }
    bytes
}

/// Writes `tensors` and `metadata` to the safetensors file `path`, atomically: a crash midway
/// leaves the old file, not a truncated one (see [`write_atomic`]).
///
/// Errors are [`Error::Io`] naming `path`. Panics as [`serialize`] does.
pub fn save(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, &serialize(tensors, metadata))
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Reads the safetensors file at `path`.
///
/// The whole file is read into memory, then converted to `f32`s. Errors: [`Error::Io`] if the
/// file cannot be read, [`Error::Format`] as for [`deserialize`].
pub fn load(path: &Path) -> Result<SafeTensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    deserialize(&bytes, &path.display().to_string())
}

/// Reads the bytes of a safetensors file. `origin` names where they came from in errors.
///
/// Everything is checked: the header length against the file and against
/// [`MAX_HEADER_LEN`]; the header is UTF-8 JSON of the right layout; every tensor is `F32`,
/// its shape's size does not overflow, its byte range holds exactly its values and lies in the
/// data section; names are unique; and the byte ranges cover the data section exactly, with no
/// overlap and no gap. Any failure is [`Error::Format`] naming `origin` and the problem.
pub fn deserialize(bytes: &[u8], origin: &str) -> Result<SafeTensors> {
    let bad = |what: String| Error::Format(format!("{origin}: {what}"));

    // Part 1: the header length.
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(bad(format!(
            "{} bytes is too short for a safetensors file (the header length alone is 8)",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {header_len} is over the {MAX_HEADER_LEN}-byte limit (corrupt file?)"
        )));
    }
    if header_len > rest.len() as u64 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the file ({} bytes after the length)",
            rest.len()
        )));
    }
    // Part 2: the header, and part 3: the data section.
    let (header, data) = rest.split_at(header_len as usize);

    let header = std::str::from_utf8(header).map_err(|e| bad(format!("header is not valid UTF-8 ({e})")))?;
    let header = json::parse(header).map_err(|e| match e {
        Error::Format(msg) => bad(format!("header: {msg}")),
        other => other,
    })?;
    let Some(entries) = header.as_object() else {
        return Err(bad("header is not a JSON object".into()));
    };

    let mut metadata = None;
    // (name, shape, begin, end) for each tensor, checked one by one before the layout is.
    let mut infos: Vec<(&str, Vec<usize>, usize, usize)> = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == METADATA_KEY {
            if metadata.is_some() {
                return Err(bad(format!("header has '{METADATA_KEY}' twice")));
            }
            metadata = Some(read_metadata(entry).map_err(bad)?);
        } else {
            let (shape, begin, end) =
                read_entry(entry, data.len()).map_err(|what| bad(format!("tensor '{name}': {what}")))?;
            infos.push((name, shape, begin, end));
        }
    }

    let mut names = std::collections::BTreeSet::new();
    if let Some((name, ..)) = infos.iter().find(|(name, ..)| !names.insert(*name)) {
        return Err(bad(format!("header has tensor '{name}' twice")));
    }

    // The byte ranges, in order, must tile the data section: each begins where the one before
    // ended, and the last ends where the file does.
    infos.sort_by_key(|&(name, _, begin, end)| (begin, end, name));
    let mut covered = 0;
    let mut previous = "";
    for &(name, _, begin, end) in &infos {
        if begin < covered {
            return Err(bad(format!("tensors '{previous}' and '{name}' overlap")));
        }
        if begin > covered {
            return Err(bad(format!(
                "data bytes {covered}..{begin} (before tensor '{name}') belong to no tensor"
            )));
        }
        covered = end;
        previous = name;
    }
    if covered != data.len() {
        return Err(bad(format!("data bytes {covered}..{} (at the end) belong to no tensor", data.len())));
    }

    let mut tensors = BTreeMap::new();
    for (name, shape, begin, end) in infos {
        let values =
            data[begin..end].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        tensors.insert(name.to_string(), TensorData { shape, data: values });
    }
    Ok(SafeTensors { tensors, metadata: metadata.unwrap_or_default(), origin: origin.to_string() })
}

/// The `"__metadata__"` entry: an object whose values are all strings.
fn read_metadata(entry: &Json) -> std::result::Result<BTreeMap<String, String>, String> {
    let Some(pairs) = entry.as_object() else {
        return Err(format!("'{METADATA_KEY}' is not an object"));
    };
    let mut metadata = BTreeMap::new();
    for (key, value) in pairs {
        let Some(value) = value.as_str() else {
            return Err(format!("'{METADATA_KEY}' value for '{key}' is not a string"));
        };
        if metadata.insert(key.clone(), value.to_string()).is_some() {
            return Err(format!("'{METADATA_KEY}' has key '{key}' twice"));
        }
    }
    Ok(metadata)
}

/// One tensor's header entry, checked on its own: returns (shape, begin, end) with
/// `end - begin` equal to 4 bytes per value and `end` within `data_len`. Other keys in the
/// entry are ignored, as the reference implementation does.
fn read_entry(entry: &Json, data_len: usize) -> std::result::Result<(Vec<usize>, usize, usize), String> {
    if entry.as_object().is_none() {
        return Err("entry is not an object".into());
    }
    let field = |key: &str| entry.get(key).ok_or_else(|| format!("entry has no \"{key}\""));

    let dtype = field("dtype")?;
    match dtype.as_str() {
        Some("F32") => {}
        Some(other) => {
            return Err(format!("dtype is {other}; only F32 is supported"));
        }
        None => return Err(format!("dtype is {dtype}, not a string")),
    }

    let shape = field("shape")?;
    let shape: Vec<usize> = shape
        .as_array()
        .and_then(|dims| dims.iter().map(as_usize).collect())
        .ok_or_else(|| format!("shape {shape} is not a list of sizes"))?;

    let offsets = field("data_offsets")?;
    let (begin, end) = match offsets.as_array() {
        Some([begin, end]) => (as_usize(begin), as_usize(end)),
        _ => (None, None),
    };
    let (Some(begin), Some(end)) = (begin, end) else {
        return Err(format!("data_offsets {offsets} are not two byte positions"));
    };

    let byte_len = shape
        .iter()
        .try_fold(4usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has too many elements to address"))?;
    if begin > end || end - begin != byte_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] do not hold shape {shape:?} ({byte_len} bytes of F32)"
        ));
    }
    if end > data_len {
        return Err(format!("data_offsets [{begin}, {end}] run past the data section ({data_len} bytes)"));
    }
    Ok((shape, begin, end))
}

/// A JSON number as a size or byte position: a whole number from 0 to 2^53 - 1 (see
/// [`Json::as_u64`]) that also fits this machine's `usize`.
fn as_usize(value: &Json) -> Option<usize> {
    value.as_u64()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_metadata() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// The message of a `Format` error, or a panic if `result` is anything else.
    fn format_error<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Err(Error::Format(msg)) => msg,
            other => panic!("expected Error::Format, got {other:?}"),
        }
    }

    /// A file from a hand-written header and data section, for testing bad headers.
    fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn layout_matches_the_format() {
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(&[("b", &[1], &[2.0]), ("a", &[2], &[1.0, -1.0])], &meta);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to a multiple of 8");
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert_eq!(
            header.trim_end_matches(' '),
            concat!(
                r#"{"__metadata__":{"k":"v"},"#,
                r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"#,
                r#""b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
            )
        );
        let data = &bytes[8 + n..];
        let expected: Vec<u8> = [1.0f32, -1.0, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(data, expected, "sorted by name, contiguous, little-endian");
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let specials = [
            f32::from_bits(0x7fc0_1234), // quiet NaN with a payload
            f32::from_bits(0xff80_0001), // signalling NaN, negative
            -0.0,
            0.0,
            f32::from_bits(1),           // smallest subnormal
            f32::from_bits(0x007f_ffff), // largest subnormal
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0 / 3.0,
        ];
        let ramp: Vec<f32> = (0..24).map(|i| i as f32 * 0.1 - 1.0).collect();
        let meta = BTreeMap::from([
            ("config".to_string(), r#"{"dim": 64, "note": "é\n"}"#.to_string()),
            ("empty".to_string(), String::new()),
        ]);
        let input: [(&str, &[usize], &[f32]); 4] = [
            ("specials", &[3, 4], &specials),
            ("ramp", &[2, 3, 4], &ramp),
            ("scalar", &[], &[42.0]),
            ("empty", &[0, 5], &[]),
        ];
        let read = deserialize(&serialize(&input, &meta), "test").unwrap();
        assert_eq!(read.metadata, meta);
        assert_eq!(read.tensors.len(), 4);
        for (name, shape, data) in input {
            let t = &read.tensors[name];
            assert_eq!(t.shape, shape, "{name}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&t.data), bits(data), "{name}");
        }
    }

    #[test]
    fn empty_file_round_trips() {
        let bytes = serialize(&[], &no_metadata());
        assert_eq!(bytes, b"\x08\0\0\0\0\0\0\0{}      ");
        let read = deserialize(&bytes, "test").unwrap();
        assert!(read.tensors.is_empty() && read.metadata.is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(&[("a", &[2], &[1.0, 2.0]), ("b", &[1, 1], &[3.0])], &meta);
        for len in 0..bytes.len() {
            let msg = format_error(deserialize(&bytes[..len], "cut.safetensors"));
            assert!(msg.starts_with("cut.safetensors: "), "{msg}");
        }
        assert!(deserialize(&bytes, "whole").is_ok());
    }

    #[test]
    fn flipping_any_bit_never_panics() {
        // Most flips give an error, some (in the data, or a space in the padding) a different
        // valid file; none may panic or read out of bounds.
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(&[("a", &[2], &[1.0, 2.0]), ("b", &[], &[3.0])], &meta);
        for i in 0..bytes.len() * 8 {
            let mut corrupt = bytes.clone();
            corrupt[i / 8] ^= 1 << (i % 8);
            let _ = deserialize(&corrupt, "flipped");
        }
    }

    #[test]
    fn short_and_oversized_headers() {
        let msg = format_error(deserialize(b"abc", "f"));
        assert!(msg.contains("3 bytes is too short"), "{msg}");
        let msg = format_error(deserialize(&u64::MAX.to_le_bytes(), "f"));
        assert!(msg.contains("over the 100000000-byte limit"), "{msg}");
        let msg = format_error(deserialize(&file_with_header("{}", b"")[..9], "f"));
        assert!(msg.contains("header length 2 runs past the end"), "{msg}");
    }

    #[test]
    fn header_must_be_utf8_json_object() {
        let mut bytes = file_with_header("{}", b"");
        bytes[8] = 0xff;
        assert!(format_error(deserialize(&bytes, "f")).contains("not valid UTF-8"));
        let msg = format_error(deserialize(&file_with_header("{\"a\":", b""), "f"));
        assert!(msg.starts_with("f: header: JSON: at byte 5: expected a value"), "{msg}");
        let msg = format_error(deserialize(&file_with_header("[]", b""), "f"));
        assert!(msg.contains("not a JSON object"), "{msg}");
    }

    #[test]
    fn entries_must_be_complete_and_f32() {
        let check = |header: &str, data: &[u8], expected: &str| {
            let msg = format_error(deserialize(&file_with_header(header, data), "m.st"));
            assert!(msg.contains(expected), "{header}: got {msg:?}, expected {expected:?}");
        };
        let four = [0u8; 4];
        check(r#"{"t":1}"#, b"", "tensor 't': entry is not an object");
        check(r#"{"t":{"shape":[1],"data_offsets":[0,4]}}"#, &four, "tensor 't': entry has no \"dtype\"");
        check(r#"{"t":{"dtype":"F32","data_offsets":[0,4]}}"#, &four, "no \"shape\"");
        check(r#"{"t":{"dtype":"F32","shape":[1]}}"#, &four, "no \"data_offsets\"");
        check(
            r#"{"t":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            &four,
            "m.st: tensor 't': dtype is BF16; only F32 is supported",
        );
        check(r#"{"t":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#, &four, "dtype is 7, not a string");
        check(
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            &four,
            "shape [-1] is not a list",
        );
        check(r#"{"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, &four, "is not a list");
        check(r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, &four, "not two byte positions");
        check(r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#, &four, "not two byte positions");
        check(r#"{"__metadata__":[],"t":1}"#, b"", "'__metadata__' is not an object");
        check(r#"{"__metadata__":{"k":1}}"#, b"", "'__metadata__' value for 'k' is not a string");
        check(r#"{"__metadata__":{"k":"a","k":"b"}}"#, b"", "'__metadata__' has key 'k' twice");
        check(r#"{"__metadata__":{},"__metadata__":{}}"#, b"", "'__metadata__' twice");
    }

    #[test]
    fn offsets_must_fit_the_shape_and_the_data_section() {
        let check = |header: &str, data_len: usize, expected: &str| {
            let msg = format_error(deserialize(&file_with_header(header, &vec![0; data_len]), "f"));
            assert!(msg.contains(expected), "{header}: got {msg:?}, expected {expected:?}");
        };
        check(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            8,
            "data_offsets [0, 4] do not hold shape [2] (8 bytes of F32)",
        );
        check(r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, 8, "do not hold shape");
        check(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            8,
            "run past the data section (8 bytes)",
        );
        check(
            r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
            4,
            "too many elements",
        );
        check(
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,9007199254740993]}}"#,
            4,
            "not two byte positions",
        );
    }

    #[test]
    fn tensors_must_tile_the_data_section() {
        let check = |header: &str, data_len: usize, expected: &str| {
            let msg = format_error(deserialize(&file_with_header(header, &vec![0; data_len]), "f"));
            assert!(msg.contains(expected), "{header}: got {msg:?}, expected {expected:?}");
        };
        let a = |b: usize, e: usize| {
            format!(r#""a":{{"dtype":"F32","shape":[{}],"data_offsets":[{b},{e}]}}"#, (e - b) / 4)
        };
        let b = |b: usize, e: usize| {
            format!(r#""b":{{"dtype":"F32","shape":[{}],"data_offsets":[{b},{e}]}}"#, (e - b) / 4)
        };
        check(&format!("{{{},{}}}", a(0, 8), b(4, 12)), 12, "tensors 'a' and 'b' overlap");
        check(&format!("{{{},{}}}", a(0, 8), b(0, 8)), 8, "tensors 'a' and 'b' overlap");
        check(&format!("{{{},{}}}", a(0, 8), a(8, 12)), 12, "header has tensor 'a' twice");
        check(&format!("{{{},{}}}", a(0, 8), a(0, 8)), 8, "header has tensor 'a' twice");
        check(
            &format!("{{{},{}}}", a(0, 4), b(8, 12)),
            12,
            "data bytes 4..8 (before tensor 'b') belong to no tensor",
        );
        check(&format!("{{{}}}", a(4, 8)), 8, "data bytes 0..4 (before tensor 'a')");
        check(&format!("{{{}}}", a(0, 4)), 8, "data bytes 4..8 (at the end) belong to no tensor");
        check("{}", 1, "data bytes 0..1 (at the end)");
        // An empty tensor takes no bytes: it may sit where one tensor ends and the next begins,
        // but not inside another (the reference implementation draws the same line).
        let empty = |at: usize| format!(r#""e":{{"dtype":"F32","shape":[0],"data_offsets":[{at},{at}]}}"#);
        let ok = file_with_header(&format!("{{{},{},{}}}", a(0, 8), empty(8), b(8, 12)), &[0; 12]);
        assert_eq!(deserialize(&ok, "f").unwrap().tensors["e"].shape, [0]);
        check(&format!("{{{},{},{}}}", a(0, 8), empty(4), b(8, 12)), 12, "tensors 'a' and 'e' overlap");
    }

    #[test]
    fn reader_accepts_unpadded_headers_and_extra_fields() {
        // Other writers may not pad, may put "__metadata__" last, and may add fields.
        let header =
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":true},"__metadata__":{"a":"b"}}"#;
        let read = deserialize(&file_with_header(header, &2.5f32.to_le_bytes()), "f").unwrap();
        assert_eq!(read.tensors["t"].data, [2.5]);
        assert_eq!(read.metadata["a"], "b");
    }

    #[test]
    fn take_and_get_check_names_and_shapes() {
        let bytes = serialize(&[("w", &[2, 3], &[0.0; 6])], &no_metadata());
        let mut read = deserialize(&bytes, "ckpt.safetensors").unwrap();
        assert_eq!(read.get("w").unwrap().shape, [2, 3]);
        let msg = format_error(read.get("v"));
        assert_eq!(msg, "ckpt.safetensors: no tensor named 'v' (the file has 1 tensors)");
        let msg = format_error(read.take("w", &[3, 2]));
        assert_eq!(msg, "ckpt.safetensors: tensor 'w' has shape [2, 3], expected [3, 2]");
        assert!(read.tensors.contains_key("w"), "a failed take leaves the tensor");
        assert_eq!(read.take("w", &[2, 3]).unwrap(), [0.0; 6]);
        assert!(read.tensors.is_empty());
        assert!(format_error(read.take("w", &[2, 3])).contains("no tensor named 'w'"));
    }

    #[test]
    #[should_panic(expected = "tensor 'w' has shape [2, 2] but 3 values")]
    fn serialize_panics_on_shape_mismatch() {
        serialize(&[("w", &[2, 2], &[1.0, 2.0, 3.0])], &no_metadata());
    }

    #[test]
    #[should_panic(expected = "two tensors named 'w'")]
    fn serialize_panics_on_duplicate_names() {
        serialize(&[("w", &[1], &[1.0]), ("w", &[1], &[2.0])], &no_metadata());
    }

    #[test]
    fn save_and_load_through_a_file() {
        let dir = std::env::temp_dir().join(format!("lego-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let meta = BTreeMap::from([("step".to_string(), "100".to_string())]);
        save(&path, &[("x", &[3], &[1.0, 2.0, 3.0])], &meta).unwrap();
        let read = load(&path).unwrap();
        assert_eq!(read.tensors["x"].data, [1.0, 2.0, 3.0]);
        assert_eq!(read.metadata, meta);
        assert_eq!(read.origin, path.display().to_string());

        std::fs::write(&path, b"short").unwrap();
        let msg = format_error(load(&path));
        assert!(msg.starts_with(&format!("{}: 5 bytes", path.display())), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(load(&path), Err(Error::Io { .. })));
    }
}
