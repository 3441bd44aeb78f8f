//! The report of the LEGO experiment (`examples/true_early_exit.rs`): what it measured, as
//! tables on stdout ([`ExperimentReport`]'s `Display`), `report.json` and `results.csv`.
//!
//! The example runs the stages and fills these records; everything about presenting them lives
//! here, so the example reads as the list of its stages.
//!
//! **Training FLOPs** ([`Stage::flops`]) are 3 × the forward FLOPs of every position trained
//! ([`cost::training_flops`]): for phase 1 and the baseline every layer; for phase 2 only the upper layers and the deep head, over every position they
//! ran, plus the one forward pass of the lower layers and the exit head over the training split
//! that collected the hard examples. Validation passes for early stopping are not counted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Csv, Table, write_into};
use crate::error::Result;
use crate::io::json::Json;
use crate::model::{LegoConfig, cost};
use crate::train::{EvalStats, ExitHeadHistory, History, Phase2History, Phase2Mode, TrainingCheckpoint};

/// The name of a phase-2 mode in reports, flags and checkpoints.
pub fn mode_name(mode: Phase2Mode) -> &'static str {
    match mode {
        Phase2Mode::Sequence => "sequence",
        Phase2Mode::SequenceSkip => "sequence-skip",
        Phase2Mode::Token => "token",
    }
}

/// `0.123` as `12.3 %`.
pub fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// The relative change from `from` to `to`, as `+4.2 %`.
pub fn change(from: f64, to: f64) -> String {
    format!("{:+.1} %", 100.0 * (to / from - 1.0))
}

/// What a training stage cost and how it went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stage {
    /// Wall time, seconds.
    pub seconds: f64,
    /// Training FLOPs (see the module doc).
    pub flops: f64,
    /// Epochs run.
    pub epochs_run: usize,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Per epoch: (train loss, validation PPL); the routed validation PPL for phase 2.
    pub curve: Vec<(f64, f64)>,
    /// Read from a checkpoint rather than run now.
    pub loaded: bool,
}

impl Stage {
    /// Phase 1 or the baseline, from its history: every layer and the head of `config`, over
    /// every training token in windows of `seq_len`.
    pub fn of_training(history: &History, config: &LegoConfig, seq_len: usize, seconds: f64) -> Stage {
        Stage {
            seconds,
            flops: cost::training_flops(config, config.num_layers, history.tokens as f64, seq_len),
            epochs_run: history.epochs.len(),
            best_epoch: history.best_epoch,
            steps: history.steps,
            curve: history.epochs.iter().map(|e| (e.train_loss, e.val_ppl)).collect(),
            loaded: false,
        }
    }

    /// Collecting hard examples: the lower layers and the exit head over `tokens` training
    /// tokens (one forward pass).
    pub fn of_collection(tokens: usize, config: &LegoConfig, seq_len: usize, seconds: f64) -> Stage {
        let per_token =
            config.exit_layer as f64 * cost::mean_layer_flops(config, seq_len) + cost::head_flops(config);
        Stage { seconds, flops: tokens as f64 * per_token, ..Stage::default() }
    }

    /// Phase 2 in `mode`: the upper layers and the deep head, forward and backward, over every
    /// position they ran (whole hard sequences of `hard_seq_len` in `sequence` mode, one
    /// position per hard token in `token` mode).
    pub fn of_phase2(
        history: &Phase2History,
        config: &LegoConfig,
        mode: Phase2Mode,
        hard_seq_len: usize,
        seconds: f64,
    ) -> Stage {
        let upper = (config.num_layers - config.exit_layer) as f64;
        let layer = match mode {
            // (The skip mask hides keys but the attention still scores them all.)
            Phase2Mode::Sequence | Phase2Mode::SequenceSkip => cost::mean_layer_flops(config, hard_seq_len),
            Phase2Mode::Token => cost::layer_flops(config, 1),
        };
        Stage {
            seconds,
            flops: 3.0 * history.positions as f64 * (upper * layer + cost::head_flops(config)),
            // Epoch 0 is the evaluation before any step (its train loss is NaN), not a run.
            epochs_run: history.epochs.iter().filter(|e| e.epoch > 0).count(),
            best_epoch: history.best_epoch,
            steps: history.steps,
            curve: history.epochs.iter().map(|e| (e.train_loss, e.val_ppl_routed)).collect(),
            loaded: false,
        }
    }

    /// Tuning an exit head: the exit states of `train_tokens` tokens once (the lower layers),
    /// then a head forward and backward per token trained.
    pub fn of_exit_head(
        history: &ExitHeadHistory,
        config: &LegoConfig,
        train_tokens: usize,
        seq_len: usize,
        seconds: f64,
    ) -> Stage {
        let states = train_tokens as f64 * config.exit_layer as f64 * cost::mean_layer_flops(config, seq_len);
        Stage {
            seconds,
            flops: states + 3.0 * history.tokens as f64 * cost::head_flops(config),
            epochs_run: history.epochs.len(),
            best_epoch: history.best_epoch,
            steps: history.steps,
            curve: history.epochs.iter().map(|e| (e.train_loss, e.val_ppl)).collect(),
            loaded: false,
        }
    }

