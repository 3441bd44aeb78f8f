//! Checkpoints in the safetensors format (see [`crate::io::safetensors`]).
//!
//! Tensor names follow Llama's conventions:
//!
//! | name | shape |
//! |---|---|
//! | `tok_embeddings.weight` | `[V, D]` |
//! | `layers.{i}.attention_norm.weight` | `[D]` |
//! | `layers.{i}.attention.wq.weight`, `.wk.weight`, `.wv.weight`, `.wo.weight` | `[D, D]` |
//! | `layers.{i}.ffn_norm.weight` | `[D]` |
//! | `layers.{i}.feed_forward.w1.weight`, `.w3.weight` | `[F, D]` |
//! | `layers.{i}.feed_forward.w2.weight` | `[D, F]` |
//! | `norm.weight` | `[D]` |
//! | `output.weight` | `[V, D]` |
//! | `exit_norm.weight`, `exit_output.weight` (an extended model's frozen exit head) | `[D]`, `[V, D]` |
//! | `exit_gate.weight`, `exit_gate.square_weight`, `exit_gate.bias` (the learned exit gate, [`ExitGate`], if trained; a file without `square_weight` holds a linear gate) | `[1, D]`, `[1, D]`, `[1]` |
//!
//! The metadata holds `config` (the [`LegoConfig`] as JSON), `frozen` (a comma-separated list
//! of the parameters that do not train), `exit_gate.threshold` (the gate's calibrated
//! threshold, a decimal that reads back to the same f32; only with a gate), `exit_gate.kind`
//! (`imitation` or `consistency`: what the gate was trained to predict; a file without it
//! holds an imitation gate), and any extra
//! entries the caller adds (a tokenizer, an optimizer's step). A file without the gate's
//! tensors loads as a model without a gate. In Python:
//! `from safetensors.numpy import load_file; load_file("model.safetensors")`.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{LegoConfig, check_threshold};
use super::exit_gate::{ExitGate, GateKind};
use super::transformer::{ExitHead, LegoTransformer};
use crate::error::{Error, Result};
use crate::io::safetensors::SafeTensors;
use crate::io::{json, safetensors};
use crate::nn::{Attention, Block, Linear, RmsNorm, SwiGluMlp};
use crate::tensor::Tensor;

impl LegoTransformer {
    /// Writes the model (and `extra` metadata) to `path`, atomically.
    pub fn save(&self, path: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
        let named = self.named_params();
        let datas: Vec<_> = named.iter().map(|(_, t)| t.data()).collect();
        let entries: Vec<(&str, &[usize], &[f32])> =
            named.iter().zip(&datas).map(|((n, t), d)| (n.as_str(), t.shape(), d.as_slice())).collect();
        let mut meta = extra.clone();
        meta.insert("config".into(), self.config.to_json().to_string_compact());
        let frozen: Vec<&str> =
            named.iter().filter(|(_, t)| !t.requires_grad_flag()).map(|(n, _)| n.as_str()).collect();
        meta.insert("frozen".into(), frozen.join(","));
        if let Some(gate) = &self.exit_gate {
            meta.insert(ExitGate::THRESHOLD_KEY.into(), gate.threshold.to_string());
            meta.insert(ExitGate::KIND_KEY.into(), gate.kind.name().into());
        }
        safetensors::save(path, &entries, &meta)
    }

    /// Reads a model written by [`save`](LegoTransformer::save); returns it with the file's
    /// metadata. A missing, truncated or mismatched file is an error naming the problem.
    pub fn load(path: &Path) -> Result<(LegoTransformer, BTreeMap<String, String>)> {
        let mut st = safetensors::load(path)?;
        let origin = path.display().to_string();
        let model = LegoTransformer::take_from(&mut st, &origin)?;
        if let Some(name) = st.tensors.keys().next() {
            return Err(Error::Format(format!("{origin}: unexpected tensor '{name}' for this config")));
        }
        Ok((model, std::mem::take(&mut st.metadata)))
    }

