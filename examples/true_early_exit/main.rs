//! **TRUE early exit**: the LEGO experiment from start to finish (the spec's `colab4.py`).
//!
//! ```sh
//! cargo run --release --example true_early_exit                      # synthetic corpus, ~4.5 min
//! bash scripts/fetch-shakespeare.sh                                  # Shakespeare, 5 MB
//! cargo run --release --example true_early_exit -- --data data/shakespeare --epochs 2
//! cargo run --release --example true_early_exit -- --help
//! ```
//!
//! `examples/lego_tiny.rs` is the method alone in 150 lines; this program runs it at full size
//! and measures what it gives. [`run`] is the list of its stages; this file holds the training
//! stages, [`measure`] the measurements, [`options`] the flags, [`checkpoints`] `--save` and
//! `--load`. The reports themselves are `lego::report`.
//!
//! 1. the text, split by **whole documents** into train, validation (4) and test (4): everything
//!    reported comes from the test documents, which nothing is fitted on;
//! 2. bytes or words (fitted on the training split only), in windows of `seq_len + 1` tokens;
//! 3. [`train_phase1`]: a **shallow** model (2 layers) on all the training data;
//! 4. [`calibrate`]: the **threshold**: the exit confidence (max softmax) below which
//!    `--hard-ratio` of the *validation* tokens fall;
//!    Then [`train_gate`]: the learned **exit gate**, imitating that routing, so that a deep
//!    token need not pay the exit head;
//! 5. [`collect_hard`]: the **hard examples**: the *training* tokens under it, with their
//!    hidden states after the lower layers;
//! 6. [`extend`]: 4 layers; embedding and lower layers frozen, a frozen copy of the phase-1
//!    head as the **exit head** (so the calibrated confidences cannot move);
//! 7. [`train_phase2`]: only the upper layers and the deep head learn, from the hard examples,
//!    in whole sequences (`sequence`, our default) or token by token (`token`, the spec's);
//!    then [`choose_gate`]: CALM's **consistency gate** (does the exit's argmax equal the deep
//!    model's?) against the imitation gate on validation; the better one routes from here on;
//! 8. [`train_baseline`]: the same 4 layers from scratch on all the data (or `--baseline`'s); and
//!    [`tune_baseline_exit`]: that baseline with a tuned exit head (body frozen);
//! 9. [`measure::evaluate_models`]: test PPL at full depth and with (fake) early exit;
//! 10. [`measure::true_early_exit_generation`]: generation where a confident token really skips
//!     the upper layers, timed against ordinary generation;
//! 11. [`measure::early_exit_table`]: thresholds × upper-cache fills: agreement with full-depth
//!     greedy generation, and teacher-forced PPL through the early-exit engine;
//! 12. [`measure::frontier`]: test PPL against inference FLOPs for the static models and every
//!     sweep, against the static frontier (`lego::report::frontier`);
//! 13. the report (`lego::report::experiment`): tables on stdout, `report.json`,
//!     `results.csv`, `frontier.svg` and `frontier.csv` under `--out`.
//!
//! Costs are counted by `lego::model::cost` (inference) and `lego::report::experiment::Stage`
//! (training).

mod checkpoints;
mod measure;
mod options;

use std::time::Instant;

use lego::Result;
use lego::cli;
use lego::data::{self, Dataset, Document, SyntheticConfig, Tokenizer};
use lego::model::exit_gate::ExitGate;
use lego::model::transformer::ExtendInit;
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};
use lego::report::experiment::{ExperimentReport, Phase2Record, Stage, mode_name};
use lego::train::{
    ExitGateOptions, HardExamples, Phase2Mode, TrainOptions, Trainer, collect_hard_examples,
    compute_confidence_threshold, create_hard_example_loader, get_device, set_seed, train_consistency_gate,
    train_exit_gate, validation_frontier_ppl,
};

use checkpoints::Loaded;
use options::{Options, USAGE};

/// Documents held out for testing and for validation (whole documents, chosen by `--seed`).
const TEST_DOCS: usize = 4;
const VAL_DOCS: usize = 4;
/// Hard tokens per batch in `token` mode (the spec's `create_hard_example_loader(…, 64)`).
const TOKEN_MODE_BATCH: usize = 64;

