//! TRUE early exit, measured: how much faster early exit (`generate_with` with an exit rule)
//! and lossless self-speculative decoding really are than `generate`, against what a cost model
//! of this machine says they could be.
//!
//! Run with `cargo bench --bench early_exit` (configs T and S; on an idle machine about four
//! minutes of training and ten of timing); `LEGO_BENCH_QUICK=1` makes it a smoke run (barely
//! trained models, few reps); `LEGO_BENCH_CONFIGS=T,S` picks the configs, `LEGO_BENCH_BATCHES=1,8`
//! the batch sizes.
//!
//! **The models.** Confidences mean nothing on an untrained model (the spec's lesson 1), so the
//! bench trains one per config on the synthetic corpus ([`generate_corpus`], 80 stories):
//! config **S** (V = 4096, D = 256, N = 4, H = 8, F = 688) with the word tokenizer fitted on the
//! training split (capped at 4096 words; if the corpus has fewer distinct words the unused ids
//! simply never occur, so every product still has config S's sizes), sequences of 128; config
//! **T** (V = 256, D = 64, N = 4, H = 4, F = 172, `max_seq_len` 64) with the byte tokenizer,
//! sequences of 64. Phase 1 trains the lower 2 layers (S 90 s, T 60 s), the threshold is
//! calibrated at 50 % hard on the validation split, the **exit gate** is fitted on the training
//! split to imitate that routing (`train_exit_gate`, its own threshold calibrated on validation),
//! the hard examples of 192 training sequences are collected, the model is `extend`ed to 4
//! layers (lower part, exit head and gate frozen) and phase 2 trains the upper layers on the
//! hard examples (S 35 s, T 30 s). The exit is at layer 2 = N/2. The trained model is saved,
//! gate included, to `target/bench-early-exit-model-{T,S}.safetensors` (with its tokenizer);
//! `LEGO_BENCH_CKPT_T=<path>` / `LEGO_BENCH_CKPT_S=<path>` (or `LEGO_BENCH_CKPT`, for S) load
//! a model instead: a training checkpoint (`load_training_checkpoint`, e.g. the main example's
//! `--save` on Shakespeare, the issue's pinned T model) or a model (`LegoTransformer::load`). A checkpoint without a gate gets one fitted here
//! on the synthetic corpus if it has a tokenizer (or is byte-level); otherwise the gate rows
//! are skipped, with a message.
//!
//! **What is timed.** Prompts from the held-out test stories, greedy, at batch 1 and 8: at S
//! 16 prompt + 128 new tokens, at T (`max_seq_len` 64) 8 + 55. For thresholds calibrated to
//! send about 0, 25, 50, 75 and 100 % of the generated tokens out at the exit, by the **gate**
//! (the issue's measure: 31 paired reps at batch 1, 21 at batch 8) and by the spec's **max
//! softmax** (15 and 11), upper-cache fill `Skip`, and at 50 % with `Propagate` and `Deferred`;
//! then self-speculative decoding with k = 2 and 4 drafts a round and adaptive (k <= 4, a
//! row's draft stops below the model's calibrated threshold). The reps alternate `generate` and
//! the mode (A B A B ...), each also with a single new token (the prefill alone), so that
//!
//! ```text
//! time per decode step = (median t(new tokens) − median t(1 new token)) / (new − 1)
//! measured speed-up    = median over reps of (generate's step time / the mode's step time)
//! ```
//!
//! with a distribution-free 95 % interval for that median (order statistics). The end-to-end
//! ratio of whole calls, prefill included, is shown beside it. Self-speculative decoding is
//! lossless: every run checks that its greedy tokens equal `generate`'s (the bench panics if
//! not) and reports the acceptance rate alpha = accepted / drafted.
//!
//! **The cost model** (the "ideal"). Each phase of a decode step costs the larger of its FLOPs
//! at the GEMM rate and its bytes at the memory bandwidth, both measured here:
//!
//! - *bandwidth*: `roofline::read_bandwidth` over a buffer of the model's own weight size
//!   (`cost::weight_bytes_per_token` plus the exit head: S about 21 MB, in DRAM; T about
//!   0.9 MB, in L2), read by as many threads of the decode team as the decoder uses
//!   (`decode_parts`: both at S, one at T).
//! - *GEMM rate at m rows* (m = 1..8): the decode shapes of one layer (4 × D×D, 2 × F×D,
//!   1 × D×F) through the SIMD small-M kernel `simd::matmul_xwt` with the weights hot in
//!   cache, one private copy per thread, all threads at once, many calls per task (so no
//!   dispatch cost): the compute roof of our kernel. (The rate of `matvec::products` on the
//!   decode team, the way the decoder calls it, hand-offs included, is shown too, for the
//!   diagnosis.)
//!
//! The phases of a step, and what they are charged (bytes are f32 weights plus the KV cache
//! entries read by attention, `2·ctx·D·4` per row and layer):
//!
//! ```text
//! lower      layers 0..exit, every row                 weights of layers 0..exit
//! exit check softmax: the exit head, every row         V×D
//!            gate: a norm + 2D-term sum, every row;     3·D
//!            the exit head for the rows that exit only  V×D (if any row exits)
//! upper      layers exit..N + the final head, the deep rows only; charged only on steps
//!            where at least one row goes deep, and then the weights are read whole once
//! fill       (Propagate) Wk, Wv of each upper layer for the rows that exited;
//!            (Deferred) the owed positions riding along a deep row's upper pass
//! ```
//!
//! Self-speculative decoding is charged from its counts (`SpeculationStats`): its draft steps
//! (the lower layers for the rows still drafting: a round feeds its last accepted token and
//! then each draft, one lower pass more than its drafts), its exit-head steps, and each check
//! pass the upper layers and the deep head over its mean number of positions, weights read
//! once a step. Its ideal speed-up is then `steps × full-depth step / (draft steps + heads +
//! check passes)`: with alpha near 1 and k drafts a round about
//! `(k + 1) × full / ((k + 1) × lower + k × exit head + check)`.
//! Beside it, `ideal*` takes every piece at its **measured** cost instead (the draft's lower
//! passes and exit heads and the check passes, timed by the phase timer in runs of their own,
//! against `generate`'s measured step): a check pass of k + 1 rows then counts what it really
//! costs, and `effic*` is the share of the time spent in those pieces, the rest being the
//! loop's own work (accepting, rolling back).
//!
//! `generate` is charged the same way (lower + upper with every row, no exit check). The
//! ideal speed-up is Σ ideal(generate) / Σ ideal(early exit) over the run's decode steps, with the
//! routing of every row at every step taken from `EarlyExitStats::routes` (and each row's
//! upper-cache length followed through them). **Efficiency** = measured / ideal speed-up.
//!
//! **Where the time goes.** `EarlyExitStats::time` splits the early-exit run (lower, exit
//! check, upper, upper fill, sampling, prefill) and full-depth decoding alike: both are the one
//! generation loop (`generate_with`) with its phase timer on, in runs of their own (the timed
//! runs have it off).
//! Each phase is shown beside its ideal, and the diagnosis charges each early-exit phase its
//! *excess*: measured − ideal × (generate's own measured / ideal), i.e. the time it takes
//! beyond running as close to the roofline as `generate` does. Those excesses add up to what
//! separates the efficiency from 1. A layer's time is further split into its seven products
//! alone (timed over the model's real weights, a call each: on two threads that counts a
//! hand-off per product, which the decoder's one-job layer does not pay, so it is an upper
//! bound there) and the rest (attention over the cache, norms, RoPE, ...), and the exit
//! check's confidence pass over V logits is timed on its own.
//!
//! Also printed: the spec's layer-compute saving `1 − actual_compute_cost` and the FLOP saving
//! `1 − flop_cost`, and (if `python3 -c "import torch"` works, in a full run; force with
//! `LEGO_BENCH_PEER=1`, skip with `=0`) PyTorch's decode rate from
//! `../shared/peers/torch_bench.py decode <T|S> 3 <threads> <batch>`, run right after ours.
//!
//! On a shared machine every time is disturbed by the other work; the reps are paired (the
//! speed-up is the median of each rep's own ratio) and the ratio of the fastest reps is shown
//! too. The bench says when the load average was above the thread count.
//!
//! Output: per config and batch, a table of early exit and one of self-speculative decoding on
//! stdout, and every row in `target/bench-early-exit.csv` (`LEGO_BENCH_CSV=path`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lego::Tensor;
use lego::data::{
    Batch, Document, SyntheticConfig, Tokenizer, batches, generate_corpus, sequences_from_documents,
    split_documents,
};
use lego::kernels::roofline::read_bandwidth;
use lego::kernels::team::decode_team;
use lego::kernels::{matvec, simd};
use lego::model::decoder::decode_parts;
use lego::model::{
    EarlyExitStats, ExitMeasure, ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling,
    Speculation, SpeculationStats, UpperCacheFill, cost, early_exit::TimeSplit,
};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    ExitGateOptions, Phase2Mode, TrainOptions, Trainer, collect_hard_examples, compute_confidence_threshold,
    create_hard_example_loader, load_training_checkpoint, train_exit_gate,
};
use rand::Rng;
use rayon::prelude::*;

/// Training batch (config S's and T's training shape; the sequence length is the config's).
const TRAIN_BATCH: usize = 16;
/// Target shares of generated tokens that exit at the exit layer.
const TARGETS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// The decode protocol of a model: prompt tokens and new tokens per row. 16 + 128 (as
/// PEERS.md's decode table) where the context allows; T (`max_seq_len` 64) takes 8 + 55.
#[derive(Clone, Copy, Debug)]
struct Protocol {
    prompt: usize,
    new: usize,
}

