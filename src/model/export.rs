//! Export to llama2.c's checkpoint format, so an independent program (Karpathy's `run.c`) can
//! run our model and show that our forward pass is Llama's.
//!
//! **`model.bin`, legacy version 0** (what `run.c` reads): a header of seven little-endian
//! `i32` — `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` — where a
//! **negative** `vocab_size` says the output layer is not shared with the embedding and is
//! stored at the end. Then `f32` arrays, each layer-major:
//!
//! ```text
//! token_embedding_table [V, D]
//! rms_att_weight [L, D]
//! wq [L, D, D]   wk [L, D, D]   wv [L, D, D]   wo [L, D, D]
//! rms_ffn_weight [L, D]
//! w1 [L, F, D]   w2 [L, D, F]   w3 [L, F, D]
//! rms_final_weight [D]
//! freq_cis_real [seq_len, hd/2]   freq_cis_imag [seq_len, hd/2]   (RoPE cos / sin, unused by run.c)
//! wcls [V, D]
//! ```
//!
//! **`tokenizer.bin`**: `i32 max_token_length`, then per token `f32 score, i32 len, len bytes`.
//! We name token `i` as `<i>` so run.c's output reads back as ids.
//!
//! The export is the deep path (all layers, the final head): what `generate` computes.

use std::path::Path;

use super::transformer::LegoTransformer;
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::ops::rope::rope_tables;

impl LegoTransformer {
    /// Writes `model.bin` (llama2.c version 0) at `path` and `tokenizer.bin` beside it.
    pub fn export_llama2c(&self, path: &Path) -> Result<()> {
        let c = &self.config;
        let to_i32 = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| Error::Input(format!("{what} {v} does not fit llama2.c's int32 header")))
        };
        let mut bytes: Vec<u8> = Vec::new();
        for (v, what) in [
            (c.dim, "dim"),
            (c.ffn_hidden, "hidden_dim"),
            (c.num_layers, "n_layers"),
            (c.num_heads, "n_heads"),
            (c.num_heads, "n_kv_heads"),
        ] {
            bytes.extend(to_i32(v, what)?.to_le_bytes());
        }
        bytes.extend((-to_i32(c.vocab_size, "vocab_size")?).to_le_bytes());
        bytes.extend(to_i32(c.max_seq_len, "seq_len")?.to_le_bytes());
        let mut put = |data: &[f32]| data.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
        put(&self.tok_embeddings.data());
        let per_layer = |get: &dyn Fn(&crate::nn::Block) -> crate::tensor::Tensor| -> Vec<f32> {
            self.layers.iter().flat_map(|b| get(b).to_vec()).collect()
        };
        put(&per_layer(&|b| b.attention_norm.weight.clone()));
        put(&per_layer(&|b| b.attention.wq.weight.clone()));
        put(&per_layer(&|b| b.attention.wk.weight.clone()));
        put(&per_layer(&|b| b.attention.wv.weight.clone()));
        put(&per_layer(&|b| b.attention.wo.weight.clone()));
        put(&per_layer(&|b| b.ffn_norm.weight.clone()));
        put(&per_layer(&|b| b.feed_forward.w1.weight.clone()));
        put(&per_layer(&|b| b.feed_forward.w2.weight.clone()));
        put(&per_layer(&|b| b.feed_forward.w3.weight.clone()));
        put(&self.head.norm.weight.data());
        let positions: Vec<usize> = (0..c.max_seq_len).collect();
        let (cos, sin) = rope_tables(&positions, c.head_dim(), c.rope_theta);
        put(&cos);
        put(&sin);
        put(&self.head.output.weight.data());
        write_atomic(path, &bytes)?;

        let names: Vec<String> = (0..c.vocab_size).map(|i| format!("<{i}>")).collect();
        let max_len = names.iter().map(String::len).max().unwrap_or(0);
        let mut tok: Vec<u8> = Vec::new();
        tok.extend((max_len as i32).to_le_bytes());
        for name in &names {
            tok.extend(0f32.to_le_bytes());
            tok.extend((name.len() as i32).to_le_bytes());
            tok.extend(name.as_bytes());
        }
        write_atomic(&path.with_file_name("tokenizer.bin"), &tok)
    }
}