fn main() {
    let options = Options::parse(std::env::args().skip(1))
        .unwrap_or_else(|e| cli::exit_with("true_early_exit", USAGE, &e));
    if let Err(e) = run(&options) {
        eprintln!("true_early_exit: error: {e}");
        std::process::exit(1);
    }
}

// ================================================================================================
// The experiment, stage by stage
// ================================================================================================

/// The whole run: each stage in order, then the report.
fn run(o: &Options) -> Result<()> {
    let started = Instant::now();
    let device = get_device();
    eprintln!("device: {device}");
    // The report goes to --out at the very end: find out now, not after training, if it cannot.
    lego::io::output_dir::prepare_output_dir(&o.out)?;

    // 1-2. The documents, split; tokens and batches.
    let (docs, source) = load_corpus(o)?;
    let split = data::split_documents(docs, TEST_DOCS, VAL_DOCS, o.run.seed)?;
    eprintln!(
        "test documents: {}\nvalidation documents: {}",
        split.test_names().join(", "),
        split.val_names().join(", ")
    );
    let loaded = o.load.as_deref().map(|path| Loaded::read(path, &split)).transpose()?;
    let tokenizer = match (&loaded, o.run.tokenizer.as_str()) {
        (Some(l), _) => l.phase1.tokenizer.clone(),
        (None, "word") => Tokenizer::word(&split.train, o.run.vocab_size)?,
        (None, _) => Tokenizer::Byte,
    };
    let data = Dataset::new(&tokenizer, &split, o.run.seq_len, o.run.batch_size, o.run.seed)?;
    let [train_n, val_n, test_n] = data.tokens;
    eprintln!(
        "data: {source}; {train_n} / {val_n} / {test_n} tokens ({}, V = {})",
        tokenizer.kind(),
        tokenizer.vocab_size()
    );

    // 3. Phase 1: the shallow model.
    let (mut phase1, phase1_opt, phase1_stage) = match &loaded {
        Some(l) => l.phase1_model()?,
        None => train_phase1(&tokenizer, &data, o)?,
    };
    // 4. The threshold, on validation.  5. Hard examples, from training.
    let threshold = calibrate(&phase1, &data, o)?;
    // 4b. The learned exit gate, trained to imitate that routing (kept by `extend`).
    phase1.exit_gate = Some(train_gate(&phase1, &data, threshold, o)?);
    let (hard, collect_stage) = collect_hard(&phase1, &data, threshold)?;
    // 6. The 4-layer starting point of phase 2.  7. Phase 2, each mode from that same start.
    let start = extend(&phase1, threshold, o)?;
    let mut phase2 = Vec::new();
    for &mode in &o.modes {
        phase2.push(match loaded.as_ref().and_then(|l| l.phase2_model(mode)) {
            // Phase 2 keeps phase 1's gate frozen, so a loaded phase-2 model takes the gate
            // just trained from the same phase 1 and data: the one it would have had.
            Some(run) => run.map(|mut run| {
                run.model.exit_gate = phase1.exit_gate.as_ref().map(|g| g.deep_clone());
                run
            })?,
            None => train_phase2(&start, &hard, &data, threshold, mode, o)?,
        });
    }
    // 7b. CALM's consistency gate for each phase-2 model; the gate with the better validation
    // frontier routes it from here on.
    for run in &mut phase2 {
        choose_gate(run, &data, o)?;
    }
    // The checkpoints, as soon as LEGO's training is over: the baseline and the measurements
    // below take a while, and a run stopped during them keeps what it trained (`--load`).
    if let Some(path) = &o.save {
        checkpoints::save(
            path,
            &tokenizer,
            &split,
            threshold,
            o,
            (&phase1, &phase1_opt, &phase1_stage),
            &phase2[0],
        )?;
    }
    // 8. The baseline: 4 layers from scratch; and the same with a tuned exit head.
    let loaded_baseline = o.baseline.as_deref().map(|p| checkpoints::load_baseline(p, &split)).transpose()?;
    let (baseline, baseline_stage) = match loaded_baseline.flatten() {
        Some(pair) => pair,
        None => {
            let (model, opt, stage) = train_baseline(&tokenizer, &data, o)?;
            if let Some(path) = &o.baseline {
                checkpoints::save_baseline(path, &tokenizer, &split, o, (&model, &opt, &stage))?;
            }
            (model, stage)
        }
    };
    let (tuned, tuned_stage) = tune_baseline_exit(&baseline, &data, o)?;

    // 9-12. Measurements on the test split.
    let evals = measure::evaluate_models(&phase1, &phase2, &baseline, &data, threshold, o)?;
    let prompt = measure::choose_prompt(&tokenizer, &split, o)?;
    let primary = &phase2[0];
    let generation = measure::true_early_exit_generation(&primary.model, &tokenizer, &prompt, threshold, o)?;
    let table = measure::early_exit_table(&phase2, &data, o)?;
    let frontier = measure::frontier(&phase1, &primary.model, &baseline, &tuned, &data, o)?;

    // 13. The report.
    let report = ExperimentReport {
        settings: o.settings(&tokenizer),
        source,
        split_names: [split.train_names(), split.val_names(), split.test_names()]
            .map(|names| names.into_iter().map(String::from).collect()),
        tokens: data.tokens,
        threshold,
        phase1_stage,
        collect_stage,
        phase2: phase2.iter().map(|run| run.record.clone()).collect(),
        baseline_stage,
        phase1_params: phase1.num_params(),
        phase2_params: primary.model.num_params(),
        evals,
        generation,
        table,
        table_prompts: measure::TABLE_PROMPTS,
        table_prompt_len: (o.run.seq_len - o.run.max_new_tokens).min(16),
        table_windows: o.eval_sequences.min(data.test_windows.len()),
        prompt: tokenizer.decode(&prompt)?,
        device: device.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    };
    print!("{report}");
    let [json, csv] = report.write(&o.out)?;
    let lego_total = report.lego_total(&report.phase2[0]);
    measure::print_frontier(&frontier, lego_total, (&report.baseline_stage, &tuned_stage), o)?;
    eprintln!("\nwrote {} and {}", json.display(), csv.display());
    Ok(())
}