impl Protocol {
    fn of(c: &LegoConfig) -> Protocol {
        if c.max_seq_len >= 16 + 128 {
            Protocol { prompt: 16, new: 128 }
        } else {
            assert!(c.max_seq_len >= 16, "max_seq_len {} leaves no room to decode", c.max_seq_len);
            Protocol { prompt: 8, new: c.max_seq_len - 9 }
        }
    }

    /// One-token decode steps after the prefill (which makes the first new token).
    fn steps(&self) -> usize {
        self.new - 1
    }
}

// ----- settings ----------------------------------------------------------------------------

fn quick() -> bool {
    std::env::var("LEGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `full` in a full run, `small` in a quick one.
fn pick<T>(full: T, small: T) -> T {
    if quick() { small } else { full }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ----- the model ---------------------------------------------------------------------------

/// The trained (or loaded) model, the prompts it is timed on, and how it came about.
struct Subject {
    model: LegoTransformer,
    protocol: Protocol,
    /// Prompts of `protocol.prompt` tokens from held-out text (8 of them).
    prompts: Vec<Vec<usize>>,
    description: String,
    /// Why the model has no exit gate (then the gate rows are skipped), if it has none.
    no_gate: Option<String>,
}

/// The synthetic corpus split into train / validation / test stories (the same every run).
fn corpus() -> (Vec<Document>, Vec<Document>, Vec<Document>) {
    let docs = generate_corpus(&SyntheticConfig { documents: 80, bytes_per_document: 10_000, seed: 0 });
    let split = split_documents(docs, 4, 4, 42).expect("80 stories split");
    (split.train, split.val, split.test)
}

/// Eight prompts of `len` tokens spread over the test stories.
fn prompts_from(tokenizer: &Tokenizer, test: &[Document], len: usize) -> Vec<Vec<usize>> {
    let streams: Vec<Vec<usize>> = test.iter().map(|d| tokenizer.encode(&d.text)).collect();
    (0..8)
        .map(|i| {
            let s = &streams[i % streams.len()];
            let start = (i / streams.len()) * 97 + 23 * (i % 3);
            s[start..start + len].to_vec()
        })
        .collect()
}

/// The checkpoint to load for config `name`: `LEGO_BENCH_CKPT_T` / `LEGO_BENCH_CKPT_S`
/// (`LEGO_BENCH_CKPT` is S's too).
fn checkpoint_var(name: &str) -> Option<PathBuf> {
    let own = std::env::var_os(format!("LEGO_BENCH_CKPT_{name}"));
    let shared = if name == "S" { std::env::var_os("LEGO_BENCH_CKPT") } else { None };
    own.or(shared).map(PathBuf::from)
}

/// Loads config `name`'s checkpoint if one is named, or trains a model as the module doc says.
fn subject(name: &'static str) -> Subject {
    let (train_docs, val_docs, test_docs) = corpus();
    let Some(path) = checkpoint_var(name) else {
        return train(name, &train_docs, &val_docs, &test_docs);
    };
    // A training checkpoint (`--save` of the main example: model, tokenizer, optimizer) or a
    // model checkpoint (`LegoTransformer::save`, the tokenizer in its metadata if any).
    let (mut model, tokenizer) = match load_training_checkpoint(&path) {
        Ok(t) => (t.model, Some(t.tokenizer)),
        Err(training_error) => {
            let (model, meta) = LegoTransformer::load(&path).unwrap_or_else(|e| {
                panic!("checkpoint {}: {e} (as a training checkpoint: {training_error})", path.display())
            });
            let tokenizer = match meta.get("tokenizer") {
                Some(t) => Some(Tokenizer::from_json_str(t).expect("the checkpoint's tokenizer")),
                None if model.config.vocab_size == 256 => Some(Tokenizer::Byte),
                None => None,
            };
            (model, tokenizer)
        }
    };
    let c = model.config.clone();
    let protocol = Protocol::of(&c);
    assert!(
        c.exit_layer > 0 && c.exit_layer < c.num_layers,
        "the checkpoint's exit layer {} leaves no lower or no upper part (N = {})",
        c.exit_layer,
        c.num_layers
    );
    let prompts = match &tokenizer {
        Some(t) => prompts_from(t, &test_docs, protocol.prompt),
        None => {
            let mut rng = Tensor::rng(5);
            (0..8)
                .map(|_| (0..protocol.prompt).map(|_| rng.random_range(0..c.vocab_size)).collect())
                .collect()
        }
    };
    // A checkpoint without a gate gets one here when the bench has text in its vocabulary.
    let gate = match (&model.exit_gate, &tokenizer) {
        (Some(g), _) => Ok(format!("exit gate from the checkpoint (threshold {:.4})", g.threshold)),
        (None, Some(t)) => {
            let seq = c.max_seq_len.min(128);
            let train = batches(&sequences_from_documents(t, &train_docs, seq), TRAIN_BATCH, Some(7))
                .expect("training batches");
            let val = batches(&sequences_from_documents(t, &val_docs, seq), TRAIN_BATCH, None)
                .expect("validation batches");
            let softmax = compute_confidence_threshold(&model, &val, 0.5).expect("softmax threshold");
            let note = fit_gate(&mut model, &train, &val, softmax);
            Ok(format!("no exit gate in the checkpoint: {note}, on the synthetic corpus"))
        }
        (None, None) => Err(format!(
            "config {name}: the checkpoint has no exit gate and no tokenizer (no text to fit one \
             on): the gate rows are skipped"
        )),
    };
    let description = format!(
        "loaded {} (V={} D={} N={} H={} F={}, exit at {}); prompts: {}; {}",
        path.display(),
        c.vocab_size,
        c.dim,
        c.num_layers,
        c.num_heads,
        c.ffn_hidden,
        c.exit_layer,
        if tokenizer.is_some() {
            "test stories of the synthetic corpus"
        } else {
            "random ids (no tokenizer in the checkpoint)"
        },
        gate.as_deref().unwrap_or("no exit gate")
    );
    Subject { model, protocol, prompts, description, no_gate: gate.err() }
}

/// Fits the model's exit gate to imitate max-softmax routing at `softmax` (the threshold of
/// 50 % hard on `val`), its own threshold calibrated on `val` to the same share; sets
/// `model.exit_gate`. Returns a line for the description.
fn fit_gate(model: &mut LegoTransformer, train: &[Batch], val: &[Batch], softmax: f32) -> String {
    let t = Instant::now();
    let (gate, report) =
        train_exit_gate(model, train, val, softmax, 0.5, &ExitGateOptions::default()).expect("exit gate");
    let line = format!(
        "exit gate fitted in {:.1} s on {} tokens (softmax threshold {softmax:.4}, {} Newton steps): \
         agrees with softmax routing on {:.1} % of validation tokens, threshold {:.4}",
        t.elapsed().as_secs_f64(),
        report.train_tokens,
        report.iterations,
        100.0 * report.validation.agreement,
        gate.threshold
    );
    model.exit_gate = Some(gate);
    line
}

/// Trains `model` for about `budget` seconds in calls of `round` batches each (one epoch of a
/// call each), the learning rate following a cosine over the time budget; stops early when the
/// validation perplexity stops improving for 3 rounds. Returns (rounds, last val PPL).
fn phase1(
    model: &LegoTransformer,
    train: &[Vec<usize>],
    val: &[Batch],
    budget: f64,
    round: usize,
) -> (usize, f64) {
    let peak = 2e-3f32;
    let mut opt = AdamW::new(model.params(), AdamWConfig { lr: peak, ..Default::default() });
    let start = Instant::now();
    let (mut rounds, mut best, mut since_best, mut ppl) = (0usize, f64::INFINITY, 0, f64::NAN);
    let mut pass = 0u64;
    let mut order = batches(train, TRAIN_BATCH, Some(pass)).expect("training batches");
    let mut next = 0;
    while start.elapsed().as_secs_f64() < budget && since_best < 3 {
        if next + round > order.len() {
            pass += 1;
            order = batches(train, TRAIN_BATCH, Some(pass)).expect("training batches");
            next = 0;
        }
        let chunk: Vec<Batch> =
            order[next..next + round].iter().filter(|b| b.batch == TRAIN_BATCH).cloned().collect();
        next += round;
        let progress = (start.elapsed().as_secs_f64() / budget).min(1.0);
        opt.config.lr = peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
        let trainer = Trainer::new(TrainOptions {
            max_epochs: 1,
            patience: 1,
            warmup_steps: if rounds == 0 { 10 } else { 0 },
            min_lr_ratio: 0.8,
            label: "phase 1".into(),
            ..TrainOptions::default()
        });
        let h = trainer.train_with_early_stopping(model, &chunk, val, &mut opt).expect("phase 1");
        ppl = h.epochs[0].val_ppl;
        rounds += 1;
        if ppl < best {
            (best, since_best) = (ppl, 0);
        } else {
            since_best += 1;
        }
        eprint!(
            "\r  phase 1: round {rounds}, {:.0} s, val PPL {ppl:.2}, {:.0} tok/s   ",
            start.elapsed().as_secs_f64(),
            h.epochs[0].tokens_per_second
        );
    }
    eprintln!();
    (rounds, ppl)
}

/// Trains config `name` ("T" or "S") as the module doc says, and saves it.
fn train(
    name: &'static str,
    train_docs: &[Document],
    val_docs: &[Document],
    test_docs: &[Document],
) -> Subject {
    let t0 = Instant::now();
    // S: words (capped at V); T: bytes (V = 256).
    let (base, tokenizer) = match name {
        "S" => (LegoConfig::s(), Tokenizer::word(train_docs, 4096).expect("word tokenizer")),
        "T" => (LegoConfig::t(), Tokenizer::Byte),
        _ => panic!("LEGO_BENCH_CONFIGS: T or S, got {name}"),
    };
    let words = tokenizer.vocab_size();
    let seq = base.max_seq_len.min(128);
    // Phase 1: the lower half, exit after it.
    let exit = base.num_layers / 2;
    let shallow_config = LegoConfig {
        exit_layer: exit,
        ..LegoConfig::new(base.vocab_size, base.dim, exit, base.num_heads, base.ffn_hidden, base.max_seq_len)
    };
    let train_seqs = sequences_from_documents(&tokenizer, train_docs, seq);
    let val_seqs = sequences_from_documents(&tokenizer, val_docs, seq);
    let val = batches(&val_seqs, TRAIN_BATCH, None).expect("validation batches");
    eprintln!(
        "training config {name} on the synthetic corpus: {} training sequences of {seq} tokens, \
         {} validation; vocabulary {words} (model V = {})",
        train_seqs.len(),
        val_seqs.len(),
        base.vocab_size
    );
    let (budget1, budget2) = match name {
        "S" => (pick(90.0, 6.0), pick(35.0, 4.0)),
        _ => (pick(60.0, 4.0), pick(30.0, 3.0)),
    };
    let round = pick(16, 4);

    // Phase 1: the lower layers on everything.
    let mut model = LegoTransformer::new(shallow_config, &mut Tensor::rng(1)).expect("model");
    let (rounds1, ppl1) = phase1(&model, &train_seqs, &val, budget1, round);

    // Calibrate at 50 % hard on the validation split; the exit gate on the training split (it
    // stays frozen through `extend` and phase 2); hard examples of the training split.
    let threshold = compute_confidence_threshold(&model, &val, 0.5).expect("threshold");
    let gate_train = batches(&train_seqs, TRAIN_BATCH, Some(7)).expect("batches");
    let gate_note = fit_gate(&mut model, &gate_train, &val, threshold);
    let hard_source: Vec<Batch> =
        batches(&train_seqs, TRAIN_BATCH, Some(99)).expect("batches").into_iter().take(pick(12, 4)).collect();
    let hard = collect_hard_examples(&model, &hard_source, threshold).expect("hard examples");

    // Phase 2: full depth, lower part frozen, upper layers on the hard examples.
    let deep = model.extend(base.num_layers, threshold, true, &mut Tensor::rng(2)).expect("extend");
    drop(model);
    assert!(deep.exit_gate.is_some(), "extend keeps the exit gate");
    let mut opt = AdamW::new(deep.trainable_params(), AdamWConfig { lr: 1e-3, ..Default::default() });
    let start2 = Instant::now();
    let (mut epochs2, mut ppl2) = (0usize, f64::NAN);
    while start2.elapsed().as_secs_f64() < budget2 {
        let progress = (start2.elapsed().as_secs_f64() / budget2).min(1.0);
        opt.config.lr = 1e-3 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
        let hard_batches =
            create_hard_example_loader(&hard, TRAIN_BATCH, epochs2 as u64, Phase2Mode::Sequence)
                .expect("hard batches");
        let trainer = Trainer::new(TrainOptions {
            max_epochs: 1,
            patience: 1,
            warmup_steps: if epochs2 == 0 { 10 } else { 0 },
            min_lr_ratio: 0.5,
            label: "phase 2".into(),
            ..TrainOptions::default()
        });
        let h = trainer
            .train_upper_layers_with_early_stopping(
                &deep,
                &hard_batches,
                &val,
                &hard,
                &mut opt,
                exit,
                threshold,
                Phase2Mode::Sequence,
            )
            .expect("phase 2");
        epochs2 += 1;
        // (epochs[0] is the model before this call's epoch; the last is after it.)
        let last = h.epochs.last().expect("phase 2 ran an epoch");
        ppl2 = last.val_ppl_routed;
        eprint!(
            "\r  phase 2: epoch {epochs2}, {:.0} s, hard PPL {:.2}, routed val PPL {ppl2:.2}   ",
            start2.elapsed().as_secs_f64(),
            last.hard_ppl
        );
    }
    eprintln!();
    let full = Trainer::new(TrainOptions::default()).evaluate(&deep, &val, None).expect("evaluate");

    let path = target_dir().join(format!("bench-early-exit-model-{name}.safetensors"));
    let mut meta = BTreeMap::new();
    meta.insert("tokenizer".to_string(), tokenizer.to_json().to_string_compact());
    meta.insert("trained_by".to_string(), "benches/early_exit.rs".to_string());
    let saved = match deep.save(&path, &meta) {
        Ok(()) => format!("saved to {}", path.display()),
        Err(e) => format!("not saved ({e})"),
    };
    let c = &deep.config;
    let description = format!(
        "trained here in {:.0} s: config {name} (V={} D={} N={} H={} F={}), {} tokenizer \
         ({words} ids) on the synthetic corpus; phase 1 ({exit} layers) {rounds1} rounds of \
         {round} batches of {TRAIN_BATCH}x{seq}, val PPL {ppl1:.2}; threshold {threshold:.4} \
         (50 % hard on val), {} hard tokens; {gate_note}; phase 2 (layers {exit}-{}) {epochs2} \
         epochs, routed val PPL {ppl2:.2}, full-depth val PPL {:.2}; exit at layer {exit}; {saved}",
        t0.elapsed().as_secs_f64(),
        c.vocab_size,
        c.dim,
        c.num_layers,
        c.num_heads,
        c.ffn_hidden,
        if name == "S" { "word" } else { "byte" },
        hard.len(),
        c.num_layers - 1,
        full.ppl
    );
    let protocol = Protocol::of(c);
    Subject {
        prompts: prompts_from(&tokenizer, test_docs, protocol.prompt),
        protocol,
        model: deep,
        description,
        no_gate: None,
    }
}

// ----- the machine -------------------------------------------------------------------------

/// The two rates the cost model charges at.
struct Machine {
    /// The decoder's threads (of the decode team).
    threads: usize,
    /// Bytes/s read from a buffer of the model's weight size by the decoder's threads
    /// (`roofline::read_bandwidth`).
    bandwidth: f64,
    /// The same on one thread.
    bandwidth_1thread: f64,
    /// FLOP/s of the small-M kernel on hot weights, all threads at once, for `m` rows
    /// (index m = 1..=8).
    gemm: [f64; 9],
    /// FLOP/s of `matvec::products` (one team hand-off a call, as the decoder runs a head), hot weights.
    gemm_split: [f64; 9],
}

impl Machine {
    fn gemm_rate(&self, rows: usize) -> f64 {
        self.gemm[rows.clamp(1, 8)]
    }
}

/// The decode shapes `(n, k, count)` of one layer's products `x·Wᵀ`, W `[n, k]`.
fn layer_shapes(c: &LegoConfig) -> [(usize, usize, usize); 3] {
    [(c.dim, c.dim, 4), (c.ffn_hidden, c.dim, 2), (c.dim, c.ffn_hidden, 1)]
}

/// `out = x·Wᵀ` (`[m, n]`) through `matvec::products` on the decode team, one hand-off a call,
/// split over as many threads as the decoder uses for a model of config `c` (`decode_parts`).
/// That is how the decoder computes a head; its layers run as one team job each
/// (`model::decoder_layer`), which spares most of the hand-offs, so a layer's products in the
/// decoder cost somewhat less than this (`cargo bench --bench kernels`, the decode step rows).
#[allow(clippy::too_many_arguments)]
fn engine_product(
    c: &LegoConfig,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let team = decode_team();
    let parts = decode_parts(c, team.size().min(rayon::current_num_threads()));
    matvec::products(team, parts, x, m, k, [w], [out], scratch, matvec::Epilogue::None);
}

/// FLOP/s of one layer's products for `m` rows: `simd::matmul_xwt` on every thread at once
/// with private hot weights (`split = false`), or as the decoder calls them (`engine_product`).
fn gemm_rate(c: &LegoConfig, m: usize, threads: usize, split: bool, calls: usize) -> f64 {
    let shapes = layer_shapes(c);
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (n, k, count) in shapes {
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 1e-2).collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 1e-2).collect();
        let per_call = if split {
            let mut out = vec![0.0f32; n * m];
            let mut scratch = vec![0.0f32; matvec::scratch_len(&[n], m)];
            for _ in 0..20 {
                engine_product(c, &x, m, k, &w, &mut out, &mut scratch);
            }
            let samples: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..calls {
                        engine_product(c, &x, m, k, &w, &mut out, &mut scratch);
                        black_box(&out);
                    }
                    t.elapsed().as_secs_f64() / calls as f64
                })
                .collect();
            median(&samples)
        } else {
            // Each thread its own copy of W, hot in its core's cache; one task per thread.
            let copies: Vec<Vec<f32>> = (0..threads).map(|_| w.clone()).collect();
            let run = |calls: usize| {
                copies.par_iter().for_each(|w| {
                    let mut out = vec![0.0f32; n * m];
                    for _ in 0..calls {
                        simd::matmul_xwt(&x, m, k, w, &mut out);
                        black_box(&out);
                    }
                });
            };
            run(20);
            let samples: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    run(calls);
                    // `threads` products done in this time.
                    t.elapsed().as_secs_f64() / (calls * threads) as f64
                })
                .collect();
            median(&samples)
        };
        flops += (count * 2 * m * k * n) as f64;
        seconds += count as f64 * per_call;
    }
    flops / seconds
}

