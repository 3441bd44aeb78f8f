//! **TRUE early exit**: the LEGO experiment from start to finish (the spec's `colab4.py`).
//!
//! ```sh
//! cargo run --release --example true_early_exit                      # synthetic corpus, ~3 min
//! bash scripts/fetch-shakespeare.sh                                  # Shakespeare, 5 MB
//! cargo run --release --example true_early_exit -- --data data/shakespeare --epochs 2  # ~20 min
//! cargo run --release --example true_early_exit -- --help
//! ```
//!
//! LEGO trains a transformer in two phases and then lets the tokens it is sure of skip its
//! upper layers, for real, when it generates. This program runs every step of that and
//! measures what it gives, each step one function below:
//!
//! 1. [`load_corpus`], [`split_corpus`]: the text, split by **whole documents** into train,
//!    validation (4) and test (4). Everything reported comes from the test documents, which
//!    nothing is fitted on (the prototype reported on the split it collected hard examples
//!    from: its weakness 1).
//! 2. [`build_tokenizer`], [`make_data`]: bytes or words (the word vocabulary is fitted on the
//!    training split only), cut into windows of `seq_len + 1` tokens and batched.
//! 3. [`train_phase1`]: a **shallow** model (2 layers) learns from all the training data.
//! 4. [`calibrate`]: the **routing threshold**: the confidence (`max softmax` of the exit
//!    logits) below which `--hard-ratio` of the *validation* tokens fall.
//! 5. [`collect_hard`]: the **hard examples**: the *training* tokens under the threshold, with
//!    their hidden states after the lower layers (computed once, here).
//! 6. [`extend`]: the model grows to 4 layers; the embedding and lower layers are frozen, and
//!    a frozen copy of the phase-1 head becomes the **exit head**, so the confidences the
//!    threshold was calibrated on cannot move (the prototype's weakness 3).
//! 7. [`train_phase2`]: only the **upper layers** (and the deep head) learn, only from the
//!    hard examples, fed from the cached hidden states: in whole sequences with the loss on
//!    the hard positions (`sequence`, our default: attention sees context, as at inference),
//!    or token by token (`token`, the spec's: each hard token alone, so the upper attention
//!    never sees context in training — weakness 2). Both run from the same starting point.
//! 8. [`train_baseline`]: the same 4-layer model trained from scratch on all the training
//!    data, with the same optimizer and epochs: what LEGO should be compared with.
//! 9. [`evaluate_models`]: test perplexity of every model at full depth and with early exit
//!    at the threshold (*fake* early exit: both paths computed, one chosen, which measures the
//!    quality and the share of tokens that would skip), perplexity on the test split's hard
//!    tokens before and after phase 2, and whether the hard share stayed at its target.
//! 10. [`true_early_exit_generation`]: **TRUE early exit**: generation in which a confident
//!     token really does not run the upper layers; counts, compute and wall-clock time
//!     against ordinary generation.
//! 11. [`early_exit_table`]: the cost/quality trade-off: for several thresholds and both ways
//!     of treating the upper KV cache of tokens that exited (`skip`: they are missing there,
//!     the spec's behaviour; `propagate`: their exit hidden state is projected into the upper
//!     layers' keys and values), how often greedy generation still picks the full-depth
//!     model's tokens, and the test perplexity when the test text is fed token by token
//!     through the early-exit engine (teacher forcing, so exited tokens really are missing
//!     from the upper cache, unlike step 9).
//! 12. [`print_report`], [`write_outputs`]: tables on stdout beside the prototype's published
//!     numbers, `report.json` and `results.csv` under `--out`, checkpoints with `--save`.
//!
//! **Compute.** Inference cost is counted two ways (see `lego::model::cost`): the spec's
//! *layer cost*, `(shallow·exit_layer + deep·num_layers) / (tokens·num_layers)`, and a *FLOP
//! cost* that also counts attention over the context and the exit check's projection to the
//! vocabulary (which the layer count ignores: weakness 6). **Training FLOPs** are counted as
//! 3 × the forward FLOPs of every position trained (the backward pass costs about twice the
//! forward), with the forward FLOPs of a token at context length `ctx` being
//! `layers · layer_flops(ctx) + head_flops`: for phase 1 and the baseline every layer, for
//! phase 2 only the upper layers and the deep head, over every position they ran (in
//! `sequence` mode the whole sequence, in `token` mode one position per hard token), plus the
//! one forward pass of the lower layers and the exit head over the training split that
//! collected the hard examples. Validation passes for early stopping are not counted for
//! any model.
//!
//! **Checkpoints.** `--save run.safetensors` writes the phase-2 model (with its optimizer,
//! tokenizer and threshold: `lego::train::save_training_checkpoint`) to `run.safetensors` and
//! the phase-1 model to `run.phase1.safetensors`. `--load run.safetensors` reuses finished
//! stages instead of training them again: a phase-1 checkpoint skips phase 1; a phase-2
//! checkpoint (with its phase-1 file beside it) skips phase 1 and the phase-2 mode it holds
//! (another requested mode is trained from the same extended starting point as before, since
//! `extend` is seeded). The tokenizer and the model's sizes come from the checkpoint (size
//! flags are then ignored), and the run refuses a checkpoint whose test documents differ
//! from this run's split, which would leak test text into training. The baseline is always
//! trained. Training is not continued mid-stage: a stage is either loaded or run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lego::data::{
    self, Batch, Document, Split, SyntheticConfig, Tokenizer, batches, generate_corpus,
    sequences_from_documents,
};
use lego::io::atomic::write_atomic;
use lego::io::json::Json;
use lego::model::{ExitRule, LegoConfig, LegoTransformer, Sampling, UpperCacheFill, cost};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    EvalStats, HardExamples, Phase2Mode, TrainOptions, Trainer, TrainingCheckpoint, collect_hard_examples,
    compute_confidence_threshold, create_hard_example_loader, evaluate_on_hard_examples, get_device,
    load_training_checkpoint, save_training_checkpoint, set_seed,
};
use lego::{Error, Result, no_grad};

/// Documents held out for testing and for validation (whole documents, chosen by `--seed`).
const TEST_DOCS: usize = 4;
const VAL_DOCS: usize = 4;
/// Hard tokens per batch in `token` mode (the spec's `create_hard_example_loader(…, 64)`).
const TOKEN_MODE_BATCH: usize = 64;
/// Timed repetitions of each generation; the best is kept.
const TIMING_REPS: usize = 7;
/// Prompts (from the test split) for the agreement column of the early-exit table.
const TABLE_PROMPTS: usize = 8;
/// Hard ratios whose validation thresholds the early-exit table tries.
const TABLE_RATIOS: [f32; 3] = [0.25, 0.5, 0.75];

const USAGE: &str = "\
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
  --lr X                 AdamW learning rate of phase 1 and the baseline (1e-3)
  --lr2 X                AdamW learning rate of phase 2 (1e-4)
  --hard-ratio X         share of validation tokens under the threshold, in (0, 1) (0.5)
  --phase2-mode M        both | sequence | token (both)
generation
  --prompt TEXT          prompt for TRUE early-exit generation (default: a phrase from the
                         first test document)
  --max-new-tokens N     tokens to generate; must leave room in --seq-len for the prompt (32)
  --eval-sequences N     test windows fed token by token for the early-exit table (64)
output
  --out DIR              where report.json and results.csv go (out/true_early_exit)
  --save PATH            write the phase-2 training checkpoint to PATH, phase 1's beside it
  --load PATH            reuse a checkpoint written by --save (see the doc comment)
  --help                 this text
";

// ================================================================================================
// Flags
// ================================================================================================

/// Every setting of a run; the defaults are the spec's config T on the synthetic corpus.
#[derive(Clone, Debug)]
struct Options {
    data: Option<PathBuf>,
    seed: u64,
    tokenizer: String,
    vocab_size: usize,
    seq_len: usize,
    batch_size: usize,
    dim: usize,
    heads: usize,
    ffn_hidden: Option<usize>,
    phase1_layers: usize,
    phase2_layers: usize,
    epochs: usize,
    phase2_epochs: Option<usize>,
    patience: usize,
    lr: f32,
    lr2: f32,
    hard_ratio: f32,
    modes: Vec<Phase2Mode>,
    prompt: Option<String>,
    max_new_tokens: usize,
    eval_sequences: usize,
    out: PathBuf,
    save: Option<PathBuf>,
    load: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            data: None,
            seed: 0,
            tokenizer: "byte".into(),
            vocab_size: 8192,
            seq_len: 64,
            batch_size: 32,
            dim: 64,
            heads: 4,
            ffn_hidden: None,
            phase1_layers: 2,
            phase2_layers: 4,
            epochs: 4,
            phase2_epochs: None,
            patience: 2,
            lr: 1e-3,
            lr2: 1e-4,
            hard_ratio: 0.5,
            modes: vec![Phase2Mode::Sequence, Phase2Mode::Token],
            prompt: None,
            max_new_tokens: 32,
            eval_sequences: 64,
            out: PathBuf::from("out/true_early_exit"),
            save: None,
            load: None,
        }
    }
}

