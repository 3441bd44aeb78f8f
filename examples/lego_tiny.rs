//! # LEGO in one sitting
//!
//! ```sh
//! cargo run --release --example lego_tiny      # a few seconds
//! ```
//!
//! The whole method on a small synthetic corpus, with the library's public API only. LEGO
//! (Layered Ensemble with Gradual Optimization) trains a transformer in two phases and then lets
//! the tokens it is sure of skip its upper layers, for real, while generating:
//!
//! 1. **phase 1**: train a shallow model (2 layers) on all the data;
//! 2. **calibrate** a confidence threshold: below it, a token counts as "hard";
//! 3. **collect** the hard training tokens, with their hidden states after those 2 layers;
//! 4. **extend** the model to 4 layers: the old layers frozen, the old head kept (frozen) as
//!    the *exit head*, two new layers and a new head on top;
//! 5. **phase 2**: train only the new layers, only on the hard tokens;
//! 6. **TRUE early exit**: generate; a token whose exit confidence reaches the threshold leaves
//!    after layer 2 and the upper layers never run for it.
//!
//! `examples/true_early_exit` is the same at full size with every measurement; this file is
//! the lesson. Each step names the library item to read next.

use lego::data::{Dataset, SyntheticConfig, Tokenizer, generate_corpus, split_documents};
use lego::model::{LegoConfig, LegoTransformer, Sampling, UpperCacheFill};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    Phase2Mode, TrainOptions, Trainer, collect_hard_examples, compute_confidence_threshold,
    create_hard_example_loader, set_seed,
};

/// The sizes of a run: `main` uses [`LESSON`]; the test below runs the same code smaller.
struct Sizes {
    /// Stories in the synthetic corpus (2 go to validation, 2 to test).
    documents: usize,
    /// Model width; the MLP is `8·dim/3` rounded up to a multiple of 4, as in Llama.
    dim: usize,
    /// Tokens per training window (also the longest sequence the model takes).
    seq_len: usize,
    /// Most epochs of each phase (early stopping may end one sooner).
    epochs: usize,
    /// Tokens to generate.
    new_tokens: usize,
}

const LESSON: Sizes = Sizes { documents: 16, dim: 32, seq_len: 48, epochs: 3, new_tokens: 32 };

/// What the lesson measured, so the test can check it.
struct Outcome {
    phase1_ppl: f64,
    phase2_ppl: f64,
    shallow: usize,
    deep: usize,
}

fn main() -> lego::Result<()> {
    let out = lesson(&LESSON)?;
    println!("\ntest PPL with early exit: phase 1 {:.3} → phase 2 {:.3}", out.phase1_ppl, out.phase2_ppl);
    println!("generated tokens: {} left at the exit, {} went deep", out.shallow, out.deep);
    Ok(())
}

