//! A pool of `f32` buffers, so that a training step reuses the memory of the last one.
//!
//! Every op allocates its output and its backward allocates gradients; a step of config S
//! makes hundreds of buffers of up to tens of megabytes, frees them, and makes them again.
//! The C allocator returns such large blocks to the operating system on free, so each step
//! paid again for mapping and zeroing fresh pages: measured, about a fifth of a training step
//! and half the time of a large `matmul_t` went to page faults.
//!
//! The pool keeps freed buffers (of at least [`MIN_POOLED`] floats) by length, up to
//! [`max_bytes`] in all, and hands them back when a buffer of the same length is asked
//! for. Shapes repeat exactly from step to step, so nearly every request is served. Buffers
//! come back when a tensor's storage is dropped for the last time and when `backward` is done
//! with an intermediate gradient. Values are always initialised: [`take`] returns whatever the
//! last user left (for outputs that are fully overwritten), [`zeroed`] clears it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Buffers shorter than this (64 KiB) go straight to the allocator, which handles them well.
pub const MIN_POOLED: usize = 1 << 14;

/// The most the pool holds at once by default, 1,152 MiB; beyond that freed buffers go back
/// to the allocator. `LEGO_POOL_MAX_MB` overrides it (read once): see [`max_bytes`].
///
/// Why this much: after warm-up the pool holds every poolable buffer a training step frees,
/// so its size is the step's pooled working set. Measured with the model bench
/// (`target/bench-model.csv`, column `pool_peak_mib`): about 1,087 MiB at config M
/// (batch 8 × seq 256), far less at S and T. With this cap a step at M allocates nothing
/// after warm-up; at 1 GiB it missed one buffer a step, at 512 MiB 128, at 256 MiB 176 (each
/// miss maps and zeroes fresh pages again). The pool never holds more than the step's own
/// peak, so it does not raise the process's peak memory (about 1.5 GiB at M either way);
/// what it costs is keeping that memory after the last step, which [`release`] gives back
/// (the [`Trainer`](crate::train::trainer::Trainer) calls it when training ends).
pub const MAX_POOLED_BYTES: usize = 1152 << 20;

/// The pool's cap in bytes: `LEGO_POOL_MAX_MB` mebibytes if that is set to a number, else
/// [`MAX_POOLED_BYTES`]. `LEGO_POOL_MAX_MB=0` turns the pool off.
pub fn max_bytes() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("LEGO_POOL_MAX_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(MAX_POOLED_BYTES, |mb| mb << 20)
    })
}

struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

impl Pool {
    /// Keeps `v` for reuse unless that would take the pool past `cap` bytes (then `v` is
    /// dropped, back to the allocator). Returns whether it was kept.
    fn keep(&mut self, v: Vec<f32>, cap: usize) -> bool {
        let len = v.len();
        if self.bytes + len * 4 > cap {
            return false;
        }
        self.bytes += len * 4;
        self.free.entry(len).or_default().push(v);
        true
    }

    /// A kept buffer of exactly `len` floats, if there is one.
    fn reuse(&mut self, len: usize) -> Option<Vec<f32>> {
        let v = self.free.get_mut(&len).and_then(Vec::pop)?;
        self.bytes -= len * 4;
        Some(v)
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Requests of a poolable length that the pool could not serve (they went to the allocator).
static MISSES: AtomicUsize = AtomicUsize::new(0);
/// The most bytes the pool has held at once.
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// What the pool holds and has done, for benches and tests: see [`stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held now, waiting to be handed out again.
    pub held_bytes: usize,
    /// The most bytes held at once since the process started.
    pub peak_held_bytes: usize,
    /// Requests of at least [`MIN_POOLED`] floats that found no buffer and went to the
    /// allocator, since the process started. Flat across steps once a loop is warm.
    pub misses: usize,
}

/// The pool's current size, its peak and its misses so far.
pub fn stats() -> PoolStats {
    let held_bytes = POOL.lock().expect("buffer pool lock poisoned").as_ref().map_or(0, |p| p.bytes);
    PoolStats {
        held_bytes,
        peak_held_bytes: PEAK_BYTES.load(Ordering::Relaxed),
        misses: MISSES.load(Ordering::Relaxed),
    }
}

/// A buffer of exactly `len` floats whose contents are unspecified (but initialised): for
/// outputs that the caller overwrites entirely.
pub fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED {
        let mut guard = POOL.lock().expect("buffer pool lock poisoned");
        if let Some(v) = guard.as_mut().and_then(|pool| pool.reuse(len)) {
            return v;
        }
        MISSES.fetch_add(1, Ordering::Relaxed);
    }
    vec![0.0; len]
}

