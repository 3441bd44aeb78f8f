//! Model benchmarks: decoding with the KV cache, prefill, and a whole training step, at the
//! reference configs, on 2 threads (rayon's default pool here) and on 1.
//!
//! Run with `cargo bench --bench model` (about three minutes); `LEGO_BENCH_QUICK=1` makes it a
//! smoke run (numbers then rough). What it measures, and how:
//!
//! - **decode**: new tokens/s of [`LegoTransformer::generate`] (greedy) at configs S and M,
//!   batch 1 and 8, prompt 16, 128 new tokens. The first new token comes out of the prefill,
//!   so `generate(.., 128, ..)` runs the prefill and then 127 one-token decode steps, and
//!   `generate(.., 1, ..)` the prefill alone. The decode part is their difference (both timed
//!   alternately, median of each), and the rate is `batch·127 / (t₁₂₈ − t₁)`: tokens per
//!   second of decode steps, the same thing PyTorch's peer reports (its loop runs 128 steps
//!   for 128 tokens). The end-to-end rate `batch·128 / t₁₂₈` is shown beside it.
//! - **prefill**: a 128-token prompt for each of 1 or 8 rows through the [`Decoder`] that
//!   `generate` uses (`begin`, every layer, the logits of each row's last token), on a decoder
//!   allocated once (its cache cleared between reps), so no allocation is timed.
//! - **train**: one step of `forward` → `cross_entropy` → `backward` → `AdamW::step` →
//!   `zero_grad` at T, S and M with the DEVELOPERS guide's batch × seq, random token ids and
//!   targets (drawn outside the timing). The split: forward (with the cross-entropy),
//!   backward, optimizer (step and zero_grad); the total also holds dropping the graph.
//!   Beside it: buffers a timed step still had to allocate (`miss/step`, 0 once the buffer
//!   pool covers a step), the most the pool has held (`pool MiB`) and the process's peak
//!   resident memory so far (`RSS MiB`, `VmHWM`; run one config alone to read its own).
//!
//! Every figure is the median over several reps after warm-up (the best rep is shown too: on
//! a shared 2-core machine the best is often the better estimate of what the code can do).
//!
//! Selecting what runs (all optional):
//!
//! - parts: `cargo bench --bench model -- decode train` or `LEGO_BENCH=decode,prefill,train`;
//! - `LEGO_BENCH_CONFIGS=T,S,M` (decode and prefill skip T: its max_seq_len is 64);
//! - `LEGO_BENCH_THREADS=2,1`, `LEGO_BENCH_BATCHES=1,8` (decode and prefill);
//! - `LEGO_BENCH_REPS=n` overrides the rep counts, `LEGO_BENCH_CSV=path` the CSV's path
//!   (default `target/bench-model.csv`).
//!
//! Each measurement also prints one `RESULT ...` line, which `scripts/bench-peers.sh` reads to
//! put our figures beside PyTorch's.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use lego::Tensor;
use lego::kernels::roofline::read_bandwidth;
use lego::kernels::team::decode_team;
use lego::model::decoder::decode_parts;
use lego::model::{Decoder, LegoConfig, LegoTransformer, Sampling, Tokens, cost};
use lego::optim::adamw::{AdamW, AdamWConfig};
use lego::tensor::pool;
use rand::Rng;

/// Prompt length and new tokens of the decode measurement (as PEERS.md's table).
const DECODE_PROMPT: usize = 16;
const DECODE_NEW: usize = 128;

/// The decode protocol for a config: prompt 16 + 128 new tokens, or for T (whose
/// `max_seq_len` is 64) prompt 8 + 56 new tokens.
fn decode_protocol(c: &LegoConfig) -> (usize, usize) {
    if c.max_seq_len >= DECODE_PROMPT + DECODE_NEW {
        (DECODE_PROMPT, DECODE_NEW)
    } else {
        (8, c.max_seq_len - 8)
    }
}
/// Prompt length of the prefill measurement.
const PREFILL_PROMPT: usize = 128;

/// One reference config with its training batch × seq (DEVELOPERS guide).
struct Reference {
    name: &'static str,
    config: LegoConfig,
    train_batch: usize,
    train_seq: usize,
    /// Timed training steps (after warm-up) in a full run: fewer for the slow configs.
    train_reps: usize,
}