/// The documents: the files of `--data`, or the synthetic corpus; and a description.
fn load_corpus(o: &Options) -> Result<(Vec<Document>, String)> {
    if let Some(path) = &o.data {
        let docs = data::load_texts(path)?;
        let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
        return Ok((docs, format!("{} ({bytes} bytes)", path.display())));
    }
    let c = SyntheticConfig::default();
    let what = format!(
        "synthetic corpus ({} stories of ~{} bytes, seed {})",
        c.documents, c.bytes_per_document, c.seed
    );
    Ok((data::generate_corpus(&c), what))
}

// ----- 3-8. Training ----------------------------------------------------------------------------

fn trainer(label: &str, epochs: usize, o: &Options) -> Trainer {
    let options = TrainOptions {
        max_epochs: epochs,
        patience: o.run.patience,
        verbose: true,
        label: label.into(),
        ..Default::default()
    };
    Trainer::new(options)
}

/// Phase 1: a shallow model (exit layer = its depth) trained on every training batch, with
/// AdamW at `--lr` and early stopping on the validation perplexity.
fn train_phase1(tok: &Tokenizer, data: &Dataset, o: &Options) -> Result<(LegoTransformer, AdamW, Stage)> {
    eprintln!("\n== phase 1: {} layers on all training data ==", o.run.phase1_layers);
    train_from_scratch("phase 1", tok, data, o.run.phase1_layers, o.run.seed, o)
}

/// A model of `layers` layers (exit after `--phase1-layers`) trained from scratch on all the
/// training data: phase 1, and the baseline.
fn train_from_scratch(
    label: &str,
    tok: &Tokenizer,
    data: &Dataset,
    layers: usize,
    seed: u64,
    o: &Options,
) -> Result<(LegoTransformer, AdamW, Stage)> {
    let base =
        LegoConfig::new(tok.vocab_size(), o.run.dim, layers, o.run.heads, o.run.ffn_hidden, o.run.seq_len);
    let model =
        LegoTransformer::new(LegoConfig { exit_layer: o.run.phase1_layers, ..base }, &mut set_seed(seed))?;
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: o.run.lr, ..Default::default() });
    let t0 = Instant::now();
    let history = trainer(label, o.run.epochs, o).train_with_early_stopping(
        &model,
        &data.train,
        &data.val,
        &mut opt,
    )?;
    let stage = Stage::of_training(&history, &model.config, data.seq_len, t0.elapsed().as_secs_f64());
    Ok((model, opt, stage))
}

