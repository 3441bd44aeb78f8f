//! TRUE early exit, measured: how much faster `generate_with_early_exit` really is than
//! `generate`, against what a cost model of this machine says it could be.
//!
//! Run with `cargo bench --bench early_exit` (about five minutes on an idle machine, two and a
//! half of them training); `LEGO_BENCH_QUICK=1` makes it a smoke run (a barely trained model,
//! few reps); `LEGO_BENCH_BATCHES=1,8` picks the batch sizes.
//!
//! **The model.** Confidences mean nothing on an untrained model (the spec's lesson 1), so the
//! bench trains one, at config **S** (V = 4096, D = 256, N = 4, H = 8, F = 688), on the
//! synthetic corpus ([`generate_corpus`], 80 stories) with the word tokenizer fitted on the
//! training split (capped at 4096 words; if the corpus has fewer distinct words the unused
//! ids simply never occur, so every product still has config S's sizes): phase 1 trains 2
//! layers for 90 s, the threshold is calibrated at 50 % hard on the validation split, the hard
//! examples of 192 training sequences are collected, the model is `extend`ed to 4 layers
//! (lower part and exit head frozen) and phase 2 trains the upper layers on the hard examples
//! for about 35 s (the pipeline of `tests/pipeline.rs`). The exit is at layer 2 = N/2. The
//! trained model is saved to `target/bench-early-exit-model.safetensors` (with its tokenizer);
//! `LEGO_BENCH_CKPT=<path>` loads a model instead of training one (`LegoTransformer::load`).
//!
//! **What is timed.** Prompts of 16 tokens from the held-out test stories, 128 new tokens,
//! greedy, at batch 1 and 8, on rayon's default pool. For thresholds calibrated to send about
//! 0, 25, 50, 75 and 100 % of the generated tokens out at the exit (upper-cache fill `Skip`),
//! and 50 % with `Propagate`, the reps alternate `generate` and `generate_with_early_exit`
//! (A B A B ...), each also with a single new token (the prefill alone), so that
//!
//! ```text
//! time per decode step = (median t(128 new tokens) − median t(1 new token)) / 127
//! measured speed-up    = step time of generate / step time of generate_with_early_exit
//! ```
//!
//! (127 one-token steps follow the prefill, which makes the first token.) The end-to-end
//! ratio of whole calls, prefill included, is shown beside it.
//!
//! **The cost model** (the "ideal"). Each phase of a decode step costs the larger of its FLOPs
//! at the GEMM rate and its bytes at the memory bandwidth, both measured here:
//!
//! - *bandwidth*: two threads each stream half of a buffer as large as the model's weights
//!   (all layers and both heads, about 21 MB: the working set a decode step cycles through)
//!   with the SIMD dot kernel; bytes / median time of a pass.
//! - *GEMM rate at m rows* (m = 1..8): the decode shapes of one layer (4 × D×D, 2 × F×D,
//!   1 × D×F) through the SIMD small-M kernel `simd::matmul_xwt` with the weights hot in
//!   cache, one private copy per thread, all threads at once, many calls per task (so no
//!   dispatch cost): the compute roof of our kernel. (The rate of `matmul_xwt_split`, the
//!   way the engine calls it, dispatch included, is shown too, for the diagnosis.)
//!
//! The phases of a step, and what they are charged (bytes are f32 weights plus the KV cache
//! entries read by attention, `2·ctx·D·4` per row and layer):
//!
//! ```text
//! lower      layers 0..exit, every row                 weights of layers 0..exit
//! exit check the exit head, every row                  V×D
//! upper      layers exit..N + the final head, the deep rows only; charged only on steps
//!            where at least one row goes deep, and then the weights are read whole once
//! fill       (Propagate) Wk, Wv of each upper layer for the rows that exited
//! ```
//!
//! `generate` is charged the same way (lower + upper with every row, no exit check). The
//! ideal speed-up is Σ ideal(generate) / Σ ideal(early exit) over the run's 127 steps, with the
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
//! alone (timed over the model's real weights) and the rest (attention over the cache, norms,
//! RoPE, ...), and the exit check's confidence pass over V logits is timed on its own.
//!
//! Also printed: the spec's layer-compute saving `1 − actual_compute_cost` and the FLOP saving
//! `1 − flop_cost`, and (if `python3 -c "import torch"` works, in a full run; force with
//! `LEGO_BENCH_PEER=1`, skip with `=0`) PyTorch's decode rate from
//! `../shared/peers/torch_bench.py decode S 3 <threads> <batch>`, run right after ours.
//!
//! On a shared machine every time is disturbed by the other work; the reps are paired (the
//! speed-up is the median of each rep's own ratio) and the ratio of the fastest reps is shown
//! too. The bench says when the load average was above the thread count.
//!
//! Output: a table on stdout and `target/bench-early-exit.csv` (`LEGO_BENCH_CSV=path`).

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
use lego::kernels::gemm::matmul_xwt_split;
use lego::kernels::simd;
use lego::model::{
    EarlyExitStats, ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling, UpperCacheFill, cost,
    early_exit::TimeSplit,
};
use lego::optim::{AdamW, AdamWConfig};
use lego::train::{
    Phase2Mode, TrainOptions, Trainer, collect_hard_examples, compute_confidence_threshold,
    create_hard_example_loader,
};
use rand::Rng;
use rayon::prelude::*;

