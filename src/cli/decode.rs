//! The decoding flags of any program that generates text, and the [`GenerateOptions`] they
//! become.
//!
//! [`USAGE`] lists the flags; a program puts it in its own usage text (so that
//! [`Flags::parse_usage`] knows them) and calls [`generate_options`]:
//!
//! ```text
//! --mode early-exit --measure softmax --fill skip   ->  DecodeMode::EarlyExit(ExitRule::new(t, Skip))
//! --mode speculative --k 4 --draft adaptive        ->  DecodeMode::SelfSpeculative(Speculation::adaptive(4, t))
//! --temperature 0.8 --top-k 20 --seed 7            ->  Sampling { temperature: 0.8, top_k: 20, top_p: 1.0, seed: 7 }
//! --stop "."                                       ->  stop_tokens: the ids of "." in the tokenizer
//! ```
//!
//! A threshold not given is the calibrated one: the checkpoint's for the max-softmax measure
//! (it stores the threshold that routes the hard examples deep), the exit gate's own for the
//! gate. `examples/generate.rs` is the program this was written for.

use super::{FlagError, Flags};
use crate::data::Tokenizer;
use crate::model::{
    DecodeMode, ExitMeasure, ExitRule, GenerateOptions, LegoTransformer, Sampling, Speculation,
    UpperCacheFill,
};