impl Options {
    /// Llama's MLP width rule, `8·dim/3`, rounded up to a multiple of 4 (172 for dim 64).
    fn ffn(&self) -> usize {
        self.ffn_hidden.unwrap_or_else(|| (8 * self.dim).div_ceil(3).next_multiple_of(4))
    }

    fn phase2_epochs(&self) -> usize {
        self.phase2_epochs.unwrap_or(self.epochs)
    }
}

/// Every flag (each takes a value), as in [`USAGE`].
const FLAGS: [&str; 24] = [
    "data",
    "seed",
    "tokenizer",
    "vocab-size",
    "seq-len",
    "batch-size",
    "dim",
    "heads",
    "ffn-hidden",
    "phase1-layers",
    "phase2-layers",
    "epochs",
    "phase2-epochs",
    "patience",
    "lr",
    "lr2",
    "hard-ratio",
    "phase2-mode",
    "prompt",
    "max-new-tokens",
    "eval-sequences",
    "out",
    "save",
    "load",
];

/// Reads the flags. A flag is `--name value` or `--name=value`; the error says which flag and
/// why.
fn parse_args(args: impl IntoIterator<Item = String>) -> std::result::Result<Options, String> {
    fn num<T: std::str::FromStr>(flag: &str, v: &str) -> std::result::Result<T, String> {
        v.parse().map_err(|_| format!("{flag}: '{v}' is not a valid number here"))
    }
    fn positive(flag: &str, v: &str) -> std::result::Result<usize, String> {
        match num::<usize>(flag, v)? {
            0 => Err(format!("{flag}: must be at least 1")),
            n => Ok(n),
        }
    }
    let mut o = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Err(String::new());
        }
        let Some(name) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument '{arg}' (flags start with --)"));
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (name.to_string(), None),
        };
        let flag = format!("--{name}");
        if !FLAGS.contains(&name.as_str()) {
            return Err(format!("unknown flag {flag}"));
        }
        let v = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        match name.as_str() {
            "data" => o.data = Some(PathBuf::from(v)),
            "seed" => o.seed = num(&flag, &v)?,
            "tokenizer" => match v.as_str() {
                "byte" | "word" => o.tokenizer = v,
                _ => return Err(format!("{flag}: 'byte' or 'word', not '{v}'")),
            },
            "vocab-size" => o.vocab_size = positive(&flag, &v)?,
            "seq-len" => o.seq_len = positive(&flag, &v)?,
            "batch-size" => o.batch_size = positive(&flag, &v)?,
            "dim" => o.dim = positive(&flag, &v)?,
            "heads" => o.heads = positive(&flag, &v)?,
            "ffn-hidden" => o.ffn_hidden = Some(positive(&flag, &v)?),
            "phase1-layers" => o.phase1_layers = positive(&flag, &v)?,
            "phase2-layers" => o.phase2_layers = positive(&flag, &v)?,
            "epochs" => o.epochs = positive(&flag, &v)?,
            "phase2-epochs" => o.phase2_epochs = Some(positive(&flag, &v)?),
            "patience" => o.patience = positive(&flag, &v)?,
            "lr" => o.lr = num(&flag, &v)?,
            "lr2" => o.lr2 = num(&flag, &v)?,
            "hard-ratio" => o.hard_ratio = num(&flag, &v)?,
            "phase2-mode" => {
                o.modes = match v.as_str() {
                    "both" => vec![Phase2Mode::Sequence, Phase2Mode::Token],
                    "sequence" => vec![Phase2Mode::Sequence],
                    "token" => vec![Phase2Mode::Token],
                    _ => return Err(format!("{flag}: 'both', 'sequence' or 'token', not '{v}'")),
                }
            }
            "prompt" => o.prompt = Some(v),
            "max-new-tokens" => o.max_new_tokens = positive(&flag, &v)?,
            "eval-sequences" => o.eval_sequences = positive(&flag, &v)?,
            "out" => o.out = PathBuf::from(v),
            "save" => o.save = Some(PathBuf::from(v)),
            "load" => o.load = Some(PathBuf::from(v)),
            _ => unreachable!("{flag} is in FLAGS but not handled"),
        }
    }
    // Checks that involve more than one flag, or ranges a number parser cannot see.
    for (flag, lr) in [("--lr", o.lr), ("--lr2", o.lr2)] {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("{flag}: must be a positive number, not {lr}"));
        }
    }
    if !(o.hard_ratio > 0.0 && o.hard_ratio < 1.0) {
        return Err(format!("--hard-ratio: must be in (0, 1), not {}", o.hard_ratio));
    }
    if o.phase2_layers <= o.phase1_layers {
        return Err(format!(
            "--phase2-layers ({}) must be more than --phase1-layers ({})",
            o.phase2_layers, o.phase1_layers
        ));
    }
    if o.max_new_tokens >= o.seq_len {
        return Err(format!(
            "--max-new-tokens ({}) must be below --seq-len ({}), to leave room for a prompt",
            o.max_new_tokens, o.seq_len
        ));
    }
    if o.tokenizer == "word" && o.vocab_size < 2 {
        return Err("--vocab-size: must be at least 2 (<unk> and one word)".into());
    }
    Ok(o)
}

fn main() {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) if msg.is_empty() => {
            print!("{USAGE}");
            return;
        }
        Err(msg) => {
            eprintln!("true_early_exit: error: {msg}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&options) {
        eprintln!("true_early_exit: error: {e}");
        std::process::exit(1);
    }
}

// ================================================================================================
// The experiment, stage by stage
// ================================================================================================

/// The whole run: each stage below in order, then the report.
fn run(o: &Options) -> Result<()> {
    let started = Instant::now();
    let device = get_device();
    eprintln!("device: {device}");
    // The report goes to --out at the very end: find out now, not after training, if it cannot.
    lego::io::output_dir::prepare_output_dir(&o.out)?;

    // 1-2. Data.
    let (docs, source) = load_corpus(o)?;
    let split = split_corpus(docs, o)?;
    let loaded = match &o.load {
        Some(path) => Some(Loaded::read(path, &split)?),
        None => None,
    };
    let tokenizer = match &loaded {
        Some(l) => l.phase1.tokenizer.clone(),
        None => build_tokenizer(&split, o)?,
    };
    let data = make_data(&tokenizer, &split, o)?;
    eprintln!(
        "data: {source}; {} train / {} val / {} test documents; {} / {} / {} tokens ({} tokenizer, V = {})",
        split.train.len(),
        split.val.len(),
        split.test.len(),
        data.tokens[0],
        data.tokens[1],
        data.tokens[2],
        tokenizer.kind(),
        tokenizer.vocab_size()
    );

    // 3. Phase 1: the shallow model.
    let (phase1, phase1_opt, phase1_stage) = match &loaded {
        Some(l) => l.phase1_model()?,
        None => train_phase1(&tokenizer, &data, o)?,
    };
    // 4. The threshold, on validation.
    let threshold = calibrate(&phase1, &data, o)?;
    // 5. Hard examples, from training.
    let (hard, collect_stage) = collect_hard(&phase1, &data, threshold)?;
    // 6. The 4-layer starting point of phase 2.
    let start = extend(&phase1, threshold, o)?;
    // 7. Phase 2, in each requested mode, from that same starting point.
    let mut phase2 = Vec::new();
    for &mode in &o.modes {
        let run = match loaded.as_ref().and_then(|l| l.phase2_model(mode)) {
            Some(run) => run?,
            None => train_phase2(&start, &hard, &data, threshold, mode, o)?,
        };
        phase2.push(run);
    }
    // 8. The baseline: 4 layers from scratch.
    let (baseline, baseline_stage) = train_baseline(&tokenizer, &data, o)?;

    // 9-11. Measurements on the test split.
    let evals = evaluate_models(&phase1, &phase2, &baseline, &data, threshold, o)?;
    let prompt = choose_prompt(&tokenizer, &split, o)?;
    let primary = &phase2[0];
    let generation = true_early_exit_generation(&primary.model, &tokenizer, &prompt, threshold, o)?;
    let table = early_exit_table(&phase2, &data, o)?;

    // 12. Report and checkpoints.
    if let Some(path) = &o.save {
        save_checkpoints(
            path,
            &tokenizer,
            &split,
            threshold,
            o,
            &phase1,
            &phase1_opt,
            &phase1_stage,
            primary,
        )?;
    }
    let report = Report {
        o,
        source,
        split: &split,
        tokenizer: &tokenizer,
        data: &data,
        threshold,
        phase1_stage,
        collect_stage,
        phase2: &phase2,
        baseline_stage,
        phase1_params: phase1.num_params(),
        phase2_params: primary.model.num_params(),
        evals,
        generation,
        table,
        prompt,
        device: device.to_string(),
        seconds: started.elapsed().as_secs_f64(),
    };
    print_report(&report);
    write_outputs(&report)?;
    Ok(())
}