    /// The checkpoint metadata that records this stage (`stage.seconds`, ...).
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("stage.seconds".into(), self.seconds.to_string()),
            ("stage.flops".into(), self.flops.to_string()),
            ("stage.epochs_run".into(), self.epochs_run.to_string()),
            ("stage.best_epoch".into(), self.best_epoch.to_string()),
            ("stage.steps".into(), self.steps.to_string()),
        ])
    }

    /// The stage a checkpoint recorded with [`Stage::to_metadata`] (`loaded`, no curve); the
    /// error names the file and the missing or malformed entry.
    pub fn from_checkpoint(ckpt: &TrainingCheckpoint) -> Result<Stage> {
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

    fn to_json(&self) -> Json {
        let curve = self
            .curve
            .iter()
            .map(|&(loss, ppl)| Json::object([("train_loss", loss.into()), ("val_ppl", ppl.into())]));
        Json::object([
            ("seconds", self.seconds.into()),
            ("training_flops", self.flops.into()),
            ("epochs_run", self.epochs_run.into()),
            ("best_epoch", self.best_epoch.into()),
            ("steps", (self.steps as usize).into()),
            ("loaded_from_checkpoint", self.loaded.into()),
            ("curve", Json::Array(curve.collect())),
        ])
    }
}

/// The settings of a run that the report states (the example's flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// Seeds the split, the batch order and the inits.
    pub seed: u64,
    /// `byte` or `word`.
    pub tokenizer: String,
    /// The tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// Tokens per training window.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub ffn_hidden: usize,
    /// Layers of phase 1 (the exit layer).
    pub phase1_layers: usize,
    /// Layers after extending.
    pub phase2_layers: usize,
    /// Most epochs of phase 1 and the baseline.
    pub epochs: usize,
    /// Most epochs of phase 2.
    pub phase2_epochs: usize,
    /// Early-stopping patience.
    pub patience: usize,
    /// Learning rate of phase 1 and the baseline.
    pub lr: f32,
    /// Learning rate of phase 2.
    pub lr2: f32,
    /// How `extend` initialises the new layers: `random` (the spec's), `stack` or `identity`.
    pub init: String,
    /// Target share of validation tokens under the threshold.
    pub hard_ratio: f32,
    /// Tokens generated in the TRUE early-exit run.
    pub max_new_tokens: usize,
}

/// One model's test figures.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEval {
    /// "phase 1", "phase 2 (sequence)", "baseline", ...
    pub name: String,
    /// Full depth.
    pub full: EvalStats,
    /// With (fake) early exit at the threshold; `None` for a model with no upper part.
    pub routed: Option<EvalStats>,
    /// Validation PPL at full depth (the split the prototype reported on).
    pub val_ppl: f64,
    /// PPL on the test split's hard tokens (deep path, tokens in their sequences).
    pub hard_ppl: f64,
    /// For a token-mode model: the same tokens fed alone, as it was trained.
    pub hard_ppl_alone: Option<f64>,
}

/// Every model's test figures, phase 1 first and the baseline last.
#[derive(Clone, Debug, PartialEq)]
pub struct Evals {
    /// Phase 1, each phase-2 model, the baseline.
    pub models: Vec<ModelEval>,
    /// Test hard tokens (phase-1 confidence under the threshold) and all test tokens.
    pub test_hard: (usize, usize),
    /// The hard share on validation with the phase-2 exit (the exit head is frozen, so it must
    /// equal the target).
    pub val_hard_ratio_after: f64,
}

/// Ordinary and early-exit generation from one prompt, compared.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    /// Full-depth continuation.
    pub full_text: String,
    /// Early-exit continuation.
    pub early_text: String,
    /// Share of generated tokens identical to full-depth generation.
    pub agreement: f64,
    /// Of the full-depth generation's tokens, how many the exit head's most likely token (on
    /// the lower layers' state, teacher-forced) equals: the most that could exit without
    /// changing a greedy token, whatever the routing.
    pub exit_would_agree: usize,
    /// Tokens that exited.
    pub shallow: usize,
    /// Tokens that went deep.
    pub deep: usize,
    /// The spec's layer cost.
    pub layer_cost: f64,
    /// FLOPs against full depth.
    pub flop_cost: f64,
    /// The exit measure the early-exit run routed by (`softmax` or `gate`).
    pub measure: String,
    /// Median wall-clock seconds at full depth with the KV cache.
    pub seconds_full: f64,
    /// Median wall-clock seconds with early exit.
    pub seconds_early: f64,
    /// The paired-median speed-up: full depth and early exit timed alternately, rep after
    /// rep, and the median of each rep's own ratio (a busy moment slows both sides of a pair).
    pub speedup: f64,
    /// What the FLOP count promises: `1 / flop_cost`.
    pub ideal_speedup: f64,
    /// Best wall-clock seconds with no KV cache at all.
    pub seconds_no_cache: f64,
    /// Median wall-clock seconds of the full-depth call with one new token: the prompt's
    /// prefill and the first token, which both runs pay alike and the FLOP ideal leaves out.
    pub seconds_prompt: f64,
}

