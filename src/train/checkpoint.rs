//! Training checkpoints: everything needed to pick a LEGO run up where it stopped, in one
//! safetensors file.
//!
//! A model checkpoint ([`LegoTransformer::save`]) holds the weights and the config. To resume
//! training, or to evaluate a trained model on the text it was trained for, three more things
//! are needed: the **tokenizer** (a word vocabulary fitted on the training split cannot be
//! rebuilt without that split), the **optimizer's state** (AdamW's step count and its two
//! running moments; without them the next step is not the step that would have been taken),
//! and where the run was (the **phase**, the calibrated **routing threshold**, the epoch, ...).
//!
//! The file is the model checkpoint's layout plus these. Tensors:
//!
//! | name | shape | what |
//! |---|---|---|
//! | the model's names (`tok_embeddings.weight`, `layers.{i}.…`, `norm.weight`, `output.weight`, `exit_*`, `exit_gate.*`) | as in [`crate::model::checkpoint`] | the weights |
//! | `optim.m.<parameter name>` | the parameter's | AdamW's first moment |
//! | `optim.v.<parameter name>` | the parameter's | AdamW's second moment |
//!
//! A parameter the optimizer has never updated (a frozen one) has empty moments, and no
//! `optim.*` tensors at all. Metadata (strings):
//!
//! | key | value |
//! |---|---|
//! | `format` | `lego-training-checkpoint/2` |
//! | `config`, `frozen`, `exit_gate.threshold` (with a gate) | as in a model checkpoint |
//! | `tokenizer` | the tokenizer as compact JSON ([`Tokenizer::to_json`]) |
//! | `optim.step` | the number of AdamW steps taken (what the learning-rate schedule counts) |
//! | `optim.params` | the optimizer's parameters by name, comma-separated, in its order |
//! | `optim.param_steps` | per parameter of `optim.params`, the updates it has had (its bias-correction `t`), comma-separated |
//! | `optim.config` | `{"lr":…,"beta1":…,"beta2":…,"eps":…,"weight_decay":…}` |
//! | `phase` | `phase1` or `phase2` (given by the caller, else `phase2` for an extended model) |
//! | `routing_threshold` | the threshold (given by the caller, else the model config's) |
//! | anything else | the caller's `extra` entries (epoch, seed, the data split, …) |
//!
//! Format 1 had no `optim.param_steps`: its AdamW counted steps globally, so every parameter
//! with moments had had `optim.step` updates, and one without none. Such files still load,
//! with those counts.
//!
//! The optimizer's moments are stored **by parameter name**, not by position, so a state
//! cannot be restored onto the wrong tensors: [`OptimizerState::to_optimizer`] rebuilds the
//! AdamW over the loaded model's parameters of those names. Writing is atomic
//! ([`crate::io::safetensors::save`]); reading checks every name, shape and length and says
//! which file is wrong and how.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::path::Path;
//! use lego::train::{load_training_checkpoint, save_training_checkpoint};
//! # fn run(model: &lego::model::LegoTransformer, tok: &lego::data::Tokenizer,
//! #        opt: &lego::optim::AdamW) -> lego::Result<()> {
//! let extra = BTreeMap::from([("phase".to_string(), "phase1".to_string())]);
//! save_training_checkpoint(Path::new("run.safetensors"), model, tok, opt, &extra)?;
//! let ckpt = load_training_checkpoint(Path::new("run.safetensors"))?;
//! let mut opt = ckpt.optimizer.to_optimizer(&ckpt.model)?; // continue training with this
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::io::json::{self, Json};
use crate::io::safetensors::{self, SafeTensors};
use crate::model::checkpoint::check_finite;
use crate::model::{ExitGate, LegoTransformer};
use crate::optim::{AdamW, AdamWConfig};
use crate::tensor::Tensor;

/// The value of the `format` metadata entry of a training checkpoint written now.
pub const TRAINING_CHECKPOINT_FORMAT: &str = "lego-training-checkpoint/2";

/// The first format, still read: it has no per-parameter step counts (see the module doc).
const TRAINING_CHECKPOINT_FORMAT_1: &str = "lego-training-checkpoint/1";

/// Metadata keys this module writes itself; `extra` may not use them.
const RESERVED: [&str; 9] = [
    "format",
    "config",
    "frozen",
    ExitGate::THRESHOLD_KEY,
    "tokenizer",
    "optim.step",
    "optim.params",
    "optim.param_steps",
    "optim.config",
];

