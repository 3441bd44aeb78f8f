//! Text from a trained checkpoint, streamed as it is generated, with the tokens that left the
//! model early made visible.
//!
//! ```text
//! cargo run --release --example true_early_exit -- --save target/run.safetensors   # once
//! cargo run --release --example generate -- --checkpoint target/run.safetensors \
//!     --prompt "once upon a time" --mode early-exit
//! ```
//!
//! The whole lesson is one library call, [`LegoTransformer::generate_streaming`]: it hands out
//! each token as it is chosen (`TokenEvent { row, token, exited }`), a [`TextStream`] per row
//! turns the ids into whole characters, and the exited ones are printed between marks. After
//! it, the same prompts are decoded again, timed in pairs against full depth, for an honest
//! speed-up. The flags become a `GenerateOptions` in [`lego::cli::decode`], where any other
//! program can take them too.
//!
//! Several prompts are one ragged batch, and the model's step hands out a token of every row
//! in turn. Printing them as they come would interleave the rows mid-word, so row 0 is
//! streamed live and the other rows, kept as they grew, are printed whole after it.

use std::io::{IsTerminal, Write};

use lego::cli::{self, FlagError, Flags, decode};
use lego::data::{TextStream, Tokenizer};
use lego::model::{DecodeMode, EarlyExitStats, GenerateOptions, LegoTransformer};
use lego::train::load_training_checkpoint;