/// Prompt length and new tokens per row (as PEERS.md's decode table).
const PROMPT: usize = 16;
const NEW: usize = 128;
/// One-token decode steps after the prefill.
const STEPS: usize = NEW - 1;
/// Training sequence length and batch (config S's training shape).
const TRAIN_SEQ: usize = 128;
const TRAIN_BATCH: usize = 16;
/// Target shares of generated tokens that exit at the exit layer.
const TARGETS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

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
    /// Prompts of `PROMPT` tokens from held-out text (8 of them).
    prompts: Vec<Vec<usize>>,
    description: String,
}

/// The synthetic corpus split into train / validation / test stories (the same every run).
fn corpus() -> (Vec<Document>, Vec<Document>, Vec<Document>) {
    let docs = generate_corpus(&SyntheticConfig { documents: 80, bytes_per_document: 10_000, seed: 0 });
    let split = split_documents(docs, 4, 4, 42).expect("80 stories split");
    (split.train, split.val, split.test)
}

/// Eight prompts of `PROMPT` tokens spread over the test stories.
fn prompts_from(tokenizer: &Tokenizer, test: &[Document]) -> Vec<Vec<usize>> {
    let streams: Vec<Vec<usize>> = test.iter().map(|d| tokenizer.encode(&d.text)).collect();
    (0..8)
        .map(|i| {
            let s = &streams[i % streams.len()];
            let start = (i / streams.len()) * 97 + 23 * (i % 3);
            s[start..start + PROMPT].to_vec()
        })
        .collect()
}

/// Loads `LEGO_BENCH_CKPT`, or trains a model as the module doc says.
fn subject() -> Subject {
    let (train_docs, val_docs, test_docs) = corpus();
    if let Some(path) = std::env::var_os("LEGO_BENCH_CKPT") {
        let path = PathBuf::from(path);
        let (model, meta) = LegoTransformer::load(&path)
            .unwrap_or_else(|e| panic!("LEGO_BENCH_CKPT={}: {e}", path.display()));
        let c = &model.config;
        assert!(
            c.exit_layer > 0 && c.exit_layer < c.num_layers,
            "the checkpoint's exit layer {} leaves no lower or no upper part (N = {})",
            c.exit_layer,
            c.num_layers
        );
        assert!(c.max_seq_len >= PROMPT + NEW, "max_seq_len {} < {}", c.max_seq_len, PROMPT + NEW);
        let tokenizer = match meta.get("tokenizer") {
            Some(t) => Some(Tokenizer::from_json_str(t).expect("the checkpoint's tokenizer")),
            None if c.vocab_size == 256 => Some(Tokenizer::Byte),
            None => None,
        };
        let prompts = match &tokenizer {
            Some(t) => prompts_from(t, &test_docs),
            None => {
                let mut rng = Tensor::rng(5);
                (0..8).map(|_| (0..PROMPT).map(|_| rng.random_range(0..c.vocab_size)).collect()).collect()
            }
        };
        let description = format!(
            "loaded {} (V={} D={} N={} H={} F={}, exit at {}); prompts: {}",
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
            }
        );
        return Subject { model, prompts, description };
    }
    train(&train_docs, &val_docs, &test_docs)
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

