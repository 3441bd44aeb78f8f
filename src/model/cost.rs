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
//! **With the exit gate** ([`ExitMeasure::Gate`](super::ExitMeasure::Gate)) the check is a norm
//! and a `D`-term dot product ([`gate_flops`]): a token that exits pays the lower layers, the
//! gate and the exit head; one that goes deep pays full depth and the gate, never the exit head.

use super::LegoConfig;

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
/// squares, then a scale and a weight per element: `4·D`) and the dot product with the gate's
/// weights (`2·D`); the bias and the sigmoid are a handful more, not counted.
pub fn gate_flops(c: &LegoConfig) -> f64 {
    6.0 * c.dim as f64
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
        assert_eq!(gate_deep_flops(&c, 32) - full_depth_flops(&c, 32), 6.0 * 64.0);
        assert_eq!(gate_shallow_flops(&c, 32) - shallow_flops(&c, 32), 6.0 * 64.0);
        // The max-softmax check makes a deep token pay a second head; the gate does not.
        assert!(gate_deep_flops(&c, 32) < deep_flops(&c, 32));
    }
}