impl Generation {
    /// The most the early-exit call could gain if every step after the prompt ran at exactly
    /// its FLOP ideal, the prompt and first token costing what they measured (both runs pay
    /// them alike): `t_full / (t_prompt + (t_full − t_prompt) / ideal)`. An estimate (the ideal
    /// counts the first token's FLOPs too), which says how much of the gap between the measured
    /// speed-up and the FLOP ideal is the prompt's share of the call rather than the decoder's.
    pub fn ceiling(&self) -> f64 {
        let decode = (self.seconds_full - self.seconds_prompt).max(0.0);
        self.seconds_full / (self.seconds_prompt + decode / self.ideal_speedup)
    }
}

/// One row of the early-exit table.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitTableRow {
    /// The model's name.
    pub model: String,
    /// `skip` or `propagate`.
    pub fill: &'static str,
    /// The validation hard ratio the threshold was set at (`None`: never exit).
    pub ratio: Option<f32>,
    /// The threshold.
    pub threshold: f32,
    /// Greedy generation from test prompts: share identical to full depth.
    pub agreement: f64,
    /// Shallow share in that generation.
    pub gen_shallow_ratio: f64,
    /// Its layer cost.
    pub gen_layer_cost: f64,
    /// Its FLOP cost.
    pub gen_flop_cost: f64,
    /// Test windows fed token by token through the early-exit engine: PPL.
    pub tf_ppl: f64,
    /// Their shallow share.
    pub tf_shallow_ratio: f64,
}

/// A phase-2 run as the report sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase2Record {
    /// How the hard examples were fed.
    pub mode: Phase2Mode,
    /// What it cost.
    pub stage: Stage,
}

impl Phase2Record {
    /// "phase 2 (sequence)".
    pub fn model_name(&self) -> String {
        format!("phase 2 ({})", mode_name(self.mode))
    }
}

/// Everything the experiment reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentReport {
    /// The run's settings.
    pub settings: Settings,
    /// Where the text came from.
    pub source: String,
    /// Document names of train, val and test.
    pub split_names: [Vec<String>; 3],
    /// Targets in train, val and test.
    pub tokens: [usize; 3],
    /// The routing threshold.
    pub threshold: f32,
    /// Phase 1.
    pub phase1_stage: Stage,
    /// Collecting the hard examples.
    pub collect_stage: Stage,
    /// Each phase-2 run; the first is the one generation used.
    pub phase2: Vec<Phase2Record>,
    /// The baseline.
    pub baseline_stage: Stage,
    /// Parameters of the phase-1 model.
    pub phase1_params: usize,
    /// Parameters of the phase-2 model.
    pub phase2_params: usize,
    /// Test figures.
    pub evals: Evals,
    /// The TRUE early-exit generation.
    pub generation: Generation,
    /// The early-exit table.
    pub table: Vec<ExitTableRow>,
    /// Prompts of the table's agreement column.
    pub table_prompts: usize,
    /// Their length in tokens.
    pub table_prompt_len: usize,
    /// Test windows behind the table's teacher-forced PPL.
    pub table_windows: usize,
    /// The generation prompt, decoded.
    pub prompt: String,
    /// The device line.
    pub device: String,
    /// Wall time of the whole run.
    pub seconds: f64,
}

impl ExperimentReport {
    /// LEGO's whole training bill for one phase-2 run: phase 1, collection, phase 2
    /// (seconds, FLOPs).
    pub fn lego_total(&self, run: &Phase2Record) -> (f64, f64) {
        (
            self.phase1_stage.seconds + self.collect_stage.seconds + run.stage.seconds,
            self.phase1_stage.flops + self.collect_stage.flops + run.stage.flops,
        )
    }

    /// The hard share on the test split with the first phase-2 model's exit.
    fn test_hard_after(&self) -> f64 {
        1.0 - self.evals.models[1].routed.as_ref().map_or(0.0, |s| s.shallow_ratio)
    }

