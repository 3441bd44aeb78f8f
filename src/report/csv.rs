//! [`Csv`]: rows of text cells written as comma-separated values (RFC 4180 quoting).
//!
//! ```
//! use lego::report::Csv;
//!
//! let mut csv = Csv::new(["model", "metric", "value"]);
//! csv.push(["phase 1", "ppl", "5.58"]);
//! csv.push(["LEGO, sequence", "ppl", "5.4"]);
//! assert_eq!(csv.to_string(), "model,metric,value\nphase 1,ppl,5.58\n\"LEGO, sequence\",ppl,5.4\n");
//! ```

use std::fmt;

/// A header line and rows, all as long as the header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Csv {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Csv {
    /// An empty file with these column names.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Csv {
        Csv { header: header.into_iter().map(Into::into).collect(), rows: Vec::new() }
    }

    /// Appends a row.
    ///
    /// # Panics
    ///
    /// If the row does not have one cell per column (a programming error).
    pub fn push<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        assert_eq!(
            cells.len(),
            self.header.len(),
            "Csv::push: {} cells for columns {:?}",
            cells.len(),
            self.header
        );
        self.rows.push(cells);
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Vec<String>] {
        &self.rows
    }
}

/// A cell, quoted if it holds a comma, a quote or a line break (a quote inside is doubled).
pub fn cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

impl fmt::Display for Csv {
    /// One line per row, `\n`-terminated, the header first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
            writeln!(f, "{}", cells.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled_inside_a_quoted_cell() {
        assert_eq!(cell(r#"say "hi""#), r#""say ""hi""""#);
        assert_eq!(cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(cell("plain"), "plain");
    }
}
