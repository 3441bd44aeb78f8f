//! Lossless self-speculative decoding: the model's own lower layers and exit head draft, the
//! whole model checks (LayerSkip's idea, Elhoushi et al. 2024, on our split model).
//!
//! Early exit ([`early_exit`](super::early_exit)) saves the upper layers of a confident token
//! but may change the text: the exit head's choice is not always the deep head's. Here the
//! exit head only *proposes*; every token that is kept is one the full model would have
//! produced. One round, per row, starting from the row's last chosen token `x` at position `n`:
//!
//! ```text
//! draft (k steps, one token a row a step; lower layers only):
//!     feed x, d1, .., dk through layers 0..exit        keep each exit state h_n .. h_n+k
//!     d1 .. dk from the exit head                       (adaptive: stop when its confidence is low)
//! check (one step: the upper layers once over the k + 1 positions of every row):
//!     begin_hidden(h_n .. h_n+k at positions n .. n+k); layers exit..N; deep head on each
//!     → p_n .. p_n+k, the full model's distributions after x, d1, .., dk
//! accept: the longest prefix d1..dj that the full model agrees with, then one token of its
//!     own at position n+j+1 (a correction where it disagreed, or a bonus after all k);
//!     both caches are rolled back to positions ..n+j (Decoder::rollback)
//! ```
//!
//! The check writes the upper cache of every checked position with its true keys and values
//! (the positions are a small prefill through the upper layers); the rollback drops those
//! past the accepted prefix, and leaves both caches exactly as a run that never saw the
//! rejected drafts (tested). A round costs k + 1 lower passes, the exit head k times, and one
//! upper pass over k + 1 positions; it yields between 1 and k + 1 tokens.
//!
//! **Greedy** (temperature 0): a draft is accepted when it is the full model's argmax. Every
//! kept token is then the argmax of the same logits `generate` computes (the decoder's batch
//! invariance: a token's numbers do not depend on how many tokens share its step), so the
//! output is `generate`'s, token for token, for any `k` and threshold.
//!
//! **Sampling**: the speculative-sampling rule of Leviathan, Kalman and Matias, "Fast Inference
//! from Transformers via Speculative Decoding" (ICML 2023), and Chen et al., "Accelerating
//! Large Language Model Decoding with Speculative Sampling" (2023). With `q` the draft's
//! distribution and `p` the full model's at the same position (both after the temperature,
//! top-k and top-p of [`Sampling`]), a draft `d ~ q` is accepted with
//! probability `min(1, p(d) / q(d))`; at the first rejection the token is drawn from the
//! residual `max(0, p − q)`, renormalised; after k acceptances a bonus token is drawn from `p`.
//! Then each token is distributed exactly as `p` (the proof: `P(token = t) = q(t)·min(1,
//! p(t)/q(t)) + (1 − Σ_s min(q(s), p(s)))·max(0, p(t) − q(t)) / Σ_s max(0, p(s) − q(s))`
//! `= min(q(t), p(t)) + max(0, p(t) − q(t)) = p(t)`), so the output has the full model's
//! distribution, though not the same draws as `generate` (the random numbers are used
//! differently).
//!
//! **Per row.** Rows draft, accept and roll back on their own: in one check, one row may keep
//! all its drafts and another none. A row that meets a stop token or its last new token stops.
//!
//! **k fixed or adaptive** ([`Speculation`]): a fixed k drafts k tokens a round; adaptive
//! drafting (Kangaroo's and LayerSkip's early stop of the draft) also stops a row's draft
//! as soon as the exit head's confidence (max softmax) falls below a threshold, since a
//! doubtful draft is likely rejected and its lower pass wasted.

use super::decoder::{Decoder, Tokens};
use super::early_exit::{EarlyExitStats, TimeSplit, Timer};
use super::generate::{GenerateOptions, Sampler, Sampling, TokenEvent};
use super::transformer::LegoTransformer;
use super::{config::check_threshold, cost};
use crate::error::{Error, Result};
use crate::ops::select::argmax;

/// How many tokens a row drafts a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speculation {
    /// Most tokens drafted per row per round (at least 1).
    pub k: usize,
    /// `None`: always `k` (fixed). `Some(t)`: adaptive, a row's draft also stops at the first
    /// token whose exit confidence (max softmax of the exit head) is below `t`.
    pub stop_below: Option<f32>,
}