    /// `report.json` (everything) and `results.csv` (`section,model,metric,value`), written
    /// atomically into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 2]> {
        let (json, csv) = (self.to_json(), self.to_csv());
        Ok([
            write_into(dir, "report.json", json.to_string_pretty().as_bytes())?,
            write_into(dir, "results.csv", csv.to_string().as_bytes())?,
        ])
    }

    /// `results.csv`: one `section,model,metric,value` row per number.
    pub fn to_csv(&self) -> Csv {
        let (e, g) = (&self.evals, &self.generation);
        let mut csv = Csv::new(["section", "model", "metric", "value"]);
        let mut put = |section: &str, model: &str, metric: &str, value: f64| {
            csv.push([section, model, metric, &format!("{value}")]);
        };
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
        }
        put("training", "phase 1", "flops", self.phase1_stage.flops);
        put("training", "phase 1", "seconds", self.phase1_stage.seconds);
        put("training", "collect hard examples", "flops", self.collect_stage.flops);
        put("training", "baseline", "flops", self.baseline_stage.flops);
        put("training", "baseline", "seconds", self.baseline_stage.seconds);
        for run in &self.phase2 {
            let (secs, flops) = self.lego_total(run);
            let (name, total) = (run.model_name(), format!("LEGO total ({})", mode_name(run.mode)));
            put("training", &name, "flops", run.stage.flops);
            put("training", &name, "seconds", run.stage.seconds);
            put("training", &total, "flops", flops);
            put("training", &total, "seconds", secs);
        }
        let gm = self.phase2[0].model_name();
        put("generation", &gm, "shallow_count", g.shallow as f64);
        put("generation", &gm, "deep_count", g.deep as f64);
        put("generation", &gm, "layer_cost", g.layer_cost);
        put("generation", &gm, "flop_cost", g.flop_cost);
        put("generation", &gm, "speedup", g.speedup);
        put("generation", &gm, "ideal_speedup", g.ideal_speedup);
        put("generation", &gm, "ceiling_with_prompt", g.ceiling());
        put("generation", &gm, "kv_cache_speedup", g.seconds_no_cache / g.seconds_full);
        put("generation", &gm, "agreement", g.agreement);
        for row in &self.table {
            let ratio = row.ratio.map_or("never".into(), |x| x.to_string());
            let section = format!("early_exit_table {} ratio={ratio}", row.fill);
            put(&section, &row.model, "threshold", row.threshold as f64);
            put(&section, &row.model, "agreement", row.agreement);
            put(&section, &row.model, "gen_layer_cost", row.gen_layer_cost);
            put(&section, &row.model, "gen_flop_cost", row.gen_flop_cost);
            put(&section, &row.model, "teacher_forced_ppl", row.tf_ppl);
            put(&section, &row.model, "teacher_forced_shallow_ratio", row.tf_shallow_ratio);
        }
        csv
    }

    /// `report.json`: the settings, the split, every stage, every figure.
    pub fn to_json(&self) -> Json {
        let (o, e, g) = (&self.settings, &self.evals, &self.generation);
        let eval_json = |s: &EvalStats| {
            Json::object([
                ("ppl", s.ppl.into()),
                ("loss", s.loss.into()),
                ("accuracy", s.accuracy.into()),
                ("tokens", s.tokens.into()),
                ("shallow_ratio", s.shallow_ratio.into()),
                ("layer_cost", s.layer_cost.into()),
                ("flop_cost", s.flop_cost.into()),
                ("full_depth_ppl", s.full_depth_loss.exp().into()),
            ])
        };
        let models = e.models.iter().map(|m| {
            Json::object([
                ("name", m.name.as_str().into()),
                ("test_full_depth", eval_json(&m.full)),
                ("test_early_exit", m.routed.as_ref().map_or(Json::Null, eval_json)),
                ("val_ppl_full_depth", m.val_ppl.into()),
                ("test_hard_ppl", m.hard_ppl.into()),
                ("test_hard_ppl_tokens_alone", m.hard_ppl_alone.map_or(Json::Null, Json::from)),
            ])
        });
        let phase2 = self.phase2.iter().map(|run| {
            let (secs, flops) = self.lego_total(run);
            Json::object([
                ("mode", mode_name(run.mode).into()),
                ("stage", run.stage.to_json()),
                ("lego_total_seconds", secs.into()),
                ("lego_total_flops", flops.into()),
            ])
        });
        let training = Json::object([
            ("phase1", self.phase1_stage.to_json()),
            ("collect_hard_examples", self.collect_stage.to_json()),
            ("baseline", self.baseline_stage.to_json()),
            ("phase2", Json::Array(phase2.collect())),
        ]);
        let table = self.table.iter().map(|row| {
            Json::object([
                ("model", row.model.as_str().into()),
                ("fill", row.fill.into()),
                ("val_hard_ratio", row.ratio.map_or(Json::Null, Json::f32_decimal)),
                ("threshold", Json::f32_decimal(row.threshold)),
                ("greedy_agreement", row.agreement.into()),
                ("generation_shallow_ratio", row.gen_shallow_ratio.into()),
                ("generation_layer_cost", row.gen_layer_cost.into()),
                ("generation_flop_cost", row.gen_flop_cost.into()),
                ("teacher_forced_ppl", row.tf_ppl.into()),
                ("teacher_forced_shallow_ratio", row.tf_shallow_ratio.into()),
            ])
        });
        let names = |i: usize| Json::from(self.split_names[i].iter().map(String::as_str).collect::<Vec<_>>());
        let settings = Json::object([
            ("seed", (o.seed as usize).into()),
            ("tokenizer", o.tokenizer.as_str().into()),
            ("vocab_size", o.vocab_size.into()),
            ("seq_len", o.seq_len.into()),
            ("batch_size", o.batch_size.into()),
            ("dim", o.dim.into()),
            ("heads", o.heads.into()),
            ("ffn_hidden", o.ffn_hidden.into()),
            ("phase1_layers", o.phase1_layers.into()),
            ("phase2_layers", o.phase2_layers.into()),
            ("epochs", o.epochs.into()),
            ("phase2_epochs", o.phase2_epochs.into()),
            ("patience", o.patience.into()),
            ("lr", Json::f32_decimal(o.lr)),
            ("lr2", Json::f32_decimal(o.lr2)),
            ("init", o.init.as_str().into()),
            ("hard_ratio", Json::f32_decimal(o.hard_ratio)),
            ("max_new_tokens", o.max_new_tokens.into()),
        ]);
        let generation = Json::object([
            ("model", self.phase2[0].model_name().into()),
            ("prompt", self.prompt.as_str().into()),
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
            ("seconds_prompt_and_first_token", g.seconds_prompt.into()),
            ("exit_measure", g.measure.as_str().into()),
            ("speedup", g.speedup.into()),
            ("ideal_speedup", g.ideal_speedup.into()),
            ("ceiling_with_prompt", g.ceiling().into()),
            ("identical_tokens", g.agreement.into()),
            ("exit_argmax_agrees", g.exit_would_agree.into()),
        ]);
        Json::object([
            ("data", self.source.as_str().into()),
            ("split", Json::object([("train", names(0)), ("val", names(1)), ("test", names(2))])),
            ("device", self.device.as_str().into()),
            ("run_seconds", self.seconds.into()),
            ("settings", settings),
            (
                "tokens",
                Json::object([
                    ("train", self.tokens[0].into()),
                    ("val", self.tokens[1].into()),
                    ("test", self.tokens[2].into()),
                ]),
            ),
            ("threshold", Json::f32_decimal(self.threshold)),
            (
                "hard_ratio",
                Json::object([
                    ("target", Json::f32_decimal(o.hard_ratio)),
                    ("val_after_phase2", e.val_hard_ratio_after.into()),
                    ("test_after_phase2", self.test_hard_after().into()),
                    ("test_hard_tokens", e.test_hard.0.into()),
                    ("test_tokens", e.test_hard.1.into()),
                ]),
            ),
            ("training", training),
            ("models", Json::Array(models.collect())),
            ("true_early_exit", generation),
            ("early_exit_table", Json::Array(table.collect())),
        ])
    }

    /// The run's header lines: data, split, tokens, model, threshold.
    fn fmt_header(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (o, e) = (&self.settings, &self.evals);
        writeln!(f, "\n# LEGO: TRUE early exit\n")?;
        writeln!(f, "data: {}", self.source)?;
        writeln!(f, "split (seed {}): test = [{}]", o.seed, self.split_names[2].join(", "))?;
        writeln!(f, "                 val  = [{}]", self.split_names[1].join(", "))?;
        writeln!(f, "                 train = {} documents", self.split_names[0].len())?;
        writeln!(
            f,
            "tokenizer: {} (V = {}); tokens train/val/test: {} / {} / {}; seq_len {}, batch {}",
            o.tokenizer,
            o.vocab_size,
            self.tokens[0],
            self.tokens[1],
            self.tokens[2],
            o.seq_len,
            o.batch_size
        )?;
        writeln!(
            f,
            "model: D={} H={} F={}; phase 1 {} layers ({} params), phase 2 {} layers ({} params), exit after layer {}",
            o.dim,
            o.heads,
            o.ffn_hidden,
            o.phase1_layers,
            self.phase1_params,
            o.phase2_layers,
            self.phase2_params,
            o.phase1_layers
        )?;
        writeln!(
            f,
            "threshold {:.4}: target hard ratio {} on validation; measured after phase 2: validation {}, test {}",
            self.threshold,
            pct(o.hard_ratio as f64),
            pct(e.val_hard_ratio_after),
            pct(self.test_hard_after()),
        )?;
        writeln!(f, "device: {}; total run time {:.0} s", self.device, self.seconds)
    }

    /// Training: each stage's epochs, steps, time and FLOPs, and LEGO's totals.
    fn training_table(&self) -> Table {
        let mut t = Table::new(["stage", "epochs run (best)", "steps", "time", "training FLOPs"]);
        let stage_row = |t: &mut Table, name: &str, s: &Stage| {
            let loaded = if s.loaded { " (loaded)" } else { "" };
            t.row([
                format!("{name}{loaded}"),
                format!("{} ({})", s.epochs_run, s.best_epoch),
                s.steps.to_string(),
                format!("{:.1} s", s.seconds),
                format!("{:.3e}", s.flops),
            ]);
        };
        stage_row(&mut t, "phase 1", &self.phase1_stage);
        stage_row(&mut t, "collect hard examples", &self.collect_stage);
        for run in &self.phase2 {
            stage_row(&mut t, &run.model_name(), &run.stage);
        }
        for run in &self.phase2 {
            let (secs, flops) = self.lego_total(run);
            t.row([
                format!("**LEGO total, {} mode**", mode_name(run.mode)),
                String::new(),
                String::new(),
                format!("{secs:.1} s"),
                format!("{flops:.3e} ({} of the baseline's)", pct(flops / self.baseline_stage.flops)),
            ]);
        }
        stage_row(&mut t, "baseline", &self.baseline_stage);
        t
    }

    /// The test split: full depth and fake early exit for every model.
    fn test_table(&self) -> Table {
        let mut t = Table::new([
            "model",
            "test PPL full depth",
            "test PPL early exit",
            "accuracy (full / exit)",
            "shallow",
            "layer cost",
            "FLOP cost",
            "hard-token PPL",
            "val PPL",
        ]);
        for m in &self.evals.models {
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
            t.row([
                m.name.clone(),
                format!("{:.3}", m.full.ppl),
                ee_ppl,
                acc,
                shallow,
                lc,
                fc,
                hard,
                format!("{:.3}", m.val_ppl),
            ]);
        }
        t
    }

    /// The early-exit table: per model, fill and threshold.
    fn exit_table(&self) -> Table {
        let mut t = Table::new([
            "model",
            "fill",
            "threshold (val hard ratio)",
            "identical greedy tokens",
            "shallow (gen)",
            "layer cost",
            "FLOP cost",
            "teacher-forced PPL",
            "vs never exiting",
            "shallow (tf)",
        ]);
        for row in &self.table {
            let reference = self
                .table
                .iter()
                .find(|x| x.model == row.model && x.fill == row.fill && x.ratio.is_none())
                .map_or(row.tf_ppl, |x| x.tf_ppl);
            let threshold = match row.ratio {
                Some(ratio) => format!("{:.4} ({})", row.threshold, pct(ratio as f64)),
                None => "never exit".into(),
            };
            t.row([
                row.model.clone(),
                row.fill.to_string(),
                threshold,
                pct(row.agreement),
                pct(row.gen_shallow_ratio),
                format!("{:.3}", row.gen_layer_cost),
                format!("{:.3}", row.gen_flop_cost),
                format!("{:.3}", row.tf_ppl),
                change(reference, row.tf_ppl),
                pct(row.tf_shallow_ratio),
            ]);
        }
        t
    }

    /// The prototype's published figures (spec) beside ours, saying which compare.
    fn prototype_table(&self) -> Table {
        let e = &self.evals;
        let (p1, p2, g) = (&e.models[0], &e.models[1], &self.generation);
        let routed = p2.routed.as_ref().expect("phase-2 models are routed");
        let ours = format!("ours ({}, {} tokenizer, test split)", p2.name, self.settings.tokenizer);
        let mut t = Table::new(["metric", "prototype", ours.as_str(), "comparable?"]);
        let shallow_share = pct(g.shallow as f64 / (g.shallow + g.deep).max(1) as f64);
        let rows: [[String; 4]; 13] = [
            [
                "PPL phase 1 → phase 2".into(),
                "986.4 → 829.8 (val)".into(),
                format!("{:.3} → {:.3} (test, full depth)", p1.full.ppl, p2.full.ppl),
                "no: absolute PPL depends on the tokenizer and data".into(),
            ],
            [
                "relative PPL change phase 1 → 2".into(),
                "−15.9 % (val, the split its hard examples came from)".into(),
                format!("{} test, {} val", change(p1.full.ppl, p2.full.ppl), change(p1.val_ppl, p2.val_ppl)),
                "yes".into(),
            ],
            [
                "same, prototype code on Shakespeare".into(),
                "val −11 % (2,263 → 2,012), test +46 % (2,208 → 3,215)".into(),
                change(p1.full.ppl, p2.full.ppl) + " test",
                "yes (relative)".into(),
            ],
            [
                "accuracy phase 1 → 2".into(),
                "16.03 % → 15.77 %".into(),
                format!("{} → {}", pct(p1.full.accuracy), pct(p2.full.accuracy)),
                "no: depends on the tokenizer".into(),
            ],
            [
                "hard-example PPL phase 1 → 2".into(),
                "2,763.7 → 668.1 (−75.8 %, val hard tokens fed alone)".into(),
                format!(
                    "{:.2} → {:.2} ({}, test hard tokens in context)",
                    p1.hard_ppl,
                    p2.hard_ppl,
                    change(p1.hard_ppl, p2.hard_ppl)
                ),
                "the relative change only".into(),
            ],
            [
                "fake early exit: shallow share".into(),
                "70.4 %".into(),
                pct(routed.shallow_ratio),
                "yes (set by the threshold: ours targets 50 % hard)".into(),
            ],
            [
                "fake early exit: layer compute".into(),
                "64.8 %".into(),
                format!("{} (FLOPs: {})", pct(routed.layer_cost), pct(routed.flop_cost)),
                "yes".into(),
            ],
            [
                "early exit PPL cost (vs same model at full depth)".into(),
                "+4.5 % at 40 % saved (prototype code, Shakespeare)".into(),
                format!("{} at {} saved", change(p2.full.ppl, routed.ppl), pct(1.0 - routed.layer_cost)),
                "yes".into(),
            ],
            [
                "hard share: target → measured after phase 2".into(),
                "50 % → 30 % (its head kept training)".into(),
                format!(
                    "{} → {} (val), {} (test)",
                    pct(self.settings.hard_ratio as f64),
                    pct(e.val_hard_ratio_after),
                    pct(1.0 - routed.shallow_ratio)
                ),
                "yes".into(),
            ],
            [
                "TRUE early exit: shallow / deep of 32".into(),
                "21 / 11 (65.6 %)".into(),
                format!("{} / {} ({shallow_share})", g.shallow, g.deep),
                "yes".into(),
            ],
            [
                "TRUE early exit: layer compute (saved)".into(),
                "67.2 % (32.8 %)".into(),
                format!(
                    "{} ({}); FLOPs {} ({})",
                    pct(g.layer_cost),
                    pct(1.0 - g.layer_cost),
                    pct(g.flop_cost),
                    pct(1.0 - g.flop_cost)
                ),
                "yes".into(),
            ],
            [
                "TRUE early exit: wall-clock speed-up".into(),
                "1.08x (Shakespeare: 1.27x where layers promised 1.59x)".into(),
                format!(
                    "{:.2}x, paired median, {} measure (layers promise {:.2}x, FLOPs {:.2}x)",
                    g.speedup,
                    g.measure,
                    1.0 / g.layer_cost,
                    g.ideal_speedup
                ),
                "yes".into(),
            ],
            [
                "KV cache alone (no cache → cache)".into(),
                "1.48x".into(),
                format!("{:.2}x", g.seconds_no_cache / g.seconds_full),
                "roughly (depends on the sequence length)".into(),
            ],
        ];
        for row in rows {
            t.row(row);
        }
        t
    }
}