fn references() -> Vec<Reference> {
    vec![
        Reference {
            name: "T",
            config: LegoConfig::t(), // V256 D64 N4 H4 F172, max_seq_len 64
            train_batch: 32,
            train_seq: 64,
            train_reps: 15,
        },
        Reference {
            name: "S",
            config: LegoConfig::s(), // V4096 D256 N4 H8 F688, max_seq_len 256
            train_batch: 16,
            train_seq: 128,
            train_reps: 9,
        },
        Reference {
            name: "M",
            config: LegoConfig::m(), // V8192 D512 N8 H8 F1376, max_seq_len 256
            train_batch: 8,
            train_seq: 256,
            train_reps: 5,
        },
    ]
}

// ----- settings from the environment -------------------------------------------------------

/// Whether `LEGO_BENCH_QUICK=1` asks for a smoke run.
fn quick() -> bool {
    std::env::var("LEGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Timed reps: `full` in a full run, 2 in a quick one, or `LEGO_BENCH_REPS` if set.
fn reps(full: usize) -> usize {
    if let Some(n) = std::env::var("LEGO_BENCH_REPS").ok().and_then(|v| v.parse::<usize>().ok()) {
        return n.max(1);
    }
    if quick() { 2 } else { full }
}

/// A comma-separated list from the environment, or `default`.
fn list_var(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Numbers from a comma-separated list in the environment, or `default`.
fn numbers_var(name: &str, default: &str) -> Vec<usize> {
    list_var(name, default)
        .iter()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name}: {s:?} is not a number")))
        .collect()
}

/// The parts to run: the command line's non-flag arguments, else `LEGO_BENCH`, else all.
fn parts() -> Vec<String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .flat_map(|a| a.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let parts = if args.is_empty() { list_var("LEGO_BENCH", "decode,prefill,train") } else { args };
    for p in &parts {
        assert!(
            ["decode", "prefill", "train"].contains(&p.as_str()),
            "unknown part {p:?}: choose from decode, prefill, train"
        );
    }
    parts
}

// ----- timing ------------------------------------------------------------------------------

/// The median and the smallest of some durations.
fn median_min(samples: &[Duration]) -> (Duration, Duration) {
    let mut s = samples.to_vec();
    s.sort();
    (s[s.len() / 2], s[0])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `f` on `threads` threads: rayon's global pool if it has that many, else a new pool.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads == rayon::current_num_threads() {
        return f();
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("could not build a rayon pool")
        .install(f)
}

/// `n` random token ids below `vocab`.
fn random_ids(n: usize, vocab: usize, rng: &mut impl Rng) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..vocab)).collect()
}

// ----- results -----------------------------------------------------------------------------