fn lesson(s: &Sizes) -> lego::Result<Outcome> {
    // ---- Data. A made-up language of easy tokens (spaces, endings that follow from the word)
    // and hard ones (which noun comes next): `lego::data::synthetic`. Whole documents go to
    // train, validation and test, so no test text is ever trained on. Bytes are the tokens.
    let corpus = SyntheticConfig { documents: s.documents, bytes_per_document: 4_000, seed: 0 };
    let split = split_documents(generate_corpus(&corpus), 2, 2, 0)?;
    let tokenizer = Tokenizer::Byte;
    let data = Dataset::new(&tokenizer, &split, s.seq_len, 16, 0)?; // batches of 16 windows
    let trainer = Trainer::new(TrainOptions { max_epochs: s.epochs, ..TrainOptions::default() });

    // ---- 1. Phase 1: a 2-layer model whose exit is its top (exit_layer = num_layers), trained
    // on everything with AdamW and early stopping on validation (`Trainer`).
    let ffn = (8 * s.dim).div_ceil(3).next_multiple_of(4);
    let shallow = LegoConfig { exit_layer: 2, ..LegoConfig::new(256, s.dim, 2, 2, ffn, s.seq_len) };
    let phase1 = LegoTransformer::new(shallow, &mut set_seed(0))?;
    let mut opt = AdamW::new(phase1.params(), AdamWConfig { lr: 3e-3, ..AdamWConfig::default() });
    trainer.train_with_early_stopping(&phase1, &data.train, &data.val, &mut opt)?;

    // ---- 2. Calibrate. A token's confidence is the largest probability of the exit head's
    // softmax (`LegoTransformer::compute_confidence`). The threshold is the validation quantile
    // that makes half the tokens "hard": those go deep at inference.
    let threshold = compute_confidence_threshold(&phase1, &data.val, 0.5)?;
    println!("threshold {threshold:.3}: half of the validation tokens are less confident");

    // ---- 3. Hard examples: the training tokens under the threshold. Their hidden states
    // after layer 2 are computed once here and stored, so phase 2 never runs layers 0-1.
    let hard = collect_hard_examples(&phase1, &data.train, threshold)?;
    println!("hard examples: {} of {} training tokens", hard.len(), hard.tokens_seen);

    // ---- 4. Extend to 4 layers, freezing the lower ones. The phase-1 head becomes a frozen
    // exit head, so the confidences calibrated above cannot drift (`LegoTransformer::extend`).
    let model = phase1.extend(4, threshold, true, &mut set_seed(1))?;

    // ---- 5. Phase 2: only the trainable parameters (layers 2-3 and the deep head), fed the
    // stored hidden states of whole sequences, the loss on the hard positions only
    // (`Phase2Mode::Sequence`), stopping early on the validation PPL with routing.
    let hard_batches = create_hard_example_loader(&hard, 16, 0, Phase2Mode::Sequence)?;
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig { lr: 1e-3, ..AdamWConfig::default() });
    let exit = model.config.exit_layer;
    trainer.train_upper_layers_with_early_stopping(
        &model,
        &hard_batches,
        &data.val,
        &hard,
        &mut opt,
        exit,
        threshold,
        Phase2Mode::Sequence,
    )?;

    // How did it go? Test PPL with routing: each token's prediction from the exit when it is
    // confident, from the top otherwise (`Trainer::evaluate`; phase 1 always exits).
    let phase1_ppl = trainer.evaluate(&phase1, &data.test, Some(threshold))?.ppl;
    let routed = trainer.evaluate(&model, &data.test, Some(threshold))?;
    println!("test: {:.1} % of tokens exit after layer 2", 100.0 * routed.shallow_ratio);

    // ---- 6. TRUE early exit. Generation runs the lower layers and the exit check for each new
    // token; a confident token's next token comes from the exit head and layers 2-3 are never
    // computed for it (their KV cache simply lacks it: `UpperCacheFill::Skip`, the spec's). See
    // `lego::model::early_exit` for the routed step, `lego::model::cost` for the costs.
    let prompts = vec![tokenizer.encode("the ")]; // one row; a batch routes each row on its own
    let greedy = Sampling::greedy();
    let (out, stats) =
        model.generate_with_early_exit(&prompts, s.new_tokens, threshold, &greedy, UpperCacheFill::Skip)?;
    let full = model.generate(&prompts, s.new_tokens, &greedy)?;
    let text = |ids: &[usize]| tokenizer.decode(&ids[prompts[0].len()..]);
    println!("\nearly exit: {:?}", text(&out[0])?);
    println!("full depth: {:?}", text(&full[0])?);
    println!(
        "{} shallow / {} deep ({:.0} % shallow): layer compute {:.1} % of full depth, FLOPs {:.1} % (the exit check included)",
        stats.shallow_count,
        stats.deep_count,
        100.0 * stats.shallow_ratio,
        100.0 * stats.actual_compute_cost,
        100.0 * stats.flop_cost
    );
    Ok(Outcome { phase1_ppl, phase2_ppl: routed.ppl, shallow: stats.shallow_count, deep: stats.deep_count })
}

#[cfg(test)]
mod tests {
    /// The lesson's code path, end to end, at a size that takes a second or two.
    #[test]
    fn the_lesson_runs_and_early_exit_generates_every_token() {
        let tiny = super::Sizes { documents: 6, dim: 16, seq_len: 16, epochs: 1, new_tokens: 8 };
        let out = super::lesson(&tiny).unwrap();
        assert_eq!(out.shallow + out.deep, 8);
        assert!(out.phase1_ppl.is_finite() && out.phase2_ppl.is_finite());
    }
}