/// A buffer of `len` zeros.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// A copy of `src` in a pooled buffer.
pub fn copy_of(src: &[f32]) -> Vec<f32> {
    let mut v = take(src.len());
    v.copy_from_slice(src);
    v
}

/// Gives a buffer back for reuse (or to the allocator, if it is small or the pool is full).
pub fn recycle(v: Vec<f32>) {
    // Small buffers, and any whose capacity differs from its length (it could not be handed
    // out as "exactly len floats" without reallocating), go back to the allocator.
    let len = v.len();
    if len < MIN_POOLED || v.capacity() != len {
        return;
    }
    let mut guard = POOL.lock().expect("buffer pool lock poisoned");
    let pool = guard.get_or_insert_with(|| Pool { free: HashMap::new(), bytes: 0 });
    if pool.keep(v, max_bytes()) {
        PEAK_BYTES.fetch_max(pool.bytes, Ordering::Relaxed);
    }
}

/// Frees every buffer the pool holds (they go back to the allocator, and from there to the
/// operating system): for a long-lived process that has finished training. The pool fills
/// again if training resumes.
pub fn release() {
    if let Some(pool) = POOL.lock().expect("buffer pool lock poisoned").as_mut() {
        pool.free.clear();
        pool.bytes = 0;
    }
}

/// A buffer that goes back to the pool when dropped: for buffers an op's backward closure
/// keeps (attention's probabilities), which are freed when the graph is.
pub struct Recycled(pub Vec<f32>);

impl Drop for Recycled {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for Recycled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_buffer_is_handed_out_again_and_zeroed_on_request() {
        // The same memory comes back, on a pool of its own (the global one is shared with
        // tests running beside this one, and a finished training run empties it).
        let len = MIN_POOLED + 12_345;
        let mut pool = Pool { free: HashMap::new(), bytes: 0 };
        let v = vec![7.0; len];
        let ptr = v.as_ptr();
        assert!(pool.keep(v, MAX_POOLED_BYTES));
        assert_eq!(pool.bytes, len * 4);
        let again = pool.reuse(len).expect("the kept buffer");
        assert_eq!((again.as_ptr(), again.len(), pool.bytes), (ptr, len, 0));
        assert!(pool.reuse(len).is_none());
        // Through the global pool: exact lengths, and zeroed on request.
        let mut v = take(len);
        v.fill(7.0);
        recycle(v);
        let z = zeroed(len);
        assert_eq!(z.len(), len);
        assert!(z.iter().all(|&x| x == 0.0));
        // Small buffers are not pooled.
        recycle(vec![1.0; 10]);
    }

    #[test]
    fn the_pool_never_holds_more_than_its_cap() {
        // A pool of its own (the global one is shared with tests running beside this one),
        // with a cap of 1 MiB, offered 3 MiB in buffers of mixed lengths.
        let cap = 1 << 20;
        let mut pool = Pool { free: HashMap::new(), bytes: 0 };
        let mut kept = 0;
        for i in 0..48 {
            let len = MIN_POOLED + (i % 3) * 1000;
            kept += usize::from(pool.keep(vec![0.0; len], cap));
            assert!(pool.bytes <= cap, "pool holds {} bytes > cap {cap}", pool.bytes);
            let held: usize = pool.free.iter().map(|(len, vs)| len * 4 * vs.len()).sum();
            assert_eq!(held, pool.bytes);
        }
        assert!(kept > 0 && kept < 48);
        // The global pool reports within its own cap.
        assert!(stats().held_bytes <= max_bytes() && stats().peak_held_bytes <= max_bytes());
    }
}
