//! Generating a token allocates nothing: every buffer is made before the first step.
//!
//! A counting global allocator (this test binary's own, so it holds one test only: no other
//! test's allocations can land in the count) counts the allocations of whole generation calls
//! that differ only in their number of new tokens. If any step allocated, the longer call would
//! allocate more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lego::Tensor;
use lego::model::{
    ExitGate, ExitMeasure, ExitRule, GenerateOptions, LegoConfig, LegoTransformer, Sampling, Speculation,
    UpperCacheFill,
};

/// The system allocator, counting calls to `alloc` and `realloc`.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_generated_token_allocates_nothing() {
    let config = LegoConfig { exit_layer: 2, ..LegoConfig::new(53, 32, 4, 4, 72, 64) };
    let mut m = LegoTransformer::new(config, &mut Tensor::rng(1)).unwrap();
    // An exit gate with fixed weights of both signs, so that its routes mix.
    let weights: Vec<f32> = (0..32).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5).collect();
    let squares = weights.iter().map(|w| -0.5 * w).collect();
    m.exit_gate = Some(ExitGate::new(weights, squares, 0.0, 0.5).unwrap());
    // A ragged batch: prompts of 5, 2 and 8 tokens.
    let prompts: Vec<Vec<usize>> =
        [5, 2, 8].iter().enumerate().map(|(s, &n)| (0..n).map(|i| (i * 7 + s * 3) % 53).collect()).collect();
    let sampled = Sampling { temperature: 0.8, top_k: 10, top_p: 0.9, seed: 3 };
    // A stop token that ends row 0 after its 6th new token, and no row within its first 5.
    let stop_for = |options: GenerateOptions| {
        let (free, _) = m.generate_with(&prompts, &options).unwrap();
        let news: Vec<&[usize]> = free.iter().zip(&prompts).map(|(o, p)| &o[p.len()..]).collect();
        let stop = *news[0][6..].iter().find(|t| news.iter().all(|n| !n[..5].contains(t))).unwrap();
        options.with_stop_tokens(&[stop])
    };
    let modes = [
        GenerateOptions::greedy(0),
        GenerateOptions { sampling: sampled, ..GenerateOptions::greedy(0) },
        GenerateOptions::greedy(0).with_exit(ExitRule::new(0.03, UpperCacheFill::Skip)),
        GenerateOptions { sampling: sampled, profile: true, ..GenerateOptions::greedy(0) }
            .with_exit(ExitRule::new(0.03, UpperCacheFill::Propagate)),
        GenerateOptions::greedy(0).with_exit(ExitRule::gate(0.5, UpperCacheFill::Skip)),
        GenerateOptions { sampling: sampled, profile: true, ..GenerateOptions::greedy(0) }
            .with_exit(ExitRule::gate(0.5, UpperCacheFill::Propagate)),
        stop_for(GenerateOptions::greedy(50)),
        GenerateOptions::greedy(0).with_exit(ExitRule::new(0.03, UpperCacheFill::Deferred)),
        GenerateOptions { sampling: sampled, profile: true, ..GenerateOptions::greedy(0) }
            .with_exit(ExitRule::gate(0.5, UpperCacheFill::Deferred)),
        GenerateOptions::greedy(0).with_speculation(Speculation::fixed(3)),
        GenerateOptions { sampling: sampled, ..GenerateOptions::greedy(0) }
            .with_speculation(Speculation::fixed(2)),
        GenerateOptions { sampling: sampled, ..GenerateOptions::greedy(0) }
            .with_speculation(Speculation::adaptive(4, 0.03)),
        stop_for(GenerateOptions::greedy(50).with_speculation(Speculation::adaptive(3, 0.02))),
        stop_for(GenerateOptions::greedy(50).with_exit(ExitRule::new(0.03, UpperCacheFill::Skip))),
    ];
    // Start every rayon worker now: a thread allocates as it starts, and one still starting
    // after the warm-up below would land its allocations in a count.
    rayon::broadcast(|_| ());
    // The same for the decode team's workers (a team is made with all of them started).
    lego::kernels::team::decode_team();
    let count = |options: &GenerateOptions| {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        // Streaming, with a listener that allocates nothing itself.
        let mut heard = 0usize;
        let (out, stats) =
            m.generate_streaming(&prompts, options, |e| heard += e.token + e.exited as usize).unwrap();
        let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
        drop((out, stats, heard));
        n
    };
    for mode in modes {
        let (short, long) = (
            GenerateOptions { max_new_tokens: 4, ..mode.clone() },
            GenerateOptions { max_new_tokens: 50, ..mode.clone() },
        );
        count(&long); // warm-up (rayon's pool, lazily built tables)
        let (a, b) = (count(&short), count(&long));
        let (_, stats) = m.generate_with(&prompts, &long).unwrap();
        if !mode.stop_tokens.is_empty() {
            assert!(stats.stopped[0], "{mode:?}: row 0 should meet its stop token");
        }
        if let Some(rule) = mode.exit_rule().filter(|r| r.measure == ExitMeasure::Gate) {
            assert!(stats.shallow_count > 0 && stats.deep_count > 0, "{rule:?}: routes not mixed");
        }
        assert_eq!(a, b, "{mode:?}: 4 new tokens made {a} allocations, 50 made {b}");
    }
}