// ----- 1. The corpus ----------------------------------------------------------------------------

/// The documents: the files of `--data`, or the synthetic corpus. Returns them and a
/// description for the report.
fn load_corpus(o: &Options) -> Result<(Vec<Document>, String)> {
    match &o.data {
        Some(path) => {
            let docs = data::load_texts(path)?;
            let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
            Ok((docs, format!("{} ({bytes} bytes)", path.display())))
        }
        None => {
            let config = SyntheticConfig::default();
            let docs = generate_corpus(&config);
            Ok((
                docs,
                format!(
                    "synthetic corpus ({} stories of ~{} bytes, seed {})",
                    config.documents, config.bytes_per_document, config.seed
                ),
            ))
        }
    }
}

/// Whole documents to test (4), validation (4) and training (the rest), seeded.
fn split_corpus(docs: Vec<Document>, o: &Options) -> Result<Split> {
    let split = data::split_documents(docs, TEST_DOCS, VAL_DOCS, o.seed)?;
    eprintln!("test documents: {}", split.test_names().join(", "));
    eprintln!("validation documents: {}", split.val_names().join(", "));
    Ok(split)
}

// ----- 2. Tokens and batches -------------------------------------------------------------------

/// Bytes, or words fitted on the **training** documents only.
fn build_tokenizer(split: &Split, o: &Options) -> Result<Tokenizer> {
    match o.tokenizer.as_str() {
        "word" => Tokenizer::word(&split.train, o.vocab_size),
        _ => Ok(Tokenizer::Byte),
    }
}

/// The three splits as batches, and the test windows for token-by-token evaluation.
struct Data {
    train: Vec<Batch>,
    val: Vec<Batch>,
    test: Vec<Batch>,
    /// Test windows of `seq_len + 1` tokens, in document order.
    test_windows: Vec<Vec<usize>>,
    /// Tokens (targets) in train, val and test.
    tokens: [usize; 3],
    seq_len: usize,
}

/// Windows of `seq_len + 1` tokens that never cross a document boundary; training batches in
/// a seeded shuffled order, validation and test in order.
fn make_data(tok: &Tokenizer, split: &Split, o: &Options) -> Result<Data> {
    let windows = |docs: &[Document], what: &str| {
        let w = sequences_from_documents(tok, docs, o.seq_len);
        if w.is_empty() {
            Err(Error::Input(format!(
                "the {what} split is shorter than one window of {} tokens",
                o.seq_len + 1
            )))
        } else {
            Ok(w)
        }
    };
    let (train_w, val_w, test_w) = (
        windows(&split.train, "training")?,
        windows(&split.val, "validation")?,
        windows(&split.test, "test")?,
    );
    let count = |w: &[Vec<usize>]| w.len() * o.seq_len;
    Ok(Data {
        tokens: [count(&train_w), count(&val_w), count(&test_w)],
        train: batches(&train_w, o.batch_size, Some(o.seed))?,
        val: batches(&val_w, o.batch_size, None)?,
        test: batches(&test_w, o.batch_size, None)?,
        test_windows: test_w,
        seq_len: o.seq_len,
    })
}

// ----- 3. Phase 1 -------------------------------------------------------------------------------

/// What a training stage cost and how it went.
#[derive(Clone, Debug, Default)]
struct Stage {
    seconds: f64,
    /// Training FLOPs (see the module doc).
    flops: f64,
    epochs_run: usize,
    best_epoch: usize,
    steps: u64,
    /// Per epoch: (train loss, validation PPL), routed validation PPL for phase 2.
    curve: Vec<(f64, f64)>,
    /// Read from a checkpoint rather than run now.
    loaded: bool,
}

fn trainer(label: &str, epochs: usize, o: &Options) -> Trainer {
    Trainer::new(TrainOptions {
        max_epochs: epochs,
        patience: o.patience,
        verbose: true,
        label: label.into(),
        ..TrainOptions::default()
    })
}

/// A model of `layers` layers over `tok`'s vocabulary, with the exit after `exit_layer`.
fn new_model(
    tok: &Tokenizer,
    layers: usize,
    exit_layer: usize,
    seed: u64,
    o: &Options,
) -> Result<LegoTransformer> {
    let config = LegoConfig {
        exit_layer,
        ..LegoConfig::new(tok.vocab_size(), o.dim, layers, o.heads, o.ffn(), o.seq_len)
    };
    LegoTransformer::new(config, &mut set_seed(seed))
}

/// Phase 1: a shallow model (exit layer = its depth) trained on every training batch, with
/// AdamW at `--lr` and early stopping on the validation perplexity.
fn train_phase1(tok: &Tokenizer, data: &Data, o: &Options) -> Result<(LegoTransformer, AdamW, Stage)> {
    eprintln!("\n== phase 1: {} layers on all training data ==", o.phase1_layers);
    train_from_scratch("phase 1", tok, data, o.phase1_layers, o.seed, o)
}

/// A model of `layers` layers (exit at `--phase1-layers`) trained from scratch on all the
/// training data: phase 1, and the baseline.
fn train_from_scratch(
    label: &str,
    tok: &Tokenizer,
    data: &Data,
    layers: usize,
    seed: u64,
    o: &Options,
) -> Result<(LegoTransformer, AdamW, Stage)> {
    let model = new_model(tok, layers, o.phase1_layers, seed, o)?;
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: o.lr, ..Default::default() });
    let t0 = Instant::now();
    let history =
        trainer(label, o.epochs, o).train_with_early_stopping(&model, &data.train, &data.val, &mut opt)?;
    let stage = Stage {
        seconds: t0.elapsed().as_secs_f64(),
        flops: full_training_flops(
            &model.config,
            model.config.num_layers,
            history.tokens as f64,
            data.seq_len,
        ),
        epochs_run: history.epochs.len(),
        best_epoch: history.best_epoch,
        steps: history.steps,
        curve: history.epochs.iter().map(|e| (e.train_loss, e.val_ppl)).collect(),
        loaded: false,
    };
    Ok((model, opt, stage))
}

// ----- 4. The threshold -------------------------------------------------------------------------

/// The routing threshold: `--hard-ratio` of the **validation** tokens have a lower exit
/// confidence.
fn calibrate(phase1: &LegoTransformer, data: &Data, o: &Options) -> Result<f32> {
    let threshold = compute_confidence_threshold(phase1, &data.val, o.hard_ratio)?;
    eprintln!(
        "\nthreshold: {threshold:.4} (confidence under which {:.0} % of validation tokens fall)",
        100.0 * o.hard_ratio
    );
    Ok(threshold)
}

// ----- 5. Hard examples -------------------------------------------------------------------------

/// The **training** tokens under the threshold, with their lower hidden states: one forward
/// pass of the lower layers and the exit head over the training split.
fn collect_hard(phase1: &LegoTransformer, data: &Data, threshold: f32) -> Result<(HardExamples, Stage)> {
    let t0 = Instant::now();
    let hard = collect_hard_examples(phase1, &data.train, threshold)?;
    let c = &phase1.config;
    let per_token = c.exit_layer as f64 * mean_layer_flops(c, data.seq_len) + cost::head_flops(c);
    let stage = Stage {
        seconds: t0.elapsed().as_secs_f64(),
        flops: hard.tokens_seen as f64 * per_token,
        ..Stage::default()
    };
    eprintln!(
        "hard examples: {} of {} training tokens ({:.1} %), in {} sequences",
        hard.len(),
        hard.tokens_seen,
        100.0 * hard.len() as f64 / hard.tokens_seen as f64,
        hard.num_sequences()
    );
    Ok((hard, stage))
}

// ----- 6. Extend --------------------------------------------------------------------------------

/// The phase-1 model grown to `--phase2-layers`: new random upper layers, the embedding and
/// lower layers frozen, a frozen copy of the phase-1 head as the exit head.
fn extend(phase1: &LegoTransformer, threshold: f32, o: &Options) -> Result<LegoTransformer> {
    phase1.extend(o.phase2_layers, threshold, true, &mut set_seed(o.seed + 1))
}

// ----- 7. Phase 2 -------------------------------------------------------------------------------

/// A phase-2 model and how it was made.
struct Phase2Run {
    mode: Phase2Mode,
    model: LegoTransformer,
    opt: AdamW,
    stage: Stage,
}