/// The decoding and sampling flags, as lines of a usage text (see [`Flags::parse_usage`]).
pub const USAGE: &str = "\
decoding
  --max-new-tokens N     tokens to add to each prompt, at most (32)
  --mode M               full | early-exit | speculative (early-exit)
                           full: every token through every layer
                           early-exit: a confident token skips the upper layers (lossy)
                           speculative: the lower layers draft, the whole model checks (lossless)
  --measure M            early exit's confidence: softmax (the exit head's top probability) |
                         gate (the learned exit gate) (gate if the model has one)
  --threshold X          exit when the confidence is at least X; speculative --draft adaptive:
                         stop drafting below it (default: the calibrated one, the checkpoint's
                         for softmax, the gate's own for gate)
  --fill F               upper cache of exited tokens: skip | propagate | deferred (skip)
  --k N                  speculative: most tokens drafted per row per round (4)
  --draft D              speculative: fixed (always k) | adaptive (stop at a draft whose exit
                         confidence is below the threshold) (fixed)
  --stop TEXT            end a row at any token of TEXT's encoding (repeatable; default: none)
sampling
  --temperature X        0 is greedy; otherwise logits / X before the softmax (0)
  --top-k N              sample among the N most likely tokens (0: all)
  --top-p X              sample among the most likely tokens holding X of the mass (1: all)
  --seed N               row r samples with seed N + r (0)
";

/// Reads the flags of [`USAGE`] into the options of a generation call on `model`, whose ids
/// belong to `tokenizer`; `calibrated` is the max-softmax threshold stored with the model (the
/// default `--threshold` for that measure). Every mistake is a [`FlagError::Invalid`] naming its
/// flag: an unknown mode, measure or fill, a gate measure on a model without a gate, a threshold
/// below 0, `--k 0`, a `--stop` text with no tokens.
pub fn generate_options(
    f: &Flags,
    model: &LegoTransformer,
    tokenizer: &Tokenizer,
    calibrated: Option<f32>,
) -> Result<GenerateOptions, FlagError> {
    let invalid = |msg: String| FlagError::Invalid(msg);
    let sampling = Sampling {
        temperature: f.number("temperature", 0.0)?,
        top_k: f.number("top-k", 0)?,
        top_p: f.number("top-p", 1.0)?,
        seed: f.number("seed", 0)?,
    };
    let softmax_threshold = |measure: &str| -> Result<f32, FlagError> {
        match calibrated {
            _ if f.given("threshold") => f.number("threshold", 0.0),
            Some(t) => Ok(t),
            None => Err(invalid(format!("--threshold: needed ({measure}): the checkpoint stores none"))),
        }
    };
    let mode = match f.choice("mode", &["full", "early-exit", "speculative"], "early-exit")? {
        "full" => DecodeMode::Full,
        "early-exit" => {
            let default_measure = if model.exit_gate.is_some() { "gate" } else { "softmax" };
            let measure: ExitMeasure =
                f.choice("measure", &["softmax", "gate"], default_measure)?.parse().expect("a choice");
            let fill: UpperCacheFill =
                f.choice("fill", &["skip", "propagate", "deferred"], "skip")?.parse().expect("a choice");
            let threshold = match (measure, &model.exit_gate) {
                (ExitMeasure::MaxSoftmax, _) => softmax_threshold("the softmax measure")?,
                (ExitMeasure::Gate, Some(gate)) => f.number("threshold", gate.threshold)?,
                (ExitMeasure::Gate, None) => {
                    return Err(invalid("--measure gate: this model has no exit gate; use softmax".into()));
                }
            };
            DecodeMode::EarlyExit(ExitRule { threshold, fill, measure })
        }
        _ => {
            let k = f.positive("k", 4)?;
            DecodeMode::SelfSpeculative(match f.choice("draft", &["fixed", "adaptive"], "fixed")? {
                "fixed" => Speculation::fixed(k),
                _ => Speculation::adaptive(k, softmax_threshold("--draft adaptive")?),
            })
        }
    };
    let mut stop_tokens = Vec::new();
    for text in f.all("stop") {
        let ids = tokenizer.encode(text);
        if ids.is_empty() {
            return Err(invalid(format!("--stop: '{text}' encodes to no token")));
        }
        stop_tokens.extend(ids);
    }
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    let options = GenerateOptions {
        max_new_tokens: f.positive("max-new-tokens", 32)?,
        stop_tokens,
        sampling,
        mode,
        profile: false,
    };
    // What the library checks itself (a threshold below 0, a top-p outside (0, 1], ...).
    options.validate_for(model).map_err(|e| invalid(e.to_string()))?;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExitGate, LegoConfig};

    fn model(gate: bool) -> LegoTransformer {
        let config = LegoConfig::new(256, 16, 4, 2, 32, 64);
        let mut m = LegoTransformer::new(config, &mut crate::Tensor::rng(0)).unwrap();
        if gate {
            m.exit_gate = Some(ExitGate::linear(vec![0.0; 16], 0.0, 0.7).unwrap());
        }
        m
    }

    fn options(args: &[&str], gate: bool) -> Result<GenerateOptions, FlagError> {
        let flags = Flags::parse_usage(args.iter().map(|s| s.to_string()), USAGE)?;
        generate_options(&flags, &model(gate), &Tokenizer::Byte, Some(0.4))
    }

    #[test]
    fn thresholds_default_to_the_calibrated_ones() {
        let rule = |o: GenerateOptions| *o.exit_rule().unwrap();
        // No gate: the max softmax against the checkpoint's threshold.
        let r = rule(options(&[], false).unwrap());
        assert_eq!((r.measure, r.threshold, r.fill), (ExitMeasure::MaxSoftmax, 0.4, UpperCacheFill::Skip));
        // A gate: it, against its own threshold, unless told otherwise.
        let r = rule(options(&["--fill", "deferred"], true).unwrap());
        assert_eq!((r.measure, r.threshold, r.fill), (ExitMeasure::Gate, 0.7, UpperCacheFill::Deferred));
        let r = rule(options(&["--measure", "softmax", "--threshold", "0.9"], true).unwrap());
        assert_eq!((r.measure, r.threshold), (ExitMeasure::MaxSoftmax, 0.9));
    }

    #[test]
    fn every_mode_sampling_and_stop_tokens() {
        assert_eq!(options(&["--mode", "full"], false).unwrap().mode, DecodeMode::Full);
        let o = options(&["--mode=speculative", "--k", "3", "--draft", "adaptive"], false).unwrap();
        assert_eq!(o.mode, DecodeMode::SelfSpeculative(Speculation::adaptive(3, 0.4)));
        let o = options(
            &["--temperature", "0.8", "--top-k", "5", "--seed", "9", "--stop", ".!", "--stop", "."],
            false,
        )
        .unwrap();
        assert_eq!(o.sampling, Sampling { temperature: 0.8, top_k: 5, top_p: 1.0, seed: 9 });
        assert_eq!(o.stop_tokens, [b'!' as usize, b'.' as usize]);
    }

    #[test]
    fn mistakes_name_their_flag() {
        let msg = |args: &[&str], gate| options(args, gate).unwrap_err().to_string();
        assert!(
            msg(&["--mode", "fast"], false).contains("--mode: one of 'full', 'early-exit', 'speculative'")
        );
        assert!(msg(&["--measure", "gate"], false).contains("no exit gate"));
        assert!(msg(&["--mode", "speculative", "--k", "0"], false).contains("--k: must be at least 1"));
        assert!(msg(&["--threshold", "-1"], false).contains("threshold"));
        assert!(msg(&["--stop", ""], false).contains("--stop: '' encodes to no token"));
        assert!(msg(&["--top-p", "0"], false).contains("top_p"));
    }
}
