//! Sampling, and standard generation with the KV cache (spec `generate`).
//!
//! The prompt goes through every layer in one step (the prefill); then each new token goes
//! through every layer alone, attending to the cache. Early-exit generation, where confident
//! tokens skip the upper layers, builds on the same engine.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cache::KvCache;
use super::decode::{Step, Workspace};
use super::transformer::LegoTransformer;
use crate::error::{Error, Result};
use crate::ops::select::argmax;

/// How the next token is picked from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before the
    /// softmax (below 1 sharpens, above 1 flattens).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (nucleus sampling; 1.0: all).
    pub top_p: f32,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    /// Checks the settings (they often come from flags).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!("temperature must be a number >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Draws tokens from logits, with buffers kept between calls (no allocation per token).
pub struct Sampler {
    settings: Sampling,
    rng: StdRng,
    probs: Vec<f32>,
    order: Vec<usize>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(settings: Sampling, vocab: usize) -> Sampler {
        Sampler {
            settings,
            rng: StdRng::seed_from_u64(settings.seed),
            probs: vec![0.0; vocab],
            order: (0..vocab).collect(),
        }
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        let s = self.settings;
        if s.temperature == 0.0 {
            return argmax(logits);
        }
        let probs = &mut self.probs[..logits.len()];
        let inv_t = 1.0 / s.temperature;
        probs.iter_mut().zip(logits).for_each(|(p, z)| *p = z * inv_t);
        crate::kernels::simd::softmax_in_place(probs);
        let order = &mut self.order[..logits.len()];
        order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
        let probs_ref = &*probs;
        let desc = |a: &usize, b: &usize| probs_ref[*b].total_cmp(&probs_ref[*a]).then(a.cmp(b));
        // Candidates: the top k (or all), most likely first.
        let mut keep = logits.len();
        if s.top_k > 0 && s.top_k < keep {
            order.select_nth_unstable_by(s.top_k - 1, desc);
            keep = s.top_k;
        }
        order[..keep].sort_unstable_by(desc);
        if s.top_p < 1.0 {
            let mut mass = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                mass += probs_ref[i];
                if mass >= s.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        let total: f32 = order[..keep].iter().map(|&i| probs_ref[i]).sum();
        let mut u = self.rng.random::<f32>() * total;
        for &i in &order[..keep] {
            u -= probs_ref[i];
            if u <= 0.0 {
                return i;
            }
        }
        order[keep - 1]
    }
}

impl LegoTransformer {
    /// Checks a batch of prompts for generation: at least one, all non-empty and of the same
    /// length, ids in the vocabulary, and room for `max_new_tokens` more. Returns the prompt
    /// length.
    pub fn check_prompts(&self, prompts: &[Vec<usize>], max_new_tokens: usize) -> Result<usize> {
        let first = prompts.first().ok_or_else(|| Error::Input("no prompt given".into()))?;
        if first.is_empty() {
            return Err(Error::Input(
                "empty prompt: generation needs at least one token to start from".into(),
            ));
        }
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != first.len()) {
            return Err(Error::Input(format!(
                "prompt {i} has {} tokens but prompt 0 has {}: a batch needs prompts of equal length",
                p.len(),
                first.len()
            )));
        }
        let flat: Vec<usize> = prompts.iter().flatten().copied().collect();
        self.check_tokens(&flat, prompts.len(), 0)?;
        let total = first.len() + max_new_tokens;
        if total > self.config.max_seq_len {
            return Err(Error::Input(format!(
                "prompt of {} tokens + {max_new_tokens} new ones = {total} exceeds max_seq_len {}",
                first.len(),
                self.config.max_seq_len
            )));
        }
        Ok(first.len())
    }

    /// **Spec `generate(input_ids, max_new_tokens, ...)`**: continues each prompt by
    /// `max_new_tokens` tokens through all layers, with the KV cache. Returns each row's prompt
    /// followed by its new tokens.
    pub fn generate(
        &self,
        prompts: &[Vec<usize>],
        max_new_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Vec<Vec<usize>>> {
        sampling.validate()?;
        let prompt_len = self.check_prompts(prompts, max_new_tokens)?;
        let batch = prompts.len();
        let mut out: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                let mut v = Vec::with_capacity(p.len() + max_new_tokens);
                v.extend_from_slice(p);
                v
            })
            .collect();
        if max_new_tokens == 0 {
            return Ok(out);
        }
        let mut cache = KvCache::new(&self.config, batch);
        let mut ws = Workspace::new(self, batch * prompt_len);
        let mut sampler = Sampler::new(*sampling, self.config.vocab_size);
        let rows: Vec<usize> = (0..batch).collect();
        let all = 0..self.layers.len();
        let v = self.config.vocab_size;

        // Prefill: the whole prompt in one step; logits of each row's last token.
        let flat: Vec<usize> = prompts.iter().flatten().copied().collect();
        self.embed_into(&flat, &mut ws);
        self.run_cached(all.clone(), &Step { cache_rows: &rows, t: prompt_len }, &mut cache, &mut ws);
        self.logits_into(&self.head, (0..batch).map(|r| r * prompt_len + prompt_len - 1), &mut ws);
        let mut next = vec![0usize; batch];
        for (r, n) in next.iter_mut().enumerate() {
            *n = sampler.sample(&ws.logits[r * v..(r + 1) * v]);
        }

        // Decode: one token per row per step.
        for step in 0..max_new_tokens {
            for (o, &n) in out.iter_mut().zip(&next) {
                o.push(n);
            }
            if step + 1 == max_new_tokens {
                break;
            }
            self.embed_into(&next, &mut ws);
            self.run_cached(all.clone(), &Step { cache_rows: &rows, t: 1 }, &mut cache, &mut ws);
            self.logits_into(&self.head, 0..batch, &mut ws);
            for (r, n) in next.iter_mut().enumerate() {
                *n = sampler.sample(&ws.logits[r * v..(r + 1) * v]);
            }
        }
        Ok(out)
    }
}
