//! The flags of the experiment: [`USAGE`] documents them and, through
//! [`Flags::parse_usage`], decides which exist; [`Options::parse`] reads and checks them.

use std::path::PathBuf;

use lego::cli::{FlagError, Flags};
use lego::data::Tokenizer;
use lego::report::experiment::Settings;
use lego::train::Phase2Mode;

pub const USAGE: &str = "\
usage: cargo run --release --example true_early_exit -- [flags]

data
  --data PATH            a UTF-8 text file or a directory of them, one document a file
                         (default: the built-in synthetic corpus, 40 stories)
  --seed N               seeds the document split, the batch order and the inits (0)
  --tokenizer byte|word  byte-level (256 ids) or lowercased words (byte)
  --vocab-size N         word vocabulary cap, fitted on the training split (8192)
  --seq-len N            tokens per training window, also the model's max_seq_len (64)
  --batch-size N         sequences per batch (32)
model (config T: D=64, H=4, F=172, V from the tokenizer)
  --dim N                model width (64)
  --heads N              attention heads (4)
  --ffn-hidden N         MLP width (Llama's 8·dim/3 rounded up to a multiple of 4: 172 for 64)
  --phase1-layers N      layers of the shallow phase-1 model, = the exit layer (2)
  --phase2-layers N      layers after extending (4)
training
  --epochs N             most epochs of phase 1, phase 2 and the baseline (4)
  --phase2-epochs N      most epochs of phase 2 (= --epochs)
  --patience N           early stopping: epochs without a better validation PPL (2)
  --lr X                 AdamW learning rate of phase 1, the baseline and its exit head (1e-3)
  --lr2 X                AdamW learning rate of phase 2 (1e-3; the spec's is 1e-4)
  --init I               new layers of phase 2: random (the spec's) | stack | identity (identity)
  --hard-ratio X         share of validation tokens under the threshold, in (0, 1) (0.5)
  --phase2-mode M        both | sequence | sequence-skip | token (both; sequence-skip: the
                         upper layers see only the hard positions, as the Skip fill leaves them)
generation
  --prompt TEXT          prompt for TRUE early-exit generation (default: a phrase from the
                         first test document)
  --max-new-tokens N     tokens to generate; must leave room in --seq-len for the prompt (32)
  --eval-sequences N     test windows fed token by token for the early-exit table (64)
  --frontier-windows N   test windows behind the frontier's points (all: the whole split)
output
  --out DIR              where report.json, results.csv and frontier.svg go (out/true_early_exit)
  --save PATH            write the phase-2 training checkpoint to PATH, phase 1's beside it
  --load PATH            reuse a checkpoint written by --save (see the doc comment)
  --baseline PATH        the baseline's checkpoint: read it if PATH exists, else train the
                         baseline and write it there (for runs that share one, as the study)
  --help                 this text
";

/// Every setting of a run: those the report states (`run`, a `lego::report` record; the
/// defaults are the spec's config T), and where the data comes from and results go.
#[derive(Clone, Debug)]
pub struct Options {
    pub run: Settings,
    pub data: Option<PathBuf>,
    pub modes: Vec<Phase2Mode>,
    pub prompt: Option<String>,
    pub eval_sequences: usize,
    pub frontier_windows: Option<usize>,
    pub out: PathBuf,
    pub save: Option<PathBuf>,
    pub load: Option<PathBuf>,
    pub baseline: Option<PathBuf>,
}

impl Options {
    /// Reads the flags; checks ranges and the rules that tie flags together.
    pub fn parse(args: impl IntoIterator<Item = String>) -> std::result::Result<Options, FlagError> {
        let f = Flags::parse_usage(args, USAGE)?;
        let dim = f.positive("dim", 64)?;
        let epochs = f.positive("epochs", 4)?;
        let run = Settings {
            seed: f.number("seed", 0)?,
            tokenizer: f.choice("tokenizer", &["byte", "word"], "byte")?.to_string(),
            vocab_size: f.positive("vocab-size", 8192)?,
            seq_len: f.positive("seq-len", 64)?,
            batch_size: f.positive("batch-size", 32)?,
            dim,
            heads: f.positive("heads", 4)?,
            // Llama's MLP width, 8·dim/3, rounded up to a multiple of 4 (172 for dim 64).
            ffn_hidden: f.positive("ffn-hidden", (8 * dim).div_ceil(3).next_multiple_of(4))?,
            phase1_layers: f.positive("phase1-layers", 2)?,
            phase2_layers: f.positive("phase2-layers", 4)?,
            epochs,
            phase2_epochs: f.positive("phase2-epochs", epochs)?,
            patience: f.positive("patience", 2)?,
            lr: f.positive_real("lr", 1e-3)?,
            // Phase 2's defaults, chosen by validation routed PPL in scripts/phase2-study.sh (the
            // synthetic corpus; see the README); `--init random --lr2 1e-4` is the spec's recipe.
            lr2: f.positive_real("lr2", 1e-3)?,
            init: f.choice("init", &["random", "stack", "identity"], "identity")?.to_string(),
            hard_ratio: f.number("hard-ratio", 0.5)?,
            max_new_tokens: f.positive("max-new-tokens", 32)?,
        };
        let o = Options {
            run,
            data: f.path("data"),
            modes: match f.choice("phase2-mode", &["both", "sequence", "sequence-skip", "token"], "both")? {
                "sequence" => vec![Phase2Mode::Sequence],
                "sequence-skip" => vec![Phase2Mode::SequenceSkip],
                "token" => vec![Phase2Mode::Token],
                _ => vec![Phase2Mode::Sequence, Phase2Mode::Token],
            },
            prompt: f.text("prompt").map(String::from),
            eval_sequences: f.positive("eval-sequences", 64)?,
            frontier_windows: f.optional_positive("frontier-windows")?,
            out: f.path("out").unwrap_or_else(|| PathBuf::from("out/true_early_exit")),
            save: f.path("save"),
            load: f.path("load"),
            baseline: f.path("baseline"),
        };
        let bad = |msg: String| Err(FlagError::Invalid(msg));
        if !(o.run.hard_ratio > 0.0 && o.run.hard_ratio < 1.0) {
            return bad(format!("--hard-ratio: must be in (0, 1), not {}", o.run.hard_ratio));
        }
        if o.run.phase2_layers <= o.run.phase1_layers {
            let (p2, p1) = (o.run.phase2_layers, o.run.phase1_layers);
            return bad(format!("--phase2-layers ({p2}) must be more than --phase1-layers ({p1})"));
        }
        if o.run.max_new_tokens >= o.run.seq_len {
            let (n, s) = (o.run.max_new_tokens, o.run.seq_len);
            return bad(format!(
                "--max-new-tokens ({n}) must be below --seq-len ({s}), to leave room for a prompt"
            ));
        }
        if o.run.tokenizer == "word" && o.run.vocab_size < 2 {
            return bad("--vocab-size: must be at least 2 (<unk> and one word)".into());
        }
        Ok(o)
    }

    /// The settings the report states: the flags', with the tokenizer actually used (a
    /// loaded checkpoint brings its own).
    pub fn settings(&self, tokenizer: &Tokenizer) -> Settings {
        Settings {
            tokenizer: tokenizer.kind().into(),
            vocab_size: tokenizer.vocab_size(),
            ..self.run.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, FlagError> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn every_flag_of_the_usage_parses_and_the_defaults_are_config_t() {
        let o = parse(&[]).unwrap();
        assert_eq!(
            (
                o.run.dim,
                o.run.heads,
                o.run.ffn_hidden,
                o.run.seq_len,
                o.run.phase1_layers,
                o.run.phase2_layers
            ),
            (64, 4, 172, 64, 2, 4)
        );
        assert_eq!(lego::cli::flags_in_usage(USAGE).len(), 28); // 27 flags and --help
        let o = parse(&["--dim=32", "--phase2-mode", "token", "--lr", "0.01", "--out", "x"]).unwrap();
        assert_eq!(
            (o.run.dim, o.run.ffn_hidden, o.modes.as_slice(), o.run.lr),
            (32, 88, &[Phase2Mode::Token][..], 0.01)
        );
    }

    #[test]
    fn a_bad_flag_is_an_error_that_prints_the_usage() {
        let err = parse(&["--epoch", "3"]).unwrap_err();
        let (text, code) = lego::cli::message("true_early_exit", USAGE, &err);
        assert_eq!(code, 2);
        assert!(text.starts_with("true_early_exit: error: unknown flag --epoch\n\nusage:"), "{text}");
        let msg = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(msg(&["--hard-ratio", "1"]).contains("--hard-ratio: must be in (0, 1)"));
        assert!(msg(&["--phase2-layers", "2"]).contains("must be more than --phase1-layers"));
        assert!(msg(&["--max-new-tokens", "64"]).contains("must be below --seq-len"));
        assert!(msg(&["--tokenizer", "bpe"]).contains("'byte', 'word', not 'bpe'"));
        assert_eq!(parse(&["--help"]).unwrap_err(), FlagError::Help);
    }
}
