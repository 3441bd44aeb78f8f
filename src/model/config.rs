//! The model's configuration, and the checks that make a bad one an error instead of a panic
//! deep inside an op.

use crate::error::{Error, Result};
use crate::io::json::Json;

/// Sizes and constants of a [`LegoTransformer`](super::LegoTransformer).
#[derive(Clone, Debug, PartialEq)]
pub struct LegoConfig {
    /// Number of tokens V.
    pub vocab_size: usize,
    /// Model width D.
    pub dim: usize,
    /// Number of layers N.
    pub num_layers: usize,
    /// Number of attention heads H (`dim / num_heads` must be an even integer).
    pub num_heads: usize,
    /// Hidden width F of the SwiGLU MLP.
    pub ffn_hidden: usize,
    /// The longest sequence the model (and its KV cache) handles.
    pub max_seq_len: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// The layer after which a confident token exits: layers `0..exit_layer` are the lower
    /// (always run) part, `exit_layer..num_layers` the upper part.
    pub exit_layer: usize,
    /// Confidence at or above which a token exits early. In `[0, 1]`; a value above 1 means
    /// "never exit" (a softmax maximum can round to exactly 1.0, so 1.0 itself can still exit).
    pub routing_threshold: f32,
}

impl LegoConfig {
    /// A config with Llama's constants (RoPE base 10000, eps 1e-5), the exit at `N/2` and a
    /// routing threshold of 0.5.
    pub fn new(
        vocab_size: usize,
        dim: usize,
        num_layers: usize,
        num_heads: usize,
        ffn_hidden: usize,
        max_seq_len: usize,
    ) -> LegoConfig {
        LegoConfig {
            vocab_size,
            dim,
            num_layers,
            num_heads,
            ffn_hidden,
            max_seq_len,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            exit_layer: num_layers / 2,
            routing_threshold: 0.5,
        }
    }

    /// Reference config **T** (the prototype's width and depth, byte vocabulary).
    pub fn t() -> LegoConfig {
        LegoConfig::new(256, 64, 4, 4, 172, 64)
    }
    /// Reference config **S**.
    pub fn s() -> LegoConfig {
        LegoConfig::new(4096, 256, 4, 8, 688, 256)
    }
    /// Reference config **M**.
    pub fn m() -> LegoConfig {
        LegoConfig::new(8192, 512, 8, 8, 1376, 256)
    }

    /// The width of one head, `dim / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads.max(1)
    }

    /// Checks that the sizes fit together. Every model constructor calls it.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.vocab_size == 0
            || self.dim == 0
            || self.num_heads == 0
            || self.ffn_hidden == 0
            || self.max_seq_len == 0
        {
            return bad(format!(
                "vocab_size, dim, num_heads, ffn_hidden and max_seq_len must be positive (got {}, {}, {}, {}, {})",
                self.vocab_size, self.dim, self.num_heads, self.ffn_hidden, self.max_seq_len
            ));
        }
        if self.num_layers == 0 {
            return bad("num_layers must be at least 1".into());
        }
        if !self.dim.is_multiple_of(self.num_heads) {
            return bad(format!("dim {} is not divisible by num_heads {}", self.dim, self.num_heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} (dim {} / heads {}) must be even for RoPE",
                self.head_dim(),
                self.dim,
                self.num_heads
            ));
        }
        if self.exit_layer > self.num_layers {
            return bad(format!("exit_layer {} is beyond num_layers {}", self.exit_layer, self.num_layers));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta must be a positive number, got {}", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!("norm_eps must be a non-negative number, got {}", self.norm_eps));
        }
        check_threshold(self.routing_threshold)?;
        Ok(())
    }

    /// The config as JSON (stored in checkpoints' metadata).
    pub fn to_json(&self) -> Json {
        Json::Object(vec![
            ("vocab_size".into(), Json::from(self.vocab_size)),
            ("dim".into(), Json::from(self.dim)),
            ("num_layers".into(), Json::from(self.num_layers)),
            ("num_heads".into(), Json::from(self.num_heads)),
            ("ffn_hidden".into(), Json::from(self.ffn_hidden)),
            ("max_seq_len".into(), Json::from(self.max_seq_len)),
            ("rope_theta".into(), Json::from(self.rope_theta as f64)),
            ("norm_eps".into(), Json::from(self.norm_eps as f64)),
            ("exit_layer".into(), Json::from(self.exit_layer)),
            ("routing_threshold".into(), Json::from(self.routing_threshold as f64)),
        ])
    }

    /// Reads a config written by [`to_json`](LegoConfig::to_json), and validates it.
    pub fn from_json(json: &Json, origin: &str) -> Result<LegoConfig> {
        let field = |name: &str| -> Result<&Json> {
            json.get(name).ok_or_else(|| Error::Format(format!("{origin}: config has no field '{name}'")))
        };
        let int = |name: &str| -> Result<usize> {
            field(name)?.as_u64().map(|v| v as usize).ok_or_else(|| {
                Error::Format(format!("{origin}: config field '{name}' is not a non-negative integer"))
            })
        };
        let float = |name: &str| -> Result<f32> {
            field(name)?
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| Error::Format(format!("{origin}: config field '{name}' is not a number")))
        };
        let config = LegoConfig {
            vocab_size: int("vocab_size")?,
            dim: int("dim")?,
            num_layers: int("num_layers")?,
            num_heads: int("num_heads")?,
            ffn_hidden: int("ffn_hidden")?,
            max_seq_len: int("max_seq_len")?,
            rope_theta: float("rope_theta")?,
            norm_eps: float("norm_eps")?,
            exit_layer: int("exit_layer")?,
            routing_threshold: float("routing_threshold")?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Checks a routing threshold: a number `>= 0` (NaN and negatives are errors; above 1 means
/// "never exit").
pub fn check_threshold(threshold: f32) -> Result<()> {
    if threshold.is_nan() || threshold < 0.0 {
        return Err(Error::Input(format!(
            "routing threshold must be a number >= 0 (confidence is in [0, 1]; above 1 means never exit), got {threshold}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_configs_are_valid_and_round_trip_through_json() {
        for c in [LegoConfig::t(), LegoConfig::s(), LegoConfig::m()] {
            c.validate().unwrap();
            let text = c.to_json().to_string_compact();
            let back = LegoConfig::from_json(&crate::io::json::parse(&text).unwrap(), "test").unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn bad_configs_are_errors_that_say_why() {
        let base = LegoConfig::t();
        let cases: Vec<(LegoConfig, &str)> = vec![
            (LegoConfig { num_heads: 3, ..base.clone() }, "not divisible"),
            (LegoConfig { dim: 12, num_heads: 4, ..base.clone() }, "must be even"),
            (LegoConfig { exit_layer: 5, ..base.clone() }, "beyond num_layers"),
            (LegoConfig { routing_threshold: f32::NAN, ..base.clone() }, "routing threshold"),
            (LegoConfig { routing_threshold: -0.1, ..base.clone() }, "routing threshold"),
            (LegoConfig { vocab_size: 0, ..base.clone() }, "must be positive"),
            (LegoConfig { num_layers: 0, ..base.clone() }, "num_layers"),
        ];
        for (c, want) in cases {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        assert!(LegoConfig { routing_threshold: 1.5, ..base }.validate().is_ok());
    }
}