impl Speculation {
    /// `k` drafts a round, always.
    pub fn fixed(k: usize) -> Speculation {
        Speculation { k, stop_below: None }
    }

    /// Up to `k` drafts a round, stopping at the first whose exit confidence is below
    /// `threshold`.
    pub fn adaptive(k: usize, threshold: f32) -> Speculation {
        Speculation { k, stop_below: Some(threshold) }
    }

    /// Checks the settings (they often come from flags): `k >= 1`, a threshold in `[0, ∞)`.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::Input(
                "self-speculative decoding needs k >= 1 drafted tokens a round, got k = 0".into(),
            ));
        }
        match self.stop_below {
            Some(t) => check_threshold(t),
            None => Ok(()),
        }
    }
}

/// What self-speculative decoding did (in [`EarlyExitStats::speculation`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculationStats {
    /// Tokens the exit head proposed.
    pub drafted: usize,
    /// Proposed tokens the full model agreed with (kept).
    pub accepted: usize,
    /// `accepted / drafted` (0 when nothing was drafted).
    pub acceptance_rate: f64,
    /// Check passes: each ran the upper layers once over the drafted positions of every row.
    pub rounds: usize,
    /// Positions that went through the upper layers in all the checks.
    pub checked: usize,
    /// Draft steps: decoder steps through the lower layers (each feeds one token for every
    /// row still drafting: a round's last accepted token, then each draft, so a row's round
    /// is one lower pass more than its drafts).
    pub draft_steps: usize,
    /// Positions fed through the lower layers while drafting (Σ rows over the draft steps).
    pub draft_positions: usize,
    /// Draft steps that ran the exit head (for at least one row), and the rows it ran for.
    pub exit_head_steps: usize,
    /// Rows the exit head ran for while drafting (= the drafts proposed, plus those an
    /// adaptive draft stopped at).
    pub exit_head_rows: usize,
}

/// The buffers of a round, made once.
struct Round {
    /// Each row's exit states of the round, `[batch, k + 1, D]`.
    hidden: Vec<f32>,
    /// The same, gathered for the check, `[Σ fed, D]`.
    gathered: Vec<f32>,
    /// Each row's drafts, `[batch, k]`.
    drafts: Vec<usize>,
    /// Each draft's distribution `q` (when sampling), `[batch, k, V]`.
    q: Vec<f32>,
    /// Per row: tokens fed this round, drafts made, drafts allowed, position of the first fed
    /// token, and the token to feed next.
    fed: Vec<usize>,
    drafted: Vec<usize>,
    budget: Vec<usize>,
    start: Vec<usize>,
    feed: Vec<usize>,
    /// The rows of a draft step, the next step's, the step rows that draft, ids of a step.
    stepping: Vec<usize>,
    next_stepping: Vec<usize>,
    want: Vec<usize>,
    ids: Vec<usize>,
    /// The full model's distribution at one position, and the residual `max(0, p − q)`, `[V]`.
    p: Vec<f32>,
    residual: Vec<f32>,
}

impl LegoTransformer {
    /// Self-speculative generation behind [`generate_streaming`] in
    /// [`DecodeMode::SelfSpeculative`](super::generate::DecodeMode::SelfSpeculative): the
    /// options and prompts are already checked.
    ///
    /// [`generate_streaming`]: LegoTransformer::generate_streaming
    pub(crate) fn generate_self_speculative(
        &self,
        prompts: &[Vec<usize>],
        options: &GenerateOptions,
        spec: &Speculation,
        on_token: impl FnMut(TokenEvent),
    ) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
        let batch = prompts.len();
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        let mut dec = Decoder::new(self, batch, prompt_tokens.max(batch * (spec.k + 1)));
        speculate(&mut dec, prompts, options, spec, on_token)
    }
}

