//! A pool of `f32` buffers, so that a training step reuses the memory of the last one.
//!
//! Every op allocates its output and its backward allocates gradients; a step of config S
//! makes hundreds of buffers of up to tens of megabytes, frees them, and makes them again.
//! The C allocator returns such large blocks to the operating system on free, so each step
//! paid again for mapping and zeroing fresh pages: measured, about a fifth of a training step
//! and half the time of a large `matmul_t` went to page faults.
//!
//! The pool keeps freed buffers (of at least [`MIN_POOLED`] floats) by length, up to
//! [`MAX_POOLED_BYTES`] in all, and hands them back when a buffer of the same length is asked
//! for. Shapes repeat exactly from step to step, so nearly every request is served. Buffers
//! come back when a tensor's storage is dropped for the last time and when `backward` is done
//! with an intermediate gradient. Values are always initialised: [`take`] returns whatever the
//! last user left (for outputs that are fully overwritten), [`zeroed`] clears it.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers shorter than this (64 KiB) go straight to the allocator, which handles them well.
pub const MIN_POOLED: usize = 1 << 14;

/// The most the pool holds at once (1 GiB); beyond that freed buffers go back to the allocator.
pub const MAX_POOLED_BYTES: usize = 1 << 30;

struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// A buffer of exactly `len` floats whose contents are unspecified (but initialised): for
/// outputs that the caller overwrites entirely.
pub fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED {
        let mut guard = POOL.lock().expect("buffer pool lock poisoned");
        if let Some(pool) = guard.as_mut()
            && let Some(v) = pool.free.get_mut(&len).and_then(Vec::pop)
        {
            pool.bytes -= len * 4;
            return v;
        }
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
    if pool.bytes + len * 4 > MAX_POOLED_BYTES {
        return;
    }
    pool.bytes += len * 4;
    pool.free.entry(len).or_default().push(v);
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
        let len = MIN_POOLED + 12_345; // a length no other test uses
        let mut v = take(len);
        v.fill(7.0);
        let ptr = v.as_ptr();
        recycle(v);
        let again = take(len);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), len);
        recycle(again);
        let z = zeroed(len);
        assert!(z.iter().all(|&x| x == 0.0));
        // Small buffers are not pooled.
        recycle(vec![1.0; 10]);
    }
}