/// The bytes a decode step may cycle through: every layer, the deep head
/// ([`cost::weight_bytes_per_token`]) and the exit head.
fn model_bytes(c: &LegoConfig) -> f64 {
    cost::weight_bytes_per_token(c) + ((c.vocab_size * c.dim + c.dim) * 4) as f64
}

fn measure_machine(c: &LegoConfig) -> Machine {
    // The decoder's own threads: the whole decode team for a model of 1 Mi weights a token or
    // more, else one (`decode_parts`).
    let team = decode_team();
    let threads = decode_parts(c, team.size());
    let bytes = model_bytes(c) as usize;
    let passes = pick(40, 10);
    let bandwidth = read_bandwidth(team, bytes, threads, passes);
    let bandwidth_1thread = read_bandwidth(team, bytes, 1, passes);
    let calls = pick(200, 40);
    let mut gemm = [0.0; 9];
    let mut gemm_split = [0.0; 9];
    for m in 1..=8 {
        gemm[m] = gemm_rate(c, m, threads, false, calls);
        gemm_split[m] = gemm_rate(c, m, threads, true, calls);
    }
    Machine { threads, bandwidth, bandwidth_1thread, gemm, gemm_split }
}

// ----- the cost model ----------------------------------------------------------------------

/// f32 weights of one layer (the products; the two norms' D each are included too).
fn weights_per_layer(c: &LegoConfig) -> usize {
    4 * c.dim * c.dim + 3 * c.dim * c.ffn_hidden + 2 * c.dim
}

