//! Stages 9-12: what the trained models are measured by, all on the test split.

use std::time::Instant;

use lego::data::{Batch, Dataset, Split, Tokenizer};
use lego::model::{ExitMeasure, ExitRule, GenerateOptions, LegoTransformer, Sampling, UpperCacheFill};
use lego::ops::cross_entropy::logsumexp;
use lego::report::experiment::{Evals, ExitTableRow, Generation, ModelEval, Stage};
use lego::report::frontier::{Frontier, FrontierPoint, SweepGrid};
use lego::report::{write_frontier_svg, write_into};
use lego::train::{
    Phase2Mode, collect_hard_examples, compute_confidence_threshold, evaluate_on_hard_examples,
};
use lego::{Error, Result, no_grad};

use super::options::Options;
use super::{Phase2Run, trainer};

/// Timed repetitions of each generation; the best is kept.
const TIMING_REPS: usize = 31;
/// Prompts (from the test split) for the agreement column of the early-exit table.
pub const TABLE_PROMPTS: usize = 8;
/// Hard ratios whose validation thresholds the early-exit table tries.
const TABLE_RATIOS: [f32; 3] = [0.25, 0.5, 0.75];
/// The frontier's sweeps: validation hard ratios (one threshold each), measures and fills.
const FRONTIER_RATIOS: [f32; 7] = [0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9];
const MEASURES: [ExitMeasure; 2] = [ExitMeasure::MaxSoftmax, ExitMeasure::Gate];
const FILLS: [UpperCacheFill; 2] = [UpperCacheFill::Skip, UpperCacheFill::Propagate];

// ----- 9. Evaluation on the test split -----------------------------------------------------------