fn mode_name(mode: Phase2Mode) -> &'static str {
    match mode {
        Phase2Mode::Sequence => "sequence",
        Phase2Mode::Token => "token",
    }
}

/// Phase 2 in `mode`, on a copy of `start`: only the trainable (upper) parameters, AdamW at
/// `--lr2`, the hard examples fed from their cached hidden states, early stopping on the
/// validation PPL with routing at the threshold.
fn train_phase2(
    start: &LegoTransformer,
    hard: &HardExamples,
    data: &Data,
    threshold: f32,
    mode: Phase2Mode,
    o: &Options,
) -> Result<Phase2Run> {
    eprintln!("\n== phase 2 ({} mode): upper layers on the hard examples ==", mode_name(mode));
    let model = start.deep_clone();
    let batch = match mode {
        Phase2Mode::Sequence => o.batch_size,
        Phase2Mode::Token => TOKEN_MODE_BATCH,
    };
    let hard_batches = create_hard_example_loader(hard, batch, o.seed, mode)?;
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig { lr: o.lr2, ..Default::default() });
    let t0 = Instant::now();
    let label = format!("phase 2 ({})", mode_name(mode));
    let exit = model.config.exit_layer;
    let history = trainer(&label, o.phase2_epochs(), o).train_upper_layers_with_early_stopping(
        &model,
        &hard_batches,
        &data.val,
        hard,
        &mut opt,
        exit,
        threshold,
        mode,
    )?;
    // Upper layers + deep head, forward and backward, over every position they ran.
    let c = &model.config;
    let upper = (c.num_layers - c.exit_layer) as f64;
    let per_position = match mode {
        Phase2Mode::Sequence => upper * mean_layer_flops(c, hard.seq_len) + cost::head_flops(c),
        Phase2Mode::Token => upper * cost::layer_flops(c, 1) + cost::head_flops(c),
    };
    let stage = Stage {
        seconds: t0.elapsed().as_secs_f64(),
        flops: 3.0 * history.positions as f64 * per_position,
        epochs_run: history.epochs.len(),
        best_epoch: history.best_epoch,
        steps: history.steps,
        curve: history.epochs.iter().map(|e| (e.train_loss, e.val_ppl_routed)).collect(),
        loaded: false,
    };
    Ok(Phase2Run { mode, model, opt, stage })
}

// ----- 8. Baseline ------------------------------------------------------------------------------

/// The same depth as phase 2, trained from scratch on all the training data exactly as phase
/// 1 is (optimizer, learning rate, epochs, early stopping).
fn train_baseline(tok: &Tokenizer, data: &Data, o: &Options) -> Result<(LegoTransformer, Stage)> {
    eprintln!("\n== baseline: {} layers from scratch on all training data ==", o.phase2_layers);
    let (model, _, stage) = train_from_scratch("baseline", tok, data, o.phase2_layers, o.seed + 2, o)?;
    Ok((model, stage))
}

/// The mean FLOPs of one layer for a token of a window of `seq_len`, context 1..=seq_len.
fn mean_layer_flops(c: &LegoConfig, seq_len: usize) -> f64 {
    (1..=seq_len).map(|ctx| cost::layer_flops(c, ctx)).sum::<f64>() / seq_len as f64
}

/// Training FLOPs of `layers` layers and the head over `tokens` tokens in windows of
/// `seq_len`: 3 × forward (the backward pass is about twice the forward).
fn full_training_flops(c: &LegoConfig, layers: usize, tokens: f64, seq_len: usize) -> f64 {
    3.0 * tokens * (layers as f64 * mean_layer_flops(c, seq_len) + cost::head_flops(c))
}

// ----- 9. Evaluation on the test split -----------------------------------------------------------

/// One model's test figures.
struct ModelEval {
    name: String,
    /// Full depth.
    full: EvalStats,
    /// With early exit at the threshold (None for the phase-1 model, which has no upper part).
    routed: Option<EvalStats>,
    /// Validation PPL at full depth (the split the prototype reported on).
    val_ppl: f64,
    /// PPL on the test split's hard tokens (deep path, tokens in their sequences).
    hard_ppl: f64,
    /// For a token-mode model: the same tokens fed alone, as it was trained.
    hard_ppl_alone: Option<f64>,
}

struct Evals {
    models: Vec<ModelEval>,
    /// Test hard tokens (phase-1 confidence under the threshold) and all test tokens.
    test_hard: (usize, usize),
    /// Hard share on validation with the phase-2 exit (it must equal the target: the exit head
    /// is frozen).
    val_hard_ratio_after: f64,
}

/// Test PPL at full depth and with (fake) early exit at the threshold, for every model; PPL
/// on the test split's hard tokens; the hard share against its target.
fn evaluate_models(
    phase1: &LegoTransformer,
    phase2: &[Phase2Run],
    baseline: &LegoTransformer,
    data: &Data,
    threshold: f32,
    o: &Options,
) -> Result<Evals> {
    eprintln!("\n== evaluation on the test split ==");
    let t = trainer("eval", 1, o);
    // The test split's hard tokens, found with the phase-1 model (the exit phase 2 keeps).
    let test_hard = collect_hard_examples(phase1, &data.test, threshold)?;
    let mask = hard_mask(phase1, &data.test, threshold)?;
    let mut models = vec![ModelEval {
        name: "phase 1".into(),
        full: t.evaluate(phase1, &data.test, None)?,
        routed: None,
        val_ppl: t.evaluate(phase1, &data.val, None)?.ppl,
        hard_ppl: evaluate_on_hard_examples(phase1, &test_hard, Phase2Mode::Sequence)?.1,
        hard_ppl_alone: None,
    }];
    for run in phase2 {
        models.push(ModelEval {
            name: format!("phase 2 ({})", mode_name(run.mode)),
            full: t.evaluate(&run.model, &data.test, None)?,
            routed: Some(t.evaluate(&run.model, &data.test, Some(threshold))?),
            val_ppl: t.evaluate(&run.model, &data.val, None)?.ppl,
            hard_ppl: evaluate_on_hard_examples(&run.model, &test_hard, Phase2Mode::Sequence)?.1,
            hard_ppl_alone: (run.mode == Phase2Mode::Token)
                .then(|| evaluate_on_hard_examples(&run.model, &test_hard, Phase2Mode::Token))
                .transpose()?
                .map(|(_, ppl)| ppl),
        });
    }
    models.push(ModelEval {
        name: "baseline".into(),
        full: t.evaluate(baseline, &data.test, None)?,
        routed: Some(t.evaluate(baseline, &data.test, Some(threshold))?),
        val_ppl: t.evaluate(baseline, &data.val, None)?.ppl,
        hard_ppl: masked_ppl(baseline, &data.test, &mask)?,
        hard_ppl_alone: None,
    });
    let val_routed = t.evaluate(&phase2[0].model, &data.val, Some(threshold))?;
    Ok(Evals {
        models,
        test_hard: (test_hard.len(), test_hard.tokens_seen),
        val_hard_ratio_after: 1.0 - val_routed.shallow_ratio,
    })
}

/// For every token of `batches`, whether `model`'s exit confidence is under `threshold`.
fn hard_mask(model: &LegoTransformer, batches: &[Batch], threshold: f32) -> Result<Vec<bool>> {
    let mut mask = Vec::new();
    for b in batches {
        let h = no_grad(|| model.get_hidden_states(&b.x, b.batch))?;
        mask.extend(model.compute_confidence(&h).0.iter().map(|&c| c < threshold));
    }
    Ok(mask)
}

/// `model`'s full-depth perplexity on the tokens of `batches` where `mask` is set (for the
/// baseline, whose own hidden states differ from the phase-1 ones the hard examples hold).
fn masked_ppl(model: &LegoTransformer, batches: &[Batch], mask: &[bool]) -> Result<f64> {
    let v = model.config.vocab_size;
    let (mut sum, mut n, mut k) = (0.0f64, 0usize, 0usize);
    for b in batches {
        let logits = no_grad(|| model.forward(&b.x, b.batch))?.data();
        for (i, &y) in b.y.iter().enumerate() {
            if mask[k] {
                let row = &logits[i * v..(i + 1) * v];
                sum += (log_sum_exp(row) - row[y]) as f64;
                n += 1;
            }
            k += 1;
        }
    }
    Ok((sum / n.max(1) as f64).exp())
}

fn log_sum_exp(z: &[f32]) -> f32 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + z.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

// ----- 10. TRUE early exit ------------------------------------------------------------------------