/// One measurement.
struct Row {
    part: &'static str,
    config: &'static str,
    batch: usize,
    /// Prompt length (decode, prefill) or sequence length (train).
    seq: usize,
    threads: usize,
    reps: usize,
    /// Tokens/s from the median times, and from the best ones.
    tok_s: f64,
    tok_s_best: f64,
    /// The median time of the measured unit (decode part, prefill, training step), ms.
    median_ms: f64,
    /// Extra columns: decode's end-to-end rate; train's forward / backward / optimizer split,
    /// the buffer pool's misses a step and peak size, and the process's peak RSS.
    extra: Vec<(&'static str, f64)>,
}

impl Row {
    fn extra(&self, key: &str) -> Option<f64> {
        self.extra.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The machine-readable line `scripts/bench-peers.sh` reads (the extra columns follow as
    /// `key=value`).
    fn result_line(&self) -> String {
        let mut line = format!(
            "RESULT lego part={} cfg={} batch={} seq={} threads={} reps={} tok_per_s_median={:.1} \
             tok_per_s_best={:.1} median_ms={:.3}",
            self.part,
            self.config,
            self.batch,
            self.seq,
            self.threads,
            self.reps,
            self.tok_s,
            self.tok_s_best,
            self.median_ms
        );
        for (k, v) in &self.extra {
            let _ = write!(line, " {k}={v:.3}");
        }
        line
    }
}

// ----- decode ------------------------------------------------------------------------------

/// Decode tokens/s of `generate` (prompt 16, 128 new tokens, greedy), from the difference of
/// `generate(.., 128, ..)` and `generate(.., 1, ..)`.
fn bench_decode(r: &Reference, model: &LegoTransformer, batch: usize, threads: usize) -> Row {
    let v = r.config.vocab_size;
    let mut rng = Tensor::rng(11);
    let (prompt_len, new_tokens) = decode_protocol(&r.config);
    let prompts: Vec<Vec<usize>> = (0..batch).map(|_| random_ids(prompt_len, v, &mut rng)).collect();
    let greedy = Sampling::greedy();
    let run = |new: usize| {
        let t = Instant::now();
        let out = model.generate(&prompts, new, &greedy).expect("generate failed");
        let dt = t.elapsed();
        assert_eq!(out[0].len(), prompt_len + new);
        black_box(out);
        dt
    };
    let n = reps(7);
    let (mut only_prefill, mut whole) = (Vec::new(), Vec::new());
    // One warm-up of each, then alternate, so that a busy moment hurts both alike.
    run(1);
    run(new_tokens);
    for _ in 0..n {
        only_prefill.push(run(1));
        whole.push(run(new_tokens));
    }
    let (p_med, p_min) = median_min(&only_prefill);
    let (w_med, w_min) = median_min(&whole);
    let steps = (new_tokens - 1) as f64;
    let decode_med = w_med.saturating_sub(p_med);
    let decode_best = w_min.saturating_sub(p_min);
    let rate = |d: Duration| batch as f64 * steps / d.as_secs_f64().max(1e-9);
    // The batch-1 roofline: the read bandwidth over a buffer of this model's weight size, on
    // as many threads as the decoder uses, divided by the weight bytes a token reads.
    let bytes = cost::weight_bytes_per_token(&r.config);
    let decoder_threads = decode_parts(&r.config, decode_team().size().min(threads));
    let bandwidth = read_bandwidth(decode_team(), bytes as usize, decoder_threads, reps(15));
    let roof = bandwidth / bytes;
    Row {
        part: "decode",
        config: r.name,
        batch,
        seq: prompt_len,
        threads,
        reps: n,
        tok_s: rate(decode_med),
        tok_s_best: rate(decode_best),
        median_ms: ms(decode_med),
        extra: vec![
            ("gen1_ms", ms(p_med)),
            ("gen128_ms", ms(w_med)),
            ("e2e_tok_s", batch as f64 * new_tokens as f64 / w_med.as_secs_f64()),
            ("decode_threads", decoder_threads as f64),
            ("read_gb_s", bandwidth / 1e9),
            ("roof_tok_s", roof),
            ("roof_share", rate(decode_med) / (batch as f64 * roof)),
        ],
    }
}

// ----- prefill -----------------------------------------------------------------------------

/// Prefill tokens/s: a 128-token prompt for each row through all layers, and the logits of
/// each row's last token (what `generate` does before its first decode step).
fn bench_prefill(r: &Reference, model: &LegoTransformer, batch: usize, threads: usize) -> Row {
    let t = PREFILL_PROMPT;
    let mut rng = Tensor::rng(12);
    let ids = random_ids(batch * t, r.config.vocab_size, &mut rng);
    let rows: Vec<usize> = (0..batch).collect();
    let counts = vec![t; batch];
    let mut dec = Decoder::new(model, batch, batch * t);
    let layers = 0..model.layers.len();
    let mut run = || {
        dec.clear();
        let start = Instant::now();
        dec.begin(&rows, &counts, &ids).expect("prefill input");
        dec.layers(layers.clone());
        dec.logits(&model.head, Tokens::LastOfEach).expect("finite logits");
        black_box(dec.logits_row(0));
        start.elapsed()
    };
    let n = reps(7);
    run();
    let samples: Vec<Duration> = (0..n).map(|_| run()).collect();
    let (med, min) = median_min(&samples);
    let tokens = (batch * t) as f64;
    Row {
        part: "prefill",
        config: r.name,
        batch,
        seq: t,
        threads,
        reps: n,
        tok_s: tokens / med.as_secs_f64(),
        tok_s_best: tokens / min.as_secs_f64(),
        median_ms: ms(med),
        extra: Vec::new(),
    }
}

// ----- training step -----------------------------------------------------------------------

/// Training tokens/s: forward, cross-entropy, backward, AdamW step, zero_grad.
fn bench_train(r: &Reference, model: &LegoTransformer, threads: usize) -> Row {
    let (b, t, v) = (r.train_batch, r.train_seq, r.config.vocab_size);
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default());
    let mut rng = Tensor::rng(13);
    let mut step = |ids: &[usize], targets: &[usize]| {
        let t0 = Instant::now();
        let logits = model.forward(ids, b).expect("forward failed"); // [B, T, V]
        let loss = logits.cross_entropy(targets, None);
        let t1 = Instant::now();
        loss.backward();
        let t2 = Instant::now();
        opt.step();
        opt.zero_grad();
        let t3 = Instant::now();
        black_box(loss.item());
        drop((loss, logits)); // frees the graph: part of the step's cost
        let t4 = Instant::now();
        [t1 - t0, t2 - t1, t3 - t2, t4 - t0]
    };
    let n = reps(r.train_reps);
    let warm = if quick() { 1 } else { 2 };
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let mut misses_after_warmup = 0;
    for i in 0..warm + n {
        let ids = random_ids(b * t, v, &mut rng);
        let targets = random_ids(b * t, v, &mut rng);
        if i == warm {
            misses_after_warmup = pool::stats().misses;
        }
        let times = step(&ids, &targets);
        if i >= warm {
            for (s, d) in samples.iter_mut().zip(times) {
                s.push(d);
            }
        }
    }
    let [fwd, bwd, optim, total] = samples.map(|s| median_min(&s));
    let tokens = (b * t) as f64;
    // Buffers the timed steps had to allocate (0 once the pool covers a step), the most the
    // pool ever held, and the process's peak resident memory so far (all parts and configs
    // run before this one count too).
    let pool = pool::stats();
    let misses_per_step = (pool.misses - misses_after_warmup) as f64 / n as f64;
    Row {
        part: "train",
        config: r.name,
        batch: b,
        seq: t,
        threads,
        reps: n,
        tok_s: tokens / total.0.as_secs_f64(),
        tok_s_best: tokens / total.1.as_secs_f64(),
        median_ms: ms(total.0),
        extra: vec![
            ("fwd_ms", ms(fwd.0)),
            ("bwd_ms", ms(bwd.0)),
            ("opt_ms", ms(optim.0)),
            ("pool_misses_per_step", misses_per_step),
            ("pool_peak_mib", pool.peak_held_bytes as f64 / (1 << 20) as f64),
            ("peak_rss_mib", peak_rss_mib().unwrap_or(f64::NAN)),
        ],
    }
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`, Linux), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

// ----- main --------------------------------------------------------------------------------

/// The 1-minute load average (Linux), to tell a quiet machine from a busy one.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn print_table(rows: &[Row]) {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
    for part in ["decode", "prefill", "train"] {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.part == part).collect();
        if mine.is_empty() {
            continue;
        }
        match part {
            "decode" => println!(
                "\ndecode: generate(prompt {DECODE_PROMPT}, {DECODE_NEW} new, greedy; T: prompt 8, 56 new); \
                 decode part = t(all new) - t(1 new); tok/s = batch * (new - 1) / decode part"
            ),
            "prefill" => println!(
                "\nprefill: {PREFILL_PROMPT}-token prompt per row through the Decoder (begin, every layer, \
                 logits of each row's last token); preallocated decoder"
            ),
            _ => println!(
                "\ntrain: forward + cross_entropy | backward | AdamW step + zero_grad; total \
                 includes freeing the graph"
            ),
        }
        let header = match part {
            "decode" => {
                format!(
                    "{:<4} {:>5} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
                    "cfg", "batch", "thr", "tok/s", "best", "decode ms", "gen1 ms", "gen128 ms", "e2e tok/s"
                ) + &format!(" {:>8} {:>9} {:>7}", "read GB/s", "roof tok/s", "of roof")
            }
            "prefill" => format!(
                "{:<4} {:>5} {:>3} {:>10} {:>10} {:>10}",
                "cfg", "batch", "thr", "tok/s", "best", "ms"
            ),
            _ => format!(
                "{:<4} {:>9} {:>3} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "cfg",
                "batch×seq",
                "thr",
                "tok/s",
                "best",
                "step ms",
                "fwd ms",
                "bwd ms",
                "opt ms",
                "miss/step",
                "pool MiB",
                "RSS MiB"
            ),
        };
        println!("{header}");
        for r in mine {
            let line = match part {
                "decode" => {
                    format!(
                        "{:<4} {:>5} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>10} {:>10} {:>9}",
                        r.config,
                        r.batch,
                        r.threads,
                        r.tok_s,
                        r.tok_s_best,
                        r.median_ms,
                        fmt(r.extra("gen1_ms")),
                        fmt(r.extra("gen128_ms")),
                        fmt(r.extra("e2e_tok_s")),
                    ) + &format!(
                        " {:>8} {:>9} {:>7}",
                        fmt(r.extra("read_gb_s")),
                        fmt(r.extra("roof_tok_s")),
                        r.extra("roof_share").map_or("-".into(), |x| format!("{:.0} %", 100.0 * x))
                    )
                }
                "prefill" => format!(
                    "{:<4} {:>5} {:>3} {:>10.1} {:>10.1} {:>10.2}",
                    r.config, r.batch, r.threads, r.tok_s, r.tok_s_best, r.median_ms
                ),
                _ => format!(
                    "{:<4} {:>9} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    r.config,
                    format!("{}×{}", r.batch, r.seq),
                    r.threads,
                    r.tok_s,
                    r.tok_s_best,
                    r.median_ms,
                    fmt(r.extra("fwd_ms")),
                    fmt(r.extra("bwd_ms")),
                    fmt(r.extra("opt_ms")),
                    fmt(r.extra("pool_misses_per_step")),
                    fmt(r.extra("pool_peak_mib")),
                    fmt(r.extra("peak_rss_mib")),
                ),
            };
            println!("{line}");
        }
    }
}

fn write_csv(rows: &[Row]) {
    let mut csv = String::from(
        "part,config,batch,seq,threads,reps,tok_per_s_median,tok_per_s_best,median_ms,\
         fwd_ms,bwd_ms,opt_ms,gen1_ms,gen128_ms,e2e_tok_per_s,pool_misses_per_step,pool_peak_mib,\
         peak_rss_mib\n",
    );
    for r in rows {
        let col = |k: &str| r.extra(k).map_or(String::new(), |x| format!("{x:.3}"));
        writeln!(
            csv,
            "{},{},{},{},{},{},{:.1},{:.1},{:.3},{},{},{},{},{},{},{},{},{}",
            r.part,
            r.config,
            r.batch,
            r.seq,
            r.threads,
            r.reps,
            r.tok_s,
            r.tok_s_best,
            r.median_ms,
            col("fwd_ms"),
            col("bwd_ms"),
            col("opt_ms"),
            col("gen1_ms"),
            col("gen128_ms"),
            col("e2e_tok_s"),
            col("pool_misses_per_step"),
            col("pool_peak_mib"),
            col("peak_rss_mib"),
        )
        .unwrap();
    }
    let path = std::env::var("LEGO_BENCH_CSV").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-model.csv"),
        std::path::PathBuf::from,
    );
    let written =
        path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| std::fs::write(&path, csv));
    match written {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}

fn main() {
    let parts = parts();
    let configs = list_var("LEGO_BENCH_CONFIGS", "T,S,M");
    let threads = numbers_var("LEGO_BENCH_THREADS", "2,1");
    let batches = numbers_var("LEGO_BENCH_BATCHES", "1,8");
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "lego model bench ({}): parts {parts:?}, configs {configs:?}, threads {threads:?}, \
         batches {batches:?}",
        if quick() { "QUICK" } else { "full" }
    );

    let mut rows = Vec::new();
    let mut record = |row: Row| {
        println!("{}", row.result_line());
        rows.push(row);
    };
    for r in references() {
        if !configs.iter().any(|c| c.eq_ignore_ascii_case(r.name)) {
            continue;
        }
        let model =
            LegoTransformer::new(r.config.clone(), &mut Tensor::rng(42)).expect("reference config is valid");
        for &thr in &threads {
            for part in &parts {
                match part.as_str() {
                    // T's max_seq_len (64) is too short for a 128 prompt; it decodes 8 + 56.
                    "decode" => {
                        for &b in &batches {
                            record(with_threads(thr, || bench_decode(&r, &model, b, thr)));
                        }
                    }
                    "prefill" if r.name != "T" => {
                        for &b in &batches {
                            record(with_threads(thr, || bench_prefill(&r, &model, b, thr)));
                        }
                    }
                    "train" => record(with_threads(thr, || bench_train(&r, &model, thr))),
                    _ => {}
                }
            }
        }
    }

    rows.sort_by_key(|r| {
        let part = ["decode", "prefill", "train"].iter().position(|p| *p == r.part);
        let config = ["T", "S", "M"].iter().position(|c| *c == r.config);
        (part, config, r.batch, std::cmp::Reverse(r.threads))
    });
    print_table(&rows);
    println!();
    write_csv(&rows);
    println!(
        "total {:.1} s; load average before {load_before}, after {} (other processes on the \
         cores make the 2-thread figures meaningless)",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}
