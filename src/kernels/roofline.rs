//! What the memory can deliver: the read bandwidth that bounds decoding.
//!
//! Decoding one token reads every weight of the model once (all but the embedding table, of
//! which it reads one row), and at batch 1 does two FLOPs per weight read: far too few to keep
//! the cores' arithmetic busy. So its speed limit is bandwidth: `tokens/s <= bytes/s ÷ weight
//! bytes per token`. Which bandwidth depends on where the weights live: a model whose weights
//! fit the last-level cache streams them from there, a larger one from DRAM. So the roofline of
//! a model is measured over a buffer **of that model's own weight size**, read the way the
//! decoder reads it: each thread of the decode team streaming its contiguous share with the
//! SIMD kernel, pass after pass.

use std::hint::black_box;
use std::time::Instant;

use super::simd;
use super::team::{Team, part_rows};

/// Bytes per second of reading a buffer of `bytes` bytes with `threads` threads of `team`
/// (median of `passes` passes, after two warm-up passes).
pub fn read_bandwidth(team: &Team, bytes: usize, threads: usize, passes: usize) -> f64 {
    let n = (bytes / 4).max(64);
    // Values that keep the sums finite; the buffer is touched first, so no page fault is timed.
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 1e-3).collect();
    let threads = threads.clamp(1, team.size());
    let pass = || {
        let sums: [std::sync::atomic::AtomicU32; 8] = Default::default();
        team.run(threads, &|p| {
            let r = part_rows(n, threads, p, 16);
            let half = r.len() / 2;
            // One read of each value: the first half dotted with the second.
            let s = simd::dot(&buf[r.start..r.start + half], &buf[r.start + half..r.start + 2 * half]);
            sums[p].store(s.to_bits(), std::sync::atomic::Ordering::Relaxed);
        });
        black_box(sums);
    };
    pass();
    pass();
    let mut times: Vec<f64> = (0..passes.max(1))
        .map(|_| {
            let t = Instant::now();
            pass();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (n * 4) as f64 / times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bandwidth_is_a_positive_finite_rate() {
        let team = Team::new(2);
        let bw = read_bandwidth(&team, 1 << 20, 2, 3);
        assert!(bw.is_finite() && bw > 1e8, "{bw} bytes/s");
    }
}