/// The generation prompt: `--prompt`, or the first line of at least six words in the first
/// test document, cut to its first six words and then to as many whole words as leave room
/// for `--max-new-tokens`.
fn choose_prompt(tok: &Tokenizer, split: &Split, o: &Options) -> Result<Vec<usize>> {
    let room = o.seq_len - o.max_new_tokens;
    let text = match &o.prompt {
        Some(p) => p.clone(),
        None => {
            let doc = &split.test[0].text;
            let line = doc.lines().find(|l| l.split_whitespace().count() >= 6).unwrap_or(doc.as_str());
            let mut words: Vec<&str> = line.split_whitespace().take(6).collect();
            while words.len() > 1 && tok.encode(&words.join(" ")).len() > room {
                words.pop();
            }
            words.join(" ")
        }
    };
    let mut ids = tok.encode(&text);
    if ids.is_empty() {
        return Err(Error::Input(format!("the prompt '{text}' has no tokens")));
    }
    if ids.len() > room {
        if o.prompt.is_some() {
            return Err(Error::Input(format!(
                "the prompt is {} tokens; with --max-new-tokens {} and --seq-len {} at most {room} fit",
                ids.len(),
                o.max_new_tokens,
                o.seq_len
            )));
        }
        ids.truncate(room);
    }
    Ok(ids)
}

/// Ordinary and early-exit generation from the prompt, compared.
struct Generation {
    full_text: String,
    early_text: String,
    /// Share of generated tokens identical to full-depth generation.
    agreement: f64,
    shallow: usize,
    deep: usize,
    layer_cost: f64,
    flop_cost: f64,
    /// Best wall-clock seconds of: full depth with the KV cache, early exit, no cache at all.
    seconds_full: f64,
    seconds_early: f64,
    seconds_no_cache: f64,
}

/// `generate` (every layer for every token) against `generate_with_early_exit` (a confident
/// token skips the upper layers, `Skip` fill, as the spec), greedy, from one prompt; each
/// timed as the best of a few runs. Also ordinary generation without a KV cache (the whole
/// sequence through every layer at each step), for the prototype's "KV cache alone" figure.
fn true_early_exit_generation(
    model: &LegoTransformer,
    tok: &Tokenizer,
    prompt: &[usize],
    threshold: f32,
    o: &Options,
) -> Result<Generation> {
    eprintln!("\n== TRUE early exit: generating {} tokens ==", o.max_new_tokens);
    let greedy = Sampling::greedy();
    let prompts = vec![prompt.to_vec()];
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..TIMING_REPS {
            let t0 = Instant::now();
            f()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let mut full = Vec::new();
    let seconds_full = best(&mut || {
        full = model.generate(&prompts, o.max_new_tokens, &greedy)?.remove(0);
        Ok(())
    })?;
    let mut early = (Vec::new(), Default::default());
    let seconds_early = best(&mut || {
        let (mut out, stats) = model.generate_with_early_exit(
            &prompts,
            o.max_new_tokens,
            threshold,
            &greedy,
            UpperCacheFill::Skip,
        )?;
        early = (out.remove(0), stats);
        Ok(())
    })?;
    let seconds_no_cache = best(&mut || generate_without_cache(model, prompt, o.max_new_tokens).map(|_| ()))?;
    let (early, stats) = early;
    let p = prompt.len();
    Ok(Generation {
        full_text: tok.decode(&full[p..])?,
        early_text: tok.decode(&early[p..])?,
        agreement: agreement(&[full], &[early], p),
        shallow: stats.shallow_count,
        deep: stats.deep_count,
        layer_cost: stats.actual_compute_cost,
        flop_cost: stats.flop_cost,
        seconds_full,
        seconds_early,
        seconds_no_cache,
    })
}

/// Greedy generation with no KV cache: at every step the whole sequence so far runs through
/// every layer (on the same inference engine, with a fresh cache each time).
fn generate_without_cache(model: &LegoTransformer, prompt: &[usize], new: usize) -> Result<Vec<usize>> {
    let v = model.config.vocab_size;
    let mut ids = prompt.to_vec();
    for _ in 0..new {
        let mut cache = lego::model::KvCache::new(&model.config, 1);
        let logits = model.forward_with_cache(&ids, 1, &mut cache, false)?.data();
        let last = &logits[(ids.len() - 1) * v..ids.len() * v];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap_or(0);
        ids.push(next);
    }
    Ok(ids)
}

/// The share of generated tokens (after `prompt_len`) at which two generations agree.
fn agreement(a: &[Vec<usize>], b: &[Vec<usize>], prompt_len: usize) -> f64 {
    let (mut same, mut all) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (s, t) in x[prompt_len..].iter().zip(&y[prompt_len..]) {
            same += (s == t) as usize;
            all += 1;
        }
    }
    same as f64 / all.max(1) as f64
}

// ----- 11. The early-exit table ------------------------------------------------------------------

/// One row of the early-exit table.
struct TableRow {
    model: String,
    fill: &'static str,
    /// The validation hard ratio the threshold was set at (None: never exit).
    ratio: Option<f32>,
    threshold: f32,
    /// Greedy generation from test prompts: agreement with full depth, shallow share, costs.
    agreement: f64,
    gen_shallow_ratio: f64,
    gen_layer_cost: f64,
    gen_flop_cost: f64,
    /// Test windows fed token by token through the early-exit engine.
    tf_ppl: f64,
    tf_shallow_ratio: f64,
}

/// For each phase-2 model, each upper-cache fill and each threshold: agreement with full-depth
/// greedy generation and teacher-forced test PPL (the first `--eval-sequences` test windows).
fn early_exit_table(phase2: &[Phase2Run], data: &Data, o: &Options) -> Result<Vec<TableRow>> {
    eprintln!("\n== early-exit table ==");
    let greedy = Sampling::greedy();
    let prompt_len = (o.seq_len - o.max_new_tokens).min(16);
    let prompts: Vec<Vec<usize>> = data
        .test_windows
        .iter()
        .step_by((data.test_windows.len() / TABLE_PROMPTS).max(1))
        .take(TABLE_PROMPTS)
        .map(|w| w[..prompt_len].to_vec())
        .collect();
    // `evaluate_with_early_exit` takes sequences of at most max_seq_len (= seq_len) tokens, so
    // each test window loses its last token here: seq_len − 1 predictions a window.
    let windows: Vec<Vec<usize>> =
        data.test_windows.iter().take(o.eval_sequences).map(|w| w[..o.seq_len].to_vec()).collect();
    let mut rows = Vec::new();
    for run in phase2 {
        let m = &run.model;
        let reference = m.generate(&prompts, o.max_new_tokens, &greedy)?;
        // Thresholds at validation quantiles; 2.0 never exits (a confidence is at most 1).
        let mut thresholds: Vec<(Option<f32>, f32)> = vec![(None, 2.0)];
        for r in TABLE_RATIOS {
            thresholds.push((Some(r), compute_confidence_threshold(m, &data.val, r)?));
        }
        for fill in [UpperCacheFill::Skip, UpperCacheFill::Propagate] {
            for &(ratio, threshold) in &thresholds {
                let (out, stats) =
                    m.generate_with_early_exit(&prompts, o.max_new_tokens, threshold, &greedy, fill)?;
                let tf = m.evaluate_with_early_exit(&windows, &ExitRule::new(threshold, fill))?;
                rows.push(TableRow {
                    model: format!("phase 2 ({})", mode_name(run.mode)),
                    fill: match fill {
                        UpperCacheFill::Skip => "skip",
                        UpperCacheFill::Propagate => "propagate",
                        UpperCacheFill::Deferred => "deferred",
                    },
                    ratio,
                    threshold,
                    agreement: agreement(&reference, &out, prompt_len),
                    gen_shallow_ratio: stats.shallow_ratio,
                    gen_layer_cost: stats.actual_compute_cost,
                    gen_flop_cost: stats.flop_cost,
                    tf_ppl: tf.ppl,
                    tf_shallow_ratio: tf.shallow_ratio,
                });
            }
        }
    }
    Ok(rows)
}

// ----- Checkpoints ---------------------------------------------------------------------------------

/// `<stem>.phase1.<ext>` beside `path`.
fn phase1_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map_or("checkpoint".into(), |s| s.to_string_lossy().into_owned());
    let ext = path.extension().map_or("safetensors".into(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}.phase1.{ext}"))
}

/// The metadata that lets `--load` reuse a stage: the stage's record, and the split.
fn stage_metadata(
    phase: &str,
    stage: &Stage,
    split: &Split,
    threshold: f32,
    o: &Options,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("phase".into(), phase.into()),
        ("routing_threshold".into(), threshold.to_string()),
        ("seed".into(), o.seed.to_string()),
        ("split.test".into(), split.test_names().join(",")),
        ("split.val".into(), split.val_names().join(",")),
        ("stage.seconds".into(), stage.seconds.to_string()),
        ("stage.flops".into(), stage.flops.to_string()),
        ("stage.epochs_run".into(), stage.epochs_run.to_string()),
        ("stage.best_epoch".into(), stage.best_epoch.to_string()),
        ("stage.steps".into(), stage.steps.to_string()),
    ])
}

