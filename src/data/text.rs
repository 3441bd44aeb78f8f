//! Reading a corpus: text files become [`Document`]s.
//!
//! A **document** is the unit the train / validation / test split works on
//! ([`crate::data::split_documents`]): one file is one document. [`load_texts`] reads one file or
//! every file of a directory; [`split_blocks`] cuts a single document at its blank lines, for a
//! corpus that comes as one big file and would otherwise be a single, unsplittable document.

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};

/// A named piece of text: one file of a corpus, or one block of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Where the text came from: a file name (without its directory), or `file#block`. Reports
    /// list these to say which texts were trained, validated and tested on.
    pub name: String,
    /// The text itself.
    pub text: String,
}

impl Document {
    /// A document from a name and its text.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Document {
        Document { name: name.into(), text: text.into() }
    }
}

/// Reads a corpus: the UTF-8 file at `path` as one document, or, if `path` is a directory,
/// every file in it, one document each, in order of file name (so the result is the same on
/// every machine).
///
/// A directory is read one level deep: subdirectories and hidden files (names starting with
/// `.`) are skipped. A leading byte-order mark is dropped. Files holding only whitespace are
/// skipped, since they have no tokens to train or test on.
///
/// Errors: a missing or unreadable path ([`Error::Io`] naming it); a file that is not UTF-8
/// ([`Error::Format`] naming the file and the byte offset); no non-empty file at all
/// ([`Error::Input`], "empty corpus").
///
/// ```no_run
/// let works = lego::data::load_texts("data/shakespeare")?;
/// println!("{} works, the first is {}", works.len(), works[0].name);
/// # Ok::<(), lego::Error>(())
/// ```
pub fn load_texts(path: impl AsRef<Path>) -> Result<Vec<Document>> {
    let path = path.as_ref();
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            let file = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            // `fs::metadata` follows symbolic links, so a link to a file counts as a file.
            let is_file = fs::metadata(&file).map_err(|e| Error::io(&file, e))?.is_file();
            if is_file && !hidden {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut docs = Vec::with_capacity(files.len());
    for file in &files {
        let bytes = fs::read(file).map_err(|e| Error::io(file, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::Format(format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                file.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        let text = match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        };
        if text.trim().is_empty() {
            continue;
        }
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string());
        docs.push(Document { name, text });
    }
    if docs.is_empty() {
        return Err(Error::Input(format!("empty corpus: {} holds no file with any text", path.display())));
    }
    Ok(docs)
}

/// Cuts a document into blocks at its blank lines (lines holding only whitespace), so that a
/// corpus that comes as one file can still be split into train, validation and test.
///
/// Each block keeps its lines (joined by `\n`) and is named `name#i`, `i` counting from 1 and
/// zero-padded so the names sort in order (`play.txt#001` ... `play.txt#120`). Runs of blank
/// lines count as one; a document with no text gives no blocks.
///
/// ```
/// use lego::data::{Document, split_blocks};
///
/// let doc = Document::new("poem.txt", "first line\nsecond line\n\n\nnext stanza\r\n");
/// let blocks = split_blocks(&doc);
/// assert_eq!(blocks.len(), 2);
/// assert_eq!(blocks[0], Document::new("poem.txt#1", "first line\nsecond line"));
/// assert_eq!(blocks[1].text, "next stanza");
/// ```
pub fn split_blocks(doc: &Document) -> Vec<Document> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    // `lines` strips both `\n` and `\r\n` endings.
    for line in doc.text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                blocks.push(std::mem::take(&mut current));
            }
        } else {
            current.push(line);
        }
    }
    if !current.is_empty() {
        blocks.push(current);
    }
    let width = blocks.len().to_string().len();
    blocks
        .iter()
        .enumerate()
        .map(|(i, lines)| Document {
            name: format!("{}#{:0width$}", doc.name, i + 1),
            text: lines.join("\n"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory under the system's temporary directory.
    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lego-text-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_directory_is_read_in_name_order_skipping_hidden_empty_and_subdirectories() {
        let dir = temp_dir("order");
        fs::write(dir.join("b.txt"), "bee").unwrap();
        fs::write(dir.join("a.txt"), "\u{feff}ay").unwrap();
        fs::write(dir.join("c.txt"), " \n\t ").unwrap();
        fs::write(dir.join(".hidden"), "secret").unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(dir.join("sub").join("d.txt"), "dee").unwrap();
        let docs = load_texts(&dir).unwrap();
        assert_eq!(docs, vec![Document::new("a.txt", "ay"), Document::new("b.txt", "bee")]);
        // A single file is one document.
        let one = load_texts(dir.join("b.txt")).unwrap();
        assert_eq!(one, vec![Document::new("b.txt", "bee")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors_that_name_them() {
        let dir = temp_dir("bad");
        let missing = load_texts(dir.join("nope.txt")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
        assert!(missing.to_string().contains("nope.txt"), "{missing}");

        let empty = load_texts(&dir).unwrap_err();
        assert!(matches!(empty, Error::Input(_)));
        assert!(empty.to_string().contains("empty corpus"), "{empty}");

        fs::write(dir.join("latin1.txt"), b"caf\xe9").unwrap();
        let bad = load_texts(&dir).unwrap_err();
        assert!(matches!(bad, Error::Format(_)));
        let msg = bad.to_string();
        assert!(msg.contains("latin1.txt") && msg.contains("offset 3"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn blocks_are_cut_at_blank_lines_and_numbered_so_they_sort() {
        let text = (1..=12).map(|i| format!("block {i}\nline two")).collect::<Vec<_>>().join("\n \n\n");
        let blocks = split_blocks(&Document::new("f", text));
        assert_eq!(blocks.len(), 12);
        assert_eq!(blocks[0].name, "f#01");
        assert_eq!(blocks[11].name, "f#12");
        assert_eq!(blocks[11].text, "block 12\nline two");
        assert!(blocks.windows(2).all(|w| w[0].name < w[1].name));
        assert!(split_blocks(&Document::new("e", "\n  \n")).is_empty());
    }
}