/// The self-speculative loop (see the module doc) on `dec`, whose cache must be empty and hold
/// a row per prompt.
fn speculate(
    dec: &mut Decoder,
    prompts: &[Vec<usize>],
    options: &GenerateOptions,
    spec: &Speculation,
    mut on_token: impl FnMut(TokenEvent),
) -> Result<(Vec<Vec<usize>>, EarlyExitStats)> {
    let t_start = std::time::Instant::now();
    // Phase times, when asked: the draft's lower layers (`lower`) and exit heads
    // (`exit_check`), the check's upper layers (`upper`) and deep head (`head`), choosing and
    // accepting tokens with the rollbacks (`sampling`), the prompt (`prefill`).
    let (mut timer, mut time) = (Timer::new(options.profile), TimeSplit::default());
    let model = dec.model();
    let c = &model.config;
    let (batch, v, d, k) = (prompts.len(), c.vocab_size, c.dim, spec.k);
    let (exit, n_layers) = (c.exit_layer, model.layers.len());
    let max_new = options.max_new_tokens;
    let greedy = options.sampling.temperature == 0.0;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut out = super::generate::output_rows(prompts, max_new);
    let mut stats = EarlyExitStats {
        routes: (0..batch).map(|_| Vec::with_capacity(max_new)).collect(),
        confidences: vec![Vec::new(); batch],
        stopped: vec![false; batch],
        ..Default::default()
    };
    if max_new == 0 {
        return Ok((out, stats));
    }
    let mut samplers: Vec<Sampler> = (0..batch as u64)
        .map(|r| {
            Sampler::new(Sampling { seed: options.sampling.seed.wrapping_add(r), ..options.sampling }, v)
        })
        .collect();
    let mut b = Round {
        hidden: vec![0.0; batch * (k + 1) * d],
        gathered: vec![0.0; batch * (k + 1) * d],
        drafts: vec![0; batch * k],
        q: if greedy { Vec::new() } else { vec![0.0; batch * k * v] },
        fed: vec![0; batch],
        drafted: vec![0; batch],
        budget: vec![0; batch],
        start: vec![0; batch],
        feed: vec![0; batch],
        stepping: Vec::with_capacity(batch),
        next_stepping: Vec::with_capacity(batch),
        want: Vec::with_capacity(batch),
        ids: vec![0; batch],
        p: vec![0.0; v],
        residual: vec![0.0; v],
    };
    let ones = vec![1usize; batch];
    let mut active: Vec<usize> = (0..batch).collect();
    let (mut counts, mut starts) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    // FLOPs spent and what full depth would spend on the kept tokens; layers run likewise.
    let (mut spent, mut full_depth) = (0.0f64, 0.0f64);
    let (mut layers_run, mut layers_full) = (0usize, 0usize);

    // Keeps token `t` for row `r` (`exited`: a draft the full model accepted); true while the
    // row goes on (no stop token, room for more).
    let mut keep =
        |r: usize, t: usize, exited: bool, out: &mut Vec<Vec<usize>>, stats: &mut EarlyExitStats| {
            out[r].push(t);
            on_token(TokenEvent { row: r, token: t, exited });
            stats.routes[r].push(!exited);
            if exited {
                stats.shallow_count += 1
            } else {
                stats.deep_count += 1
            }
            stats.stopped[r] = options.stop_tokens.contains(&t);
            !stats.stopped[r] && out[r].len() - lens[r] < max_new
        };

    // The prefill: every prompt token through every layer; each row's first token from the
    // full model.
    let flat: Vec<usize> = prompts.iter().flatten().copied().collect();
    timer.lap();
    dec.begin(&active, &lens, &flat)?;
    dec.layers(0..n_layers);
    dec.logits(&model.head, Tokens::LastOfEach)?;
    for r in 0..batch {
        // (Step row r is cache row r: every row is in the prefill.)
        let t = samplers[r].sample(dec.logits_row(r));
        full_depth += cost::full_depth_flops(c, lens[r]);
        spent += cost::full_depth_flops(c, lens[r]);
        (layers_run, layers_full) = (layers_run + n_layers, layers_full + n_layers);
        keep(r, t, false, &mut out, &mut stats);
    }
    active.retain(|&r| !stats.stopped[r] && out[r].len() - lens[r] < max_new);
    time.prefill = timer.lap();

    while !active.is_empty() {
        // Draft: each active row feeds its last token, then its drafts, through the lower
        // layers, one a step, keeping each exit state.
        for &r in &active {
            let left = max_new - (out[r].len() - lens[r]);
            b.budget[r] = k.min(left - 1);
            b.fed[r] = 0;
            b.drafted[r] = 0;
            b.feed[r] = *out[r].last().expect("a prompt is never empty");
            b.start[r] = dec.position(r);
        }
        b.stepping.clear();
        b.stepping.extend_from_slice(&active);
        while !b.stepping.is_empty() {
            let n = b.stepping.len();
            for (id, &r) in b.ids.iter_mut().zip(&b.stepping) {
                *id = b.feed[r];
            }
            // (After a check, this lap is the accept loop's and the rollbacks'.)
            time.sampling += timer.lap();
            dec.begin(&b.stepping, &ones[..n], &b.ids[..n])?;
            dec.layers(0..exit);
            time.lower += timer.lap();
            stats.speculation.draft_steps += 1;
            stats.speculation.draft_positions += n;
            b.want.clear();
            for (i, &r) in b.stepping.iter().enumerate() {
                let at = (r * (k + 1) + b.fed[r]) * d;
                b.hidden[at..at + d].copy_from_slice(dec.last_hidden(i));
                spent += exit as f64 * cost::layer_flops(c, b.start[r] + b.fed[r] + 1);
                layers_run += exit;
                b.fed[r] += 1;
                if b.drafted[r] < b.budget[r] {
                    b.want.push(i);
                }
            }
            b.next_stepping.clear();
            if !b.want.is_empty() {
                dec.logits(model.exit(), Tokens::LastOf(&b.want))?;
                stats.speculation.exit_head_steps += 1;
                stats.speculation.exit_head_rows += b.want.len();
                spent += b.want.len() as f64 * cost::head_flops(c);
                for (j, &i) in b.want.iter().enumerate() {
                    let r = b.stepping[i];
                    if let Some(threshold) = spec.stop_below {
                        let confidence = dec.confidence(j);
                        if !confidence.is_finite() {
                            return Err(Error::NonFinite(format!(
                                "the exit confidence of row {r} is {confidence}"
                            )));
                        }
                        if confidence < threshold {
                            continue; // a doubtful draft: this row's draft ends here
                        }
                    }
                    let slot = r * k + b.drafted[r];
                    let draft = if greedy {
                        argmax(dec.logits_row(j))
                    } else {
                        let q = &mut b.q[slot * v..(slot + 1) * v];
                        samplers[r].distribution(dec.logits_row(j), q);
                        samplers[r].draw(q, q.iter().sum())
                    };
                    b.drafts[slot] = draft;
                    b.drafted[r] += 1;
                    b.feed[r] = draft;
                    b.next_stepping.push(r);
                }
            }
            std::mem::swap(&mut b.stepping, &mut b.next_stepping);
            time.exit_check += timer.lap();
        }

        // Check: the upper layers once over every fed position of every active row.
        counts.clear();
        starts.clear();
        let mut m = 0;
        for &r in &active {
            let n = b.fed[r];
            counts.push(n);
            starts.push(b.start[r]);
            let from = r * (k + 1) * d;
            b.gathered[m * d..(m + n) * d].copy_from_slice(&b.hidden[from..from + n * d]);
            m += n;
        }
        dec.begin_hidden(&active, &counts, &starts, &b.gathered[..m * d])?;
        dec.layers(exit..n_layers);
        time.upper += timer.lap();
        dec.logits(&model.head, Tokens::All)?;
        time.head += timer.lap();
        stats.speculation.rounds += 1;
        stats.speculation.checked += m;

        // Accept, per row: the longest agreeing prefix, then the full model's own token.
        let mut o = 0;
        let mut i = 0;
        while i < active.len() {
            let r = active[i];
            let (nd, slots) = (b.drafted[r], r * k);
            for j in 0..b.fed[r] {
                spent +=
                    (n_layers - exit) as f64 * cost::layer_flops(c, b.start[r] + j + 1) + cost::head_flops(c);
            }
            layers_run += (n_layers - exit) * b.fed[r];
            let mut accepted = 0;
            let next = if greedy {
                loop {
                    let t = argmax(dec.logits_row(o + accepted));
                    if accepted == nd || t != b.drafts[slots + accepted] {
                        break t;
                    }
                    accepted += 1;
                }
            } else {
                loop {
                    samplers[r].distribution(dec.logits_row(o + accepted), &mut b.p);
                    if accepted == nd {
                        break samplers[r].draw(&b.p, b.p.iter().sum()); // the bonus token
                    }
                    let (draft, slot) = (b.drafts[slots + accepted], slots + accepted);
                    let q = &b.q[slot * v..(slot + 1) * v];
                    // Accept d with probability min(1, p(d) / q(d)) (q(d) > 0: d was drawn from q).
                    if samplers[r].uniform() * q[draft] < b.p[draft] {
                        accepted += 1;
                        continue;
                    }
                    // Rejected: draw from the residual max(0, p − q), renormalised.
                    let mut total = 0.0;
                    for ((res, &p), &q) in b.residual.iter_mut().zip(&b.p).zip(q) {
                        *res = (p - q).max(0.0);
                        total += *res;
                    }
                    break if total > 0.0 {
                        samplers[r].draw(&b.residual, total)
                    } else {
                        samplers[r].draw(&b.p, b.p.iter().sum())
                    };
                }
            };
            o += b.fed[r];
            stats.speculation.drafted += nd;
            stats.speculation.accepted += accepted;
            // Forget the rejected positions in every layer: the caches hold x, d1..d_accepted.
            dec.rollback(r, b.start[r] + accepted + 1)?;
            let before = out[r].len();
            let mut goes_on = true;
            for j in 0..accepted {
                full_depth += cost::full_depth_flops(c, out[r].len());
                goes_on = keep(r, b.drafts[slots + j], true, &mut out, &mut stats);
                if !goes_on {
                    break;
                }
            }
            if goes_on {
                full_depth += cost::full_depth_flops(c, out[r].len());
                goes_on = keep(r, next, false, &mut out, &mut stats);
            }
            layers_full += n_layers * (out[r].len() - before);
            if goes_on {
                i += 1;
            } else {
                active.remove(i);
            }
        }
    }
    time.sampling += timer.lap();
    stats.time = time;
    let s = &mut stats.speculation;
    s.acceptance_rate = if s.drafted == 0 { 0.0 } else { s.accepted as f64 / s.drafted as f64 };
    let total = stats.shallow_count + stats.deep_count;
    stats.shallow_ratio = stats.shallow_count as f64 / total.max(1) as f64;
    stats.actual_compute_cost = layers_run as f64 / layers_full as f64;
    stats.flop_cost = spent / full_depth;
    stats.seconds = t_start.elapsed().as_secs_f64();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LegoConfig;

    /// After rounds with rejections, both caches hold exactly what a full-depth run over the
    /// kept tokens holds: the rejected drafts left nothing behind, in any layer.
    #[test]
    fn after_rejections_the_caches_equal_a_run_that_never_drafted() {
        let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(53, 32, 4, 4, 72, 64) };
        let m = LegoTransformer::new(config, &mut crate::Tensor::rng(3)).unwrap();
        let prompts: Vec<Vec<usize>> = vec![vec![1, 5, 9], vec![7], vec![2, 3, 4, 8, 16]];
        let options = GenerateOptions::greedy(24).with_speculation(Speculation::fixed(4));
        let mut dec = Decoder::new(&m, 3, 3 * 5);
        let (out, stats) = speculate(&mut dec, &prompts, &options, &Speculation::fixed(4), |_| {}).unwrap();
        let s = &stats.speculation;
        assert!(s.accepted > 0 && s.accepted < s.drafted, "{s:?}");
        // The reference: every kept token but the last (never fed), in one full-depth step.
        let fed: Vec<usize> = out.iter().map(|o| o.len() - 1).collect();
        let mut reference = Decoder::new(&m, 3, fed.iter().sum());
        let ids: Vec<usize> = out.iter().flat_map(|o| o[..o.len() - 1].iter().copied()).collect();
        reference.begin(&[0, 1, 2], &fed, &ids).unwrap();
        reference.layers(0..m.layers.len());
        let (a, b) = (dec.cache(), reference.cache());
        assert_eq!(a.positions, b.positions);
        for l in 0..m.layers.len() {
            let (x, y) = (a.layer(l), b.layer(l));
            for row in 0..3 {
                assert_eq!(x.positions(row), y.positions(row), "layer {l} row {row}");
                let (at, n) = (row * a.max_seq_len * a.dim, x.len[row] * a.dim);
                assert_eq!(x.k[at..at + n], y.k[at..at + n], "layer {l} row {row}: keys");
                assert_eq!(x.v[at..at + n], y.v[at..at + n], "layer {l} row {row}: values");
            }
        }
    }
}
