//! What a token costs: the spec's layer count, and a FLOP count that includes what the layer
//! count leaves out (the exit check's vocabulary projection, attention over the context, the
//! head).
//!
//! **The spec's layer cost** (the prototype's formula) counts layers only:
//! `(shallow·exit_layer + deep·num_layers) / (total·num_layers)`.
//!
//! **The FLOP cost** counts multiply-adds as 2 FLOPs. For one token attending to `ctx` cached
//! positions, one layer costs
//!
//! ```text
//! attention projections  2·4·D²        (q, k, v, o)
//! attention itself       2·2·ctx·D     (scores q·k and the weighted sum of v, all heads)
//! MLP                    2·3·D·F       (w1, w3, w2)
//! ```
//!
//! and a head (norm + projection to the vocabulary) `2·V·D`. A token that exits early pays the
//! lower layers and the exit head; one that goes deep pays those, the upper layers and the final
//! head. The baseline is full-depth inference: all layers and one head. With a large vocabulary
//! the exit check costs more than a layer (the prototype's weakness 6), and this count shows it.
//!
//! **With the exit gate** ([`ExitMeasure::Gate`]) the check is a norm
//! and a `2D`-term dot product ([`gate_flops`]): a token that exits pays the lower layers, the
//! gate and the exit head; one that goes deep pays full depth and the gate, never the exit head.

use super::LegoConfig;
use super::early_exit::{ExitMeasure, ExitRule, UpperCacheFill};

/// FLOPs of one layer for one token that attends to `ctx` positions.
pub fn layer_flops(c: &LegoConfig, ctx: usize) -> f64 {
    let (d, f) = (c.dim as f64, c.ffn_hidden as f64);
    2.0 * 4.0 * d * d + 2.0 * 2.0 * ctx as f64 * d + 2.0 * 3.0 * d * f
}

/// FLOPs of a head (the projection to the vocabulary; the norm is negligible).
pub fn head_flops(c: &LegoConfig) -> f64 {
    2.0 * c.vocab_size as f64 * c.dim as f64
}

/// FLOPs of a token at full depth (all layers, one head).
pub fn full_depth_flops(c: &LegoConfig, ctx: usize) -> f64 {
    c.num_layers as f64 * layer_flops(c, ctx) + head_flops(c)
}

/// FLOPs of a token that exits early (lower layers and the exit head).
pub fn shallow_flops(c: &LegoConfig, ctx: usize) -> f64 {
    c.exit_layer as f64 * layer_flops(c, ctx) + head_flops(c)
}

/// FLOPs of a token that goes deep under early exit: the lower layers, the exit check, the
/// upper layers and the final head. (With no upper layers there is nothing to go deep to.)
pub fn deep_flops(c: &LegoConfig, ctx: usize) -> f64 {
    if c.exit_layer == c.num_layers {
        return shallow_flops(c, ctx);
    }
    c.num_layers as f64 * layer_flops(c, ctx) + 2.0 * head_flops(c)
}

/// FLOPs of the exit gate's check for one token: the RMSNorm of the exit state (a sum of
/// squares, then a scale and a weight per element: `4·D`) and the gate's sum
/// `Σᵢ x̂ᵢ (wᵢ + qᵢ x̂ᵢ)` (two multiply-adds per element: `4·D`); the bias and the sigmoid are a
/// handful more, not counted.
pub fn gate_flops(c: &LegoConfig) -> f64 {
    8.0 * c.dim as f64
}

/// FLOPs of a token that exits by the gate: the lower layers, the gate, the exit head.
pub fn gate_shallow_flops(c: &LegoConfig, ctx: usize) -> f64 {
    shallow_flops(c, ctx) + gate_flops(c)
}

/// FLOPs of a token that the gate sends deep: full depth (every layer, the final head) and the
/// gate; never the exit head.
pub fn gate_deep_flops(c: &LegoConfig, ctx: usize) -> f64 {
    full_depth_flops(c, ctx) + gate_flops(c)
}

/// The spec's layer cost: the share of layer computations done, against running every layer.
pub fn layer_cost(c: &LegoConfig, shallow: usize, deep: usize) -> f64 {
    let total = shallow + deep;
    if total == 0 {
        return 0.0;
    }
    (shallow * c.exit_layer + deep * c.num_layers) as f64 / (total * c.num_layers) as f64
}

/// FLOPs of writing one exited token's keys and values into every upper layer
/// (`UpperCacheFill::Propagate`): two `D×D` products a layer.
pub fn propagate_flops(c: &LegoConfig) -> f64 {
    (c.num_layers - c.exit_layer) as f64 * 2.0 * 2.0 * (c.dim * c.dim) as f64
}

/// Bytes of weights a full-depth decode step reads for one token: every layer and the deep
/// head (the embedding table contributes one row, left out). Over the read bandwidth this
/// gives the batch-1 decode roofline (see [`crate::kernels::roofline`]).
pub fn weight_bytes_per_token(c: &LegoConfig) -> f64 {
    let per_layer = 4 * c.dim * c.dim + 3 * c.dim * c.ffn_hidden + 2 * c.dim;
    ((c.num_layers * per_layer + c.vocab_size * c.dim + c.dim) * 4) as f64
}

