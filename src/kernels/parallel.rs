//! When to split a loop across threads.
//!
//! rayon makes splitting easy, but each task costs a few microseconds to hand out and join:
//! a loop of a few thousand flops is faster on one thread. Every parallel loop in the crate
//! asks [`worth_splitting`] first, with a rough count of the work, and runs sequentially
//! below the threshold.
//!
//! There is one thread-count knob, rayon's global pool: set `RAYON_NUM_THREADS` (or build a
//! pool with `rayon::ThreadPoolBuilder` and run inside it).
//!
//! **Determinism.** Work is split into chunks whose boundaries depend only on the sizes and
//! the thread count, and every output element is computed by exactly one task in a fixed
//! order, so the same inputs and thread count give bit-identical results run after run.

use rayon::prelude::*;

/// Below this many (rough) floating-point operations a loop stays on one thread.
pub const MIN_PARALLEL_WORK: usize = 1 << 16;

/// The number of threads in rayon's current pool.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Whether `work` flops are worth splitting over the pool.
pub fn worth_splitting(work: usize) -> bool {
    work >= MIN_PARALLEL_WORK && threads() > 1
}

/// Calls `f(row_index, row)` for each `row_len`-long row of `out`, on several threads when
/// the total work (`work_per_row` flops a row) is large enough. Rows are handed out in
/// contiguous blocks, a few per thread.
pub fn for_each_row<F>(out: &mut [f32], row_len: usize, work_per_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    if !worth_splitting(rows * work_per_row.max(row_len)) {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
        return;
    }
    let rows_per_task = rows.div_ceil(threads() * 4).max(1);
    out.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(task, block)| {
        for (j, r) in block.chunks_mut(row_len).enumerate() {
            f(task * rows_per_task + j, r);
        }
    });
}

/// Like [`for_each_row`] over two outputs with the same number of rows (an op that writes
/// two things per row, e.g. a value and a statistic saved for its backward).
pub fn for_each_row2<F>(
    out_a: &mut [f32],
    len_a: usize,
    out_b: &mut [f32],
    len_b: usize,
    work_per_row: usize,
    f: F,
) where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
{
    if len_a == 0 || len_b == 0 {
        return;
    }
    let rows = out_a.len() / len_a;
    assert_eq!(rows, out_b.len() / len_b, "for_each_row2: {rows} rows vs {} rows", out_b.len() / len_b);
    if !worth_splitting(rows * work_per_row.max(len_a)) {
        out_a.chunks_mut(len_a).zip(out_b.chunks_mut(len_b)).enumerate().for_each(|(i, (a, b))| f(i, a, b));
        return;
    }
    let per = rows.div_ceil(threads() * 4).max(1);
    out_a.par_chunks_mut(per * len_a).zip(out_b.par_chunks_mut(per * len_b)).enumerate().for_each(
        |(task, (ba, bb))| {
            for (j, (a, b)) in ba.chunks_mut(len_a).zip(bb.chunks_mut(len_b)).enumerate() {
                f(task * per + j, a, b);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once_with_its_index() {
        for rows in [1usize, 3, 100, 1000] {
            let mut out = vec![0.0f32; rows * 7];
            for_each_row(&mut out, 7, 1 << 20, |i, r| r.iter_mut().for_each(|x| *x += i as f32));
            for (i, r) in out.chunks(7).enumerate() {
                assert!(r.iter().all(|&x| x == i as f32), "row {i}");
            }
        }
    }
}