const HEAD: &str = "\
usage: cargo run --release --example generate -- --checkpoint PATH [flags]

  --checkpoint PATH      a training checkpoint (the main example's --save writes one)
  --prompt TEXT          a prompt; repeat it for several, decoded as one batch (default:
                         \"once upon a time\")
  --marks M              how exited tokens show: auto (dimmed on a terminal, [bracketed]
                         otherwise) | dim | brackets | none (auto)
  --pairs N              timed pairs (this mode, full depth) behind the speed-up; 0: none (5)
  --help                 this text
";

fn main() {
    let usage = format!("{HEAD}{}", decode::USAGE);
    let fail_flags = |e: FlagError| -> ! { cli::exit_with("generate", &usage, &e) };
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("generate: error: {e}");
        std::process::exit(1)
    };
    let flags = Flags::parse_usage(std::env::args().skip(1), &usage).unwrap_or_else(|e| fail_flags(e));
    let Some(path) = flags.path("checkpoint") else {
        fail_flags(FlagError::Invalid("--checkpoint PATH is required".into()))
    };
    let ckpt = load_training_checkpoint(&path).unwrap_or_else(|e| fail(&e));
    // Some flags can only be checked against the model (a gate measure needs a gate).
    let calibrated = ckpt.routing_threshold().ok();
    let options = decode::generate_options(&flags, &ckpt.model, &ckpt.tokenizer, calibrated)
        .unwrap_or_else(|e| fail_flags(e));
    let marks = match flags.choice("marks", &["auto", "dim", "brackets", "none"], "auto") {
        Ok("auto") if std::io::stdout().is_terminal() => ("\x1b[2m", "\x1b[0m"),
        Ok("auto" | "brackets") => ("[", "]"),
        Ok("dim") => ("\x1b[2m", "\x1b[0m"),
        Ok(_) => ("", ""),
        Err(e) => fail_flags(e),
    };
    let pairs: usize = flags.number("pairs", 5).unwrap_or_else(|e| fail_flags(e));
    let mut prompts = flags.all("prompt");
    if prompts.is_empty() {
        prompts.push("once upon a time");
    }
    let (model, tokenizer) = (&ckpt.model, &ckpt.tokenizer);
    eprintln!(
        "{}: {} layers, exit after {}; {}",
        path.display(),
        model.config.num_layers,
        model.config.exit_layer,
        describe(&options.mode)
    );
    if let Err(e) = run(model, tokenizer, &prompts, &options, marks, pairs) {
        fail(&e)
    }
}

/// Generates from `texts` by `options`, printing the text, the statistics and the speed.
fn run(
    model: &LegoTransformer,
    tokenizer: &Tokenizer,
    texts: &[&str],
    options: &GenerateOptions,
    marks: (&str, &str),
    pairs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let prompts: Vec<Vec<usize>> = texts.iter().map(|t| tokenizer.encode(t)).collect();

    // Generate, printing row 0 as it comes; a text-stream error (an id the tokenizer does not
    // know) is kept and returned once the call ends.
    let mut rows: Vec<RowText> = prompts.iter().map(|_| RowText::new(tokenizer)).collect();
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    write!(stdout, "{}{}", if texts.len() > 1 { "row 0: " } else { "" }, texts[0])?;
    stdout.flush()?;
    let (out, stats) = model.generate_streaming(&prompts, options, |t| {
        let row = &mut rows[t.row];
        let shown = row.text.len();
        if let Err(e) = row.push(t.token, t.exited, marks) {
            failed.get_or_insert(e);
        }
        if t.row == 0 {
            // Best effort while streaming; a closed stdout shows at the next checked write.
            let _ = write!(stdout, "{}", &rows[0].text[shown..]).and_then(|_| stdout.flush());
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    for (r, row) in rows.iter_mut().enumerate() {
        let shown = row.text.len();
        row.finish(marks);
        match r {
            0 => writeln!(stdout, "{}", &row.text[shown..])?,
            _ => writeln!(stdout, "row {r}: {}{}", texts[r], row.text)?,
        }
    }

    // The statistics of the call, then the speed against full depth on the same prompts.
    let new_tokens: usize = out.iter().zip(&prompts).map(|(o, p)| o.len() - p.len()).sum();
    writeln!(stdout, "\n{}", summary(&options.mode, &stats, new_tokens))?;
    if pairs > 0 {
        writeln!(stdout, "{}", speed(model, &prompts, options, pairs)?)?;
    }
    Ok(())
}

/// One row's text as it grows: whole characters only, exited tokens between `marks`.
struct RowText<'t> {
    stream: TextStream<'t>,
    text: String,
    /// Whether the text is inside a run of exited tokens (its opening mark written).
    in_exit_run: bool,
}

impl<'t> RowText<'t> {
    fn new(tokenizer: &'t Tokenizer) -> RowText<'t> {
        RowText { stream: TextStream::new(tokenizer), text: String::new(), in_exit_run: false }
    }

    /// Adds a token's text; consecutive exited tokens share one pair of marks.
    fn push(&mut self, token: usize, exited: bool, (open, close): (&str, &str)) -> lego::Result<()> {
        let piece = self.stream.push(token)?;
        if piece.is_empty() {
            return Ok(()); // a character still incomplete: it shows with the token that ends it
        }
        if exited != self.in_exit_run {
            self.text.push_str(if exited { open } else { close });
            self.in_exit_run = exited;
        }
        self.text.push_str(piece);
        Ok(())
    }

    /// Ends the text: a character cut short (as U+FFFD) and a closing mark if one is open.
    fn finish(&mut self, (_, close): (&str, &str)) {
        self.text.push_str(self.stream.finish());
        if self.in_exit_run {
            self.text.push_str(close);
            self.in_exit_run = false;
        }
    }
}

fn describe(mode: &DecodeMode) -> String {
    match mode {
        DecodeMode::Full => "full depth".into(),
        DecodeMode::EarlyExit(r) => {
            format!("early exit: {:?} >= {}, upper cache {:?}", r.measure, r.threshold, r.fill)
        }
        DecodeMode::SelfSpeculative(s) => match s.stop_below {
            None => format!("self-speculative: {} drafts a round", s.k),
            Some(t) => format!("self-speculative: up to {} drafts a round, while confidence >= {t}", s.k),
        },
    }
}

/// Routes, acceptance (speculative) and FLOPs of one call.
fn summary(mode: &DecodeMode, s: &EarlyExitStats, new_tokens: usize) -> String {
    let mut text = format!(
        "{new_tokens} new tokens: {} exited (shallow), {} deep ({:.0} % exited); FLOPs {:.2} of full depth",
        s.shallow_count,
        s.deep_count,
        100.0 * s.shallow_ratio,
        s.flop_cost
    );
    if let DecodeMode::SelfSpeculative(_) = mode {
        let sp = &s.speculation;
        text += &format!(
            "\ndrafted {}, accepted {} (acceptance rate {:.0} %) in {} check passes",
            sp.drafted,
            sp.accepted,
            100.0 * sp.acceptance_rate,
            sp.rounds
        );
    }
    text
}

/// Tokens a second of `options` against full depth, on the same prompts and sampling: `pairs`
/// pairs of runs, each pair timed back to back (so a busy moment of the machine hits both), the
/// order alternating between pairs; the median of the pairs' ratios.
fn speed(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    options: &GenerateOptions,
    pairs: usize,
) -> lego::Result<String> {
    let full = GenerateOptions { mode: DecodeMode::Full, ..options.clone() };
    let tokens_per_second = |o: &GenerateOptions| -> lego::Result<f64> {
        let (out, stats) = model.generate_with(prompts, o)?;
        let new: usize = out.iter().zip(prompts).map(|(o, p)| o.len() - p.len()).sum();
        Ok(new as f64 / stats.seconds.max(1e-9))
    };
    let (mut ratios, mut rates, mut full_rates) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..pairs {
        let (mine, deep) = if pair % 2 == 0 {
            let m = tokens_per_second(options)?;
            (m, tokens_per_second(&full)?)
        } else {
            let d = tokens_per_second(&full)?;
            (tokens_per_second(options)?, d)
        };
        ratios.push(mine / deep);
        rates.push(mine);
        full_rates.push(deep);
    }
    let (ratio, rate, full_rate) = (median(&mut ratios), median(&mut rates), median(&mut full_rates));
    Ok(match options.mode {
        DecodeMode::Full => format!("speed: {full_rate:.0} tokens/s at full depth (median of {pairs} runs)"),
        _ => format!(
            "speed: {ratio:.2}x full depth ({rate:.0} vs {full_rate:.0} tokens/s; medians of {pairs} paired runs)"
        ),
    })
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}
