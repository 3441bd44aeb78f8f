//! Command-line flags for the examples and benches: `--name value` or `--name=value`.
//!
//! A program lists the flags it knows and reads them with typed getters; every mistake (an
//! unknown flag, a missing value, a value that does not parse or is out of range) is a
//! [`FlagError::Invalid`] whose message names the flag, and `--help` is [`FlagError::Help`].
//! [`exit_with`] turns either into what a user should see (the usage, with the error above it)
//! and the process's exit code.
//!
//! It lives in the library rather than in a module the examples `#[path]`-include because
//! here `cargo test` runs its tests, and every example and bench can use the same rules (the
//! main example's flags used to be a 200-line parser of their own).
//!
//! ```
//! use lego::cli::{FlagError, Flags};
//!
//! let args = ["--epochs", "3", "--lr=0.01"].map(String::from);
//! let flags = Flags::parse(args, &["epochs", "lr", "out"]).unwrap();
//! assert_eq!(flags.positive("epochs", 4).unwrap(), 3);
//! assert_eq!(flags.number("lr", 1e-3f32).unwrap(), 0.01);
//! assert_eq!(flags.text("out"), None);
//!
//! let bad = Flags::parse(["--epoch".to_string()], &["epochs"]).unwrap_err();
//! assert_eq!(bad, FlagError::Invalid("unknown flag --epoch".into()));
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub mod decode;

/// Why the flags could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlagError {
    /// `--help` or `-h` was given: print the usage and stop, successfully.
    Help,
    /// A mistake; the message names the flag and says what is wrong.
    Invalid(String),
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlagError::Help => write!(f, "help requested"),
            FlagError::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for FlagError {}

/// A shorthand for "invalid" with a formatted message.
fn invalid<T>(msg: String) -> Result<T, FlagError> {
    Err(FlagError::Invalid(msg))
}

/// The flags given, each with its value, in order. A flag given twice reads as its last value
/// ([`text`](Flags::text) and the typed getters), or as all of them ([`all`](Flags::all): a
/// repeatable flag such as `--prompt`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    values: Vec<(String, String)>,
}

impl Flags {
    /// Reads `args` (without the program name). Every flag takes a value and must be one of
    /// `known` (names without the `--`).
    pub fn parse(args: impl IntoIterator<Item = String>, known: &[&str]) -> Result<Flags, FlagError> {
        let mut values: Vec<(String, String)> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Err(FlagError::Help);
            }
            let Some(body) = arg.strip_prefix("--") else {
                return invalid(format!("unexpected argument '{arg}' (flags start with --)"));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            if !known.contains(&name) {
                return invalid(format!("unknown flag --{name}"));
            }
            let value = match inline.or_else(|| args.next()) {
                Some(v) => v,
                None => return invalid(format!("--{name} needs a value")),
            };
            values.push((name.to_string(), value));
        }
        Ok(Flags { values })
    }

    /// Reads `args` against the flags that `usage` lists: every line of it that starts (after
    /// its indentation) with `--name` declares `name`. One text then both documents the flags
    /// and decides which exist, so the two cannot drift apart.
    pub fn parse_usage(args: impl IntoIterator<Item = String>, usage: &str) -> Result<Flags, FlagError> {
        Flags::parse(args, &flags_in_usage(usage))
    }

    /// The value of `--name` as given (the last one, if given more than once), if it was.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.values.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of a repeatable `--name`, in the order given (empty if it was not).
    ///
    /// ```
    /// let args = ["--prompt", "a", "--seed", "1", "--prompt=b"].map(String::from);
    /// let flags = lego::cli::Flags::parse(args, &["prompt", "seed"]).unwrap();
    /// assert_eq!(flags.all("prompt"), ["a", "b"]);
    /// ```
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.values.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    /// Whether `--name` was given.
    pub fn given(&self, name: &str) -> bool {
        self.values.iter().any(|(n, _)| n == name)
    }

    /// The value of `--name` as a path, if it was given.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.text(name).map(PathBuf::from)
    }

    /// `--name` parsed as a `T`, or `default` when it was not given.
    pub fn number<T: FromStr>(&self, name: &str, default: T) -> Result<T, FlagError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) => v.parse().or_else(|_| invalid(format!("--{name}: '{v}' is not a valid number here"))),
        }
    }

    /// `--name` as a count of at least 1, or `default`.
    pub fn positive(&self, name: &str, default: usize) -> Result<usize, FlagError> {
        match self.number(name, default)? {
            0 => invalid(format!("--{name}: must be at least 1")),
            n => Ok(n),
        }
    }

    /// `--name` as a count of at least 1, if it was given.
    pub fn optional_positive(&self, name: &str) -> Result<Option<usize>, FlagError> {
        self.text(name).map(|_| self.positive(name, 1)).transpose()
    }

    /// `--name` as a positive finite number, or `default`.
    pub fn positive_real(&self, name: &str, default: f32) -> Result<f32, FlagError> {
        let x = self.number(name, default)?;
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            invalid(format!("--{name}: must be a positive number, not {x}"))
        }
    }

    /// `--name` as one of `choices`, or `default`.
    pub fn choice<'a>(
        &'a self,
        name: &str,
        choices: &[&str],
        default: &'a str,
    ) -> Result<&'a str, FlagError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) if choices.contains(&v) => Ok(v),
            Some(v) => {
                let quoted: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
                invalid(format!("--{name}: one of {}, not '{v}'", quoted.join(", ")))
            }
        }
    }
}