/// Ideal seconds per phase, summed over a run's decode steps.
#[derive(Clone, Copy, Default, Debug)]
struct Phases {
    lower: f64,
    exit_check: f64,
    upper: f64,
    fill: f64,
}

impl Phases {
    fn total(&self) -> f64 {
        self.lower + self.exit_check + self.upper + self.fill
    }
}

struct CostModel<'a> {
    c: &'a LegoConfig,
    m: &'a Machine,
    p: Protocol,
}

impl CostModel<'_> {
    /// The larger of `flops` at the GEMM rate for `rows` rows and `bytes` at the bandwidth.
    fn phase(&self, flops: f64, bytes: f64, rows: usize) -> f64 {
        (flops / self.m.gemm_rate(rows)).max(bytes / self.m.bandwidth)
    }

    fn layer_bytes(&self) -> f64 {
        4.0 * weights_per_layer(self.c) as f64
    }

    fn head_bytes(&self) -> f64 {
        4.0 * (self.c.vocab_size * self.c.dim + self.c.dim) as f64
    }

    /// Bytes of the keys and values one row reads in one layer, attending to `ctx` entries.
    fn kv_bytes(&self, ctx: usize) -> f64 {
        (2 * ctx * self.c.dim * 4) as f64
    }

    /// `layers` layers for rows attending to `ctxs` entries (one per row), and a head if
    /// `head`: (flops, bytes).
    fn layers(&self, layers: usize, ctxs: &[usize], head: bool) -> (f64, f64) {
        let n = layers as f64;
        let mut flops: f64 = ctxs.iter().map(|&ctx| n * cost::layer_flops(self.c, ctx)).sum();
        let mut bytes = n * self.layer_bytes() + ctxs.iter().map(|&ctx| n * self.kv_bytes(ctx)).sum::<f64>();
        if head {
            flops += ctxs.len() as f64 * cost::head_flops(self.c);
            bytes += self.head_bytes();
        }
        (flops, bytes)
    }

    /// `generate`'s decode steps for `batch` rows: (lower, upper + head).
    fn full_depth(&self, batch: usize) -> Phases {
        let (exit, n) = (self.c.exit_layer, self.c.num_layers);
        let mut p = Phases::default();
        for s in 1..self.p.new {
            let ctxs = vec![self.p.prompt + s; batch];
            let (f, b) = self.layers(exit, &ctxs, false);
            p.lower += self.phase(f, b, batch);
            let (f, b) = self.layers(n - exit, &ctxs, true);
            p.upper += self.phase(f, b, batch);
        }
        p
    }

    /// `generate_with` under `rule`'s decode steps with this routing (`routes[row][token]`,
    /// token 0 routed by the prefill).
    fn early_exit(&self, routes: &[Vec<bool>], rule: &ExitRule) -> Phases {
        let (c, batch) = (self.c, routes.len());
        let (exit, n, d) = (c.exit_layer, c.num_layers, c.dim);
        let upper_layers = n - exit;
        // Entries each row holds in the upper cache: the prompt (the prefill runs every layer);
        // with `Deferred`, the exited tokens each row still owes its upper cache.
        let mut upper_len = vec![self.p.prompt; batch];
        let mut owed = vec![0usize; batch];
        let mut p = Phases::default();
        for s in 1..self.p.new {
            let ctxs = vec![self.p.prompt + s; batch];
            let (f, b) = self.layers(exit, &ctxs, false);
            p.lower += self.phase(f, b, batch);
            let deep: Vec<usize> = (0..batch).filter(|&r| routes[r][s]).collect();
            let shallow = batch - deep.len();
            p.exit_check += match rule.measure {
                // The exit head on every row.
                ExitMeasure::MaxSoftmax => {
                    self.phase(batch as f64 * cost::head_flops(c), self.head_bytes(), batch)
                }
                // The gate (a norm and a 2D-term sum) on every row, its D + 2D weights;
                // the exit head only for the rows that exit.
                ExitMeasure::Gate => {
                    let gate = self.phase(batch as f64 * cost::gate_flops(c), (3 * d * 4) as f64, batch);
                    let head = if shallow > 0 {
                        self.phase(shallow as f64 * cost::head_flops(c), self.head_bytes(), shallow)
                    } else {
                        0.0
                    };
                    gate + head
                }
            };
            if !deep.is_empty() {
                let ctxs: Vec<usize> = deep.iter().map(|&r| upper_len[r] + 1).collect();
                let (f, b) = self.layers(upper_layers, &ctxs, true);
                p.upper += self.phase(f, b, deep.len());
                if rule.fill == UpperCacheFill::Deferred {
                    // The owed positions ride along with the deep rows' pass: charged as the
                    // difference between the pass with them and without.
                    let mut all = ctxs.clone();
                    for &r in &deep {
                        all.extend((0..owed[r]).map(|i| upper_len[r] + 1 + i));
                    }
                    if all.len() > ctxs.len() {
                        let (f2, b2) = self.layers(upper_layers, &all, true);
                        p.fill += self.phase(f2, b2, all.len()) - self.phase(f, b, deep.len());
                    }
                }
            }
            if rule.fill == UpperCacheFill::Propagate && shallow > 0 {
                let f = (shallow * upper_layers * 2 * 2 * d * d) as f64;
                let b = (upper_layers * 2 * d * d * 4) as f64;
                p.fill += self.phase(f, b, shallow);
            }
            for ((len, owes), route) in upper_len.iter_mut().zip(owed.iter_mut()).zip(routes) {
                match (route[s], rule.fill) {
                    (true, UpperCacheFill::Deferred) => {
                        *len += *owes + 1;
                        *owes = 0;
                    }
                    (true, _) | (false, UpperCacheFill::Propagate) => *len += 1,
                    (false, UpperCacheFill::Deferred) => *owes += 1,
                    (false, UpperCacheFill::Skip) => {}
                }
            }
        }
        p
    }

    /// Self-speculative decoding's decode steps, from its counts: each draft step the lower
    /// layers over its mean number of rows (`draft_positions / draft_steps`; a row's round is
    /// one lower pass more than its drafts), each exit-head step the exit head over its mean
    /// rows, each check pass the upper layers and the deep head over its mean positions
    /// (`checked / rounds`), weights read once a pass. Taken as `lower` = the draft's layers,
    /// `exit_check` = the draft's heads, `upper` = checking. (Approximate only in taking each
    /// kind of step at its mean rows and at the middle context.)
    fn speculative(&self, spec: &SpeculationStats) -> Phases {
        let (c, exit, n) = (self.c, self.c.exit_layer, self.c.num_layers);
        // Contexts taken at the middle of the run (attention is a few % of a layer here).
        let ctx = self.p.prompt + self.p.new / 2;
        let mean =
            |total: usize, steps: usize| (total as f64 / steps.max(1) as f64).round().max(1.0) as usize;
        let rows = mean(spec.draft_positions, spec.draft_steps);
        let (f, b) = self.layers(exit, &vec![ctx; rows], false);
        let lower = spec.draft_steps as f64 * self.phase(f, b, rows.min(8));
        let heads = mean(spec.exit_head_rows, spec.exit_head_steps);
        let head = self.phase(heads as f64 * cost::head_flops(c), self.head_bytes(), heads.min(8));
        let per_pass = mean(spec.checked, spec.rounds);
        let (f, b) = self.layers(n - exit, &vec![ctx; per_pass], true);
        let check = self.phase(f, b, per_pass.min(8));
        Phases {
            lower,
            exit_check: spec.exit_head_steps as f64 * head,
            upper: spec.rounds as f64 * check,
            ..Phases::default()
        }
    }
}

