//! The decode step's products: `out = x·Wᵀ` for a few rows of `x`, on the decode [`Team`].
//!
//! Decoding one token is a chain of matrix-vector products whose cost is reading `W` from
//! memory. Each product is split over the team by **rows of `W`** (output features): every
//! thread streams its own contiguous share of the weights once, against all rows of `x`, with
//! the SIMD kernel [`simd::matmul_xwt`]. Products that read the same `x` run in one hand-off
//! (`q`, `k`, `v` from the attention input; `W1`, `W3` from the MLP input, with SwiGLU applied
//! to each part's outputs as they come out). The decoder uses it for the heads and the
//! propagated upper-cache entries; its layers split the same way inside one team job each
//! (`model::decoder_layer`), which waits at barriers instead of handing off every product.
//!
//! **Batch invariance.** Every output element is one dot product of a row of `x` with a row of
//! `W`, summed by the same kernel in the same order whatever the number of rows of `x`, the
//! thread that runs it, or how the rows of `W` are split. So a row's numbers never depend on
//! the rows beside it (the decoder's promise), and 1 or 2 threads give the same bits.
//!
//! For more than [`BLOCK`] rows (a prefill), `x` is taken [`BLOCK`] rows at a time: the kernel
//! writes its output transposed (`[n, rows]`, so that a part's rows of `W` own a contiguous
//! piece of it), into a scratch buffer, and the block is transposed back into `out`.

use super::simd;
use super::team::{Chunks, Team, part_rows};

/// Rows of `x` a product takes at a time.
pub const BLOCK: usize = 16;

/// Rows of `W` a part's share is a multiple of (the kernel's widest tile is 8 rows; 16 keeps
/// each share on whole cache lines of output).
const ALIGN: usize = 16;

/// What is applied to a part's outputs before they are written back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// Nothing: each output is its product.
    None,
    /// With two products (`W1`, `W3`): `out[0] = silu(out[0]) ⊙ out[1]` (`out[1]` is then
    /// left unspecified).
    SwiGlu,
}

/// The scratch a product needs for `m` rows of `x` and outputs of widths `n`: `[Σ n, BLOCK]`
/// when `m > 1`.
pub fn scratch_len(widths: &[usize], m: usize) -> usize {
    if m <= 1 { 0 } else { widths.iter().sum::<usize>() * BLOCK.min(m) }
}

/// `outs[i] = x·W_iᵀ` for `K` weight matrices sharing `x` (`[m, k]`): `ws[i]` is `[n_i, k]`
/// row-major and `outs[i]` holds at least `m·n_i` values (`[m, n_i]`), split over `parts`
/// threads of `team` by rows of each `W_i` (see the module doc), then `epilogue`. `scratch`
/// holds at least [`scratch_len`] values. Allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn products<const K: usize>(
    team: &Team,
    parts: usize,
    x: &[f32],
    m: usize,
    k: usize,
    ws: [&[f32]; K],
    mut outs: [&mut [f32]; K],
    scratch: &mut [f32],
    epilogue: Epilogue,
) {
    assert!(k > 0 && x.len() >= m * k, "products: x has {} values, not [{m}, {k}]", x.len());
    assert!(epilogue == Epilogue::None || K == 2, "products: SwiGLU needs two products, got {K}");
    let n: [usize; K] = std::array::from_fn(|i| ws[i].len() / k);
    for i in 0..K {
        assert!(
            ws[i].len() == n[i] * k && outs[i].len() >= m * n[i],
            "products: W{i} has {} values (not a multiple of {k}) or its output {} < {m}x{}",
            ws[i].len(),
            outs[i].len(),
            n[i]
        );
    }
    if m == 1 {
        // One row: the transposed output [n, 1] is the row itself; no scratch.
        let targets: [&mut [f32]; K] = std::array::from_fn(|i| std::mem::take(&mut outs[i]));
        block(team, parts, &x[..k], 1, k, ws, n, targets, epilogue);
        return;
    }
    for r0 in (0..m).step_by(BLOCK) {
        let rows = BLOCK.min(m - r0);
        // Scratch regions [n_i, rows], one per product.
        let mut rest = &mut scratch[..n.iter().sum::<usize>() * rows];
        let regions: [&mut [f32]; K] = std::array::from_fn(|i| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n[i] * rows);
            rest = tail;
            head
        });
        block(team, parts, &x[r0 * k..(r0 + rows) * k], rows, k, ws, n, regions, epilogue);
        // Back from [n, rows] to [rows, n] (only the first output after SwiGLU).
        let written = if epilogue == Epilogue::SwiGlu { 1 } else { K };
        let mut at = 0;
        for i in 0..written {
            let t = &scratch[at..at + n[i] * rows];
            for r in 0..rows {
                let o = &mut outs[i][(r0 + r) * n[i]..(r0 + r + 1) * n[i]];
                o.iter_mut().enumerate().for_each(|(j, y)| *y = t[j * rows + r]);
            }
            at += n[i] * rows;
        }
    }
}