/// Test PPL at full depth and with (fake) early exit at the threshold, for every model; PPL
/// on the test split's hard tokens; the hard share against its target.
pub fn evaluate_models(
    phase1: &LegoTransformer,
    phase2: &[Phase2Run],
    baseline: &LegoTransformer,
    data: &Dataset,
    threshold: f32,
    o: &Options,
) -> Result<Evals> {
    eprintln!("\n== evaluation on the test split ==");
    let t = trainer("eval", 1, o);
    // The test split's hard tokens, found with the phase-1 model (the exit phase 2 keeps).
    let test_hard = collect_hard_examples(phase1, &data.test, threshold)?;
    let hard_ppl =
        |m: &LegoTransformer, mode| evaluate_on_hard_examples(m, &test_hard, mode).map(|(_, ppl)| ppl);
    let eval = |name: String, m: &LegoTransformer, routed: bool, hard_ppl: f64| -> Result<ModelEval> {
        Ok(ModelEval {
            name,
            full: t.evaluate(m, &data.test, None)?,
            routed: routed.then(|| t.evaluate(m, &data.test, Some(threshold))).transpose()?,
            val_ppl: t.evaluate(m, &data.val, None)?.ppl,
            hard_ppl,
            hard_ppl_alone: None,
        })
    };
    let mut models = vec![eval("phase 1".into(), phase1, false, hard_ppl(phase1, Phase2Mode::Sequence)?)?];
    for run in phase2 {
        let mut m =
            eval(run.record.model_name(), &run.model, true, hard_ppl(&run.model, Phase2Mode::Sequence)?)?;
        if run.record.mode == Phase2Mode::Token {
            m.hard_ppl_alone = Some(hard_ppl(&run.model, Phase2Mode::Token)?);
        }
        models.push(m);
    }
    // The baseline's own hidden states differ from the phase-1 ones the hard examples hold:
    // its hard-token PPL is taken on the same tokens, through its own full forward pass.
    let mask = hard_mask(phase1, &data.test, threshold)?;
    models.push(eval("baseline".into(), baseline, true, masked_ppl(baseline, &data.test, &mask)?)?);
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

/// `model`'s full-depth perplexity on the tokens of `batches` where `mask` is set.
fn masked_ppl(model: &LegoTransformer, batches: &[Batch], mask: &[bool]) -> Result<f64> {
    let v = model.config.vocab_size;
    let (mut sum, mut n, mut k) = (0.0f64, 0usize, 0usize);
    for b in batches {
        let logits = no_grad(|| model.forward(&b.x, b.batch))?.data();
        for (row, &y) in logits.chunks(v).zip(&b.y) {
            if mask[k] {
                sum += (logsumexp(row) - row[y]) as f64;
                n += 1;
            }
            k += 1;
        }
    }
    Ok((sum / n.max(1) as f64).exp())
}

// ----- 10. TRUE early exit ------------------------------------------------------------------------

/// The generation prompt: `--prompt`, or the first line of at least six words in the first
/// test document, cut to its first six words and then to as many whole words as leave room
/// for `--max-new-tokens`.
pub fn choose_prompt(tok: &Tokenizer, split: &Split, o: &Options) -> Result<Vec<usize>> {
    let room = o.run.seq_len - o.run.max_new_tokens;
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
    if ids.len() > room && o.prompt.is_some() {
        let (n, m, s) = (ids.len(), o.run.max_new_tokens, o.run.seq_len);
        let msg = format!(
            "the prompt is {n} tokens; with --max-new-tokens {m} and --seq-len {s} at most {room} fit"
        );
        return Err(Error::Input(msg));
    }
    ids.truncate(room);
    Ok(ids)
}

/// `generate` (every layer for every token) against TRUE early exit (a confident token skips
/// the upper layers, `Skip` fill, as the spec), greedy, from one prompt. The exit is decided by
/// the model's learned gate when it has one (a deep token then pays no exit head), else by the
/// spec's max softmax at `threshold`. The two are timed alternately, `TIMING_REPS` pairs, and
/// the speed-up is the median of each pair's ratio. Also the same call with one new token (the
/// prompt's share of both, which the FLOP ideal leaves out), and ordinary generation without a
/// KV cache (the whole sequence through every layer at each step), for the prototype's "KV
/// cache alone" figure.
pub fn true_early_exit_generation(
    model: &LegoTransformer,
    tok: &Tokenizer,
    prompt: &[usize],
    threshold: f32,
    o: &Options,
) -> Result<Generation> {
    eprintln!("\n== TRUE early exit: generating {} tokens ==", o.run.max_new_tokens);
    let (prompts, n) = (vec![prompt.to_vec()], o.run.max_new_tokens);
    let (rule, measure) = match &model.exit_gate {
        Some(gate) => (gate.rule(UpperCacheFill::Skip), format!("{} gate", gate.kind.name())),
        None => (ExitRule::new(threshold, UpperCacheFill::Skip), "softmax".into()),
    };
    let full_options = GenerateOptions::greedy(n);
    let early_options = full_options.clone().with_exit(rule);
    let timed = |options: &GenerateOptions| -> Result<(f64, Vec<usize>, lego::model::EarlyExitStats)> {
        let t0 = Instant::now();
        let (mut out, stats) = model.generate_with(&prompts, options)?;
        Ok((t0.elapsed().as_secs_f64(), out.remove(0), stats))
    };
    let (_, full, _) = timed(&full_options)?; // warm-up, and the tokens
    let (_, early, stats) = timed(&early_options)?;
    let (mut t_full, mut t_early, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..TIMING_REPS {
        let (a, b) = (timed(&full_options)?.0, timed(&early_options)?.0);
        t_full.push(a);
        t_early.push(b);
        ratios.push(a / b);
    }
    // The prompt's share, which both runs pay alike: the same call with one new token.
    let first_token = GenerateOptions::greedy(1);
    let mut t_prompt = Vec::new();
    for _ in 0..TIMING_REPS {
        t_prompt.push(timed(&first_token)?.0);
    }
    let mut no_cache = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        generate_without_cache(model, prompt, n)?;
        no_cache.push(t0.elapsed().as_secs_f64());
    }
    let p = prompt.len();
    let exit_would_agree = exit_agrees(model, &full, p)?;
    Ok(Generation {
        full_text: tok.decode(&full[p..])?,
        early_text: tok.decode(&early[p..])?,
        agreement: agreement(&[full], &[early], p),
        exit_would_agree,
        shallow: stats.shallow_count,
        deep: stats.deep_count,
        layer_cost: stats.actual_compute_cost,
        flop_cost: stats.flop_cost,
        measure,
        seconds_full: median(&mut t_full),
        seconds_early: median(&mut t_early),
        speedup: median(&mut ratios),
        ideal_speedup: 1.0 / stats.flop_cost,
        seconds_no_cache: median(&mut no_cache),
        seconds_prompt: median(&mut t_prompt),
    })
}

/// Of the tokens of `sequence` after `prompt_len`, how many are the exit head's most likely
/// token at the position before (the sequence fed whole, teacher-forced, through the lower
/// layers and the exit head): with a full-depth greedy `sequence`, the tokens that could have
/// exited without changing the output.
fn exit_agrees(model: &LegoTransformer, sequence: &[usize], prompt_len: usize) -> Result<usize> {
    let v = model.config.vocab_size;
    let inputs = &sequence[..sequence.len() - 1];
    let h = no_grad(|| model.get_hidden_states(inputs, 1))?;
    let logits = model.compute_confidence(&h).1.data();
    let rows = logits.chunks_exact(v).zip(&sequence[1..]).skip(prompt_len - 1);
    Ok(rows.filter(|(row, next)| lego::ops::select::argmax(row) == **next).count())
}

/// The median of some values (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Greedy generation with no KV cache: at every step the whole sequence so far runs through
/// every layer (on the same inference engine, with a fresh cache each time).
fn generate_without_cache(model: &LegoTransformer, prompt: &[usize], new: usize) -> Result<Vec<usize>> {
    let v = model.config.vocab_size;
    let mut ids = prompt.to_vec();
    for _ in 0..new {
        let mut cache = lego::model::KvCache::new(&model.config, 1);
        let logits = model.forward_with_cache(&ids, 1, &mut cache, false)?.data();
        ids.push(lego::ops::select::argmax(&logits[(ids.len() - 1) * v..ids.len() * v]));
    }
    Ok(ids)
}

/// The share of generated tokens (after `prompt_len`) at which two generations agree.
fn agreement(a: &[Vec<usize>], b: &[Vec<usize>], prompt_len: usize) -> f64 {
    let pairs = a.iter().zip(b).flat_map(|(x, y)| x[prompt_len..].iter().zip(&y[prompt_len..]));
    let (same, all) = pairs.fold((0usize, 0usize), |(s, n), (x, y)| (s + (x == y) as usize, n + 1));
    same as f64 / all.max(1) as f64
}

// ----- 11. The early-exit table ------------------------------------------------------------------

/// For each phase-2 model, each upper-cache fill and each threshold: agreement with full-depth
/// greedy generation and teacher-forced test PPL (the first `--eval-sequences` test windows).
pub fn early_exit_table(phase2: &[Phase2Run], data: &Dataset, o: &Options) -> Result<Vec<ExitTableRow>> {
    eprintln!("\n== early-exit table ==");
    let greedy = Sampling::greedy();
    let prompt_len = (o.run.seq_len - o.run.max_new_tokens).min(16);
    let step = (data.test_windows.len() / TABLE_PROMPTS).max(1);
    let prompts: Vec<Vec<usize>> = data
        .test_windows
        .iter()
        .step_by(step)
        .take(TABLE_PROMPTS)
        .map(|w| w[..prompt_len].to_vec())
        .collect();
    let windows = data.test_sequences(Some(o.eval_sequences));
    let mut rows = Vec::new();
    for run in phase2 {
        let m = &run.model;
        let reference = m.generate(&prompts, o.run.max_new_tokens, &greedy)?;
        // Thresholds at validation quantiles; 2.0 never exits (a confidence is at most 1).
        let mut thresholds: Vec<(Option<f32>, f32)> = vec![(None, 2.0)];
        for r in TABLE_RATIOS {
            thresholds.push((Some(r), compute_confidence_threshold(m, &data.val, r)?));
        }
        for fill in FILLS {
            for &(ratio, threshold) in &thresholds {
                let (out, stats) =
                    m.generate_with_early_exit(&prompts, o.run.max_new_tokens, threshold, &greedy, fill)?;
                let tf = m.evaluate_with_early_exit(&windows, &ExitRule::new(threshold, fill))?;
                rows.push(ExitTableRow {
                    model: run.record.model_name(),
                    fill: fill.name(),
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

// ----- 12. The frontier ----------------------------------------------------------------------------

/// Every point on the whole test split (or `--frontier-windows` of it), fed token by token through the early-exit engine (the
/// same tokens and contexts for all; see `lego::report::frontier`): the phase-1 model, the
/// baseline and LEGO at full depth, then LEGO and the baseline with a tuned exit head over
/// every measure, fill and validation-calibrated threshold.
pub fn frontier(
    phase1: &LegoTransformer,
    lego: &LegoTransformer,
    baseline: &LegoTransformer,
    tuned: &LegoTransformer,
    data: &Dataset,
    o: &Options,
) -> Result<Frontier> {
    eprintln!("\n== frontier: test PPL against inference cost ==");
    let (seqs, base) = (data.test_sequences(o.frontier_windows), &baseline.config);
    let mut points = Vec::new();
    for (name, model) in [("phase 1", phase1), ("baseline", baseline), ("LEGO at full depth", lego)] {
        points.push(FrontierPoint::measure(model, &seqs, None, base, name, "full depth")?);
    }
    for (name, model) in [("LEGO", lego), ("baseline + tuned exit head", tuned)] {
        // The gate measure for the models that have a gate (LEGO's, trained after phase 1).
        let measures: Vec<ExitMeasure> =
            MEASURES.into_iter().filter(|&m| m != ExitMeasure::Gate || model.exit_gate.is_some()).collect();
        let grid = SweepGrid { hard_ratios: FRONTIER_RATIOS.to_vec(), measures, fills: FILLS.to_vec() };
        eprintln!(
            "{name}: {} thresholds × {} measures × {} fills",
            FRONTIER_RATIOS.len(),
            grid.measures.len(),
            FILLS.len()
        );
        points.extend(grid.run(model, name, &data.val, &seqs, base)?);
    }
    Frontier::new(points, "phase 1", "baseline")
}

/// The frontier's table, the training bills, and where LEGO stands; `frontier.svg` and
/// `frontier.csv` into `--out`.
pub fn print_frontier(
    f: &Frontier,
    lego: (f64, f64),
    (baseline, tuned): (&Stage, &Stage),
    o: &Options,
) -> Result<()> {
    let windows =
        o.frontier_windows.map_or("the whole test split".into(), |n| format!("the first {n} test windows"));
    println!(
        "\n## Frontier ({windows}, token by token; cost = FLOPs per token / the baseline's)\n\n{}",
        f.table()
    );
    let tuned_total = (baseline.seconds + tuned.seconds, baseline.flops + tuned.flops);
    println!(
        "training: LEGO {:.3e} FLOPs ({:.0} s); baseline {:.3e} ({:.0} s); baseline + tuned exit head {:.3e} ({:.0} s)",
        lego.1, lego.0, baseline.flops, baseline.seconds, tuned_total.1, tuned_total.0
    );
    println!("{}", f.summary("baseline + tuned exit head", |s| s.starts_with("baseline + tuned")));
    println!("{}", f.summary("LEGO with early exit", |s| s.starts_with("LEGO,")));
    let svg = write_frontier_svg(f, "LEGO against the static frontier (test split)", &o.out, "frontier.svg")?;
    let csv = write_into(&o.out, "frontier.csv", f.to_csv().to_string().as_bytes())?;
    eprintln!("\nwrote {} and {}", svg.display(), csv.display());
    Ok(())
}