/// `--save`: the phase-2 model (the first mode run) at `path`, phase 1 beside it.
#[allow(clippy::too_many_arguments)]
fn save_checkpoints(
    path: &Path,
    tok: &Tokenizer,
    split: &Split,
    threshold: f32,
    o: &Options,
    phase1: &LegoTransformer,
    phase1_opt: &AdamW,
    phase1_stage: &Stage,
    run: &Phase2Run,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let p1 = phase1_path(path);
    save_training_checkpoint(
        &p1,
        phase1,
        tok,
        phase1_opt,
        &stage_metadata("phase1", phase1_stage, split, threshold, o),
    )?;
    let mut meta = stage_metadata("phase2", &run.stage, split, threshold, o);
    meta.insert("phase2_mode".into(), mode_name(run.mode).into());
    save_training_checkpoint(path, &run.model, tok, &run.opt, &meta)?;
    eprintln!("saved {} and {}", path.display(), p1.display());
    Ok(())
}

/// What `--load` read: always a phase-1 checkpoint, and a phase-2 one if given.
struct Loaded {
    phase1: TrainingCheckpoint,
    phase2: Option<TrainingCheckpoint>,
}

impl Loaded {
    /// Reads `path` (and, for a phase-2 checkpoint, the phase-1 file beside it), and checks
    /// that they were trained on this run's split.
    fn read(path: &Path, split: &Split) -> Result<Loaded> {
        let first = load_training_checkpoint(path)?;
        let (phase1, phase2) = match first.phase() {
            "phase1" => (first, None),
            "phase2" => (load_training_checkpoint(&phase1_path(path))?, Some(first)),
            other => {
                return Err(Error::Input(format!(
                    "{}: phase '{other}', expected 'phase1' or 'phase2'",
                    path.display()
                )));
            }
        };
        for ckpt in std::iter::once(&phase1).chain(&phase2) {
            let test = ckpt.metadata.get("split.test").map_or("", String::as_str);
            if test != split.test_names().join(",") {
                return Err(Error::Input(format!(
                    "{}: trained with test documents [{test}], but this run's are [{}]; \
                     pass the same --data and --seed (training on test text would leak)",
                    ckpt.origin,
                    split.test_names().join(",")
                )));
            }
        }
        eprintln!("loaded {}", path.display());
        Ok(Loaded { phase1, phase2 })
    }

    fn stage(ckpt: &TrainingCheckpoint) -> Result<Stage> {
        Ok(Stage {
            seconds: ckpt.number("stage.seconds")?,
            flops: ckpt.number("stage.flops")?,
            epochs_run: ckpt.number("stage.epochs_run")?,
            best_epoch: ckpt.number("stage.best_epoch")?,
            steps: ckpt.number("stage.steps")?,
            curve: Vec::new(),
            loaded: true,
        })
    }

    fn phase1_model(&self) -> Result<(LegoTransformer, AdamW, Stage)> {
        let c = &self.phase1;
        let model = c.model.deep_clone();
        let opt = c.optimizer.to_optimizer(&model)?;
        Ok((model, opt, Loaded::stage(c)?))
    }

    /// The phase-2 run of `mode`, if the checkpoint holds that mode.
    fn phase2_model(&self, mode: Phase2Mode) -> Option<Result<Phase2Run>> {
        let c = self.phase2.as_ref()?;
        if c.metadata.get("phase2_mode").map(String::as_str) != Some(mode_name(mode)) {
            return None;
        }
        Some((|| {
            let model = c.model.deep_clone();
            let opt = c.optimizer.to_optimizer(&model)?;
            Ok(Phase2Run { mode, model, opt, stage: Loaded::stage(c)? })
        })())
    }
}

// ================================================================================================
// The report
// ================================================================================================

struct Report<'a> {
    o: &'a Options,
    source: String,
    split: &'a Split,
    tokenizer: &'a Tokenizer,
    data: &'a Data,
    threshold: f32,
    phase1_stage: Stage,
    collect_stage: Stage,
    phase2: &'a [Phase2Run],
    baseline_stage: Stage,
    phase1_params: usize,
    phase2_params: usize,
    evals: Evals,
    generation: Generation,
    table: Vec<TableRow>,
    prompt: Vec<usize>,
    device: String,
    seconds: f64,
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

fn change(from: f64, to: f64) -> String {
    format!("{:+.1} %", 100.0 * (to / from - 1.0))
}

/// The tables on stdout.
fn print_report(r: &Report) {
    let o = r.o;
    let e = &r.evals;
    println!("\n# LEGO: TRUE early exit\n");
    println!("data: {}", r.source);
    println!("split (seed {}): test = [{}]", o.seed, r.split.test_names().join(", "));
    println!("                 val  = [{}]", r.split.val_names().join(", "));
    println!("                 train = {} documents", r.split.train.len());
    println!(
        "tokenizer: {} (V = {}); tokens train/val/test: {} / {} / {}; seq_len {}, batch {}",
        r.tokenizer.kind(),
        r.tokenizer.vocab_size(),
        r.data.tokens[0],
        r.data.tokens[1],
        r.data.tokens[2],
        o.seq_len,
        o.batch_size
    );
    println!(
        "model: D={} H={} F={}; phase 1 {} layers ({} params), phase 2 {} layers ({} params), exit after layer {}",
        o.dim,
        o.heads,
        o.ffn(),
        o.phase1_layers,
        r.phase1_params,
        o.phase2_layers,
        r.phase2_params,
        o.phase1_layers
    );
    println!(
        "threshold {:.4}: target hard ratio {} on validation; measured after phase 2: validation {}, test {}",
        r.threshold,
        pct(o.hard_ratio as f64),
        pct(e.val_hard_ratio_after),
        pct(1.0 - e.models[1].routed.as_ref().map_or(0.0, |s| s.shallow_ratio)),
    );
    println!("device: {}; total run time {:.0} s", r.device, r.seconds);

    println!("\n## Training\n");
    println!("| stage | epochs run (best) | steps | time | training FLOPs |");
    println!("|---|---|---|---|---|");
    let stage_row = |name: &str, s: &Stage| {
        let loaded = if s.loaded { " (loaded)" } else { "" };
        println!(
            "| {name}{loaded} | {} ({}) | {} | {:.1} s | {:.3e} |",
            s.epochs_run, s.best_epoch, s.steps, s.seconds, s.flops
        );
    };
    stage_row("phase 1", &r.phase1_stage);
    stage_row("collect hard examples", &r.collect_stage);
    for run in r.phase2 {
        stage_row(&format!("phase 2 ({})", mode_name(run.mode)), &run.stage);
    }
    for run in r.phase2 {
        let total = lego_total(r, run);
        println!(
            "| **LEGO total, {} mode** | | | {:.1} s | {:.3e} ({} of the baseline's) |",
            mode_name(run.mode),
            total.0,
            total.1,
            pct(total.1 / r.baseline_stage.flops)
        );
    }
    stage_row("baseline", &r.baseline_stage);

    println!("\n## Test split (fake early exit: both paths computed, then routed)\n");
    println!(
        "| model | test PPL full depth | test PPL early exit | accuracy (full / exit) | shallow | layer cost | FLOP cost | hard-token PPL | val PPL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in &e.models {
        let (ee_ppl, acc, shallow, lc, fc) = match &m.routed {
            Some(s) => (
                format!("{:.3} ({})", s.ppl, change(m.full.ppl, s.ppl)),
                format!("{} / {}", pct(m.full.accuracy), pct(s.accuracy)),
                pct(s.shallow_ratio),
                format!("{:.3}", s.layer_cost),
                format!("{:.3}", s.flop_cost),
            ),
            None => ("—".into(), pct(m.full.accuracy), "—".into(), "1".into(), "1".into()),
        };
        let hard = match m.hard_ppl_alone {
            Some(alone) => format!("{:.2} (alone: {alone:.2})", m.hard_ppl),
            None => format!("{:.2}", m.hard_ppl),
        };
        println!(
            "| {} | {:.3} | {ee_ppl} | {acc} | {shallow} | {lc} | {fc} | {hard} | {:.3} |",
            m.name, m.full.ppl, m.val_ppl
        );
    }
    println!(
        "\nhard tokens: {} of {} test tokens ({}), collected with the phase-1 exit at the threshold;",
        e.test_hard.0,
        e.test_hard.1,
        pct(e.test_hard.0 as f64 / e.test_hard.1 as f64)
    );
    println!(
        "phase 1 → phase 2 on them: {}; the baseline's early exit uses its own final head at layer {} (never trained to exit).",
        e.models[1..e.models.len() - 1]
            .iter()
            .map(|m| format!("{} {}", m.name, change(e.models[0].hard_ppl, m.hard_ppl)))
            .collect::<Vec<_>>()
            .join(", "),
        o.phase1_layers
    );

    let g = &r.generation;
    println!(
        "\n## TRUE early exit, generating {} tokens ({} model, skip fill)\n",
        o.max_new_tokens,
        r.phase2[0].model_name()
    );
    println!(
        "prompt: {:?}",
        r.tokenizer.decode(&r.prompt).expect("the prompt was encoded by this tokenizer")
    );
    println!("full depth: {:?}", g.full_text);
    println!("early exit: {:?}", g.early_text);
    println!();
    println!(
        "| shallow / deep | layer cost (saved) | FLOP cost (saved) | time full / early exit | speed-up | identical tokens | no KV cache → KV cache |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} / {} ({}) | {} ({}) | {} ({}) | {:.2} / {:.2} ms | {:.2}x | {} | {:.2}x |",
        g.shallow,
        g.deep,
        pct(g.shallow as f64 / (g.shallow + g.deep).max(1) as f64),
        pct(g.layer_cost),
        pct(1.0 - g.layer_cost),
        pct(g.flop_cost),
        pct(1.0 - g.flop_cost),
        1e3 * g.seconds_full,
        1e3 * g.seconds_early,
        g.seconds_full / g.seconds_early,
        pct(g.agreement),
        g.seconds_no_cache / g.seconds_full
    );

    println!(
        "\n## Early-exit table ({} test prompts of {} tokens + {} generated; teacher-forced PPL on {} test windows)\n",
        TABLE_PROMPTS,
        (o.seq_len - o.max_new_tokens).min(16),
        o.max_new_tokens,
        o.eval_sequences.min(r.data.test_windows.len())
    );
    println!(
        "| model | fill | threshold (val hard ratio) | identical greedy tokens | shallow (gen) | layer cost | FLOP cost | teacher-forced PPL | vs never exiting | shallow (tf) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.table {
        let reference = r
            .table
            .iter()
            .find(|x| x.model == row.model && x.fill == row.fill && x.ratio.is_none())
            .map_or(row.tf_ppl, |x| x.tf_ppl);
        let t = match row.ratio {
            Some(ratio) => format!("{:.4} ({})", row.threshold, pct(ratio as f64)),
            None => "never exit".into(),
        };
        println!(
            "| {} | {} | {t} | {} | {} | {:.3} | {:.3} | {:.3} | {} | {} |",
            row.model,
            row.fill,
            pct(row.agreement),
            pct(row.gen_shallow_ratio),
            row.gen_layer_cost,
            row.gen_flop_cost,
            row.tf_ppl,
            change(reference, row.tf_ppl),
            pct(row.tf_shallow_ratio)
        );
    }

    print_prototype_comparison(r);
}

