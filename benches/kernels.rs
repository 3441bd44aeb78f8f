//! Kernel benchmarks: the matrix product, fused attention and RMSNorm, on 1 and 2 threads.
//!
//! Run with `cargo bench --bench kernels` (about a minute and a half); set
//! `LEGO_BENCH_QUICK=1` for a smoke run that checks everything runs (numbers are then rough).
//!
//! What is measured, and why:
//!
//! - `sgemm A·B`: [`lego::kernels::gemm::sgemm`] on row-major A (M×K) and B (K×N), the same
//!   products `../shared/peers/sgemm_py.py` times for numpy and PyTorch, so the GFLOP/s compare
//!   directly;
//! - `sgemm x·Wᵀ`: the same kernel with B read as the transpose of a row-major weight W (N×K),
//!   the layout every `Linear` uses. For M ≤ 16 this is the decode path, which goes to the
//!   small-M SIMD kernel instead of `matrixmultiply`;
//! - `op matmul_t`: the Tensor op `x.matmul_t(&w)` on the same operands (no gradient
//!   recorded), so its distance from `sgemm x·Wᵀ` is the op's own overhead (allocating and
//!   zeroing the output, building the tensor);
//! - `kernel x·Wᵀ` and `decode products` (few rows only): the SIMD kernel alone on one thread,
//!   and the decoder's products ([`lego::kernels::matvec::products`]) on the decode team split
//!   over the threads, output in place: the gap is what a call costs beyond its kernel;
//! - `decode step` (config S, batch 1): the products of one decoded token (4 layers × the 7
//!   weight matrices, and the head) four ways: on one thread; as the decoder runs them (one
//!   hand-off to the team per group sharing an input: 4 a layer and the head); in **one** team
//!   job per token with a spin barrier where the decoder must wait (what a fused layer program
//!   could reach); and in one job with no barrier at all (each thread streams its share of
//!   every matrix back to back: the bandwidth bound of this kernel on this machine). Only the
//!   products: no attention, norms or sampling. At one row a product does 2 FLOPs per 4-byte
//!   weight, so its GB/s are twice the GFLOP/s shown;
//! - `attention` at config T's and S's training shapes (batch 32 × seq 64, 4 heads of 16; batch
//!   16 × seq 128, 8 heads of 32) and `rms_norm` at config S (dim 256), the forward alone
//!   (recording the graph, as in training) and forward + backward.
//!
//! The timing harness is deliberately tiny (no criterion): run the closure for a warm-up
//! period, which also tells how many calls fill one repetition of ~[`REP_SECS`]; then time
//! [`reps`] repetitions of that many calls and report the median and the fastest, per call.
//! Results go to stdout as a table and to `target/bench-kernels.csv`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use lego::Tensor;
use lego::kernels::gemm::sgemm;
use lego::kernels::team::{decode_team, part_rows};
use lego::kernels::{matvec, simd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Matrix product shapes (M, K, N): training shapes of configs S/M, two decode shapes (one
/// row, eight rows) and the classic 1024³.
const SHAPES: [(usize, usize, usize); 10] = [
    (2048, 256, 256),
    (2048, 256, 688),
    (2048, 256, 4096),
    (2048, 512, 512),
    (1, 512, 512),
    (1, 512, 1376),
    (2, 512, 1376),
    (4, 512, 1376),
    (8, 512, 1376),
    (1024, 1024, 1024),
];

/// Thread counts to measure (the machine has two cores).
const THREADS: [usize; 2] = [1, 2];

/// Config S: batch, seq, dim, heads.
const S_BATCH: usize = 16;
const S_SEQ: usize = 128;
const S_DIM: usize = 256;
const S_HEADS: usize = 8;

/// Target length of one timed repetition, in seconds (each repetition runs the closure as
/// many times as fit, so that fast kernels are not dominated by timer resolution).
const REP_SECS: f64 = 0.1;

/// Whether `LEGO_BENCH_QUICK=1` asks for a smoke run.
fn quick() -> bool {
    std::env::var("LEGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// How many timed repetitions per measurement.
fn reps() -> usize {
    if quick() { 2 } else { 7 }
}

/// Seconds of warm-up before timing.
fn warmup_secs() -> f64 {
    if quick() { 0.02 } else { 0.2 }
}

/// Per-call time of one measurement: the median and the fastest repetition.
struct Timing {
    median: Duration,
    min: Duration,
}

/// Warms `f` up, then times [`reps`] repetitions of it and returns the per-call figures.
fn time_it(mut f: impl FnMut()) -> Timing {
    // Warm-up: caches, page faults, the thread pool's first wake-up. Counting the calls that
    // fit tells how many make one repetition.
    let warm = Duration::from_secs_f64(warmup_secs());
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < warm || calls == 0 {
        f();
        calls += 1;
    }
    let per_call = start.elapsed().as_secs_f64() / calls as f64;
    let rep_secs = if quick() { REP_SECS / 10.0 } else { REP_SECS };
    let inner = ((rep_secs / per_call).ceil() as usize).max(1);

    let mut samples: Vec<Duration> = (0..reps())
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed() / inner as u32
        })
        .collect();
    samples.sort();
    Timing { median: samples[samples.len() / 2], min: samples[0] }
}

/// One row of the results.
struct Row {
    name: String,
    shape: String,
    threads: usize,
    timing: Timing,
    /// Floating-point operations per call, if counting them makes sense.
    flops: Option<f64>,
}

impl Row {
    fn gflops(&self, d: Duration) -> Option<f64> {
        self.flops.map(|f| f / d.as_secs_f64() / 1e9)
    }
}

/// Deterministic values in [-1, 1) (the bench needs no statistics, just non-trivial numbers).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Tensor::rng(seed);
    Tensor::rand_uniform(&[n], -1.0, 1.0, &mut rng).to_vec()
}

/// The three matrix-product measurements for one shape, inside the current pool.
fn bench_matmul(m: usize, k: usize, n: usize, threads: usize, rows: &mut Vec<Row>) {
    let shape = format!("{m}x{k}x{n}");
    let flops = Some(2.0 * (m * k * n) as f64);
    let a = values(m * k, 1);
    let b = values(k * n, 2); // B (K×N) row-major, or W (N×K) row-major: same length
    let mut c = vec![0.0f32; m * n];
    let small_m = m <= lego::kernels::gemm::SMALL_M;

    // Plain row-major A·B, as numpy's `a @ b` (not for the decode shapes, which are measured
    // in the layout they are used in).
    if !small_m {
        let timing = time_it(|| {
            sgemm(m, k, n, 1.0, &a, k, 1, &b, n, 1, 0.0, &mut c, n);
            black_box(&mut c);
        });
        rows.push(Row { name: "sgemm A·B".into(), shape: shape.clone(), threads, timing, flops });
    }

    // x·Wᵀ: B[p][j] = W[j][p], i.e. row stride 1 and column stride K.
    let timing = time_it(|| {
        sgemm(m, k, n, 1.0, &a, k, 1, &b, 1, k, 0.0, &mut c, n);
        black_box(&mut c);
    });
    rows.push(Row { name: "sgemm x·Wᵀ".into(), shape: shape.clone(), threads, timing, flops });

    // The Tensor op, no gradient recorded (the leaves do not require one).
    let x = Tensor::from_vec(a.clone(), &[m, k]);
    let w = Tensor::from_vec(b.clone(), &[n, k]);
    let timing = time_it(|| {
        black_box(x.matmul_t(&w));
    });
    rows.push(Row { name: "op matmul_t".into(), shape: shape.clone(), threads, timing, flops });

    // The decode path for few rows: the SIMD kernel alone (one thread, no hand-off, the output
    // left transposed), and the decoder's products on the decode team, split over `threads`
    // threads by rows of W, output back in [m, n]. Their gap is the per-call overhead.
    if small_m {
        let mut out_t = vec![0.0f32; n * m];
        let timing = time_it(|| {
            simd::matmul_xwt(&a, m, k, &b, &mut out_t);
            black_box(&mut out_t);
        });
        rows.push(Row { name: "kernel x·Wᵀ".into(), shape: shape.clone(), threads: 1, timing, flops });
        let team = decode_team();
        let mut scratch = vec![0.0f32; matvec::scratch_len(&[n], m)];
        let parts = threads.min(team.size());
        let timing = time_it(|| {
            matvec::products(team, parts, &a, m, k, [&b], [&mut c], &mut scratch, matvec::Epilogue::None);
            black_box(&mut c);
        });
        rows.push(Row { name: "decode products".into(), shape, threads: parts, timing, flops });
    }
}

/// Attention of `b` sequences of `t` tokens, `h` heads of `hd`, forward and forward + backward,
/// inside the current pool.
fn bench_attention(b: usize, t: usize, h: usize, hd: usize, threads: usize, rows: &mut Vec<Row>) {
    let mut rng = Tensor::rng(7);
    // q, k, v are [B, T, H, hd]. The flop count is the two T×T products a head (Q·Kᵀ and P·V,
    // 2·T²·hd each) forward, and four more backward; the kernel computes the whole T×T square
    // (masked half included), so that is what it is charged for.
    let qkv_shape = [b, t, h, hd];
    let q = Tensor::randn(&qkv_shape, 0.0, 1.0, &mut rng).requires_grad();
    let k = Tensor::randn(&qkv_shape, 0.0, 1.0, &mut rng).requires_grad();
    let v = Tensor::randn(&qkv_shape, 0.0, 1.0, &mut rng).requires_grad();
    let g_attn = values(b * t * h * hd, 8);
    let head_flops = 2.0 * (t * t * hd) as f64 * (b * h) as f64;
    let shape = format!("B{b} T{t} H{h} hd{hd}");

    let timing = time_it(|| {
        black_box(Tensor::attention(&q, &k, &v));
    });
    rows.push(Row {
        name: "attention fwd".into(),
        shape: shape.clone(),
        threads,
        timing,
        flops: Some(2.0 * head_flops),
    });
    let timing = time_it(|| {
        for p in [&q, &k, &v] {
            p.zero_grad();
        }
        let out = Tensor::attention(&q, &k, &v);
        out.backward_with(g_attn.clone());
        black_box(q.grad());
    });
    rows.push(Row {
        name: "attention fwd+bwd".into(),
        shape,
        threads,
        timing,
        flops: Some(6.0 * head_flops),
    });
}

/// RMSNorm at config S, forward and forward + backward, inside the current pool.
fn bench_s_ops(threads: usize, rows: &mut Vec<Row>) {
    let (b, t, d) = (S_BATCH, S_SEQ, S_DIM);
    let mut rng = Tensor::rng(7);
    // RMSNorm: x [B, T, D], weight [D]. Memory-bound; no GFLOP/s.
    let x = Tensor::randn(&[b, t, d], 0.0, 1.0, &mut rng).requires_grad();
    let w = Tensor::from_vec(values(d, 9).iter().map(|v| 1.0 + 0.1 * v).collect(), &[d]).requires_grad();
    let g_norm = values(b * t * d, 10);
    let shape = format!("B{b} T{t} D{d}");
    let timing = time_it(|| {
        black_box(x.rms_norm(&w, 1e-5));
    });
    rows.push(Row { name: "rms_norm fwd".into(), shape: shape.clone(), threads, timing, flops: None });
    let timing = time_it(|| {
        x.zero_grad();
        w.zero_grad();
        let y = x.rms_norm(&w, 1e-5);
        y.backward_with(g_norm.clone());
        black_box(x.grad());
    });
    rows.push(Row { name: "rms_norm fwd+bwd".into(), shape, threads, timing, flops: None });
}

/// The 1-minute load average (Linux), to tell a quiet machine from a busy one.
/// A barrier for the threads of one team job: the last to arrive opens the next phase.
struct SpinBarrier {
    arrived: AtomicUsize,
    phase: AtomicUsize,
    threads: usize,
}

impl SpinBarrier {
    fn wait(&self) {
        let phase = self.phase.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.phase.fetch_add(1, Ordering::Release);
        } else {
            while self.phase.load(Ordering::Acquire) == phase {
                std::hint::spin_loop();
            }
        }
    }
}