impl fmt::Display for ExperimentReport {
    /// Every table of the run, as Markdown, in the order the stages ran.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (o, e, g) = (&self.settings, &self.evals, &self.generation);
        self.fmt_header(f)?;
        writeln!(f, "\n## Training\n\n{}", self.training_table())?;
        writeln!(
            f,
            "## Test split (fake early exit: both paths computed, then routed)\n\n{}",
            self.test_table()
        )?;
        writeln!(
            f,
            "hard tokens: {} of {} test tokens ({}), collected with the phase-1 exit at the threshold;",
            e.test_hard.0,
            e.test_hard.1,
            pct(e.test_hard.0 as f64 / e.test_hard.1 as f64)
        )?;
        let lego_models = &e.models[1..e.models.len() - 1];
        let gains: Vec<String> = lego_models
            .iter()
            .map(|m| format!("{} {}", m.name, change(e.models[0].hard_ppl, m.hard_ppl)))
            .collect();
        writeln!(
            f,
            "phase 1 → phase 2 on them: {}; the baseline's early exit uses its own final head at layer {} (never trained to exit).",
            gains.join(", "),
            o.phase1_layers
        )?;

        writeln!(
            f,
            "\n## TRUE early exit, generating {} tokens ({} model, skip fill)\n",
            o.max_new_tokens,
            self.phase2[0].model_name()
        )?;
        writeln!(f, "prompt: {:?}", self.prompt)?;
        writeln!(f, "full depth: {:?}", g.full_text)?;
        writeln!(f, "early exit: {:?}\n", g.early_text)?;
        let mut t = Table::new([
            "shallow / deep",
            "layer cost (saved)",
            "FLOP cost (saved)",
            "time full / early exit",
            "speed-up",
            "identical tokens",
            "exit head's argmax = the token",
            "no KV cache → KV cache",
        ]);
        t.row([
            format!(
                "{} / {} ({})",
                g.shallow,
                g.deep,
                pct(g.shallow as f64 / (g.shallow + g.deep).max(1) as f64)
            ),
            format!("{} ({})", pct(g.layer_cost), pct(1.0 - g.layer_cost)),
            format!("{} ({})", pct(g.flop_cost), pct(1.0 - g.flop_cost)),
            format!(
                "{:.2} / {:.2} ms (prompt + 1st token {:.2})",
                1e3 * g.seconds_full,
                1e3 * g.seconds_early,
                1e3 * g.seconds_prompt
            ),
            format!(
                "{:.2}x ({}; FLOP ideal {:.2}x, {:.2}x with the prompt)",
                g.speedup,
                g.measure,
                g.ideal_speedup,
                g.ceiling()
            ),
            pct(g.agreement),
            format!("{} of {}", g.exit_would_agree, g.shallow + g.deep),
            format!("{:.2}x", g.seconds_no_cache / g.seconds_full),
        ]);
        writeln!(f, "{t}")?;
        writeln!(
            f,
            "## Early-exit table ({} test prompts of {} tokens + {} generated; teacher-forced PPL on {} test windows)\n\n{}",
            self.table_prompts,
            self.table_prompt_len,
            o.max_new_tokens,
            self.table_windows,
            self.exit_table()
        )?;
        writeln!(
            f,
            "## Against the prototype (spec: WikiText-2 words, V≈10k, seq 32; its PPLs are on validation)\n\n{}",
            self.prototype_table()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::json;

    fn stats(ppl: f64, shallow_ratio: f64) -> EvalStats {
        EvalStats {
            loss: ppl.ln(),
            ppl,
            accuracy: 0.5,
            tokens: 100,
            shallow: (100.0 * shallow_ratio) as usize,
            shallow_ratio,
            layer_cost: 1.0 - shallow_ratio / 2.0,
            flop_cost: 1.0 - shallow_ratio / 3.0,
            full_depth_loss: ppl.ln(),
        }
    }

    /// A report with made-up numbers, in the shape a run fills.
    pub(crate) fn sample() -> ExperimentReport {
        let model = |name: &str, routed: Option<EvalStats>| ModelEval {
            name: name.into(),
            full: stats(5.0, 0.0),
            routed,
            val_ppl: 5.5,
            hard_ppl: 10.0,
            hard_ppl_alone: None,
        };
        let stage =
            Stage { seconds: 2.0, flops: 1e9, epochs_run: 2, best_epoch: 2, steps: 10, ..Stage::default() };
        ExperimentReport {
            settings: Settings { tokenizer: "byte".into(), hard_ratio: 0.5, lr: 1e-3, ..Settings::default() },
            source: "synthetic".into(),
            split_names: [vec!["a".into(), "b".into()], vec!["c".into()], vec!["d, e".into()]],
            tokens: [1000, 100, 100],
            threshold: 0.4,
            phase1_stage: stage.clone(),
            collect_stage: Stage { flops: 1e8, ..Stage::default() },
            phase2: vec![Phase2Record { mode: Phase2Mode::Sequence, stage: stage.clone() }],
            baseline_stage: stage,
            phase1_params: 10,
            phase2_params: 20,
            evals: Evals {
                models: vec![
                    model("phase 1", None),
                    model("phase 2 (sequence)", Some(stats(5.2, 0.5))),
                    model("baseline", Some(stats(6.0, 0.5))),
                ],
                test_hard: (50, 100),
                val_hard_ratio_after: 0.5,
            },
            generation: Generation {
                shallow: 3,
                deep: 1,
                measure: "gate".into(),
                seconds_full: 2.0,
                seconds_early: 1.0,
                speedup: 2.0,
                ideal_speedup: 1.6,
                ..Generation::default()
            },
            table: vec![ExitTableRow {
                model: "phase 2 (sequence)".into(),
                fill: "skip",
                ratio: Some(0.25),
                threshold: 0.3,
                agreement: 1.0,
                gen_shallow_ratio: 0.5,
                gen_layer_cost: 0.75,
                gen_flop_cost: 0.8,
                tf_ppl: 5.3,
                tf_shallow_ratio: 0.5,
            }],
            table_prompts: 8,
            table_prompt_len: 16,
            table_windows: 64,
            prompt: "the cat".into(),
            device: "cpu".into(),
            seconds: 9.0,
        }
    }

    #[test]
    fn the_ceiling_keeps_the_prompt_and_scales_the_rest_by_the_flop_ideal() {
        // 0.5 s of prompt, 1.5 s of decoding that could run 1.5x faster: 2 / (0.5 + 1) = 4/3.
        let g = Generation {
            seconds_full: 2.0,
            seconds_prompt: 0.5,
            ideal_speedup: 1.5,
            ..Generation::default()
        };
        assert!((g.ceiling() - 4.0 / 3.0).abs() < 1e-12, "{}", g.ceiling());
        // No prompt: the FLOP ideal itself; all prompt: no gain at all.
        assert!((Generation { seconds_prompt: 0.0, ..g.clone() }.ceiling() - 1.5).abs() < 1e-12);
        assert!((Generation { seconds_prompt: 2.0, ..g }.ceiling() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_json_reads_back_with_every_section() {
        let r = sample();
        let v = json::parse(&r.to_json().to_string_pretty()).unwrap();
        assert_eq!(v.get("settings").and_then(|s| s.get("lr")).and_then(Json::as_f64), Some(0.001));
        assert_eq!(v.get("threshold").and_then(Json::as_f64), Some(0.4));
        let models = v.get("models").and_then(Json::as_array).unwrap();
        assert_eq!(models.len(), 3);
        assert!(models[0].get("test_early_exit").unwrap().is_null());
        let speedup = v.get("true_early_exit").and_then(|g| g.get("speedup")).and_then(Json::as_f64);
        assert_eq!(speedup, Some(2.0));
        let test = v.get("split").and_then(|s| s.get("test")).and_then(Json::as_array).unwrap();
        assert_eq!(test[0].as_str(), Some("d, e"));
    }

    #[test]
    fn the_csv_has_one_number_a_row_and_the_tables_print() {
        let r = sample();
        let csv = r.to_csv().to_string();
        assert!(csv.starts_with("section,model,metric,value\ntest,phase 1,ppl_full_depth,5\n"));
        assert!(csv.contains("training,LEGO total (sequence),flops,2100000000\n"), "{csv}");
        assert!(csv.contains("early_exit_table skip ratio=0.25,phase 2 (sequence),threshold,"));
        assert!(csv.lines().skip(1).all(|l| l.split(',').count() == 4));
        let text = r.to_string();
        for heading in
            ["## Training", "## Test split", "## TRUE early exit", "## Early-exit table", "## Against"]
        {
            assert!(text.contains(heading), "{heading} missing");
        }
        assert!(text.contains("| phase 2 (sequence) | 5.000"), "{text}");
    }

    #[test]
    fn reports_are_written_atomically_into_the_directory() {
        let dir = std::env::temp_dir().join(format!("lego-report-test-{}", std::process::id()));
        let [json_path, csv_path] = sample().write(&dir).unwrap();
        assert!(std::fs::read_to_string(json_path).unwrap().contains("\"early_exit_table\""));
        assert!(std::fs::read_to_string(csv_path).unwrap().starts_with("section,"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