impl Phase2Run {
    fn model_name(&self) -> String {
        format!("phase 2 ({})", mode_name(self.mode))
    }
}

/// LEGO's whole training bill for one phase-2 mode: phase 1, collection, phase 2 (seconds,
/// FLOPs).
fn lego_total(r: &Report, run: &Phase2Run) -> (f64, f64) {
    (
        r.phase1_stage.seconds + r.collect_stage.seconds + run.stage.seconds,
        r.phase1_stage.flops + r.collect_stage.flops + run.stage.flops,
    )
}

/// The prototype's published figures (spec) beside ours, saying which compare.
fn print_prototype_comparison(r: &Report) {
    let e = &r.evals;
    let p1 = &e.models[0];
    let p2 = &e.models[1];
    let routed = p2.routed.as_ref().expect("phase-2 models are routed");
    let g = &r.generation;
    println!(
        "\n## Against the prototype (spec: WikiText-2 words, V≈10k, seq 32; its PPLs are on validation)\n"
    );
    println!(
        "| metric | prototype | ours ({}, {} tokenizer, test split) | comparable? |",
        p2.name,
        r.tokenizer.kind()
    );
    println!("|---|---|---|---|");
    let row = |metric: &str, theirs: &str, ours: String, comparable: &str| {
        println!("| {metric} | {theirs} | {ours} | {comparable} |");
    };
    row(
        "PPL phase 1 → phase 2",
        "986.4 → 829.8 (val)",
        format!("{:.3} → {:.3} (test, full depth)", p1.full.ppl, p2.full.ppl),
        "no: absolute PPL depends on the tokenizer and data",
    );
    row(
        "relative PPL change phase 1 → 2",
        "−15.9 % (val, the split its hard examples came from)",
        format!("{} test, {} val", change(p1.full.ppl, p2.full.ppl), change(p1.val_ppl, p2.val_ppl)),
        "yes",
    );
    row(
        "same, prototype code on Shakespeare",
        "val −11 % (2,263 → 2,012), test +46 % (2,208 → 3,215)",
        change(p1.full.ppl, p2.full.ppl) + " test",
        "yes (relative)",
    );
    row(
        "accuracy phase 1 → 2",
        "16.03 % → 15.77 %",
        format!("{} → {}", pct(p1.full.accuracy), pct(p2.full.accuracy)),
        "no: depends on the tokenizer",
    );
    row(
        "hard-example PPL phase 1 → 2",
        "2,763.7 → 668.1 (−75.8 %, val hard tokens fed alone)",
        format!(
            "{:.2} → {:.2} ({}, test hard tokens in context)",
            p1.hard_ppl,
            p2.hard_ppl,
            change(p1.hard_ppl, p2.hard_ppl)
        ),
        "the relative change only",
    );
    row(
        "fake early exit: shallow share",
        "70.4 %",
        pct(routed.shallow_ratio),
        "yes (set by the threshold: ours targets 50 % hard)",
    );
    row(
        "fake early exit: layer compute",
        "64.8 %",
        format!("{} (FLOPs: {})", pct(routed.layer_cost), pct(routed.flop_cost)),
        "yes",
    );
    row(
        "early exit PPL cost (vs same model at full depth)",
        "+4.5 % at 40 % saved (prototype code, Shakespeare)",
        format!("{} at {} saved", change(p2.full.ppl, routed.ppl), pct(1.0 - routed.layer_cost)),
        "yes",
    );
    row(
        "hard share: target → measured after phase 2",
        "50 % → 30 % (its head kept training)",
        format!(
            "{} → {} (val), {} (test)",
            pct(r.o.hard_ratio as f64),
            pct(e.val_hard_ratio_after),
            pct(1.0 - routed.shallow_ratio)
        ),
        "yes",
    );
    row(
        "TRUE early exit: shallow / deep of 32",
        "21 / 11 (65.6 %)",
        format!(
            "{} / {} ({})",
            g.shallow,
            g.deep,
            pct(g.shallow as f64 / (g.shallow + g.deep).max(1) as f64)
        ),
        "yes",
    );
    row(
        "TRUE early exit: layer compute (saved)",
        "67.2 % (32.8 %)",
        format!(
            "{} ({}); FLOPs {} ({})",
            pct(g.layer_cost),
            pct(1.0 - g.layer_cost),
            pct(g.flop_cost),
            pct(1.0 - g.flop_cost)
        ),
        "yes",
    );
    row(
        "TRUE early exit: wall-clock speed-up",
        "1.08x (Shakespeare: 1.27x where layers promised 1.59x)",
        format!("{:.2}x (layers promise {:.2}x)", g.seconds_full / g.seconds_early, 1.0 / g.layer_cost),
        "yes",
    );
    row(
        "KV cache alone (no cache → cache)",
        "1.48x",
        format!("{:.2}x", g.seconds_no_cache / g.seconds_full),
        "roughly (depends on the sequence length)",
    );
}

// ----- Files -----------------------------------------------------------------------------------