/// The routing threshold: `--hard-ratio` of the **validation** tokens have a lower exit
/// confidence.
fn calibrate(phase1: &LegoTransformer, data: &Dataset, o: &Options) -> Result<f32> {
    let threshold = compute_confidence_threshold(phase1, &data.val, o.run.hard_ratio)?;
    let share = 100.0 * o.run.hard_ratio;
    eprintln!("\nthreshold: {threshold:.4} (confidence under which {share:.0} % of validation tokens fall)");
    Ok(threshold)
}

/// The learned **exit gate** (CALM's classifier, `lego::model::exit_gate`): a logistic
/// regression from the normalised exit state and its squares, fitted on the *training* split to imitate the
/// max-softmax routing at `threshold`, its own threshold calibrated on *validation* to the same
/// exit share. With it, a token that goes deep never pays the exit head.
fn train_gate(phase1: &LegoTransformer, data: &Dataset, threshold: f32, o: &Options) -> Result<ExitGate> {
    let (gate, report) = train_exit_gate(
        phase1,
        &data.train,
        &data.val,
        threshold,
        o.run.hard_ratio,
        &ExitGateOptions::default(),
    )?;
    let v = &report.validation;
    eprintln!(
        "exit gate: agrees with the softmax routing on {:.1} % of validation tokens; exits {:.1} % of them \
         (softmax: {:.1} %), threshold {:.4}",
        100.0 * v.agreement,
        100.0 * v.gate_exit_share,
        100.0 * v.reference_exit_share,
        gate.threshold
    );
    Ok(gate)
}

/// Validation hard ratios at which the imitation and the consistency gate are compared.
const GATE_RATIOS: [f32; 5] = [0.2, 0.35, 0.5, 0.65, 0.8];
/// Validation sequences behind that comparison (evenly spaced over the split).
const GATE_SEQUENCES: usize = 256;

/// CALM's **consistency gate** for a phase-2 model: the same regression as the imitation gate,
/// trained on the phase-2 model to predict whether the exit's most likely token equals the
/// deep model's, its threshold calibrated on validation to the same exit share. Both gates are
/// then measured on validation (routed PPL of TRUE early exit at each of [`GATE_RATIOS`]) and
/// the one with the lower mean keeps routing the model: quality for the same compute, chosen
/// on validation only.
fn choose_gate(run: &mut Phase2Run, data: &Dataset, o: &Options) -> Result<()> {
    let imitation =
        run.model.exit_gate.clone().ok_or_else(|| {
            lego::Error::Input("choose_gate: the phase-2 model has no imitation gate".into())
        })?;
    let fitted = train_consistency_gate(
        &run.model,
        &data.train,
        &data.val,
        o.run.hard_ratio,
        &ExitGateOptions::default(),
    )?;
    let (consistency, report) = match fitted {
        Ok(fitted) => fitted,
        Err(one) => {
            // E.g. identity-grown upper layers that early stopping kept at step 0: the deep
            // model is the exit, and every token "agrees".
            eprintln!(
                "consistency gate ({}): the exit's argmax {} the deep one on all {} training tokens, \
                 so there is nothing to learn; keeping the imitation gate",
                run.record.model_name(),
                if one.exits { "equals" } else { "differs from" },
                one.tokens
            );
            return Ok(());
        }
    };
    let sequences = data.val_sequences(Some(GATE_SEQUENCES));
    let ppl =
        |gate: &ExitGate| validation_frontier_ppl(&run.model, gate, &data.val, &sequences, &GATE_RATIOS);
    let (by_imitation, by_consistency) = (ppl(&imitation)?, ppl(&consistency)?);
    let keep = if by_consistency < by_imitation { consistency } else { imitation };
    eprintln!(
        "consistency gate ({}): the exit's argmax equals the deep one on {:.1} % of training tokens; \
         validation routed PPL over {} hard ratios: imitation {by_imitation:.4}, consistency \
         {by_consistency:.4}; keeping the {} gate",
        run.record.model_name(),
        100.0 * report.train_exit_labels,
        GATE_RATIOS.len(),
        keep.kind.name()
    );
    run.model.exit_gate = Some(keep);
    Ok(())
}