// ----- measurements ------------------------------------------------------------------------

/// The time split of full-depth decoding, per step (seconds): the engine pieces `generate`
/// uses, timed one by one.
#[derive(Clone, Copy, Default, Debug)]
struct FullSplit {
    lower: f64,
    upper: f64,
    head: f64,
    sampling: f64,
}

/// `generate`'s own loop (greedy, full depth) with its phase timer on; medians over `reps`.
fn full_depth_split(model: &LegoTransformer, prompts: &[Vec<usize>], p: Protocol, reps: usize) -> FullSplit {
    let options = GenerateOptions { profile: true, ..GenerateOptions::greedy(p.new) };
    let mut samples: Vec<TimeSplit> = Vec::new();
    for rep in 0..reps + 1 {
        let (out, stats) = model.generate_with(prompts, &options).expect("generate_with");
        black_box(out);
        if rep > 0 {
            samples.push(stats.time);
        }
    }
    let med = |f: fn(&TimeSplit) -> f64| {
        median(&samples.iter().map(|s| f(s) / p.steps() as f64).collect::<Vec<_>>())
    };
    FullSplit {
        lower: med(|s| s.lower),
        upper: med(|s| s.upper),
        head: med(|s| s.head),
        sampling: med(|s| s.sampling),
    }
}

/// The anatomy of a decode step, per step at one batch size (seconds).
struct Anatomy {
    /// One layer's seven products `x·Wᵀ` alone, one call (and, on two threads, one hand-off to
    /// the team) each, cycling through every layer's real weights as a decode step does. The
    /// decoder runs a whole layer as one team job with barriers instead (`decoder_layer`,
    /// crate-private), so on two threads this includes hand-offs a decode step no longer pays:
    /// an upper bound on the products' share, exact on one thread.
    products_per_layer: f64,
    /// The head's product alone (`V×D`).
    head_product: f64,
    /// `confidence_of_row` on one row of V logits (what the exit check adds to its product).
    confidence_row: f64,
    /// The SIMD softmax of one row of V logits, for comparison.
    softmax_row: f64,
}

fn anatomy(model: &LegoTransformer, batch: usize, reps: usize) -> Anatomy {
    let c = &model.config;
    let (d, f, v) = (c.dim, c.ffn_hidden, c.vocab_size);
    let x: Vec<f32> = (0..batch * d.max(f)).map(|i| ((i % 17) as f32 - 8.0) * 1e-2).collect();
    let mut out = vec![0.0f32; batch * d.max(f).max(v)];
    let mut scratch = vec![0.0f32; matvec::scratch_len(&[d.max(f).max(v)], batch)];
    let weights: Vec<Vec<(std::sync::Arc<Vec<f32>>, usize)>> = model
        .layers
        .iter()
        .map(|l| {
            let (a, m) = (&l.attention, &l.feed_forward);
            vec![
                (a.wq.weight.data(), d),
                (a.wk.weight.data(), d),
                (a.wv.weight.data(), d),
                (a.wo.weight.data(), d),
                (m.w1.weight.data(), d),
                (m.w3.weight.data(), d),
                (m.w2.weight.data(), f),
            ]
        })
        .collect();
    let head = model.head.output.weight.data();
    let (mut layer_t, mut head_t) = (Vec::new(), Vec::new());
    for rep in 0..reps + 5 {
        let t0 = Instant::now();
        for layer in &weights {
            for (w, k) in layer {
                engine_product(
                    c,
                    &x[..batch * k],
                    batch,
                    *k,
                    w,
                    &mut out[..w.len() / k * batch],
                    &mut scratch,
                );
            }
        }
        let t1 = Instant::now();
        engine_product(c, &x[..batch * d], batch, d, &head, &mut out[..v * batch], &mut scratch);
        let t2 = Instant::now();
        black_box(&out);
        if rep >= 5 {
            layer_t.push((t1 - t0).as_secs_f64() / weights.len() as f64);
            head_t.push((t2 - t1).as_secs_f64());
        }
    }
    let logits: Vec<f32> = (0..v).map(|i| ((i * 7919) % 1000) as f32 * 1e-2).collect();
    let mut buf = logits.clone();
    let time_row = |f: &mut dyn FnMut()| {
        let samples: Vec<f64> = (0..50)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..20 {
                    f();
                }
                t.elapsed().as_secs_f64() / 20.0
            })
            .collect();
        median(&samples)
    };
    let mut scratch = vec![0.0f32; logits.len()];
    let confidence_row = time_row(&mut || {
        black_box(lego::model::transformer::confidence_with_scratch(black_box(&logits), &mut scratch));
    });
    let softmax_row = time_row(&mut || {
        buf.copy_from_slice(&logits);
        simd::softmax_in_place(black_box(&mut buf));
    });
    Anatomy {
        products_per_layer: median(&layer_t),
        head_product: median(&head_t),
        confidence_row,
        softmax_row,
    }
}

/// What a timed run decodes with, beside `generate`.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Early exit by this rule.
    Exit(ExitRule),
    /// Lossless self-speculative decoding.
    Speculate(Speculation),
}

impl Mode {
    fn options(&self, new: usize, profile: bool) -> GenerateOptions {
        let o = GenerateOptions { profile, ..GenerateOptions::greedy(new) };
        match *self {
            Mode::Exit(rule) => o.with_exit(rule),
            Mode::Speculate(spec) => o.with_speculation(spec),
        }
    }

    /// The routing measure and fill (early exit), or the speculation's name.
    fn names(&self) -> (String, &'static str) {
        match self {
            Mode::Exit(r) => (r.measure.name().to_string(), r.fill.name()),
            Mode::Speculate(Speculation { k, stop_below: None }) => (format!("spec k={k}"), "exact"),
            Mode::Speculate(Speculation { k, stop_below: Some(t) }) => {
                (format!("spec k<={k} >={t:.2}"), "exact")
            }
        }
    }
}

/// One mode at one batch size, measured.
struct Measured {
    batch: usize,
    mode: Mode,
    /// The target shallow share (early exit; NaN for speculation).
    target: f64,
    reps: usize,
    p: Protocol,
    /// Per rep, seconds: whole calls with `p.new` and with 1 new token (rep i of each ran
    /// back to back: gen 1, gen new, mode 1, mode new).
    gen_new: Vec<f64>,
    gen_1: Vec<f64>,
    ee_new: Vec<f64>,
    ee_1: Vec<f64>,
    /// The run's statistics (the routing is the same every rep: greedy).
    stats: EarlyExitStats,
    /// Median over reps of each phase of `stats.time`, per decode step (prefill: per call).
    split: TimeSplit,
    /// Steps on which at least one row went deep.
    steps_with_deep: usize,
}

