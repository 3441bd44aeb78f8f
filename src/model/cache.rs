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
//! Each entry also records the position it holds ([`LayerCache::pos`]; the prototype's weakness
//! 5 was not knowing which positions the upper cache held), so a row can be rolled back to any
//! length in every layer at once ([`KvCache::rollback`]).

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
    /// The absolute position of each entry, `[batch, max_seq_len]` (ascending within a row).
    pub pos: Vec<usize>,
    /// Entries a row can hold.
    pub max_seq_len: usize,
}

impl LayerCache {
    fn new(batch: usize, max_seq_len: usize, dim: usize) -> LayerCache {
        LayerCache {
            k: vec![0.0; batch * max_seq_len * dim],
            v: vec![0.0; batch * max_seq_len * dim],
            len: vec![0; batch],
            pos: vec![0; batch * max_seq_len],
            max_seq_len,
        }
    }

    /// Appends one entry to `row`: the key (already rotated) and value of the token at absolute
    /// position `position`. Panics if the row is full or the position is not after its last.
    pub fn push(&mut self, row: usize, position: usize, key: &[f32], value: &[f32]) {
        let (at, dim) = (self.reserve(row, position), key.len());
        self.k[at * dim..(at + 1) * dim].copy_from_slice(key);
        self.v[at * dim..(at + 1) * dim].copy_from_slice(value);
    }

    /// Makes room for `row`'s next entry, at absolute `position` (after all it holds), and
    /// returns its index: the key and value go to `k[index·D..(index + 1)·D]` and the same of
    /// `v`, written by the caller (the decoder writes each head's share from its own thread).
    pub fn reserve(&mut self, row: usize, position: usize) -> usize {
        let len = self.len[row];
        assert!(
            len < self.max_seq_len,
            "LayerCache::reserve: row {row} already holds {len} = max_seq_len entries"
        );
        let at = row * self.max_seq_len + len;
        assert!(
            len == 0 || self.pos[at - 1] < position,
            "LayerCache::reserve: row {row} got position {position} after position {}",
            self.pos[at - 1]
        );
        self.pos[at] = position;
        self.len[row] = len + 1;
        at
    }

    /// The positions of the entries `row` holds.
    pub fn positions(&self, row: usize) -> &[usize] {
        &self.pos[row * self.max_seq_len..row * self.max_seq_len + self.len[row]]
    }

    /// Drops `row`'s entries for positions `position..`.
    fn truncate_at(&mut self, row: usize, position: usize) {
        self.len[row] = self.positions(row).partition_point(|&p| p < position);
    }
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
    /// The exit states of tokens that exited and whose upper keys and values are still owed
    /// (`UpperCacheFill::Deferred`): `[batch, max_seq_len, dim]`, allocated at first use (empty
    /// until then). Row `r` owes positions `deferred_from[r] .. + deferred_len[r]`: the
    /// tokens since its last deep one, so always a contiguous run just before its next token.
    pub deferred: Vec<f32>,
    /// How many owed states each row holds.
    pub deferred_len: Vec<usize>,
    /// The position of each row's first owed state.
    pub deferred_from: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `batch` rows of a model with `config`, all buffers allocated now.
    pub fn new(config: &LegoConfig, batch: usize) -> KvCache {
        let make = |range: std::ops::Range<usize>| CachePart {
            first_layer: range.start,
            layers: range.map(|_| LayerCache::new(batch, config.max_seq_len, config.dim)).collect(),
        };
        KvCache {
            lower: make(0..config.exit_layer),
            upper: make(config.exit_layer..config.num_layers),
            positions: vec![0; batch],
            batch,
            max_seq_len: config.max_seq_len,
            dim: config.dim,
            deferred: Vec::new(),
            deferred_len: vec![0; batch],
            deferred_from: vec![0; batch],
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
        self.deferred_len.iter_mut().for_each(|n| *n = 0);
    }

    /// Forgets everything `row` saw from absolute position `len` on: its position becomes
    /// `len`, and every layer keeps only its entries for earlier positions. (The values stay in
    /// the buffers, unread, until overwritten.) The row is then exactly as if it had never seen
    /// those tokens. An error if `len` is past the row's position or the row outside the batch.
    pub fn rollback(&mut self, row: usize, len: usize) -> crate::Result<()> {
        if row >= self.batch || len > self.positions[row] {
            return Err(crate::Error::Input(format!(
                "cannot roll row {row} back to length {len}: the batch has {} rows{}",
                self.batch,
                self.positions.get(row).map_or(String::new(), |p| format!(", the row is at {p}"))
            )));
        }
        self.positions[row] = len;
        for l in self.lower.layers.iter_mut().chain(&mut self.upper.layers) {
            l.truncate_at(row, len);
        }
        let owed = &mut self.deferred_len[row];
        *owed = (*owed).min(len.saturating_sub(self.deferred_from[row]));
        Ok(())
    }

    /// A cache of no rows and no layers (a placeholder while a decoder holds the real one).
    pub fn empty() -> KvCache {
        let part = CachePart { first_layer: 0, layers: Vec::new() };
        KvCache {
            lower: part.clone(),
            upper: part,
            positions: Vec::new(),
            batch: 0,
            max_seq_len: 0,
            dim: 0,
            deferred: Vec::new(),
            deferred_len: Vec::new(),
            deferred_from: Vec::new(),
        }
    }

    /// The bytes the buffers take.
    pub fn bytes(&self) -> usize {
        (self.lower.layers.len() + self.upper.layers.len())
            * self.batch
            * self.max_seq_len
            * (2 * self.dim * 4 + 8)
    }
}