/// The **training** tokens under the threshold, with their lower hidden states: one forward
/// pass of the lower layers and the exit head over the training split.
fn collect_hard(phase1: &LegoTransformer, data: &Dataset, threshold: f32) -> Result<(HardExamples, Stage)> {
    let t0 = Instant::now();
    let hard = collect_hard_examples(phase1, &data.train, threshold)?;
    let stage =
        Stage::of_collection(hard.tokens_seen, &phase1.config, data.seq_len, t0.elapsed().as_secs_f64());
    let share = 100.0 * hard.len() as f64 / hard.tokens_seen as f64;
    let (n, seen, seqs) = (hard.len(), hard.tokens_seen, hard.num_sequences());
    eprintln!("hard examples: {n} of {seen} training tokens ({share:.1} %), in {seqs} sequences");
    Ok((hard, stage))
}

/// The phase-1 model grown to `--phase2-layers` (new random upper layers, lower part frozen,
/// a frozen copy of the phase-1 head as the exit head).
fn extend(phase1: &LegoTransformer, threshold: f32, o: &Options) -> Result<LegoTransformer> {
    let init: ExtendInit = o.run.init.parse()?;
    phase1.extend_with(o.run.phase2_layers, threshold, true, init, &mut set_seed(o.run.seed + 1))
}

/// A phase-2 model, its optimizer (for `--save`) and how it was made.
struct Phase2Run {
    model: LegoTransformer,
    opt: AdamW,
    record: Phase2Record,
}

/// Phase 2 in `mode`, on a copy of `start`: only the trainable (upper) parameters, AdamW at
/// `--lr2`, the hard examples fed from their cached hidden states, early stopping on the
/// validation PPL with routing at the threshold.
fn train_phase2(
    start: &LegoTransformer,
    hard: &HardExamples,
    data: &Dataset,
    threshold: f32,
    mode: Phase2Mode,
    o: &Options,
) -> Result<Phase2Run> {
    eprintln!("\n== phase 2 ({} mode): upper layers on the hard examples ==", mode_name(mode));
    let model = start.deep_clone();
    let batch = if mode == Phase2Mode::Token { TOKEN_MODE_BATCH } else { o.run.batch_size };
    let hard_batches = create_hard_example_loader(hard, batch, o.run.seed, mode)?;
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig { lr: o.run.lr2, ..Default::default() });
    let t0 = Instant::now();
    let (label, exit) = (format!("phase 2 ({})", mode_name(mode)), model.config.exit_layer);
    let history = trainer(&label, o.run.phase2_epochs, o).train_upper_layers_with_early_stopping(
        &model,
        &hard_batches,
        &data.val,
        hard,
        &mut opt,
        exit,
        threshold,
        mode,
    )?;
    let stage = Stage::of_phase2(&history, &model.config, mode, hard.seq_len, t0.elapsed().as_secs_f64());
    Ok(Phase2Run { model, opt, record: Phase2Record { mode, stage } })
}

/// The same depth as phase 2, trained from scratch on all the training data exactly as phase
/// 1 is (optimizer, learning rate, epochs, early stopping).
fn train_baseline(tok: &Tokenizer, data: &Dataset, o: &Options) -> Result<(LegoTransformer, AdamW, Stage)> {
    eprintln!("\n== baseline: {} layers from scratch on all training data ==", o.run.phase2_layers);
    train_from_scratch("baseline", tok, data, o.run.phase2_layers, o.run.seed + 2, o)
}

/// The baseline with a tuned exit head at layer `--phase1-layers`: its body frozen, a copy of
/// its head trained on the training split's exit states (what a user with a deep model would
/// try). Training FLOPs: the exit states once, then 3 × a head per token per epoch.
fn tune_baseline_exit(
    baseline: &LegoTransformer,
    data: &Dataset,
    o: &Options,
) -> Result<(LegoTransformer, Stage)> {
    eprintln!(
        "\n== baseline + tuned exit head: a copy of its head trained at layer {} ==",
        o.run.phase1_layers
    );
    let t0 = Instant::now();
    let (tuned, h) = trainer("tuned exit head", o.run.epochs, o).tune_exit_head_with_early_stopping(
        baseline,
        &data.train,
        &data.val,
        o.run.lr,
    )?;
    let stage =
        Stage::of_exit_head(&h, &tuned.config, data.tokens[0], data.seq_len, t0.elapsed().as_secs_f64());
    Ok((tuned, stage))
}