/// The mean of `per_context(ctx)` over a window of `len` tokens, whose contexts are `1..=len`
/// (the token at position `p` attends to `p + 1` positions).
pub fn mean_over_window(len: usize, per_context: impl Fn(usize) -> f64) -> f64 {
    (1..=len).map(per_context).sum::<f64>() / len.max(1) as f64
}

/// The mean FLOPs of one layer for a token of a window of `len` tokens.
pub fn mean_layer_flops(c: &LegoConfig, len: usize) -> f64 {
    mean_over_window(len, |ctx| layer_flops(c, ctx))
}

/// Training FLOPs of `layers` layers and one head over `tokens` tokens in windows of `len`:
/// 3 × the forward FLOPs (the backward pass costs about twice the forward).
pub fn training_flops(c: &LegoConfig, layers: usize, tokens: f64, len: usize) -> f64 {
    3.0 * tokens * (layers as f64 * mean_layer_flops(c, len) + head_flops(c))
}

/// The mean FLOPs per token of early-exit decoding under `rule` over windows of `len` tokens,
/// when a share `shallow_ratio` of the tokens exit: a shallow token pays the lower layers and
/// the exit check (whose logits are its output), plus its upper-cache fill with
/// [`UpperCacheFill::Propagate`]; a deep token pays the lower layers, the check, the upper
/// layers and the final head. Exits are taken as spread evenly over the positions (the context
/// length only changes attention's share, a few per cent of a layer at our sizes).
///
/// Each [`ExitMeasure`] states what its check costs here, so a new measure cannot be swept
/// without saying what it costs.
pub fn early_exit_flops(c: &LegoConfig, len: usize, shallow_ratio: f64, rule: &ExitRule) -> f64 {
    let (shallow, deep) = match rule.measure {
        // The check is the exit head itself: a shallow token's output, paid again by a deep one.
        ExitMeasure::MaxSoftmax => (
            mean_over_window(len, |ctx| shallow_flops(c, ctx)),
            mean_over_window(len, |ctx| deep_flops(c, ctx)),
        ),
        // The check is the gate (a norm and a dot product); only a shallow token runs the exit
        // head, for its output.
        ExitMeasure::Gate => (
            mean_over_window(len, |ctx| gate_shallow_flops(c, ctx)),
            mean_over_window(len, |ctx| gate_deep_flops(c, ctx)),
        ),
    };
    let fill = match rule.fill {
        UpperCacheFill::Skip => 0.0,
        UpperCacheFill::Propagate => propagate_flops(c),
        // The exited token's state goes through the upper layers later, with a deep token.
        UpperCacheFill::Deferred => (c.num_layers - c.exit_layer) as f64 * mean_layer_flops(c, len),
    };
    shallow_ratio * (shallow + fill) + (1.0 - shallow_ratio) * deep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_cost_is_the_spec_formula() {
        let c = LegoConfig::new(100, 64, 4, 4, 172, 64); // exit at 2
        assert_eq!(layer_cost(&c, 0, 10), 1.0);
        assert_eq!(layer_cost(&c, 10, 0), 0.5);
        // The prototype's run: 21 shallow, 11 deep -> 67.2 %.
        assert!((layer_cost(&c, 21, 11) - 0.671875).abs() < 1e-12);
    }

    #[test]
    fn a_large_vocabulary_makes_the_exit_check_cost_more_than_a_layer() {
        let c = LegoConfig::new(8192, 64, 4, 4, 172, 64);
        assert!(head_flops(&c) > layer_flops(&c, 32));
        assert!(deep_flops(&c, 32) > full_depth_flops(&c, 32));
    }

    #[test]
    fn with_the_gate_a_deep_token_costs_full_depth_and_a_norm_and_a_dot_product() {
        let c = LegoConfig::new(8192, 64, 4, 4, 172, 64);
        assert_eq!(gate_deep_flops(&c, 32) - full_depth_flops(&c, 32), 8.0 * 64.0);
        assert_eq!(gate_shallow_flops(&c, 32) - shallow_flops(&c, 32), 8.0 * 64.0);
        // The max-softmax check makes a deep token pay a second head; the gate does not.
        assert!(gate_deep_flops(&c, 32) < deep_flops(&c, 32));
    }

    #[test]
    fn early_exit_flops_run_from_all_deep_to_all_shallow() {
        let c = LegoConfig::new(256, 64, 4, 4, 172, 64);
        let (len, skip) = (64, ExitRule::new(0.5, UpperCacheFill::Skip));
        let all_deep = mean_over_window(len, |ctx| deep_flops(&c, ctx));
        let all_shallow = mean_over_window(len, |ctx| shallow_flops(&c, ctx));
        assert_eq!(early_exit_flops(&c, len, 0.0, &skip), all_deep);
        assert_eq!(early_exit_flops(&c, len, 1.0, &skip), all_shallow);
        let propagate = ExitRule::new(0.5, UpperCacheFill::Propagate);
        let gap = early_exit_flops(&c, len, 0.5, &propagate) - early_exit_flops(&c, len, 0.5, &skip);
        assert!((gap - 0.5 * propagate_flops(&c)).abs() < 1e-6 * all_deep);
        // Three contexts: the mean of 1, 2 and 3.
        assert_eq!(mean_over_window(3, |ctx| ctx as f64), 2.0);
        assert_eq!(training_flops(&c, 4, 10.0, 8), 30.0 * (4.0 * mean_layer_flops(&c, 8) + head_flops(&c)));
    }
}
