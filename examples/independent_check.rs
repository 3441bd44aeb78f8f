//! Independent checks: writes one small random model in both of our file formats, and prints
//! what two outside programs must find in them.
//!
//! ```sh
//! cargo run --release --example independent_check -- --out target/independent-check
//! ```
//!
//! Writes into the output directory:
//!
//! - `model.safetensors`: our checkpoint ([`LegoTransformer::save`]), for Python's `safetensors`;
//! - `model.bin` + `tokenizer.bin`: the llama2.c export ([`LegoTransformer::export_llama2c`]),
//!   for Karpathy's `run.c`;
//! - `ours.txt`: our greedy tokens in exactly the form `run.c -t 0` prints them on stdout, so
//!   `diff` compares the two programs.
//!
//! and prints checksums of two tensors (to compare with what numpy reads) and our greedy tokens.
//! `docs/independent-checks.md` says how to run the other side.
//!
//! Flags: `--out DIR` (default `target/independent-check`), `--steps N` (tokens to generate,
//! default 40), `--seed S` (default 7), `--scale X` (every parameter is multiplied by X,
//! default 2.5: at initialisation scale a random model's greedy output soon repeats one token,
//! which would make the comparison weak).

use std::collections::BTreeMap;
use std::path::PathBuf;

use lego::model::{LegoConfig, LegoTransformer, Sampling};
use lego::{Tensor, no_grad};

/// Token 1 is llama2.c's BOS: `run.c` starts every sequence from it, and stops when it is sampled.
const BOS: usize = 1;

struct Args {
    out: PathBuf,
    steps: usize,
    seed: u64,
    scale: f32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { out: PathBuf::from("target/independent-check"), steps: 40, seed: 7, scale: 2.5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(&value),
            "--steps" => args.steps = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--scale" => args.scale = value.parse().map_err(|e| bad(&e))?,
            _ => {
                return Err(format!("unknown flag {flag} (--out, --steps, --seed, --scale)"));
            }
        }
    }
    Ok(args)
}

/// Sum (in f64) and first three values of a tensor, as numpy will show them.
fn checksum(name: &str, t: &Tensor) {
    let d = t.data();
    let sum: f64 = d.iter().map(|&v| v as f64).sum();
    println!("{name} {:?}: sum {sum:.6}, first 3 {:?}", t.shape(), &d[..3]);
}

/// `tokens` as `run.c` prints them: each token's piece (`<i>` in our tokenizer.bin), no
/// separator, stopping *before* a BOS (run.c breaks out of its loop when it samples token 1).
/// run.c's other decode rules do not apply to our pieces: it strips a leading space after BOS
/// (ours have none) and turns pieces like `<0x0A>` into raw bytes (`<10>` does not match).
fn runc_form(tokens: &[usize]) -> String {
    tokens.iter().take_while(|&&t| t != BOS).map(|t| format!("<{t}>")).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // V=64 D=64 N=4 H=4 F=172 max_seq_len=64; RoPE base 10000 and RMSNorm eps 1e-5 as in run.c.
    let config = LegoConfig::new(64, 64, 4, 4, 172, 64);
    let model = LegoTransformer::new(config, &mut Tensor::rng(args.seed))?;
    // Scale every parameter (norm scales included) so the model has strong, varied opinions.
    for (_, t) in model.named_params() {
        t.set_data(t.data().iter().map(|v| v * args.scale).collect());
    }

    std::fs::create_dir_all(&args.out)?;
    let st_path = args.out.join("model.safetensors");
    let extra = BTreeMap::from([(
        "note".to_string(),
        format!("independent_check seed {} scale {}", args.seed, args.scale),
    )]);
    model.save(&st_path, &extra)?;
    let bin_path = args.out.join("model.bin");
    model.export_llama2c(&bin_path)?;
    println!("wrote {}", st_path.display());
    println!("wrote {} and {}", bin_path.display(), args.out.join("tokenizer.bin").display());

    // Checksums to hold against `safetensors.numpy.load_file`.
    checksum("tok_embeddings.weight", &model.tok_embeddings);
    checksum("output.weight", &model.head.output.weight);

    // Greedy, all layers, from BOS: what `run.c model.bin -t 0 -n steps` computes.
    let out = model.generate(&[vec![BOS]], args.steps, &Sampling::greedy())?;
    let new = &out[0][1..];
    println!("our greedy tokens ({}): {new:?}", new.len());
    if new.contains(&BOS) {
        println!("note: BOS (1) was generated; run.c stops there, so the run.c form stops too");
    }

    // Self-check through the other code path (the autodiff forward, no KV cache): its argmax at
    // each position must give the same tokens. The smallest gap between the two largest logits
    // says how far float rounding is from flipping a choice (a near-tie could differ in run.c).
    let seq = &out[0][..out[0].len() - 1];
    let logits = no_grad(|| model.forward(seq, 1))?.to_vec();
    let v = model.config.vocab_size;
    let mut min_gap = f32::INFINITY;
    for (row, &want) in logits.chunks(v).zip(new) {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        min_gap = min_gap.min(sorted[0] - sorted[1]);
        let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(best, want, "forward and generate disagree");
    }
    println!("forward agrees with generate; smallest top-1 / top-2 logit gap {min_gap:.4}");

    // Exactly run.c's stdout: the pieces, then a newline.
    let line = runc_form(new);
    println!("run.c form:\n{line}");
    std::fs::write(args.out.join("ours.txt"), format!("{line}\n"))?;
    Ok(())
}