/// Per rep: `(t_new − t_1) / steps`, the time of one decode step.
fn steps(t_new: &[f64], t1: &[f64], p: Protocol) -> Vec<f64> {
    t_new.iter().zip(t1).map(|(a, b)| (a - b) / p.steps() as f64).collect()
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The median of `v` and a distribution-free 95 % interval for it: the order statistics of
/// ranks `n/2 ∓ 0.98·√n` (the binomial(n, ½) count below the median, normal approximation).
fn median_interval(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (s[n / 2], s[lo], s[hi])
}

impl Measured {
    /// Median decode step of `generate`.
    fn gen_step(&self) -> f64 {
        median(&steps(&self.gen_new, &self.gen_1, self.p))
    }
    /// Median decode step of the mode.
    fn ee_step(&self) -> f64 {
        median(&steps(&self.ee_new, &self.ee_1, self.p))
    }
    /// Each rep's ratio of step times (the two calls of a rep ran back to back, so a busy
    /// moment of the machine mostly hits both).
    fn ratios(&self) -> Vec<f64> {
        let (g, e) = (steps(&self.gen_new, &self.gen_1, self.p), steps(&self.ee_new, &self.ee_1, self.p));
        g.iter().zip(&e).map(|(g, e)| g / e).collect()
    }
    /// The measured speed-up: the median over reps of each rep's ratio.
    fn speedup(&self) -> f64 {
        median(&self.ratios())
    }
    /// The 95 % interval of the paired median.
    fn interval(&self) -> (f64, f64) {
        let (_, lo, hi) = median_interval(&self.ratios());
        (lo, hi)
    }
    /// The speed-up of the best (least disturbed) reps: `(min t_new − min t_1)` of each.
    fn speedup_best(&self) -> f64 {
        (min(&self.gen_new) - min(&self.gen_1)) / (min(&self.ee_new) - min(&self.ee_1))
    }
    /// Whole calls, prefill included: the median of each rep's ratio.
    fn speedup_e2e(&self) -> f64 {
        median(&self.gen_new.iter().zip(&self.ee_new).map(|(g, e)| g / e).collect::<Vec<_>>())
    }
    /// The ideal step times of `generate` and of the mode, from the cost model.
    fn ideal(&self, cm: &CostModel) -> (f64, Phases) {
        let steps = self.p.steps() as f64;
        let phases = match self.mode {
            Mode::Exit(rule) => cm.early_exit(&self.stats.routes, &rule),
            Mode::Speculate(_) => cm.speculative(&self.stats.speculation),
        };
        (cm.full_depth(self.batch).total() / steps, phases)
    }
}

/// One generation (greedy) in `mode`: its wall time, tokens and statistics; `profile`
/// switches the phase timer on (off for the timed runs, so they pay nothing for it).
fn run(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    new: usize,
    mode: Mode,
    profile: bool,
) -> (f64, Vec<Vec<usize>>, EarlyExitStats) {
    let options = mode.options(new, profile);
    let t = Instant::now();
    let (out, stats) = model.generate_with(prompts, &options).expect("generate_with");
    let dt = t.elapsed().as_secs_f64();
    (dt, black_box(out), stats)
}

fn generate(model: &LegoTransformer, prompts: &[Vec<usize>], new: usize) -> (f64, Vec<Vec<usize>>) {
    let t = Instant::now();
    let out = model.generate(prompts, new, &Sampling::greedy()).expect("generate");
    let dt = t.elapsed().as_secs_f64();
    (dt, black_box(out))
}

/// The threshold at which about `target` of the generated tokens exit under `measure`. A
/// first guess is the quantile of the exit confidences seen while generating at full depth;
/// routing changes the tokens and so the confidences, so the guess is then refined by
/// bisection on the measured shallow ratio (which falls as the threshold rises). Returns the
/// best threshold tried.
fn calibrate(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    p: Protocol,
    target: f64,
    measure: ExitMeasure,
    fill: UpperCacheFill,
) -> f32 {
    if target <= 0.0 {
        return 2.0; // above any confidence: nothing exits
    }
    if target >= 1.0 {
        return 0.0; // every confidence is at or above 0: everything exits
    }
    let rule = |t: f32| Mode::Exit(ExitRule { threshold: t, fill, measure });
    let stats = run(model, prompts, p.new, rule(2.0), false).2;
    let mut all: Vec<f32> = stats.confidences.iter().flatten().copied().collect();
    all.sort_by(f32::total_cmp);
    let k = (((1.0 - target) * all.len() as f64).round() as usize).min(all.len() - 1);
    // Bracket: at `lo` too many tokens exit (ratio >= target), at `hi` too few.
    let (mut lo, mut hi) = (0.0f32, 1.0f32.next_up());
    let mut t = all[k];
    let mut best = (f64::INFINITY, t);
    for _ in 0..pick(10, 3) {
        let ratio = run(model, prompts, p.new, rule(t), false).2.shallow_ratio;
        let err = (ratio - target).abs();
        if err < best.0 {
            best = (err, t);
        }
        if err < 0.01 {
            break;
        }
        if ratio > target {
            lo = t;
        } else {
            hi = t;
        }
        t = 0.5 * (lo + hi);
    }
    best.1
}

/// Times `generate` and `mode` side by side, A B A B ...; the phase split from runs of their
/// own with the timer on (the first few reps). Self-speculative decoding is lossless: its
/// greedy tokens must equal `generate`'s, and the bench panics if they do not.
fn time_mode(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    p: Protocol,
    target: f64,
    mode: Mode,
    reps: usize,
) -> Measured {
    // Warm-up, and the lossless check.
    let (_, full) = generate(model, prompts, p.new);
    let (_, out, _) = run(model, prompts, p.new, mode, false);
    if let Mode::Speculate(spec) = mode {
        assert_eq!(out, full, "self-speculative decoding ({spec:?}) gave tokens that differ from generate's");
    }
    let (mut g_new, mut g1, mut e_new, mut e1) = (vec![], vec![], vec![], vec![]);
    let mut splits: Vec<TimeSplit> = Vec::new();
    let mut stats = EarlyExitStats::default();
    for rep in 0..reps {
        g1.push(generate(model, prompts, 1).0);
        g_new.push(generate(model, prompts, p.new).0);
        e1.push(run(model, prompts, 1, mode, false).0);
        let (t, _, s) = run(model, prompts, p.new, mode, false);
        e_new.push(t);
        stats = s;
        if rep < 9 {
            splits.push(run(model, prompts, p.new, mode, true).2.time);
        }
    }
    let per_step = |f: fn(&TimeSplit) -> f64| {
        median(&splits.iter().map(|s| f(s) / p.steps() as f64).collect::<Vec<_>>())
    };
    let split = TimeSplit {
        prefill: median(&splits.iter().map(|s| s.prefill).collect::<Vec<_>>()),
        lower: per_step(|s| s.lower),
        exit_check: per_step(|s| s.exit_check),
        upper: per_step(|s| s.upper + s.head),
        head: 0.0,
        upper_fill: per_step(|s| s.upper_fill),
        sampling: per_step(|s| s.sampling),
    };
    let steps_with_deep =
        (1..p.new).filter(|&s| stats.routes.iter().any(|r| r.get(s) == Some(&true))).count();
    Measured {
        batch: prompts.len(),
        mode,
        target,
        reps,
        p,
        gen_new: g_new,
        gen_1: g1,
        ee_new: e_new,
        ee_1: e1,
        stats,
        split,
        steps_with_deep,
    }
}

// ----- the PyTorch peer --------------------------------------------------------------------

/// PyTorch's decode new tokens/s at config `name` for `batch`, if the peer is to run and works.
fn torch_decode(name: &str, batch: usize, threads: usize) -> Option<f64> {
    let want = match std::env::var("LEGO_BENCH_PEER").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !quick(),
    };
    if !want {
        return None;
    }
    // The peer scripts sit in ../shared beside the repository, or where LEGO_PEERS points.
    let peers = std::env::var_os("LEGO_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers"));
    let script = Some(peers.join("torch_bench.py")).filter(|p| p.exists())?;
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["decode", name, "3", &threads.to_string(), &batch.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("RESULT"))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("new_tok_per_s_median=")).and_then(|v| v.parse().ok())
}

// ----- report ------------------------------------------------------------------------------

fn us(s: f64) -> f64 {
    s * 1e6
}