/// The products of one decoded token at config S, batch 1 (see the module doc), four ways.
fn bench_decode_step(rows: &mut Vec<Row>) {
    let (d, f, v, layers) = (256, 688, 4096, 4);
    // Per layer: wq, wk, wv, wo [D, D]; w1, w3 [F, D]; w2 [D, F]. Then the head [V, D].
    let shapes = [(d, d), (d, d), (d, d), (d, d), (f, d), (f, d), (d, f)];
    let weights: Vec<Vec<Vec<f32>>> = (0..layers)
        .map(|l| shapes.iter().enumerate().map(|(i, &(n, k))| values(n * k, (10 * l + i) as u64)).collect())
        .collect();
    let head = values(v * d, 99);
    let (x, h) = (values(d, 1), values(f, 2));
    let weight_count = layers * (4 * d * d + 3 * d * f) + v * d;
    let flops = Some(2.0 * weight_count as f64);
    let shape = "S, 1 token".to_string();
    let team = decode_team();
    let threads = team.size().min(2);

    // The decoder's way: a hand-off per group of products sharing an input.
    let (mut q, mut k, mut vv, mut o) = (vec![0.0; d], vec![0.0; d], vec![0.0; d], vec![0.0; d]);
    let (mut g, mut u, mut logits) = (vec![0.0; f], vec![0.0; f], vec![0.0; v]);
    for parts in [1, threads] {
        let timing = time_it(|| {
            use matvec::{Epilogue, products};
            for w in &weights {
                let qkv = [&mut q[..], &mut k[..], &mut vv[..]];
                products(team, parts, &x, 1, d, [&w[0], &w[1], &w[2]], qkv, &mut [], Epilogue::None);
                products(team, parts, &x, 1, d, [&w[3]], [&mut o[..]], &mut [], Epilogue::None);
                let gu = [&mut g[..], &mut u[..]];
                products(team, parts, &x, 1, d, [&w[4], &w[5]], gu, &mut [], Epilogue::SwiGlu);
                products(team, parts, &h, 1, f, [&w[6]], [&mut o[..]], &mut [], Epilogue::None);
            }
            products(team, parts, &x, 1, d, [&head], [&mut logits[..]], &mut [], Epilogue::None);
            black_box(&logits);
        });
        let name = if parts == 1 { "decode step 1 thr" } else { "decode step hand-offs" };
        rows.push(Row { name: name.into(), shape: shape.clone(), threads: parts, timing, flops });
    }
    if threads < 2 {
        return;
    }
    // One team job per token: each thread streams its share (by rows of W) of every product,
    // waiting at a barrier where the decoder would need the whole output, or never. Each part
    // writes its own output buffers (nobody reads them here).
    let out_len = |n: usize, p: usize| part_rows(n, threads, p, 16).len();
    let outs: Vec<Mutex<Vec<Vec<f32>>>> = (0..threads)
        .map(|p| {
            Mutex::new(
                shapes
                    .iter()
                    .map(|&(n, _)| vec![0.0; out_len(n, p)])
                    .chain([vec![0.0; out_len(v, p)]])
                    .collect(),
            )
        })
        .collect();
    for with_barriers in [true, false] {
        let barrier = SpinBarrier { arrived: AtomicUsize::new(0), phase: AtomicUsize::new(0), threads };
        let timing = time_it(|| {
            team.run(threads, &|p| {
                let mut out = outs[p].lock().unwrap();
                for w in &weights {
                    for (i, &(n, k)) in shapes.iter().enumerate() {
                        let r = part_rows(n, threads, p, 16);
                        let input = if i == 6 { &h } else { &x };
                        simd::matmul_xwt(input, 1, k, &w[i][r.start * k..r.end * k], &mut out[i]);
                        // The decoder waits after q/k/v (attention), wo, w1/w3 and w2.
                        if with_barriers && matches!(i, 2 | 3 | 5 | 6) {
                            barrier.wait();
                        }
                    }
                }
                let r = part_rows(v, threads, p, 16);
                simd::matmul_xwt(&x, 1, d, &head[r.start * d..r.end * d], &mut out[7]);
            });
        });
        let name = if with_barriers { "decode step one job" } else { "decode step no sync" };
        rows.push(Row { name: name.into(), shape: shape.clone(), threads, timing, flops });
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument would be ignored, so say so.
    if let Some(arg) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        eprintln!("note: this bench takes no filter (got {arg:?}); running everything");
    }
    let started = Instant::now();
    let load_before = load_average();
    let mut rows = Vec::new();
    for threads in THREADS {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("could not build a rayon pool");
        pool.install(|| {
            for (m, k, n) in SHAPES {
                bench_matmul(m, k, n, threads, &mut rows);
            }
            // Config T's training shape (32 × 64 tokens, 4 heads of 16), then config S's.
            bench_attention(32, 64, 4, 16, threads, &mut rows);
            bench_attention(S_BATCH, S_SEQ, S_HEADS, S_DIM / S_HEADS, threads, &mut rows);
            bench_s_ops(threads, &mut rows);
        });
    }
    bench_decode_step(&mut rows);

    // The table: matrix products grouped by shape (1 and 2 threads side by side), then the
    // config-S ops.
    println!(
        "\nlego kernels ({}, {} reps, median and best per call)\n",
        if quick() { "QUICK" } else { "full" },
        reps()
    );
    println!(
        "{:<18} {:<18} {:>3} {:>11} {:>11} {:>9} {:>9}",
        "name", "shape", "thr", "median ms", "min ms", "GFLOP/s", "best"
    );
    let mut order: Vec<&Row> = rows.iter().collect();
    order.sort_by_key(|r| {
        let group = rows.iter().position(|q| q.shape == r.shape && q.name == r.name).unwrap();
        (group, r.threads)
    });
    let mut csv = String::from("name,shape,threads,median_ms,gflops\n");
    for r in order {
        let fmt = |g: Option<f64>| g.map_or("-".to_string(), |g| format!("{g:.1}"));
        println!(
            "{:<18} {:<18} {:>3} {:>11.4} {:>11.4} {:>9} {:>9}",
            r.name,
            r.shape,
            r.threads,
            r.timing.median.as_secs_f64() * 1e3,
            r.timing.min.as_secs_f64() * 1e3,
            fmt(r.gflops(r.timing.median)),
            fmt(r.gflops(r.timing.min)),
        );
        writeln!(
            csv,
            "{},{},{},{:.6},{}",
            r.name,
            r.shape,
            r.threads,
            r.timing.median.as_secs_f64() * 1e3,
            r.gflops(r.timing.median).map_or(String::new(), |g| format!("{g:.2}"))
        )
        .unwrap();
    }
    println!(
        "\nattention GFLOP/s count the full T×T products (4·T²·hd a head forward, 12·T²·hd with \
         backward); rms_norm is memory-bound."
    );

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let path = dir.join("bench-kernels.csv");
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, csv)) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    println!(
        "total {:.1} s; load average before {load_before}, after {} (other processes on the \
         cores make the 2-thread figures meaningless)",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}
