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
//! speed-up. [`lego::cli::decode`] turns the flags into a `GenerateOptions` (any program can).
//!
//! Several prompts are one ragged batch, and the model's step hands out a token of every row
//! in turn. Printing them as they come would interleave the rows mid-word, so row 0 is
//! streamed live and the other rows, kept as they grew, are printed whole after it.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use lego::cli::{self, FlagError, Flags, decode};
use lego::data::{TextStream, Tokenizer};
use lego::model::{DecodeMode, ExitMeasure, GenerateOptions, LegoTransformer};
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
        Ok(_) => ("", ""), // none
        Err(e) => fail_flags(e),
    };
    let pairs: usize = flags.number("pairs", 5).unwrap_or_else(|e| fail_flags(e));
    let mut prompts = flags.all("prompt");
    if prompts.is_empty() {
        prompts.push("once upon a time");
    }
    let (model, tokenizer) = (&ckpt.model, &ckpt.tokenizer);
    eprintln!("{}: {}", path.display(), describe(&options.mode));
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
    let (_, stats) = model.generate_streaming(&prompts, options, |t| {
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
    let (s, sp) = (&stats, &stats.speculation);
    writeln!(
        stdout,
        "\n{} new tokens: {} exited (shallow), {} deep ({:.0} % exited); FLOPs {:.2} of full depth",
        s.shallow_count + s.deep_count,
        s.shallow_count,
        s.deep_count,
        100.0 * s.shallow_ratio,
        s.flop_cost
    )?;
    if let DecodeMode::SelfSpeculative(_) = options.mode {
        writeln!(
            stdout,
            "drafted {}, accepted {} (acceptance rate {:.0} %) in {} check passes",
            sp.drafted,
            sp.accepted,
            100.0 * sp.acceptance_rate,
            sp.rounds
        )?;
    }
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
        }
    }
}

fn describe(mode: &DecodeMode) -> String {
    match mode {
        DecodeMode::Full => "full depth".into(),
        DecodeMode::EarlyExit(r) => format!(
            "early exit: {} >= {:.3}, upper cache: {}",
            if r.measure == ExitMeasure::Gate { "gate" } else { "max softmax" },
            r.threshold,
            format!("{:?}", r.fill).to_lowercase()
        ),
        DecodeMode::SelfSpeculative(s) => match s.stop_below {
            None => format!("self-speculative: {} drafts a round", s.k),
            Some(t) => format!("self-speculative: up to {} drafts a round, while confidence >= {t:.3}", s.k),
        },
    }
}

/// Tokens a second of `options` against full depth, on the same prompts and sampling: `pairs`
/// pairs of runs, each pair timed back to back (so a busy moment of the machine hits both), the
/// order alternating between pairs; the median of the pairs' ratios. A small model decodes in
/// microseconds, so each run repeats the call for about 50 ms (the count set by a first call).
fn speed(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    options: &GenerateOptions,
    pairs: usize,
) -> lego::Result<String> {
    let full = GenerateOptions { mode: DecodeMode::Full, ..options.clone() };
    let new_tokens = |o: &GenerateOptions| -> lego::Result<(usize, f64)> {
        let (out, stats) = model.generate_with(prompts, o)?;
        Ok((out.iter().zip(prompts).map(|(o, p)| o.len() - p.len()).sum(), stats.seconds))
    };
    let ((mine_n, first), (full_n, _)) = (new_tokens(options)?, new_tokens(&full)?);
    let reps = ((0.05 / first.max(1e-9)).ceil() as usize).clamp(1, 10_000);
    let rate = |o: &GenerateOptions, n: usize| -> lego::Result<f64> {
        let t = Instant::now();
        for _ in 0..reps {
            model.generate_with(prompts, o)?;
        }
        Ok((n * reps) as f64 / t.elapsed().as_secs_f64())
    };
    let (mut ratios, mut full_rates) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let (mine, deep) = if pair % 2 == 0 {
            let m = rate(options, mine_n)?;
            (m, rate(&full, full_n)?)
        } else {
            let d = rate(&full, full_n)?;
            (rate(options, mine_n)?, d)
        };
        ratios.push(mine / deep);
        full_rates.push(deep);
    }
    let (ratio, full_rate) = (median(&mut ratios), median(&mut full_rates));
    Ok(match options.mode {
        DecodeMode::Full => format!("speed: {full_rate:.0} tokens/s at full depth (median of {pairs} runs)"),
        _ => format!(
            "speed: {ratio:.2}x full depth (median of {pairs} paired runs; full depth: {full_rate:.0} tokens/s)"
        ),
    })
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}