fn main() {
    let t_start = Instant::now();
    println!(
        "early-exit bench{}: {} threads, SIMD {:?}, load average {}",
        if quick() { " (QUICK: rough numbers)" } else { "" },
        rayon::current_num_threads(),
        simd::level(),
        load_average()
    );
    let configs: Vec<&'static str> = std::env::var("LEGO_BENCH_CONFIGS")
        .unwrap_or_else(|_| "T,S".into())
        .split(',')
        .map(|n| match n.trim() {
            "T" | "t" => "T",
            "S" | "s" => "S",
            other => panic!("LEGO_BENCH_CONFIGS: T and/or S, got {other:?}"),
        })
        .collect();
    let batch_sizes: Vec<usize> = std::env::var("LEGO_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| b.trim().parse().expect("LEGO_BENCH_BATCHES: numbers from 1 to 8"))
        .collect();
    let mut csv = String::from(
        "config,batch,mode,measure,fill,target_shallow,threshold,prompt,new,shallow_ratio,steps_with_deep,reps,\
         gen_step_us,ee_step_us,speedup_measured,speedup_ci_lo,speedup_ci_hi,speedup_best,speedup_e2e,\
         ideal_gen_step_us,ideal_ee_step_us,speedup_ideal,efficiency,efficiency_best,\
         layer_saving,flop_saving,gen_tok_s,ee_tok_s,\
         ee_lower_us,ee_exit_check_us,ee_upper_us,ee_upper_fill_us,ee_sampling_us,ee_other_us,\
         ideal_lower_us,ideal_exit_check_us,ideal_upper_us,ideal_fill_us,\
         ee_prefill_ms,gen_1_ms,ee_1_ms,gen_new_ms,ee_new_ms,\
         drafted,accepted,acceptance_rate,rounds,\
         bandwidth_gb_s,gemm_gflop_s_at_batch,threads,load_busy\n",
    );
    for name in configs {
        bench_config(name, &batch_sizes, &mut csv);
    }
    let csv_path = std::env::var_os("LEGO_BENCH_CSV")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench-early-exit.csv"));
    match std::fs::write(&csv_path, csv) {
        Ok(()) => println!("\nCSV: {}", csv_path.display()),
        Err(e) => println!("\nCSV not written to {}: {e}", csv_path.display()),
    }
    println!(
        "total bench time {:.0} s, load average now {}",
        t_start.elapsed().as_secs_f64(),
        load_average()
    );
}

/// Trains (or loads) config `name`, times every mode at every batch size, prints its tables
/// and appends its CSV rows.
fn bench_config(name: &'static str, batch_sizes: &[usize], csv: &mut String) {
    println!();
    println!("===== config {name} =====");
    let subject = subject(name);
    let model = &subject.model;
    let c = &model.config;
    let p = subject.protocol;
    println!("model: {}", subject.description);
    if let Some(why) = &subject.no_gate {
        println!("  {why}");
    }

    let machine = measure_machine(c);
    let cm = CostModel { c, m: &machine, p };
    println!(
        "machine: read bandwidth {:.1} GB/s on the decoder's {} thread(s) ({:.1} on 1), over the \
         model's own {:.2} MB (all layers, both heads)",
        machine.bandwidth / 1e9,
        machine.threads,
        machine.bandwidth_1thread / 1e9,
        model_bytes(c) / 1e6
    );
    let mut line = String::from("  GEMM GFLOP/s (one layer's decode shapes, hot) rows:");
    for m in [1, 2, 4, 8] {
        let _ = write!(
            line,
            "  m={m} {:.0} kernel / {:.0} as called",
            machine.gemm[m] / 1e9,
            machine.gemm_split[m] / 1e9
        );
    }
    println!("{line}");
    println!(
        "  weights: layer {:.3} MB, head {:.3} MB; full-depth token reads {:.3} MB, a shallow one {:.3} MB",
        cm.layer_bytes() / 1e6,
        cm.head_bytes() / 1e6,
        (c.num_layers as f64 * cm.layer_bytes() + cm.head_bytes()) / 1e6,
        (c.exit_layer as f64 * cm.layer_bytes() + cm.head_bytes()) / 1e6,
    );

    let busy = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()))
        .is_some_and(|l| l > rayon::current_num_threads() as f64 + 0.5);
    if busy {
        println!(
            "  NOTE: the machine is busy (load average {}) with other work: every time is \
             disturbed; paired ratios and the best reps are the figures to trust",
            load_average()
        );
    }

    // ----- calibrate and time, at each batch size -----
    let mut results: Vec<Measured> = Vec::new();
    let mut full_splits: Vec<(usize, FullSplit)> = Vec::new();
    let mut anatomies: Vec<(usize, Anatomy)> = Vec::new();
    let has_gate = subject.no_gate.is_none() && model.exit_gate.is_some();
    for &batch in batch_sizes {
        assert!((1..=8).contains(&batch), "batch {batch}: 1 to 8 prompts");
        let prompts = &subject.prompts[..batch];
        // The gate rows are the issue's measure: >= 31 paired reps at batch 1.
        let reps = pick(if batch == 1 { 31 } else { 21 }, 3);
        let reps_other = pick(if batch == 1 { 15 } else { 11 }, 3);
        eprintln!(
            "config {name}, batch {batch}: calibrating and timing ({reps} reps a gate row, {reps_other} others)"
        );
        let mut measures = vec![(ExitMeasure::MaxSoftmax, reps_other)];
        if has_gate {
            measures.insert(0, (ExitMeasure::Gate, reps));
        }
        for (measure, reps) in measures {
            let mut at_half = 2.0;
            for &target in &TARGETS {
                let th = calibrate(model, prompts, p, target, measure, UpperCacheFill::Skip);
                if target == 0.5 {
                    at_half = th;
                }
                let rule = ExitRule { threshold: th, fill: UpperCacheFill::Skip, measure };
                results.push(time_mode(model, prompts, p, target, Mode::Exit(rule), reps));
            }
            for fill in [UpperCacheFill::Propagate, UpperCacheFill::Deferred] {
                let rule = ExitRule { threshold: at_half, fill, measure };
                results.push(time_mode(model, prompts, p, 0.5, Mode::Exit(rule), reps_other));
            }
        }
        let adaptive = c.routing_threshold.clamp(0.0, 1.0);
        for spec in [Speculation::fixed(2), Speculation::fixed(4), Speculation::adaptive(4, adaptive)] {
            results.push(time_mode(model, prompts, p, f64::NAN, Mode::Speculate(spec), reps_other));
        }
        full_splits.push((batch, full_depth_split(model, prompts, p, pick(5, 1))));
        anatomies.push((batch, anatomy(model, batch, pick(60, 10))));
    }

    // ----- the main tables: one per batch -----
    for &batch in batch_sizes {
        println!();
        println!(
            "config {name}, batch {batch}: early exit (prompt {}, {} new tokens = 1 from the prefill + {} \
             one-token steps, greedy). µs per step (one token for each row); speed-up = generate / \
             early exit, the median of {}+ reps' paired ratios, [95 % interval]; 'best' = from each \
             side's fastest reps; efficiency = measured / ideal",
            p.prompt,
            p.new,
            p.steps(),
            results.iter().filter(|r| r.batch == batch).map(|r| r.reps).min().unwrap_or(0)
        );
        if batch > 1 {
            println!(
                "  (batch {batch}: a step runs the upper layers if any row goes deep, so the ideal at a \
                 middle share is below what the share alone suggests, and can be below 1)"
            );
        }
        println!(
            "{:>8} {:>9} {:>6} {:>8} {:>7} {:>5} {:>8} {:>8} {:>7} {:>15} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
            "measure",
            "fill",
            "target",
            "thresh",
            "shallow",
            "deep",
            "gen",
            "ee",
            "speedup",
            "95% interval",
            "best",
            "e2e",
            "ideal",
            "effic",
            "layer",
            "FLOP",
            "tok/s"
        );
        println!(
            "{:>8} {:>9} {:>6} {:>8} {:>7} {:>5} {:>8} {:>8} {:>7} {:>15} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6}",
            "", "", "", "", "ratio", "steps", "µs", "µs", "", "", "", "", "", "", "saved", "saved", "(ee)"
        );
        for r in results.iter().filter(|r| r.batch == batch) {
            let Mode::Exit(rule) = r.mode else { continue };
            let (ideal_gen, ip) = r.ideal(&cm);
            let ideal = ideal_gen / (ip.total() / p.steps() as f64);
            let (lo, hi) = r.interval();
            println!(
                "{:>8} {:>9} {:>5.0}% {:>8.4} {:>6.1}% {:>5} {:>8.1} {:>8.1} {:>6.3}x  [{:.3}, {:.3}] {:>6.3}x {:>6.3}x {:>6.3}x {:>6.3} {:>5.1}% {:>5.1}% {:>6.0}",
                rule.measure.name(),
                rule.fill.name(),
                100.0 * r.target,
                rule.threshold,
                100.0 * r.stats.shallow_ratio,
                r.steps_with_deep,
                us(r.gen_step()),
                us(r.ee_step()),
                r.speedup(),
                lo,
                hi,
                r.speedup_best(),
                r.speedup_e2e(),
                ideal,
                r.speedup() / ideal,
                100.0 * (1.0 - r.stats.actual_compute_cost),
                100.0 * (1.0 - r.stats.flop_cost),
                r.batch as f64 / r.ee_step(),
            );
        }
        // Deferred beside Skip and Propagate: the extra µs a token.
        for measure in [ExitMeasure::Gate, ExitMeasure::MaxSoftmax] {
            let at = |fill: UpperCacheFill| {
                results.iter().find(|r| {
                    r.batch == batch
                        && r.target == 0.5
                        && matches!(r.mode, Mode::Exit(x) if x.measure == measure && x.fill == fill)
                })
            };
            if let (Some(skip), Some(prop), Some(def)) =
                (at(UpperCacheFill::Skip), at(UpperCacheFill::Propagate), at(UpperCacheFill::Deferred))
            {
                let per_token = |r: &Measured| us(r.ee_step()) / batch as f64;
                println!(
                    "  {} at 50 %: upper-cache fill costs a token {:.1} µs (skip) / {:.1} (propagate, {:+.1}) \
                     / {:.1} (deferred, {:+.1}, exact upper states)",
                    measure.name(),
                    per_token(skip),
                    per_token(prop),
                    per_token(prop) - per_token(skip),
                    per_token(def),
                    per_token(def) - per_token(skip),
                );
            }
        }
        println!(
            "  deep steps: decode steps (of {}) with at least one deep row; layer saved = \
             1 − actual_compute_cost, FLOP saved = 1 − flop_cost (the spec's figures, from the stats)",
            p.steps()
        );

        // Self-speculative decoding.
        println!();
        println!(
            "config {name}, batch {batch}: lossless self-speculative decoding (draft: layers 0..{} and the \
             exit head; check: the upper layers over the drafted positions). alpha = accepted / drafted; \
             ideal = the cost model over the run's counts (draft steps, exit-head steps and check \
             passes, each at its mean width, contexts at mid-run); ideal* = every piece at its measured \
             cost (the draft's lower passes and exit heads, the check passes, from the phase timer) \
             against generate's measured step: effic* = the share of the time spent in those pieces \
             (the rest is accepting, rolling back and the loop)",
            c.exit_layer
        );
        println!(
            "{:>20} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8} {:>7} {:>15} {:>7} {:>7} {:>6} {:>7} {:>6} {:>10}",
            "mode",
            "drafted",
            "accept",
            "alpha",
            "checks",
            "gen µs",
            "spec µs",
            "speedup",
            "95% interval",
            "best",
            "ideal",
            "effic",
            "ideal*",
            "effic*",
            "= generate"
        );
        for r in results.iter().filter(|r| r.batch == batch) {
            let Mode::Speculate(_) = r.mode else { continue };
            let (ideal_gen, ip) = r.ideal(&cm);
            let ideal = ideal_gen / (ip.total() / p.steps() as f64);
            let (lo, hi) = r.interval();
            let sp = &r.stats.speculation;
            // Every piece at its measured cost, per decode step (the split's `upper` holds the
            // check's upper layers and deep head).
            let pieces = r.split.lower + r.split.exit_check + r.split.upper;
            let ideal_measured = r.gen_step() / pieces;
            println!(
                "{:>20} {:>7} {:>7} {:>6.3} {:>6} {:>8.1} {:>8.1} {:>6.3}x  [{:.3}, {:.3}] {:>6.3}x {:>6.3}x {:>6.3} {:>6.3}x {:>6.3} {:>10}",
                r.mode.names().0,
                sp.drafted,
                sp.accepted,
                sp.acceptance_rate,
                sp.rounds,
                us(r.gen_step()),
                us(r.ee_step()),
                r.speedup(),
                lo,
                hi,
                r.speedup_best(),
                ideal,
                r.speedup() / ideal,
                ideal_measured,
                r.speedup() / ideal_measured,
                "yes",
            );
        }
        println!(
            "  '= generate': the greedy tokens equal generate's, token for token (checked every run; the bench panics otherwise)"
        );
    }
    for r in &results {
        let (ideal_gen, ip) = r.ideal(&cm);
        let ideal_ee = ip.total() / p.steps() as f64;
        let ideal = ideal_gen / ideal_ee;
        let s = &r.split;
        let other = r.ee_step() - (s.lower + s.exit_check + s.upper + s.upper_fill + s.sampling);
        let per = |x: f64| us(x / p.steps() as f64);
        let (lo, hi) = r.interval();
        let (measure, fill) = r.mode.names();
        let (mode, threshold) = match r.mode {
            Mode::Exit(rule) => ("early_exit", rule.threshold),
            Mode::Speculate(sp) => ("speculative", sp.stop_below.unwrap_or(f32::NAN)),
        };
        let sp = &r.stats.speculation;
        let _ = writeln!(
            csv,
            "{name},{},{mode},{measure},{fill},{},{},{},{},{:.4},{},{},{:.2},{:.2},{:.4},{:.4},{:.4},{:.4},{:.4},\
             {:.2},{:.2},{:.4},{:.4},{:.4},\
             {:.4},{:.4},{:.1},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},\
             {:.3},{:.3},{:.3},{:.3},{:.3},{},{},{:.4},{},{:.2},{:.1},{},{}",
            r.batch,
            r.target,
            threshold,
            p.prompt,
            p.new,
            r.stats.shallow_ratio,
            r.steps_with_deep,
            r.reps,
            us(r.gen_step()),
            us(r.ee_step()),
            r.speedup(),
            lo,
            hi,
            r.speedup_best(),
            r.speedup_e2e(),
            us(ideal_gen),
            us(ideal_ee),
            ideal,
            r.speedup() / ideal,
            r.speedup_best() / ideal,
            1.0 - r.stats.actual_compute_cost,
            1.0 - r.stats.flop_cost,
            r.batch as f64 / r.gen_step(),
            r.batch as f64 / r.ee_step(),
            us(s.lower),
            us(s.exit_check),
            us(s.upper),
            us(s.upper_fill),
            us(s.sampling),
            us(other),
            per(ip.lower),
            per(ip.exit_check),
            per(ip.upper),
            per(ip.fill),
            s.prefill * 1e3,
            median(&r.gen_1) * 1e3,
            median(&r.ee_1) * 1e3,
            median(&r.gen_new) * 1e3,
            median(&r.ee_new) * 1e3,
            sp.drafted,
            sp.accepted,
            sp.acceptance_rate,
            sp.rounds,
            machine.bandwidth / 1e9,
            machine.gemm_rate(r.batch) / 1e9,
            machine.threads,
            busy,
        );
    }
    // ----- where the time goes -----
    println!();
    println!(
        "config {name}: where a decode step's time goes, µs per step, measured / ideal (the cost model). \
         g = generate's measured / ideal step time (how far from the roofline generate itself \
         runs); 'excess' = measured − g × ideal: what a phase costs beyond running as close to \
         the roofline as generate does (the excesses add up to ee − g × ideal(ee))"
    );
    for (batch, f) in &full_splits {
        // The ideal of each piece on its own (upper layers without the head, and the head).
        let (mut il, mut iu, mut ih) = (0.0, 0.0, 0.0);
        let (exit, n) = (c.exit_layer, c.num_layers);
        for s in 1..p.new {
            let ctxs = vec![p.prompt + s; *batch];
            let (fl, by) = cm.layers(exit, &ctxs, false);
            il += cm.phase(fl, by, *batch) / p.steps() as f64;
            let (fl, by) = cm.layers(n - exit, &ctxs, false);
            iu += cm.phase(fl, by, *batch) / p.steps() as f64;
            ih += cm.phase(*batch as f64 * cost::head_flops(c), cm.head_bytes(), *batch) / p.steps() as f64;
        }
        println!(
            "  generate, batch {batch} (its loop replayed from the engine's pieces): lower {:.1} / \
             {:.1}, upper layers {:.1} / {:.1}, head {:.1} / {:.1}, sampling {:.1} / 0; sum \
             {:.1} / {:.1}",
            us(f.lower),
            us(il),
            us(f.upper),
            us(iu),
            us(f.head),
            us(ih),
            us(f.sampling),
            us(f.lower + f.upper + f.head + f.sampling),
            us(il + iu + ih),
        );
        if let Some((_, a)) = anatomies.iter().find(|(b, _)| b == batch) {
            let layer = (f.lower + f.upper) / n as f64;
            println!(
                "    one layer {:.1} µs (ideal {:.1}): its 7 products alone (a call each) {:.1}, the rest \
                 (attention over the cache, norms, RoPE, small-M transposes, residual adds) \
                 {:.1}; the head {:.1}, its product alone {:.1}; confidence of one row of V \
                 logits {:.1} µs (SIMD softmax of the row: {:.1})",
                us(layer),
                us((il + iu) / n as f64),
                us(a.products_per_layer),
                us(layer - a.products_per_layer),
                us(f.head),
                us(a.head_product),
                us(a.confidence_row),
                us(a.softmax_row),
            );
        }
    }
    println!(
        "{:>5} {:>17} {:>7} {:>15} {:>15} {:>15} {:>13} {:>6} {:>6} {:>7} | {:>5} | excess: {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "batch",
        "fill",
        "shallow",
        "lower",
        "exit check",
        "upper+head",
        "fill",
        "sample",
        "other",
        "prefill",
        "g",
        "lower",
        "exit",
        "upper",
        "fill",
        "sample",
        "other"
    );
    let names = ["lower", "exit check", "upper", "upper fill", "sampling", "other"];
    let mut short: Vec<String> = Vec::new();
    for r in &results {
        let Mode::Exit(rule) = r.mode else { continue };
        let (ideal_gen, ip) = r.ideal(&cm);
        let g = r.gen_step() / ideal_gen;
        let per = |x: f64| x / p.steps() as f64;
        let s = &r.split;
        let other = r.ee_step() - (s.lower + s.exit_check + s.upper + s.upper_fill + s.sampling);
        let measured = [s.lower, s.exit_check, s.upper, s.upper_fill, s.sampling, other];
        let ideal = [per(ip.lower), per(ip.exit_check), per(ip.upper), per(ip.fill), 0.0, 0.0];
        let excess: Vec<f64> = measured.iter().zip(&ideal).map(|(m, i)| m - g * i).collect();
        println!(
            "{:>5} {:>17} {:>6.1}% {:>7.1} / {:>5.1} {:>7.1} / {:>5.1} {:>7.1} / {:>5.1} {:>5.1} / {:>5.1} {:>6.1} {:>6.1} {:>5.2}ms | {:>5.2} |         {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
            r.batch,
            format!("{}/{}", rule.measure.name(), rule.fill.name()),
            100.0 * r.stats.shallow_ratio,
            us(measured[0]),
            us(ideal[0]),
            us(measured[1]),
            us(ideal[1]),
            us(measured[2]),
            us(ideal[2]),
            us(measured[3]),
            us(ideal[3]),
            us(measured[4]),
            us(measured[5]),
            s.prefill * 1e3,
            g,
            us(excess[0]),
            us(excess[1]),
            us(excess[2]),
            us(excess[3]),
            us(excess[4]),
            us(excess[5]),
        );
        let eff = r.speedup() / (ideal_gen / per(ip.total()));
        if eff < 0.9 {
            let (i, e) = excess.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("six phases");
            short.push(format!(
                "batch {} {}/{} at {:.0} % shallow: efficiency {:.3} (best reps {:.3}); the largest \
                 excess is the {} phase, {:.1} µs a step beyond g × ideal ({:.1} µs measured, \
                 {:.1} ideal, g = {:.2}); early exit takes {:.1} µs a step where g × ideal is {:.1}",
                r.batch,
                rule.measure.name(),
                rule.fill.name(),
                100.0 * r.stats.shallow_ratio,
                eff,
                r.speedup_best() / (ideal_gen / per(ip.total())),
                names[i],
                us(*e),
                us(measured[i]),
                us(ideal[i]),
                g,
                us(r.ee_step()),
                us(g * per(ip.total())),
            ));
        }
    }
    if short.is_empty() {
        println!("  every measurement reaches efficiency >= 0.9");
    } else {
        println!("  below efficiency 0.9:");
        for w in &short {
            println!("    {w}");
        }
    }

    // ----- the PyTorch peer, beside full-depth generate -----
    println!();
    println!("Full-depth generate beside PyTorch (config {name}, decode new tokens/s, same threads):");
    for &batch in batch_sizes {
        let gen_steps: Vec<f64> = results.iter().filter(|r| r.batch == batch).map(|r| r.gen_step()).collect();
        let ours = batch as f64 / median(&gen_steps);
        let peers_md = match (name, batch) {
            ("S", 1) => Some(820.0),
            ("S", 8) => Some(3880.0),
            _ => None,
        };
        let md = peers_md.map_or(String::new(), |p| format!("; PEERS.md PyTorch {p:.0} -> {:.2}x", ours / p));
        match torch_decode(name, batch, machine.threads) {
            Some(t) => println!(
                "  batch {batch}: lego generate {ours:.0} tok/s, PyTorch run now {t:.0} -> {:.2}x{md}",
                ours / t
            ),
            None => println!(
                "  batch {batch}: lego generate {ours:.0} tok/s; PyTorch not run (quick run, \
                 LEGO_BENCH_PEER=0, or torch not importable){md}"
            ),
        }
    }
}
