//! The model's configuration, and the checks that make a bad one an error instead of a panic
//! deep inside an op.

use crate::error::{Error, Result};
use crate::io::json::Json;

/// Sizes and constants of a [`LegoTransformer`](super::LegoTransformer).
///
/// Build one by naming its fields, starting from a reference config for the rest (nanoGPT's
/// `GPTConfig` reads the same way): six sizes in a row are easy to swap when passed by
/// position, and a name cannot be.
///
/// ```
/// use lego::model::LegoConfig;
///
/// let config = LegoConfig {
///     vocab_size: 300,
///     dim: 32,
///     num_layers: 2,
///     num_heads: 4,
///     ffn_hidden: 64,
///     max_seq_len: 32,
///     exit_layer: 2, // the exit after both layers: a shallow (phase-1) model
///     ..LegoConfig::t() // the rest (RoPE base, norm epsilon, threshold) as in config T
/// };
/// assert!(config.validate().is_ok());
/// assert_eq!(config.head_dim(), 8);
/// ```
///
/// `exit_layer` is a field like the others: it is not recomputed when `num_layers` changes, so
/// name it too ([`validate`](LegoConfig::validate) refuses one beyond `num_layers`).
/// [`LegoConfig::new`] is the specification's positional form, for call sites that pass
/// variables with telling names.
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
    /// (always run) part, `exit_layer..num_layers` the upper part. At least 1 (the exit head
    /// reads the lower layers' output) and at most `num_layers` (a shallow model, no upper part).
    pub exit_layer: usize,
    /// Confidence at or above which a token exits early. In `[0, 1]`; a value above 1 means
    /// "never exit" (a softmax maximum can round to exactly 1.0, so 1.0 itself can still exit).
    pub routing_threshold: f32,
}

impl LegoConfig {
    /// **Spec `LegoConfig(vocab_size, dim, num_layers, num_heads, ffn_hidden, max_seq_len)`**:
    /// the sizes by position, Llama's constants (RoPE base 10000, eps 1e-5), the exit at `N/2`
    /// (at least 1, so a one-layer model exits after its only layer) and a routing threshold of
    /// 0.5. Where the sizes are bare numbers, the named form (see [`LegoConfig`]) reads safer.
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
            // Half the depth; `max(1)` because an exit before the first layer (exit_layer 0)
            // would route on the embedding alone, which `validate` refuses.
            exit_layer: (num_layers / 2).max(1),
            routing_threshold: 0.5,
        }
    }

    /// Reference config **T**: the prototype's width and depth over a byte vocabulary,
    /// V=256 D=64 N=4 H=4 F=172, sequences of 64, the exit after layer 2.
    pub fn t() -> LegoConfig {
        LegoConfig {
            vocab_size: 256,
            dim: 64,
            num_layers: 4,
            num_heads: 4,
            ffn_hidden: 172,
            max_seq_len: 64,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            exit_layer: 2,
            routing_threshold: 0.5,
        }
    }
    /// Reference config **S**: V=4096 D=256 N=4 H=8 F=688, sequences of 256, the exit after
    /// layer 2.
    pub fn s() -> LegoConfig {
        LegoConfig {
            vocab_size: 4096,
            dim: 256,
            num_layers: 4,
            num_heads: 8,
            ffn_hidden: 688,
            max_seq_len: 256,
            ..LegoConfig::t()
        }
    }
    /// Reference config **M**: V=8192 D=512 N=8 H=8 F=1376, sequences of 256, the exit after
    /// layer 4.
    pub fn m() -> LegoConfig {
        LegoConfig {
            vocab_size: 8192,
            dim: 512,
            num_layers: 8,
            num_heads: 8,
            ffn_hidden: 1376,
            max_seq_len: 256,
            exit_layer: 4,
            ..LegoConfig::t()
        }
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
        if self.exit_layer == 0 {
            return bad(format!(
                "exit_layer is 0, but it must be at least 1: the exit head reads the hidden state \
                 after the lower layers 0..exit_layer, and with none a token would exit on its \
                 embedding alone (use {} for a shallow model, or a layer in between)",
                self.num_layers
            ));
        }
        if self.exit_layer > self.num_layers {
            return bad(format!("exit_layer {} is beyond num_layers {}", self.exit_layer, self.num_layers));
        }
        // The largest buffers the sizes imply must have a size this machine can address: one
        // row of the KV cache (keys and values of every layer, f32) and the embedding and MLP
        // matrices. A config read from a file could otherwise ask for an allocation whose
        // size overflows.
        let bytes = |dims: &[usize]| dims.iter().try_fold(4usize, |n, &d| n.checked_mul(d));
        let sizes = [
            bytes(&[2, self.num_layers, self.max_seq_len, self.dim]),
            bytes(&[self.vocab_size, self.dim]),
            bytes(&[self.ffn_hidden, self.dim]),
        ];
        if sizes.iter().any(|b| b.is_none_or(|b| b > isize::MAX as usize)) {
            return bad(format!(
                "sizes too large to address: vocab_size {}, dim {}, num_layers {}, ffn_hidden {}, max_seq_len {}",
                self.vocab_size, self.dim, self.num_layers, self.ffn_hidden, self.max_seq_len
            ));
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
    fn named_presets_are_the_positional_sizes() {
        // The presets name their fields; the positional form must give the same configs.
        assert_eq!(LegoConfig::t(), LegoConfig::new(256, 64, 4, 4, 172, 64));
        assert_eq!(LegoConfig::s(), LegoConfig::new(4096, 256, 4, 8, 688, 256));
        assert_eq!(LegoConfig::m(), LegoConfig::new(8192, 512, 8, 8, 1376, 256));
    }

    #[test]
    fn default_exit_layer_is_half_the_depth_and_never_zero() {
        let exit = |n: usize| LegoConfig::new(256, 64, n, 4, 172, 64).exit_layer;
        assert_eq!([exit(1), exit(2), exit(3), exit(4), exit(8)], [1, 1, 1, 2, 4]);
        LegoConfig::new(256, 64, 1, 4, 172, 64).validate().unwrap();
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
            (LegoConfig { exit_layer: 0, ..base.clone() }, "exit_layer is 0, but it must be at least 1"),
            (LegoConfig { max_seq_len: usize::MAX / 2, ..base.clone() }, "too large to address"),
            (LegoConfig { vocab_size: 1 << 62, ..base.clone() }, "too large to address"),
        ];
        for (c, want) in cases {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        assert!(LegoConfig { routing_threshold: 1.5, ..base }.validate().is_ok());
    }
}