/// The flags a usage text declares: the `name` of each line that starts with `--name`
/// (`--help` included, which [`Flags::parse`] answers itself).
pub fn flags_in_usage(usage: &str) -> Vec<&str> {
    usage
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .filter_map(|rest| rest.split([' ', '=']).next())
        .filter(|name| !name.is_empty())
        .collect()
}

/// What a program prints for `error`, and with which exit code: the usage alone on stdout and 0
/// for `--help`; `program: error: ...` and the usage on stderr and 2 for a mistake.
pub fn message(program: &str, usage: &str, error: &FlagError) -> (String, i32) {
    match error {
        FlagError::Help => (usage.to_string(), 0),
        FlagError::Invalid(msg) => (format!("{program}: error: {msg}\n\n{usage}"), 2),
    }
}

/// Prints [`message`] (to stdout for help, stderr otherwise) and ends the process with its code.
pub fn exit_with(program: &str, usage: &str, error: &FlagError) -> ! {
    let (text, code) = message(program, usage, error);
    if code == 0 {
        print!("{text}");
    } else {
        eprint!("{text}");
    }
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 4] = ["seed", "lr", "mode", "out"];

    fn parse(args: &[&str]) -> Result<Flags, FlagError> {
        Flags::parse(args.iter().map(|s| s.to_string()), &KNOWN)
    }

    #[test]
    fn both_spellings_and_the_last_value_win() {
        let f = parse(&["--seed", "3", "--lr=0.5", "--seed=4"]).unwrap();
        assert_eq!(f.number("seed", 0u64).unwrap(), 4);
        assert_eq!(f.positive_real("lr", 1.0).unwrap(), 0.5);
        assert_eq!(f.choice("mode", &["a", "b"], "a").unwrap(), "a");
        assert_eq!(f.path("out"), None);
        // A value may itself contain '=' or start like a flag when given separately.
        let f = parse(&["--out", "--weird=name"]).unwrap();
        assert_eq!(f.text("out"), Some("--weird=name"));
    }

    #[test]
    fn every_mistake_names_its_flag() {
        let msg = |args: &[&str]| match parse(args) {
            Err(FlagError::Invalid(m)) => m,
            other => panic!("{args:?} gave {other:?}"),
        };
        assert_eq!(msg(&["--sed", "1"]), "unknown flag --sed");
        assert_eq!(msg(&["--seed"]), "--seed needs a value");
        assert!(msg(&["seed"]).contains("flags start with --"));
        let f = parse(&["--seed", "x", "--lr", "-1", "--mode", "c"]).unwrap();
        assert_eq!(
            f.number("seed", 0u64),
            Err(FlagError::Invalid("--seed: 'x' is not a valid number here".into()))
        );
        assert!(f.positive_real("lr", 1.0).unwrap_err().to_string().contains("--lr: must be a positive"));
        assert!(f.choice("mode", &["a", "b"], "a").unwrap_err().to_string().contains("'a', 'b', not 'c'"));
        let f = parse(&["--seed", "0"]).unwrap();
        assert_eq!(f.positive("seed", 1), Err(FlagError::Invalid("--seed: must be at least 1".into())));
        assert_eq!(f.optional_positive("lr"), Ok(None));
    }

    #[test]
    fn the_usage_text_declares_the_flags() {
        let usage = "usage: prog [flags]\n  --seed N      the seed (0)\n  --out=DIR     where\n\n  plain text --not-a-flag\n";
        assert_eq!(flags_in_usage(usage), ["seed", "out"]);
        let f = Flags::parse_usage(["--out", "x"].map(String::from), usage).unwrap();
        assert_eq!(f.text("out"), Some("x"));
        let err = Flags::parse_usage(["--not-a-flag", "1"].map(String::from), usage).unwrap_err();
        assert_eq!(err, FlagError::Invalid("unknown flag --not-a-flag".into()));
    }

    #[test]
    fn help_prints_the_usage_and_a_bad_flag_prints_it_after_the_error() {
        assert_eq!(parse(&["--seed", "1", "--help"]), Err(FlagError::Help));
        assert_eq!(parse(&["-h"]), Err(FlagError::Help));
        let usage = "usage: prog [flags]\n";
        assert_eq!(message("prog", usage, &FlagError::Help), (usage.to_string(), 0));
        let err = parse(&["--nope"]).unwrap_err();
        let (text, code) = message("prog", usage, &err);
        assert_eq!(code, 2);
        assert_eq!(text, "prog: error: unknown flag --nope\n\nusage: prog [flags]\n");
    }
}
