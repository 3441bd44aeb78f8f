//! The split KV cache.
//!
//! Each layer keeps the keys and values of the tokens it has seen, so a new token attends to
//! them without recomputing them. The cache is split as the spec describes:
//!
//! - the **lower** part, layers `0..exit_layer`, gets every token;
//! - the **upper** part, layers `exit_layer..num_layers`, gets only the tokens that went deep
//!   (unless early-exited tokens are propagated into it).
//!
//! Every buffer is allocated once, for `max_seq_len` positions of every row: nothing grows
//! while decoding. Layout per layer: `[batch, max_seq_len, dim]`, keys stored **after** RoPE
//! (rotated at their absolute position), so attention needs no positions for cached entries.
//!
//! Each row of the batch keeps its own length in each layer: under early exit one row's token
//! may skip the upper layers while another's does not. Absolute positions are counted apart,
//! per row, in [`KvCache::positions`]: a row's upper layers may hold fewer entries than its
//! position, but a new token is always rotated by its true position (the spec's lesson 2).

use super::LegoConfig;

/// Keys and values of one layer for every row, with each row's length.
#[derive(Clone, Debug)]
pub struct LayerCache {
    /// Keys `[batch, max_seq_len, dim]`, rotated by RoPE.
    pub k: Vec<f32>,
    /// Values `[batch, max_seq_len, dim]`.
    pub v: Vec<f32>,
    /// How many entries each row holds.
    pub len: Vec<usize>,
}

/// The caches of a contiguous range of layers (the lower or the upper part).
#[derive(Clone, Debug)]
pub struct CachePart {
    /// The first layer of the part.
    pub first_layer: usize,
    /// One cache per layer of the part.
    pub layers: Vec<LayerCache>,
}

impl CachePart {
    /// The entries a row holds in the part's first layer (every layer of a part gets the same
    /// tokens, so they agree).
    pub fn len(&self, row: usize) -> usize {
        self.layers.first().map_or(0, |l| l.len[row])
    }

    /// Whether the part holds no layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// The split KV cache of a [`LegoTransformer`](super::LegoTransformer) for a batch of rows.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Layers `0..exit_layer`: every token.
    pub lower: CachePart,
    /// Layers `exit_layer..num_layers`: the tokens that went deep (or were propagated).
    pub upper: CachePart,
    /// The absolute position of the next token of each row (= tokens of that row so far).
    pub positions: Vec<usize>,
    /// Rows in the batch.
    pub batch: usize,
    /// Positions per row the buffers hold.
    pub max_seq_len: usize,
    /// Model width.
    pub dim: usize,
}

impl KvCache {
    /// An empty cache for `batch` rows of a model with `config`, all buffers allocated now.
    pub fn new(config: &LegoConfig, batch: usize) -> KvCache {
        let per_layer = batch * config.max_seq_len * config.dim;
        let make = |range: std::ops::Range<usize>| CachePart {
            first_layer: range.start,
            layers: range
                .map(|_| LayerCache { k: vec![0.0; per_layer], v: vec![0.0; per_layer], len: vec![0; batch] })
                .collect(),
        };
        KvCache {
            lower: make(0..config.exit_layer),
            upper: make(config.exit_layer..config.num_layers),
            positions: vec![0; batch],
            batch,
            max_seq_len: config.max_seq_len,
            dim: config.dim,
        }
    }

    /// The cache of layer `layer` (whichever part it is in).
    pub fn layer(&self, layer: usize) -> &LayerCache {
        if layer < self.upper.first_layer {
            &self.lower.layers[layer]
        } else {
            &self.upper.layers[layer - self.upper.first_layer]
        }
    }

    /// The cache of layer `layer`, mutably.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache {
        if layer < self.upper.first_layer {
            &mut self.lower.layers[layer]
        } else {
            let first = self.upper.first_layer;
            &mut self.upper.layers[layer - first]
        }
    }

    /// Empties every row (the buffers stay allocated).
    pub fn clear(&mut self) {
        for part in [&mut self.lower, &mut self.upper] {
            for l in &mut part.layers {
                l.len.iter_mut().for_each(|n| *n = 0);
            }
        }
        self.positions.iter_mut().for_each(|p| *p = 0);
    }

    /// Every length the cache keeps: each row's position, and each layer's entries per row.
    pub fn lengths(&self) -> (Vec<usize>, Vec<Vec<usize>>) {
        let layers = self.lower.layers.iter().chain(&self.upper.layers).map(|l| l.len.clone()).collect();
        (self.positions.clone(), layers)
    }

    /// Restores lengths taken by [`lengths`](KvCache::lengths): the entries added since are
    /// forgotten (their values stay in the buffers, unread, until overwritten).
    pub fn set_lengths(&mut self, (positions, layers): (Vec<usize>, Vec<Vec<usize>>)) {
        assert_eq!(
            positions.len(),
            self.batch,
            "KvCache::set_lengths: {} rows for a batch of {}",
            positions.len(),
            self.batch
        );
        self.positions = positions;
        for (l, len) in self.lower.layers.iter_mut().chain(&mut self.upper.layers).zip(layers) {
            l.len = len;
        }
    }

    /// The bytes the buffers take.
    pub fn bytes(&self) -> usize {
        (self.lower.layers.len() + self.upper.layers.len()) * 2 * self.batch * self.max_seq_len * self.dim * 4
    }
}
