//! [`Table`]: rows of text cells printed as a Markdown table whose columns line up.
//!
//! ```
//! use lego::report::Table;
//!
//! let mut t = Table::new(["model", "PPL"]);
//! t.row(["phase 1", "5.58"]).row(["baseline", "5.2"]);
//! assert_eq!(
//!     t.to_string(),
//!     "| model    | PPL  |\n|----------|------|\n| phase 1  | 5.58 |\n| baseline | 5.2  |\n"
//! );
//! ```

use std::fmt;

/// A header and rows of cells, all rows as long as the header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table { header: header.into_iter().map(Into::into).collect(), rows: Vec::new() }
    }

    /// Appends a row.
    ///
    /// # Panics
    ///
    /// If the row does not have one cell per column (a programming error).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Table {
        let cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        assert_eq!(
            cells.len(),
            self.header.len(),
            "Table::row: {} cells for columns {:?}",
            cells.len(),
            self.header
        );
        self.rows.push(cells);
        self
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Vec<String>] {
        &self.rows
    }

    /// Each column's width in characters (not bytes: `→` and `—` count one).
    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in w.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        w
    }
}

impl fmt::Display for Table {
    /// `| a | b |` lines, each cell padded to its column's width, with the `|---|` rule under
    /// the header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| {
            for (cell, w) in cells.iter().zip(&widths) {
                write!(f, "| {cell}{} ", " ".repeat(w - cell.chars().count()))?;
            }
            writeln!(f, "|")
        };
        line(f, &self.header)?;
        for w in &widths {
            write!(f, "|{}", "-".repeat(w + 2))?;
        }
        writeln!(f, "|")?;
        for row in &self.rows {
            line(f, row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_by_characters_not_bytes() {
        let mut t = Table::new(["a", "b"]);
        t.row(["→ x", "—"]);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["| a   | b |", "|-----|---|", "| → x | — |"]);
        assert_eq!(t.rows().len(), 1);
    }

    #[test]
    #[should_panic(expected = "Table::row: 1 cells")]
    fn a_short_row_is_a_programming_error() {
        Table::new(["a", "b"]).row(["only one"]);
    }
}