/// One block of `rows` rows of `x`: `targets[i]` (`[n_i, rows]`, transposed) = `(x·W_iᵀ)ᵀ`,
/// each part computing its share of every `W_i`, then its epilogue.
#[allow(clippy::too_many_arguments)]
fn block<const K: usize>(
    team: &Team,
    parts: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    ws: [&[f32]; K],
    n: [usize; K],
    targets: [&mut [f32]; K],
    epilogue: Epilogue,
) {
    // Part p owns rows part_rows(n_i, parts, p) of W_i, and the matching piece of target i.
    let mut i = 0;
    let chunks: [Chunks; K] = targets.map(|t| {
        let per = part_rows(n[i], parts, 0, ALIGN).len();
        i += 1;
        Chunks::new(&mut t[..n[i - 1] * rows], per * rows)
    });
    let job = |p: usize| {
        let mut pieces: [Option<&mut [f32]>; K] = std::array::from_fn(|i| chunks[i].take(p));
        for i in 0..K {
            if let Some(out) = pieces[i].as_deref_mut() {
                let r = part_rows(n[i], parts, p, ALIGN);
                simd::matmul_xwt(x, rows, k, &ws[i][r.start * k..r.end * k], out);
            }
        }
        if epilogue == Epilogue::SwiGlu
            && let [Some(gate), Some(up)] = &mut pieces[..]
        {
            // Both pieces cover the same rows of W1 and W3 (same widths, same split); the same
            // SIMD SwiGLU as the decoder's layers.
            simd::swiglu_in_place(gate, up);
        }
    };
    team.run(parts, &job);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::unary::sigmoid;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 997) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// `x·Wᵀ` by the textbook loop, `[m, n]`.
    fn naive(x: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
        let n = w.len() / k;
        (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn products_match_the_loop_and_give_the_same_bits_for_any_split_and_row_count() {
        let team = Team::new(2);
        let (k, n) = (37, [70, 33, 5]);
        let x = values(40 * k, 1);
        let ws: Vec<Vec<f32>> = n.iter().enumerate().map(|(i, &ni)| values(ni * k, 10 + i as u32)).collect();
        let run = |m: usize, parts: usize| {
            let mut outs: Vec<Vec<f32>> = n.iter().map(|&ni| vec![f32::NAN; m * ni]).collect();
            let mut scratch = vec![0.0; scratch_len(&n, m)];
            let [a, b, c] = &mut outs[..] else { unreachable!() };
            products(
                &team,
                parts,
                &x,
                m,
                k,
                [&ws[0], &ws[1], &ws[2]],
                [a, b, c],
                &mut scratch,
                Epilogue::None,
            );
            outs
        };
        let alone: Vec<Vec<Vec<f32>>> = (0..40)
            .map(|r| {
                let mut outs: Vec<Vec<f32>> = n.iter().map(|&ni| vec![0.0; ni]).collect();
                let [a, b, c] = &mut outs[..] else { unreachable!() };
                products(
                    &team,
                    1,
                    &x[r * k..(r + 1) * k],
                    1,
                    k,
                    [&ws[0], &ws[1], &ws[2]],
                    [a, b, c],
                    &mut [],
                    Epilogue::None,
                );
                outs
            })
            .collect();
        for m in [1, 2, 5, 16, 17, 40] {
            for parts in [1, 2] {
                let got = run(m, parts);
                for i in 0..3 {
                    let want = naive(&x[..m * k], m, k, &ws[i]);
                    for (g, w) in got[i].iter().zip(&want) {
                        assert!((g - w).abs() < 1e-4, "m={m} parts={parts} W{i}: {g} vs {w}");
                    }
                    for r in 0..m {
                        assert_eq!(
                            got[i][r * n[i]..(r + 1) * n[i]],
                            alone[r][i][..],
                            "m={m} parts={parts} W{i} row {r}: bits"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_swiglu_epilogue_is_silu_of_the_first_times_the_second() {
        let team = Team::new(2);
        let (k, f) = (24, 50);
        let (w1, w3) = (values(f * k, 3), values(f * k, 4));
        for m in [1, 3, 20] {
            let x = values(m * k, 5);
            let (g, u) = (naive(&x, m, k, &w1), naive(&x, m, k, &w3));
            for parts in [1, 2] {
                let (mut gate, mut up) = (vec![0.0; m * f], vec![0.0; m * f]);
                let mut scratch = vec![0.0; scratch_len(&[f, f], m)];
                products(
                    &team,
                    parts,
                    &x,
                    m,
                    k,
                    [&w1, &w3],
                    [&mut gate, &mut up],
                    &mut scratch,
                    Epilogue::SwiGlu,
                );
                for j in 0..m * f {
                    let want = g[j] * sigmoid(g[j]) * u[j];
                    assert!(
                        (gate[j] - want).abs() < 1e-4,
                        "m={m} parts={parts} [{j}]: {} vs {want}",
                        gate[j]
                    );
                }
            }
        }
    }
}