/// AdamW's state, with each moment buffer tied to a parameter by name.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Calls of [`AdamW::step`] (the learning-rate schedule's count).
    pub step: u64,
    /// The hyper-parameters (`lr` as it was at the last step: a schedule may have moved it).
    pub config: AdamWConfig,
    /// The names of the optimizer's parameters, in its order.
    pub params: Vec<String>,
    /// Per entry of `params`, the updates it has had (its bias-correction `t`; 0: never).
    pub param_steps: Vec<u64>,
    /// First moments, one per entry of `params` (empty: never updated).
    pub m: Vec<Vec<f32>>,
    /// Second moments, likewise.
    pub v: Vec<Vec<f32>>,
}

impl OptimizerState {
    /// The state of `opt`, whose parameters must all be parameters of `model` (found by
    /// identity, so their names are known).
    pub fn of(opt: &AdamW, model: &LegoTransformer) -> Result<OptimizerState> {
        let named = model.named_params();
        let params = opt
            .params()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                named.iter().find(|(_, t)| t.id() == p.id()).map(|(n, _)| n.clone()).ok_or_else(|| {
                    Error::Input(format!(
                        "the optimizer's parameter {i} (shape {:?}) is not a parameter of the model",
                        p.shape()
                    ))
                })
            })
            .collect::<Result<Vec<String>>>()?;
        let state = opt.state();
        Ok(OptimizerState {
            step: state.step,
            config: opt.config,
            params,
            param_steps: state.param_steps.to_vec(),
            m: state.m.to_vec(),
            v: state.v.to_vec(),
        })
    }

    /// An AdamW over `model`'s parameters of these names, in this order, with this state
    /// restored: the optimizer that was saved, now updating the loaded model.
    pub fn to_optimizer(&self, model: &LegoTransformer) -> Result<AdamW> {
        let named = model.named_params();
        let params = self
            .params
            .iter()
            .map(|name| {
                named.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).ok_or_else(|| {
                    Error::Input(format!("optimizer state: the model has no parameter '{name}'"))
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let mut opt = AdamW::new(params, self.config);
        opt.set_state(self.step, self.param_steps.clone(), self.m.clone(), self.v.clone())?;
        Ok(opt)
    }
}

/// What [`load_training_checkpoint`] reads back.
#[derive(Debug)]
pub struct TrainingCheckpoint {
    /// The model, with its frozen parameters frozen again.
    pub model: LegoTransformer,
    /// The tokenizer the model's ids belong to.
    pub tokenizer: Tokenizer,
    /// The optimizer's state; [`OptimizerState::to_optimizer`] makes the optimizer.
    pub optimizer: OptimizerState,
    /// Every other metadata entry: `phase`, `routing_threshold`, and the caller's `extra`.
    pub metadata: BTreeMap<String, String>,
    /// The file it came from (for messages).
    pub origin: String,
}

impl TrainingCheckpoint {
    /// The phase the checkpoint was written after (`phase1`, `phase2`, or the caller's word).
    pub fn phase(&self) -> &str {
        self.metadata.get("phase").map_or("", String::as_str)
    }

    /// The routing threshold stored with it.
    pub fn routing_threshold(&self) -> Result<f32> {
        self.number("routing_threshold")
    }

    /// A metadata entry read as a number; the error names the file and the entry.
    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let text = self
            .metadata
            .get(key)
            .ok_or_else(|| Error::Format(format!("{}: no '{key}' in the metadata", self.origin)))?;
        text.parse().map_err(|_| {
            Error::Format(format!("{}: metadata '{key}' is '{text}', not a number", self.origin))
        })
    }
}

/// Writes a training checkpoint of `model`, `tokenizer` and `opt` (whose parameters must be
/// `model`'s) to `path`, atomically. `extra` entries are stored as metadata; `phase` and
/// `routing_threshold` among them override the defaults (see the module doc). Errors: an
/// `extra` key this module reserves, an optimizer over foreign tensors, or the write failing
/// ([`Error::Io`] naming `path`).
pub fn save_training_checkpoint(
    path: &Path,
    model: &LegoTransformer,
    tokenizer: &Tokenizer,
    opt: &AdamW,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    if let Some(key) = extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
        return Err(Error::Input(format!(
            "{}: metadata key '{key}' is written by the checkpoint itself",
            path.display()
        )));
    }
    if tokenizer.vocab_size() != model.config.vocab_size {
        return Err(Error::Input(format!(
            "{}: the tokenizer has {} ids but the model's vocabulary is {}",
            path.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    let state = OptimizerState::of(opt, model)?;

    // The model's tensors, exactly as LegoTransformer::save lays them out ...
    let named = model.named_params();
    let mut names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let mut shapes: Vec<Vec<usize>> = named.iter().map(|(_, t)| t.shape().to_vec()).collect();
    let mut values: Vec<Vec<f32>> = named.iter().map(|(_, t)| t.to_vec()).collect();
    // ... then each updated parameter's two moments, under its name.
    for (i, name) in state.params.iter().enumerate() {
        if state.m[i].is_empty() {
            continue;
        }
        let shape = shapes[names.iter().position(|n| n == name).expect("named above")].clone();
        for (prefix, buf) in [("optim.m.", &state.m[i]), ("optim.v.", &state.v[i])] {
            names.push(format!("{prefix}{name}"));
            shapes.push(shape.clone());
            values.push(buf.clone());
        }
    }
    let entries: Vec<(&str, &[usize], &[f32])> = names
        .iter()
        .zip(&shapes)
        .zip(&values)
        .map(|((n, s), v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();

    let mut meta = extra.clone();
    meta.insert("format".into(), TRAINING_CHECKPOINT_FORMAT.into());
    meta.insert("config".into(), model.config.to_json().to_string_compact());
    let frozen: Vec<&str> =
        named.iter().filter(|(_, t)| !t.requires_grad_flag()).map(|(n, _)| n.as_str()).collect();
    meta.insert("frozen".into(), frozen.join(","));
    if let Some(gate) = &model.exit_gate {
        meta.insert(ExitGate::THRESHOLD_KEY.into(), gate.threshold.to_string());
    }
    meta.insert("tokenizer".into(), tokenizer.to_json().to_string_compact());
    meta.insert("optim.step".into(), state.step.to_string());
    meta.insert("optim.params".into(), state.params.join(","));
    let param_steps: Vec<String> = state.param_steps.iter().map(u64::to_string).collect();
    meta.insert("optim.param_steps".into(), param_steps.join(","));
    meta.insert("optim.config".into(), adamw_config_to_json(&state.config).to_string_compact());
    meta.entry("phase".into())
        .or_insert_with(|| if model.exit_head.is_some() { "phase2".into() } else { "phase1".into() });
    meta.entry("routing_threshold".into()).or_insert_with(|| model.config.routing_threshold.to_string());
    safetensors::save(path, &entries, &meta)
}

/// Reads a checkpoint written by [`save_training_checkpoint`] (or by this crate's earlier
/// format, see the module doc). A missing file is [`Error::Io`]; a truncated or corrupt one, a
/// plain model checkpoint, a tensor of the wrong shape or holding a NaN or an infinity, a
/// missing or extra tensor, or metadata that does not parse is [`Error::Format`] naming the
/// file and the problem.
pub fn load_training_checkpoint(path: &Path) -> Result<TrainingCheckpoint> {
    TrainingCheckpoint::from_safetensors(safetensors::load(path)?)
}

impl TrainingCheckpoint {
    /// Reads a training checkpoint from the contents of its file, as
    /// [`load_training_checkpoint`] does (`st.origin` names it in errors).
    pub fn from_safetensors(mut st: SafeTensors) -> Result<TrainingCheckpoint> {
        let origin = st.origin.clone();
        let bad = |what: String| Error::Format(format!("{origin}: {what}"));
        let format = match st.metadata.get("format").map(String::as_str) {
            Some(f @ (TRAINING_CHECKPOINT_FORMAT | TRAINING_CHECKPOINT_FORMAT_1)) => f.to_string(),
            Some(f) => {
                return Err(bad(format!("format '{f}', this code reads '{TRAINING_CHECKPOINT_FORMAT}'")));
            }
            None => {
                return Err(bad(format!(
                    "not a training checkpoint (no 'format' {TRAINING_CHECKPOINT_FORMAT:?} in the \
                     metadata; a model saved by LegoTransformer::save is read by LegoTransformer::load)"
                )));
            }
        };
        // The model: its config, frozen flags and named tensors (finite ones only), read as
        // LegoTransformer::load reads them; what stays in `st` is the optimizer's.
        let model = LegoTransformer::take_from(&mut st, &origin)?;
        let config = model.config.clone();
        let mut meta = std::mem::take(&mut st.metadata);
        let mut take_meta =
            |key: &str| meta.remove(key).ok_or_else(|| bad(format!("no '{key}' in the metadata")));
        for key in ["format", "config", "frozen"] {
            take_meta(key)?;
        }
        let tokenizer = Tokenizer::from_json_str(&take_meta("tokenizer")?)
            .map_err(|e| bad(format!("metadata 'tokenizer': {e}")))?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} ids but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let step_text = take_meta("optim.step")?;
        let step: u64 = step_text
            .parse()
            .map_err(|_| bad(format!("metadata 'optim.step' is '{step_text}', not a count")))?;
        let opt_params: Vec<String> =
            take_meta("optim.params")?.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
        let param_steps = if format == TRAINING_CHECKPOINT_FORMAT_1 {
            None // derived from the moments below
        } else {
            let text = take_meta("optim.param_steps")?;
            let counts = text
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|c| {
                    c.parse::<u64>()
                        .map_err(|_| bad(format!("metadata 'optim.param_steps': '{c}' is not a count")))
                })
                .collect::<Result<Vec<u64>>>()?;
            if counts.len() != opt_params.len() {
                return Err(bad(format!(
                    "metadata 'optim.param_steps' has {} counts for the {} parameters of 'optim.params'",
                    counts.len(),
                    opt_params.len()
                )));
            }
            Some(counts)
        };
        let opt_config = adamw_config_from_json(&take_meta("optim.config")?)
            .map_err(|e| bad(format!("metadata 'optim.config': {e}")))?;

        let named = model.named_params();

        // The optimizer's moments, by name: both or neither of a parameter's two.
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for name in &opt_params {
            let (_, t) = named.iter().find(|(n, _)| n == name).ok_or_else(|| {
                bad(format!("'optim.params' names '{name}', which the model does not have"))
            })?;
            let (mk, vk) = (format!("optim.m.{name}"), format!("optim.v.{name}"));
            match (st.tensors.contains_key(&mk), st.tensors.contains_key(&vk)) {
                (true, true) => {
                    // A NaN moment would turn the parameter into NaN at the next step.
                    for (key, out) in [(&mk, &mut m), (&vk, &mut v)] {
                        let values = st.take(key, t.shape())?;
                        check_finite(&values, &origin, key)?;
                        out.push(values);
                    }
                }
                (false, false) => {
                    m.push(Vec::new());
                    v.push(Vec::new());
                }
                _ => return Err(bad(format!("only one of '{mk}' and '{vk}' is present"))),
            }
        }
        if let Some(name) = st.tensors.keys().next() {
            return Err(bad(format!("unexpected tensor '{name}'")));
        }
        // Format 1 counted steps globally: every parameter with moments had had them all.
        let param_steps =
            param_steps.unwrap_or_else(|| m.iter().map(|mi| if mi.is_empty() { 0 } else { step }).collect());
        let optimizer = OptimizerState { step, config: opt_config, params: opt_params, param_steps, m, v };
        // Check the state against the parameters now, so a bad file fails here, not on resume.
        optimizer.to_optimizer(&model).map_err(|e| bad(e.to_string()))?;
        Ok(TrainingCheckpoint { model, tokenizer, optimizer, metadata: meta, origin })
    }
}

fn adamw_config_to_json(c: &AdamWConfig) -> Json {
    Json::Object(vec![
        ("lr".into(), Json::from(c.lr as f64)),
        ("beta1".into(), Json::from(c.beta1 as f64)),
        ("beta2".into(), Json::from(c.beta2 as f64)),
        ("eps".into(), Json::from(c.eps as f64)),
        ("weight_decay".into(), Json::from(c.weight_decay as f64)),
    ])
}

fn adamw_config_from_json(text: &str) -> std::result::Result<AdamWConfig, String> {
    let json = json::parse(text).map_err(|e| e.to_string())?;
    let f = |key: &str| {
        json.get(key).and_then(Json::as_f64).map(|x| x as f32).ok_or_else(|| format!("no number '{key}'"))
    };
    let config = AdamWConfig {
        lr: f("lr")?,
        beta1: f("beta1")?,
        beta2: f("beta2")?,
        eps: f("eps")?,
        weight_decay: f("weight_decay")?,
    };
    // A beta of 1 makes the bias correction 1 − βᵗ zero, and the first step a division by it.
    for (key, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return Err(format!("'{key}' is {beta}, outside [0, 1)"));
        }
    }
    for (key, x) in [("lr", config.lr), ("eps", config.eps), ("weight_decay", config.weight_decay)] {
        if !(x.is_finite() && x >= 0.0) {
            return Err(format!("'{key}' is {x}, not a finite number >= 0"));
        }
    }
    Ok(config)
}