fn train(train_docs: &[Document], val_docs: &[Document], test_docs: &[Document]) -> Subject {
    let t0 = Instant::now();
    let tokenizer = Tokenizer::word(train_docs, 4096).expect("word tokenizer");
    let words = tokenizer.vocab_size();
    // Config S; exit after the 2 layers of phase 1.
    let s = LegoConfig::s();
    let shallow_config = LegoConfig {
        exit_layer: 2,
        ..LegoConfig::new(s.vocab_size, s.dim, 2, s.num_heads, s.ffn_hidden, s.max_seq_len)
    };
    let train_seqs = sequences_from_documents(&tokenizer, train_docs, TRAIN_SEQ);
    let val_seqs = sequences_from_documents(&tokenizer, val_docs, TRAIN_SEQ);
    let val = batches(&val_seqs, TRAIN_BATCH, None).expect("validation batches");
    eprintln!(
        "training config S on the synthetic corpus: {} training sequences of {TRAIN_SEQ} tokens, \
         {} validation; word vocabulary {words} (model V = {})",
        train_seqs.len(),
        val_seqs.len(),
        s.vocab_size
    );

    // Phase 1: 2 layers on everything.
    let model = LegoTransformer::new(shallow_config, &mut Tensor::rng(1)).expect("model");
    let (rounds1, ppl1) = phase1(&model, &train_seqs, &val, pick(90.0, 6.0), pick(16, 4));

    // Calibrate at 50 % hard on the validation split; hard examples of the training split.
    let threshold = compute_confidence_threshold(&model, &val, 0.5).expect("threshold");
    let hard_source: Vec<Batch> =
        batches(&train_seqs, TRAIN_BATCH, Some(99)).expect("batches").into_iter().take(pick(12, 4)).collect();
    let hard = collect_hard_examples(&model, &hard_source, threshold).expect("hard examples");

    // Phase 2: 4 layers, lower part frozen, upper layers on the hard examples.
    let deep = model.extend(4, threshold, true, &mut Tensor::rng(2)).expect("extend");
    drop(model);
    let mut opt = AdamW::new(deep.trainable_params(), AdamWConfig { lr: 1e-3, ..Default::default() });
    let start2 = Instant::now();
    let budget2 = pick(35.0, 4.0);
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
                2,
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

    let path = target_dir().join("bench-early-exit-model.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("tokenizer".to_string(), tokenizer.to_json().to_string_compact());
    meta.insert("trained_by".to_string(), "benches/early_exit.rs".to_string());
    let saved = match deep.save(&path, &meta) {
        Ok(()) => format!("saved to {}", path.display()),
        Err(e) => format!("not saved ({e})"),
    };
    let description = format!(
        "trained here in {:.0} s: config S (V=4096 D=256 N=4 H=8 F=688), word tokenizer \
         ({words} words) on the synthetic corpus; phase 1 (2 layers) {rounds1} rounds of \
         {} batches of {TRAIN_BATCH}x{TRAIN_SEQ}, val PPL {ppl1:.2}; threshold {threshold:.4} \
         (50 % hard on val), {} hard tokens; phase 2 (layers 2-3) {epochs2} epochs, routed val \
         PPL {ppl2:.2}, full-depth val PPL {:.2}; exit at layer 2; {saved}",
        t0.elapsed().as_secs_f64(),
        pick(16, 4),
        hard.len(),
        full.ppl
    );
    Subject { prompts: prompts_from(&tokenizer, test_docs), model: deep, description }
}

// ----- the machine -------------------------------------------------------------------------

/// The two rates the cost model charges at.
struct Machine {
    threads: usize,
    /// Bytes/s streamed from a model-sized buffer by every thread at once.
    bandwidth: f64,
    /// The same on one thread.
    bandwidth_1thread: f64,
    /// FLOP/s of the small-M kernel on hot weights, all threads at once, for `m` rows
    /// (index m = 1..=8).
    gemm: [f64; 9],
    /// FLOP/s of `matmul_xwt_split` (the engine's call, thread dispatch included), hot weights.
    gemm_split: [f64; 9],
}

impl Machine {
    fn gemm_rate(&self, rows: usize) -> f64 {
        self.gemm[rows.clamp(1, 8)]
    }
}

/// Bytes/s of streaming `bytes` (summing with the SIMD dot kernel), on `threads` threads.
fn stream_rate(buf: &[f32], threads: usize, passes: usize) -> f64 {
    let chunk = buf.len().div_ceil(threads);
    let pass = || -> f32 {
        buf.par_chunks(chunk)
            .map(|c| {
                let h = c.len() / 2;
                simd::dot(&c[..h], &c[h..2 * h])
            })
            .sum()
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool");
    pool.install(|| {
        for _ in 0..3 {
            black_box(pass());
        }
        let times: Vec<f64> = (0..passes)
            .map(|_| {
                let t = Instant::now();
                black_box(pass());
                t.elapsed().as_secs_f64()
            })
            .collect();
        (buf.len() * 4) as f64 / median(&times)
    })
}

/// The decode shapes `(n, k, count)` of one layer's products `x·Wᵀ`, W `[n, k]`.
fn layer_shapes(c: &LegoConfig) -> [(usize, usize, usize); 3] {
    [(c.dim, c.dim, 4), (c.ffn_hidden, c.dim, 2), (c.dim, c.ffn_hidden, 1)]
}

/// FLOP/s of one layer's products for `m` rows: `simd::matmul_xwt` on every thread at once
/// with private hot weights (`split = false`), or `matmul_xwt_split` as the engine calls it.
fn gemm_rate(c: &LegoConfig, m: usize, threads: usize, split: bool, calls: usize) -> f64 {
    let shapes = layer_shapes(c);
    let (mut flops, mut seconds) = (0.0, 0.0);
    for (n, k, count) in shapes {
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 1e-2).collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 1e-2).collect();
        let per_call = if split {
            let mut out = vec![0.0f32; n * m];
            for _ in 0..20 {
                matmul_xwt_split(&x, m, k, &w, &mut out);
            }
            let samples: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..calls {
                        matmul_xwt_split(&x, m, k, &w, &mut out);
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

fn measure_machine(c: &LegoConfig) -> Machine {
    let threads = rayon::current_num_threads();
    // A buffer the size of the weights a decode step may touch: all layers and two heads.
    let words = c.num_layers * weights_per_layer(c) + 2 * c.vocab_size * c.dim;
    let buf: Vec<f32> = (0..words).map(|i| (i % 31) as f32 * 1e-3).collect();
    let passes = pick(40, 10);
    let bandwidth = stream_rate(&buf, threads, passes);
    let bandwidth_1thread = stream_rate(&buf, 1, passes);
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
        for s in 1..NEW {
            let ctxs = vec![PROMPT + s; batch];
            let (f, b) = self.layers(exit, &ctxs, false);
            p.lower += self.phase(f, b, batch);
            let (f, b) = self.layers(n - exit, &ctxs, true);
            p.upper += self.phase(f, b, batch);
        }
        p
    }

    /// `generate_with_early_exit`'s decode steps with this routing (`routes[row][token]`,
    /// token 0 routed by the prefill).
    fn early_exit(&self, routes: &[Vec<bool>], fill: UpperCacheFill) -> Phases {
        let (c, batch) = (self.c, routes.len());
        let (exit, n, d) = (c.exit_layer, c.num_layers, c.dim);
        let upper_layers = n - exit;
        // Entries each row holds in the upper cache: the prompt (the prefill runs every layer).
        let mut upper_len = vec![PROMPT; batch];
        let mut p = Phases::default();
        for s in 1..NEW {
            let ctxs = vec![PROMPT + s; batch];
            let (f, b) = self.layers(exit, &ctxs, false);
            p.lower += self.phase(f, b, batch);
            p.exit_check += self.phase(batch as f64 * cost::head_flops(c), self.head_bytes(), batch);
            let deep: Vec<usize> = (0..batch).filter(|&r| routes[r][s]).collect();
            let shallow = batch - deep.len();
            if !deep.is_empty() {
                let ctxs: Vec<usize> = deep.iter().map(|&r| upper_len[r] + 1).collect();
                let (f, b) = self.layers(upper_layers, &ctxs, true);
                p.upper += self.phase(f, b, deep.len());
            }
            if fill == UpperCacheFill::Propagate && shallow > 0 {
                let f = (shallow * upper_layers * 2 * 2 * d * d) as f64;
                let b = (upper_layers * 2 * d * d * 4) as f64;
                p.fill += self.phase(f, b, shallow);
            }
            for (len, route) in upper_len.iter_mut().zip(routes) {
                if route[s] || fill == UpperCacheFill::Propagate {
                    *len += 1;
                }
            }
        }
        p
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
fn full_depth_split(model: &LegoTransformer, prompts: &[Vec<usize>], reps: usize) -> FullSplit {
    let options = GenerateOptions { profile: true, ..GenerateOptions::greedy(NEW) };
    let mut samples: Vec<TimeSplit> = Vec::new();
    for rep in 0..reps + 1 {
        let (out, stats) = model.generate_with(prompts, &options).expect("generate_with");
        black_box(out);
        if rep > 0 {
            samples.push(stats.time);
        }
    }
    let med =
        |f: fn(&TimeSplit) -> f64| median(&samples.iter().map(|s| f(s) / STEPS as f64).collect::<Vec<_>>());
    FullSplit {
        lower: med(|s| s.lower),
        upper: med(|s| s.upper),
        head: med(|s| s.head),
        sampling: med(|s| s.sampling),
    }
}

/// The anatomy of a decode step, per step at one batch size (seconds).
struct Anatomy {
    /// One layer's seven products `x·Wᵀ` alone (`matmul_xwt_split`, as the engine calls
    /// them), cycling through every layer's real weights as a decode step does.
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
                matmul_xwt_split(&x[..batch * k], batch, *k, w, &mut out[..w.len() / k * batch]);
            }
        }
        let t1 = Instant::now();
        matmul_xwt_split(&x[..batch * d], batch, d, &head, &mut out[..v * batch]);
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

/// One threshold at one batch size, measured.
struct Measured {
    batch: usize,
    fill: UpperCacheFill,
    target: f64,
    threshold: f32,
    reps: usize,
    /// Per rep, seconds: whole calls with 128 and with 1 new token (rep i of each ran
    /// back to back: gen 1, gen 128, early exit 1, early exit 128).
    gen_128: Vec<f64>,
    gen_1: Vec<f64>,
    ee_128: Vec<f64>,
    ee_1: Vec<f64>,
    /// The early-exit run's statistics (the routing is the same every rep: greedy).
    stats: EarlyExitStats,
    /// Median over reps of each phase of `stats.time`, per decode step (prefill: per call).
    split: TimeSplit,
    /// Steps (of 127) on which at least one row went deep.
    steps_with_deep: usize,
}

/// Per rep: `(t128 − t1) / 127`, the time of one decode step.
fn steps(t128: &[f64], t1: &[f64]) -> Vec<f64> {
    t128.iter().zip(t1).map(|(a, b)| (a - b) / STEPS as f64).collect()
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Measured {
    /// Median decode step of `generate`.
    fn gen_step(&self) -> f64 {
        median(&steps(&self.gen_128, &self.gen_1))
    }
    /// Median decode step of `generate_with_early_exit`.
    fn ee_step(&self) -> f64 {
        median(&steps(&self.ee_128, &self.ee_1))
    }
    /// The measured speed-up: the median over reps of each rep's ratio (the two calls of a
    /// rep ran back to back, so a busy moment of the machine mostly hits both).
    fn speedup(&self) -> f64 {
        let (g, e) = (steps(&self.gen_128, &self.gen_1), steps(&self.ee_128, &self.ee_1));
        median(&g.iter().zip(&e).map(|(g, e)| g / e).collect::<Vec<_>>())
    }
    /// The speed-up of the best (least disturbed) reps: `(min t128 − min t1)` of each.
    fn speedup_best(&self) -> f64 {
        (min(&self.gen_128) - min(&self.gen_1)) / (min(&self.ee_128) - min(&self.ee_1))
    }
    /// Whole calls, prefill included: the median of each rep's ratio.
    fn speedup_e2e(&self) -> f64 {
        median(&self.gen_128.iter().zip(&self.ee_128).map(|(g, e)| g / e).collect::<Vec<_>>())
    }
}

fn fill_name(f: UpperCacheFill) -> &'static str {
    match f {
        UpperCacheFill::Skip => "skip",
        UpperCacheFill::Propagate => "propagate",
        UpperCacheFill::Deferred => "deferred",
    }
}

/// One early-exit generation (greedy), its wall time and statistics; `profile` switches the
/// phase timer on (off for the timed runs, so they pay nothing for it).
fn early_exit(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    new: usize,
    threshold: f32,
    fill: UpperCacheFill,
    profile: bool,
) -> (f64, EarlyExitStats) {
    let options =
        GenerateOptions { profile, ..GenerateOptions::greedy(new) }.with_exit(ExitRule::new(threshold, fill));
    let t = Instant::now();
    let (out, stats) = model.generate_with(prompts, &options).expect("generate_with (early exit)");
    let dt = t.elapsed().as_secs_f64();
    black_box(out);
    (dt, stats)
}

fn generate(model: &LegoTransformer, prompts: &[Vec<usize>], new: usize) -> f64 {
    let t = Instant::now();
    let out = model.generate(prompts, new, &Sampling::greedy()).expect("generate");
    let dt = t.elapsed().as_secs_f64();
    black_box(out);
    dt
}

/// The threshold at which about `target` of the generated tokens exit. A first guess is the
/// quantile of the exit confidences seen while generating at full depth; routing changes the
/// tokens and so the confidences, so the guess is then refined by bisection on the measured
/// shallow ratio (which falls as the threshold rises). Returns the best threshold tried.
fn calibrate(model: &LegoTransformer, prompts: &[Vec<usize>], target: f64, fill: UpperCacheFill) -> f32 {
    if target <= 0.0 {
        return 2.0; // above any confidence: nothing exits
    }
    if target >= 1.0 {
        return 0.0; // every confidence is at or above 0: everything exits
    }
    let (_, stats) = early_exit(model, prompts, NEW, 2.0, fill, false);
    let mut all: Vec<f32> = stats.confidences.iter().flatten().copied().collect();
    all.sort_by(f32::total_cmp);
    let k = (((1.0 - target) * all.len() as f64).round() as usize).min(all.len() - 1);
    // Bracket: at `lo` too many tokens exit (ratio >= target), at `hi` too few.
    let (mut lo, mut hi) = (0.0f32, 1.0f32.next_up());
    let mut t = all[k];
    let mut best = (f64::INFINITY, t);
    for _ in 0..pick(10, 3) {
        let ratio = early_exit(model, prompts, NEW, t, fill, false).1.shallow_ratio;
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

/// Times `generate` and `generate_with_early_exit` side by side, A B A B ...
fn measure(
    model: &LegoTransformer,
    prompts: &[Vec<usize>],
    target: f64,
    threshold: f32,
    fill: UpperCacheFill,
    reps: usize,
) -> Measured {
    // Warm-up.
    generate(model, prompts, NEW);
    early_exit(model, prompts, NEW, threshold, fill, false);
    let (mut g128, mut g1, mut e128, mut e1) = (vec![], vec![], vec![], vec![]);
    let mut splits: Vec<TimeSplit> = Vec::new();
    let mut stats = EarlyExitStats::default();
    for _ in 0..reps {
        g1.push(generate(model, prompts, 1));
        g128.push(generate(model, prompts, NEW));
        e1.push(early_exit(model, prompts, 1, threshold, fill, false).0);
        let (t, s) = early_exit(model, prompts, NEW, threshold, fill, false);
        e128.push(t);
        stats = s;
        // The phase split from a run of its own, with the timer on.
        splits.push(early_exit(model, prompts, NEW, threshold, fill, true).1.time);
    }
    let per_step =
        |f: fn(&TimeSplit) -> f64| median(&splits.iter().map(|s| f(s) / STEPS as f64).collect::<Vec<_>>());
    let split = TimeSplit {
        prefill: median(&splits.iter().map(|s| s.prefill).collect::<Vec<_>>()),
        lower: per_step(|s| s.lower),
        exit_check: per_step(|s| s.exit_check),
        upper: per_step(|s| s.upper + s.head),
        head: 0.0,
        upper_fill: per_step(|s| s.upper_fill),
        sampling: per_step(|s| s.sampling),
    };
    let steps_with_deep = (1..NEW).filter(|&s| stats.routes.iter().any(|r| r[s])).count();
    Measured {
        batch: prompts.len(),
        fill,
        target,
        threshold,
        reps,
        gen_128: g128,
        gen_1: g1,
        ee_128: e128,
        ee_1: e1,
        stats,
        split,
        steps_with_deep,
    }
}

// ----- the PyTorch peer --------------------------------------------------------------------

/// PyTorch's decode new tokens/s at config S for `batch`, if the peer is to run and works.
fn torch_decode(batch: usize, threads: usize) -> Option<f64> {
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
        .args(["decode", "S", "3", &threads.to_string(), &batch.to_string()])
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
    let subject = subject();
    let model = &subject.model;
    let c = &model.config;
    println!("model: {}", subject.description);

    let machine = measure_machine(c);
    let cm = CostModel { c, m: &machine };
    println!(
        "machine: stream bandwidth {:.1} GB/s on {} threads ({:.1} on 1), over {:.1} MB",
        machine.bandwidth / 1e9,
        machine.threads,
        machine.bandwidth_1thread / 1e9,
        (c.num_layers * weights_per_layer(c) + 2 * c.vocab_size * c.dim) as f64 * 4e-6
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
        "  weights: layer {:.2} MB, head {:.2} MB; full-depth token reads {:.2} MB, a shallow one {:.2} MB",
        cm.layer_bytes() / 1e6,
        cm.head_bytes() / 1e6,
        (c.num_layers as f64 * cm.layer_bytes() + cm.head_bytes()) / 1e6,
        (c.exit_layer as f64 * cm.layer_bytes() + cm.head_bytes()) / 1e6,
    );

    let busy = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()))
        .is_some_and(|l| l > machine.threads as f64 + 0.5);
    if busy {
        println!(
            "  NOTE: the machine is busy (load average {}) with other work: every time is \
             disturbed; paired ratios and the best reps are the figures to trust",
            load_average()
        );
    }

    // ----- calibrate and time, at each batch size -----
    let batch_sizes: Vec<usize> = std::env::var("LEGO_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|b| b.trim().parse().expect("LEGO_BENCH_BATCHES: numbers from 1 to 8"))
        .collect();
    let mut results: Vec<Measured> = Vec::new();
    let mut full_splits: Vec<(usize, FullSplit)> = Vec::new();
    let mut anatomies: Vec<(usize, Anatomy)> = Vec::new();
    for &batch in &batch_sizes {
        assert!((1..=8).contains(&batch), "batch {batch}: 1 to 8 prompts");
        let prompts = &subject.prompts[..batch];
        let reps = pick(if batch == 1 { 15 } else { 11 }, 2);
        eprintln!("batch {batch}: calibrating and timing ({reps} reps a threshold)");
        let mut thresholds = Vec::new();
        for &target in &TARGETS {
            let th = calibrate(model, prompts, target, UpperCacheFill::Skip);
            thresholds.push(th);
            results.push(measure(model, prompts, target, th, UpperCacheFill::Skip, reps));
        }
        results.push(measure(model, prompts, 0.5, thresholds[2], UpperCacheFill::Propagate, reps));
        full_splits.push((batch, full_depth_split(model, prompts, pick(5, 1))));
        anatomies.push((batch, anatomy(model, batch, pick(60, 10))));
    }

    // ----- the main table -----
    println!();
    println!(
        "Decode steps (prompt {PROMPT}, {NEW} new tokens = 1 from the prefill + {STEPS} one-token \
         steps, greedy). µs per step (one token for each row); speed-up = generate / early exit, \
         the median of the reps' paired ratios; 'best' = from each side's fastest reps; \
         efficiency = measured / ideal"
    );
    println!(
        "{:>5} {:>9} {:>6} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "batch",
        "fill",
        "target",
        "thresh",
        "shallow",
        "deep",
        "gen",
        "ee",
        "speedup",
        "best",
        "e2e",
        "ideal",
        "effic",
        "e.best",
        "layer",
        "FLOP",
        "tok/s"
    );
    println!(
        "{:>5} {:>9} {:>6} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "", "", "", "", "ratio", "steps", "µs", "µs", "", "", "", "", "", "", "saved", "saved", "(ee)"
    );
    let mut csv = String::from(
        "batch,fill,target_shallow,threshold,shallow_ratio,steps_with_deep,reps,\
         gen_step_us,ee_step_us,speedup_measured,speedup_best,speedup_e2e,\
         ideal_gen_step_us,ideal_ee_step_us,speedup_ideal,efficiency,efficiency_best,\
         layer_saving,flop_saving,gen_tok_s,ee_tok_s,\
         ee_lower_us,ee_exit_check_us,ee_upper_us,ee_upper_fill_us,ee_sampling_us,ee_other_us,\
         ideal_lower_us,ideal_exit_check_us,ideal_upper_us,ideal_fill_us,\
         ee_prefill_ms,gen_1_ms,ee_1_ms,gen_128_ms,ee_128_ms,\
         bandwidth_gb_s,gemm_gflop_s_at_batch,threads,load_busy\n",
    );
    for r in &results {
        let ideal_gen = cm.full_depth(r.batch).total() / STEPS as f64;
        let ip = cm.early_exit(&r.stats.routes, r.fill);
        let ideal_ee = ip.total() / STEPS as f64;
        let ideal = ideal_gen / ideal_ee;
        let s = &r.split;
        let other = r.ee_step() - (s.lower + s.exit_check + s.upper + s.upper_fill + s.sampling);
        println!(
            "{:>5} {:>9} {:>5.0}% {:>8.4} {:>6.1}% {:>6} {:>8.1} {:>8.1} {:>6.3}x {:>6.3}x {:>6.3}x {:>6.3}x {:>6.3} {:>6.3} {:>5.1}% {:>5.1}% {:>6.0}",
            r.batch,
            fill_name(r.fill),
            100.0 * r.target,
            r.threshold,
            100.0 * r.stats.shallow_ratio,
            r.steps_with_deep,
            us(r.gen_step()),
            us(r.ee_step()),
            r.speedup(),
            r.speedup_best(),
            r.speedup_e2e(),
            ideal,
            r.speedup() / ideal,
            r.speedup_best() / ideal,
            100.0 * (1.0 - r.stats.actual_compute_cost),
            100.0 * (1.0 - r.stats.flop_cost),
            r.batch as f64 / r.ee_step(),
        );
        let per = |x: f64| us(x / STEPS as f64);
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.4},{},{},{:.2},{:.2},{:.4},{:.4},{:.4},{:.2},{:.2},{:.4},{:.4},{:.4},\
             {:.4},{:.4},{:.1},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},\
             {:.3},{:.3},{:.3},{:.3},{:.3},{:.2},{:.1},{},{}",
            r.batch,
            fill_name(r.fill),
            r.target,
            r.threshold,
            r.stats.shallow_ratio,
            r.steps_with_deep,
            r.reps,
            us(r.gen_step()),
            us(r.ee_step()),
            r.speedup(),
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
            median(&r.gen_128) * 1e3,
            median(&r.ee_128) * 1e3,
            machine.bandwidth / 1e9,
            machine.gemm_rate(r.batch) / 1e9,
            machine.threads,
            busy,
        );
    }
    println!(
        "  deep steps: decode steps (of {STEPS}) with at least one deep row; layer saved = \
         1 − actual_compute_cost, FLOP saved = 1 − flop_cost (the spec's figures, from the stats)"
    );

    // ----- where the time goes -----
    println!();
    println!(
        "Where a decode step's time goes, µs per step, measured / ideal (the cost model). \
         g = generate's measured / ideal step time (how far from the roofline generate itself \
         runs); 'excess' = measured − g × ideal: what a phase costs beyond running as close to \
         the roofline as generate does (the excesses add up to ee − g × ideal(ee))"
    );
    for (batch, f) in &full_splits {
        // The ideal of each piece on its own (upper layers without the head, and the head).
        let (mut il, mut iu, mut ih) = (0.0, 0.0, 0.0);
        let (exit, n) = (c.exit_layer, c.num_layers);
        for s in 1..NEW {
            let ctxs = vec![PROMPT + s; *batch];
            let (fl, by) = cm.layers(exit, &ctxs, false);
            il += cm.phase(fl, by, *batch) / STEPS as f64;
            let (fl, by) = cm.layers(n - exit, &ctxs, false);
            iu += cm.phase(fl, by, *batch) / STEPS as f64;
            ih += cm.phase(*batch as f64 * cost::head_flops(c), cm.head_bytes(), *batch) / STEPS as f64;
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
                "    one layer {:.1} µs (ideal {:.1}): its 7 products alone {:.1}, the rest \
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
        "{:>5} {:>9} {:>7} {:>15} {:>15} {:>15} {:>13} {:>6} {:>6} {:>7} | {:>5} | excess: {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
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
        let ideal_gen = cm.full_depth(r.batch).total() / STEPS as f64;
        let g = r.gen_step() / ideal_gen;
        let ip = cm.early_exit(&r.stats.routes, r.fill);
        let per = |x: f64| x / STEPS as f64;
        let s = &r.split;
        let other = r.ee_step() - (s.lower + s.exit_check + s.upper + s.upper_fill + s.sampling);
        let measured = [s.lower, s.exit_check, s.upper, s.upper_fill, s.sampling, other];
        let ideal = [per(ip.lower), per(ip.exit_check), per(ip.upper), per(ip.fill), 0.0, 0.0];
        let excess: Vec<f64> = measured.iter().zip(&ideal).map(|(m, i)| m - g * i).collect();
        println!(
            "{:>5} {:>9} {:>6.1}% {:>7.1} / {:>5.1} {:>7.1} / {:>5.1} {:>7.1} / {:>5.1} {:>5.1} / {:>5.1} {:>6.1} {:>6.1} {:>5.2}ms | {:>5.2} |         {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1}",
            r.batch,
            fill_name(r.fill),
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
                "batch {} {} at {:.0} % shallow: efficiency {:.3} (best reps {:.3}); the largest \
                 excess is the {} phase, {:.1} µs a step beyond g × ideal ({:.1} µs measured, \
                 {:.1} ideal, g = {:.2}); early exit takes {:.1} µs a step where g × ideal is {:.1}",
                r.batch,
                fill_name(r.fill),
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
    println!("Full-depth generate beside PyTorch (config S, decode new tokens/s, same threads):");
    for &batch in &batch_sizes {
        let gen_steps: Vec<f64> = results.iter().filter(|r| r.batch == batch).map(|r| r.gen_step()).collect();
        let ours = batch as f64 / median(&gen_steps);
        let peers_md = match batch {
            1 => Some(820.0),
            8 => Some(3880.0),
            _ => None,
        };
        let md = peers_md.map_or(String::new(), |p| format!("; PEERS.md PyTorch {p:.0} -> {:.2}x", ours / p));
        match torch_decode(batch, machine.threads) {
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