fn obj(pairs: Vec<(&str, Json)>) -> Json {
    Json::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// An f32 as the decimal it prints as (`0.001`, not `0.0010000000474974513`).
fn f32_json(x: f32) -> Json {
    Json::from(x.to_string().parse::<f64>().unwrap_or(f64::NAN))
}

fn eval_json(s: &EvalStats) -> Json {
    obj(vec![
        ("ppl", s.ppl.into()),
        ("loss", s.loss.into()),
        ("accuracy", s.accuracy.into()),
        ("tokens", s.tokens.into()),
        ("shallow_ratio", s.shallow_ratio.into()),
        ("layer_cost", s.layer_cost.into()),
        ("flop_cost", s.flop_cost.into()),
        ("full_depth_ppl", s.full_depth_loss.exp().into()),
    ])
}

fn stage_json(s: &Stage) -> Json {
    obj(vec![
        ("seconds", s.seconds.into()),
        ("training_flops", s.flops.into()),
        ("epochs_run", s.epochs_run.into()),
        ("best_epoch", s.best_epoch.into()),
        ("steps", (s.steps as usize).into()),
        ("loaded_from_checkpoint", s.loaded.into()),
        (
            "curve",
            Json::Array(
                s.curve
                    .iter()
                    .map(|&(loss, ppl)| obj(vec![("train_loss", loss.into()), ("val_ppl", ppl.into())]))
                    .collect(),
            ),
        ),
    ])
}

/// `report.json` (everything) and `results.csv` (`section,model,metric,value`), atomically.
fn write_outputs(r: &Report) -> Result<()> {
    let o = r.o;
    let e = &r.evals;
    let g = &r.generation;
    let mut csv: Vec<[String; 4]> = Vec::new();
    let mut put = |section: &str, model: &str, metric: &str, value: f64| {
        csv.push([section.into(), model.into(), metric.into(), format!("{value}")]);
    };

    let mut models = Vec::new();
    for m in &e.models {
        put("test", &m.name, "ppl_full_depth", m.full.ppl);
        put("test", &m.name, "accuracy_full_depth", m.full.accuracy);
        put("test", &m.name, "hard_ppl", m.hard_ppl);
        put("val", &m.name, "ppl_full_depth", m.val_ppl);
        if let Some(s) = &m.routed {
            put("test", &m.name, "ppl_early_exit", s.ppl);
            put("test", &m.name, "shallow_ratio", s.shallow_ratio);
            put("test", &m.name, "layer_cost", s.layer_cost);
            put("test", &m.name, "flop_cost", s.flop_cost);
        }
        models.push(obj(vec![
            ("name", m.name.as_str().into()),
            ("test_full_depth", eval_json(&m.full)),
            ("test_early_exit", m.routed.as_ref().map_or(Json::Null, eval_json)),
            ("val_ppl_full_depth", m.val_ppl.into()),
            ("test_hard_ppl", m.hard_ppl.into()),
            ("test_hard_ppl_tokens_alone", m.hard_ppl_alone.map_or(Json::Null, Json::from)),
        ]));
    }
    let mut training = vec![
        ("phase1", stage_json(&r.phase1_stage)),
        ("collect_hard_examples", stage_json(&r.collect_stage)),
        ("baseline", stage_json(&r.baseline_stage)),
    ];
    put("training", "phase 1", "flops", r.phase1_stage.flops);
    put("training", "phase 1", "seconds", r.phase1_stage.seconds);
    put("training", "collect hard examples", "flops", r.collect_stage.flops);
    put("training", "baseline", "flops", r.baseline_stage.flops);
    put("training", "baseline", "seconds", r.baseline_stage.seconds);
    let mut phase2 = Vec::new();
    for run in r.phase2 {
        let (secs, flops) = lego_total(r, run);
        let name = run.model_name();
        put("training", &name, "flops", run.stage.flops);
        put("training", &name, "seconds", run.stage.seconds);
        put("training", &format!("LEGO total ({})", mode_name(run.mode)), "flops", flops);
        put("training", &format!("LEGO total ({})", mode_name(run.mode)), "seconds", secs);
        phase2.push(obj(vec![
            ("mode", mode_name(run.mode).into()),
            ("stage", stage_json(&run.stage)),
            ("lego_total_seconds", secs.into()),
            ("lego_total_flops", flops.into()),
        ]));
    }
    training.push(("phase2", Json::Array(phase2)));

    let gm = r.phase2[0].model_name();
    put("generation", &gm, "shallow_count", g.shallow as f64);
    put("generation", &gm, "deep_count", g.deep as f64);
    put("generation", &gm, "layer_cost", g.layer_cost);
    put("generation", &gm, "flop_cost", g.flop_cost);
    put("generation", &gm, "speedup", g.seconds_full / g.seconds_early);
    put("generation", &gm, "kv_cache_speedup", g.seconds_no_cache / g.seconds_full);
    put("generation", &gm, "agreement", g.agreement);

    let mut table = Vec::new();
    for row in &r.table {
        let section = format!(
            "early_exit_table {} ratio={}",
            row.fill,
            row.ratio.map_or("never".into(), |x| x.to_string())
        );
        put(&section, &row.model, "threshold", row.threshold as f64);
        put(&section, &row.model, "agreement", row.agreement);
        put(&section, &row.model, "gen_layer_cost", row.gen_layer_cost);
        put(&section, &row.model, "gen_flop_cost", row.gen_flop_cost);
        put(&section, &row.model, "teacher_forced_ppl", row.tf_ppl);
        put(&section, &row.model, "teacher_forced_shallow_ratio", row.tf_shallow_ratio);
        table.push(obj(vec![
            ("model", row.model.as_str().into()),
            ("fill", row.fill.into()),
            ("val_hard_ratio", row.ratio.map_or(Json::Null, f32_json)),
            ("threshold", f32_json(row.threshold)),
            ("greedy_agreement", row.agreement.into()),
            ("generation_shallow_ratio", row.gen_shallow_ratio.into()),
            ("generation_layer_cost", row.gen_layer_cost.into()),
            ("generation_flop_cost", row.gen_flop_cost.into()),
            ("teacher_forced_ppl", row.tf_ppl.into()),
            ("teacher_forced_shallow_ratio", row.tf_shallow_ratio.into()),
        ]));
    }

    let report = obj(vec![
        ("data", r.source.as_str().into()),
        ("split", r.split.to_json()),
        ("device", r.device.as_str().into()),
        ("run_seconds", r.seconds.into()),
        (
            "settings",
            obj(vec![
                ("seed", (o.seed as usize).into()),
                ("tokenizer", r.tokenizer.kind().into()),
                ("vocab_size", r.tokenizer.vocab_size().into()),
                ("seq_len", o.seq_len.into()),
                ("batch_size", o.batch_size.into()),
                ("dim", o.dim.into()),
                ("heads", o.heads.into()),
                ("ffn_hidden", o.ffn().into()),
                ("phase1_layers", o.phase1_layers.into()),
                ("phase2_layers", o.phase2_layers.into()),
                ("epochs", o.epochs.into()),
                ("phase2_epochs", o.phase2_epochs().into()),
                ("patience", o.patience.into()),
                ("lr", f32_json(o.lr)),
                ("lr2", f32_json(o.lr2)),
                ("hard_ratio", f32_json(o.hard_ratio)),
                ("max_new_tokens", o.max_new_tokens.into()),
            ]),
        ),
        (
            "tokens",
            obj(vec![
                ("train", r.data.tokens[0].into()),
                ("val", r.data.tokens[1].into()),
                ("test", r.data.tokens[2].into()),
            ]),
        ),
        ("threshold", f32_json(r.threshold)),
        (
            "hard_ratio",
            obj(vec![
                ("target", f32_json(o.hard_ratio)),
                ("val_after_phase2", e.val_hard_ratio_after.into()),
                (
                    "test_after_phase2",
                    (1.0 - e.models[1].routed.as_ref().map_or(0.0, |s| s.shallow_ratio)).into(),
                ),
                ("test_hard_tokens", e.test_hard.0.into()),
                ("test_tokens", e.test_hard.1.into()),
            ]),
        ),
        ("training", obj(training)),
        ("models", Json::Array(models)),
        (
            "true_early_exit",
            obj(vec![
                ("model", gm.as_str().into()),
                ("prompt", r.tokenizer.decode(&r.prompt)?.into()),
                ("max_new_tokens", o.max_new_tokens.into()),
                ("full_depth_text", g.full_text.as_str().into()),
                ("early_exit_text", g.early_text.as_str().into()),
                ("shallow_count", g.shallow.into()),
                ("deep_count", g.deep.into()),
                ("actual_compute_cost", g.layer_cost.into()),
                ("flop_cost", g.flop_cost.into()),
                ("seconds_full_depth", g.seconds_full.into()),
                ("seconds_early_exit", g.seconds_early.into()),
                ("seconds_no_kv_cache", g.seconds_no_cache.into()),
                ("speedup", (g.seconds_full / g.seconds_early).into()),
                ("identical_tokens", g.agreement.into()),
            ]),
        ),
        ("early_exit_table", Json::Array(table)),
    ]);

    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let json_path = o.out.join("report.json");
    write_atomic(&json_path, report.to_string_pretty().as_bytes())?;
    let mut text = String::from("section,model,metric,value\n");
    for row in &csv {
        let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    let csv_path = o.out.join("results.csv");
    write_atomic(&csv_path, text.as_bytes())?;
    eprintln!("\nwrote {} and {}", json_path.display(), csv_path.display());
    Ok(())
}

/// A CSV cell, quoted if it holds a comma, a quote or a newline.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}