    /// Builds the model stored in `st` (its `config` and `frozen` metadata and its named
    /// tensors), taking those tensors (and the exit gate's threshold entry) out of `st` and
    /// leaving anything else there (a training checkpoint keeps its optimizer's moments beside
    /// the model). `origin` names the file in errors.
    pub fn take_from(st: &mut SafeTensors, origin: &str) -> Result<LegoTransformer> {
        let config_text = st
            .metadata
            .get("config")
            .ok_or_else(|| Error::Format(format!("{origin}: no 'config' in the metadata")))?;
        let config_json = json::parse(config_text).map_err(|e| match e {
            Error::Format(msg) => Error::Format(format!("{origin}: metadata 'config': {msg}")),
            other => other,
        })?;
        let config = LegoConfig::from_json(&config_json, origin)?;
        let has_exit_head = st.tensors.contains_key("exit_norm.weight");
        let has_exit_gate = st.tensors.contains_key("exit_gate.weight");
        let has_square_weight = st.tensors.contains_key("exit_gate.square_weight");
        // The gate's threshold: taken out of the metadata (it belongs to the model now).
        let gate_threshold = match st.metadata.remove(ExitGate::THRESHOLD_KEY) {
            None if has_exit_gate => {
                return Err(Error::Format(format!(
                    "{origin}: the file holds exit_gate.weight but no '{}' in the metadata",
                    ExitGate::THRESHOLD_KEY
                )));
            }
            None => None,
            Some(_) if !has_exit_gate => {
                return Err(Error::Format(format!(
                    "{origin}: metadata '{}' without the exit gate's tensors",
                    ExitGate::THRESHOLD_KEY
                )));
            }
            Some(text) => {
                let t: f32 = text.parse().map_err(|_| {
                    Error::Format(format!(
                        "{origin}: metadata '{}' is '{text}', not a number",
                        ExitGate::THRESHOLD_KEY
                    ))
                })?;
                check_threshold(t).map_err(|e| {
                    Error::Format(format!("{origin}: metadata '{}': {e}", ExitGate::THRESHOLD_KEY))
                })?;
                Some(t)
            }
        };
        let frozen: Vec<String> = st
            .metadata
            .get("frozen")
            .map(|f| f.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let (v, d, f) = (config.vocab_size, config.dim, config.ffn_hidden);
        // The gate's kind (a file from before kinds existed holds an imitation gate).
        let gate_kind = match st.metadata.remove(ExitGate::KIND_KEY) {
            Some(_) if !has_exit_gate => {
                return Err(Error::Format(format!(
                    "{origin}: metadata '{}' without the exit gate's tensors",
                    ExitGate::KIND_KEY
                )));
            }
            Some(name) => GateKind::parse(&name).map_err(|e| Error::Format(format!("{origin}: {e}")))?,
            None => GateKind::Imitation,
        };
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let values = st.take(name, shape)?;
            check_finite(&values, origin, name)?;
            let t = Tensor::from_vec(values, shape);
            t.set_requires_grad(!frozen.iter().any(|n| n == name));
            Ok(t)
        };
        let tok_embeddings = take("tok_embeddings.weight", &[v, d])?;
        // Grown one layer at a time rather than reserved from the config: the file's
        // `num_layers` is not trusted until its tensors are there.
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let p = |n: &str| format!("layers.{i}.{n}");
            let norm = |t: Tensor| RmsNorm { weight: t, eps: config.norm_eps };
            layers.push(Block {
                attention_norm: norm(take(&p("attention_norm.weight"), &[d])?),
                attention: Attention {
                    wq: Linear { weight: take(&p("attention.wq.weight"), &[d, d])? },
                    wk: Linear { weight: take(&p("attention.wk.weight"), &[d, d])? },
                    wv: Linear { weight: take(&p("attention.wv.weight"), &[d, d])? },
                    wo: Linear { weight: take(&p("attention.wo.weight"), &[d, d])? },
                    heads: config.num_heads,
                    rope_theta: config.rope_theta,
                },
                ffn_norm: norm(take(&p("ffn_norm.weight"), &[d])?),
                feed_forward: SwiGluMlp {
                    w1: Linear { weight: take(&p("feed_forward.w1.weight"), &[f, d])? },
                    w2: Linear { weight: take(&p("feed_forward.w2.weight"), &[d, f])? },
                    w3: Linear { weight: take(&p("feed_forward.w3.weight"), &[f, d])? },
                },
            });
        }
        let head = ExitHead {
            norm: RmsNorm { weight: take("norm.weight", &[d])?, eps: config.norm_eps },
            output: Linear { weight: take("output.weight", &[v, d])? },
        };
        let exit_head = if has_exit_head {
            Some(ExitHead {
                norm: RmsNorm { weight: take("exit_norm.weight", &[d])?, eps: config.norm_eps },
                output: Linear { weight: take("exit_output.weight", &[v, d])? },
            })
        } else {
            None
        };
        // The exit gate never trains (no gradient), whatever `frozen` says.
        let exit_gate = match gate_threshold {
            Some(threshold) => {
                let weight = take("exit_gate.weight", &[1, d])?;
                // A linear gate's file (written before the squares) has none: q = 0.
                let square_weight = if has_square_weight {
                    take("exit_gate.square_weight", &[1, d])?
                } else {
                    Tensor::from_vec(vec![0.0; d], &[1, d])
                };
                let bias = take("exit_gate.bias", &[1])?;
                for t in [&weight, &square_weight, &bias] {
                    t.set_requires_grad(false);
                }
                Some(ExitGate { weight, square_weight, bias, threshold, kind: gate_kind })
            }
            None => None,
        };
        let mut model = LegoTransformer::from_parts(config, tok_embeddings, layers, head, exit_head);
        model.exit_gate = exit_gate;
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        if let Some(name) = frozen.iter().find(|f| !names.contains(f)) {
            return Err(Error::Format(format!(
                "{origin}: metadata 'frozen' names '{name}', which the model does not have"
            )));
        }
        Ok(model)
    }
}

/// Checks that every value of the tensor `name` is a number: a NaN or an infinity in a weight
/// would flow through every forward pass into the logits (and generation would sample from
/// them) without any op noticing, so a file holding one is refused when it is read. The error
/// names the file, the tensor, the first bad value and its index.
pub(crate) fn check_finite(values: &[f32], origin: &str, name: &str) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Format(format!(
            "{origin}: tensor '{name}' holds {} at index {i} (of {}); weights must be finite",
            values[i],
            values.len()
        ))),
    }
}
