//! Grouped SwiGLU experts on the CPU.
//!
//! Work is split by (expert, tile of 64 weight rows): each task widens its weight tile to f32
//! once (a cache-sized scratch, borrowed as-is for f32 weights) and applies it to all of that
//! expert's rows. Each weight element is read once per call, whatever the number of rows, and
//! nothing of the size of a weight matrix is allocated. Sums accumulate in f32 in a fixed order
//! (tile by tile), so results are deterministic.

use std::borrow::Cow;

use rayon::prelude::*;

use super::gemm::{matmul_bt, matmul_bt_strided};
use super::gemv;
use crate::dtype::Element;
use crate::error::Result;
use crate::model::config::Activation;
use crate::model::weights::{ExpertSet, ExpertWeights, Weight};
use crate::tensor::{Storage, Tensor};
use crate::with_storage;

/// Weight rows widened and applied together.
const TILE: usize = 64;

/// Rows `[r0, r1)` of `t` as f32, borrowed when `t` already is f32.
fn rows_f32(t: &Tensor, r0: usize, r1: usize) -> Cow<'_, [f32]> {
    let c = t.cols();
    match t.storage() {
        Storage::F32(v) => Cow::Borrowed(&v[r0 * c..r1 * c]),
        s => {
            let mut out = vec![0f32; (r1 - r0) * c];
            with_storage!(s, v => Element::widen_slice(&v[r0 * c..r1 * c], &mut out));
            Cow::Owned(out)
        }
    }
}

/// Weight rows `[r0, r1)` as f32: dense ones as [`rows_f32`], packed ones decoded row by row
/// into the tile (never more than the tile of the matrix at a time).
fn weight_rows_f32(w: &Weight, r0: usize, r1: usize) -> Cow<'_, [f32]> {
    match w {
        Weight::Dense(t) => rows_f32(t, r0, r1),
        Weight::Packed(p) => {
            let c = p.cols();
            let mut out = vec![0f32; (r1 - r0) * c];
            for (i, row) in out.chunks_mut(c.max(1)).enumerate().take(r1 - r0) {
                p.decode_row(r0 + i, row);
            }
            Cow::Owned(out)
        }
    }
}

/// `silu(g) * u`, element-wise, into `g`.
#[inline]
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    Activation::Silu.apply_slice(g, u);
}

/// The up projection's epilogue for weight rows `f0..f1` of `w` over `m` rows (`g`, `u` are
/// `[m, f1 - f0]`): the biases of those rows added, if `w` has any, then `g = act(g, u)`.
fn up_epilogue(w: &ExpertWeights, act: Activation, f0: usize, f1: usize, g: &mut [f32], u: &mut [f32]) {
    let n = f1 - f0;
    if let Some(b) = &w.bias {
        for (gr, ur) in g.chunks_mut(n).zip(u.chunks_mut(n)) {
            gr.iter_mut().zip(&b.gate[f0..f1]).for_each(|(v, c)| *v += c);
            ur.iter_mut().zip(&b.up[f0..f1]).for_each(|(v, c)| *v += c);
        }
    }
    act.apply_slice(g, u);
}

/// The down projection's bias for output columns `d0..d1` added to `y` (`[m, d1 - d0]`), if
/// `w` has biases.
fn down_epilogue(w: &ExpertWeights, d0: usize, d1: usize, y: &mut [f32]) {
    if let Some(b) = &w.bias {
        for row in y.chunks_mut(d1 - d0) {
            row.iter_mut().zip(&b.down[d0..d1]).for_each(|(v, c)| *v += c);
        }
    }
}

/// Rows an expert may have for the decode path (outside deterministic mode).
pub const DECODE_MAX_ROWS: usize = 4;

/// See [`crate::Engine::ffn`]. The GEMM path (`matrixmultiply`, whose summation order for an
/// output does not depend on the row count) always gives a row the same bits; without
/// `deterministic`, calls where no expert has more than [`DECODE_MAX_ROWS`] rows take the
/// decode path instead ([`super::gemv`]: weights streamed once, another summation order).
pub fn ffn(
    batch: &Tensor,
    offsets: &[usize],
    experts: &ExpertSet,
    deterministic: bool,
    out: &mut Tensor,
) -> Result<()> {
    crate::compute::engine::check_ffn(batch, offsets, experts, out)?;
    let d = batch.cols();
    let active: Vec<usize> = (0..experts.len()).filter(|&l| offsets[l + 1] > offsets[l]).collect();
    if active.is_empty() {
        return Ok(());
    }

    // Inputs of each active expert as f32, [m, D].
    let h: Vec<Cow<'_, [f32]>> = active.par_iter().map(|&l| rows_f32(batch, offsets[l], offsets[l + 1])).collect();
    let decode = !deterministic && active.iter().all(|&l| offsets[l + 1] - offsets[l] <= DECODE_MAX_ROWS);
    let tiles = |n: usize| (0..n.div_ceil(TILE)).map(move |c| (c * TILE, ((c + 1) * TILE).min(n)));
    if decode {
        return ffn_decode(&active, offsets, &h, experts, d, out);
    }

    // Gate and up, tile by tile of F: a[ai][c] = silu(h · Wg[c]^T) * (h · Wu[c]^T), [m, tile].
    let up_tasks: Vec<(usize, usize, usize)> =
        (0..active.len()).flat_map(|ai| tiles(experts[active[ai]].gate.rows()).map(move |(a, b)| (ai, a, b))).collect();
    let a_tiles: Vec<Vec<f32>> = up_tasks
        .par_iter()
        .map(|&(ai, f0, f1)| {
            let w = &experts[active[ai]];
            let m = offsets[active[ai] + 1] - offsets[active[ai]];
            let (wg, wu) = (weight_rows_f32(&w.gate, f0, f1), weight_rows_f32(&w.up, f0, f1));
            let n = f1 - f0;
            let mut g = vec![0f32; m * n];
            let mut u = vec![0f32; m * n];
            matmul_bt(&h[ai], &wg, &mut g, m, d, n);
            matmul_bt(&h[ai], &wu, &mut u, m, d, n);
            up_epilogue(w, experts.activation(), f0, f1, &mut g, &mut u);
            g
        })
        .collect();
    drop(h);

    // Down, tile by tile of D: y[ai][dt] = sum over F tiles (in order) of a[ai][c] · Wd[dt, c]^T.
    let first_tile =
        crate::segments::offsets(&active.iter().map(|&l| experts[l].gate.rows().div_ceil(TILE)).collect::<Vec<_>>());
    let down_tasks: Vec<(usize, usize, usize)> =
        (0..active.len()).flat_map(|ai| tiles(d).map(move |(a, b)| (ai, a, b))).collect();
    let y_tiles: Vec<Vec<f32>> = down_tasks
        .par_iter()
        .map(|&(ai, d0, d1)| {
            let w = &experts[active[ai]];
            let (m, f) = (offsets[active[ai] + 1] - offsets[active[ai]], w.down.cols());
            let wd = weight_rows_f32(&w.down, d0, d1);
            let n = d1 - d0;
            let mut y = vec![0f32; m * n];
            for (c, (f0, f1)) in tiles(f).enumerate() {
                let a = &a_tiles[first_tile[ai] + c];
                matmul_bt_strided(a, &wd[f0..], f, &mut y, m, f1 - f0, n, true);
            }
            down_epilogue(w, d0, d1, &mut y);
            y
        })
        .collect();

    write_out(&active, offsets, &y_tiles, d, out);
    Ok(())
}

/// Narrow each active expert's f32 output tiles (`y_tiles[ai * ceil(D / TILE) + t]`, `[m, tile]`)
/// into its rows of `out`.
fn write_out(active: &[usize], offsets: &[usize], y_tiles: &[Vec<f32>], d: usize, out: &mut Tensor) {
    let tiles = |n: usize| (0..n.div_ceil(TILE)).map(move |c| (c * TILE, ((c + 1) * TILE).min(n)));
    let ntiles = d.div_ceil(TILE);
    with_storage!(out.storage_mut(), o => {
        let mut rest: &mut [_] = o;
        let mut chunks = Vec::with_capacity(active.len());
        let mut at = 0;
        for &l in active {
            let (_, tail) = rest.split_at_mut((offsets[l] - at) * d);
            let (mine, tail) = tail.split_at_mut((offsets[l + 1] - offsets[l]) * d);
            chunks.push(mine);
            rest = tail;
            at = offsets[l + 1];
        }
        chunks.into_par_iter().enumerate().for_each(|(ai, dst)| {
            for (t, (d0, d1)) in tiles(d).enumerate() {
                let y = &y_tiles[ai * ntiles + t];
                let n = d1 - d0;
                for (r, row) in dst.chunks_mut(d).enumerate() {
                    Element::narrow_slice(&y[r * n..(r + 1) * n], &mut row[d0..d1]);
                }
            }
        });
    });
}

/// The decode path: every weight row streamed once against the expert's few rows.
fn ffn_decode(
    active: &[usize],
    offsets: &[usize],
    h: &[Cow<'_, [f32]>],
    experts: &ExpertSet,
    d: usize,
    out: &mut Tensor,
) -> Result<()> {
    let tiles = |n: usize| (0..n.div_ceil(TILE)).map(move |c| (c * TILE, ((c + 1) * TILE).min(n)));
    let m = |ai: usize| offsets[active[ai] + 1] - offsets[active[ai]];
    // a[ai] = silu(h Wg^T) * (h Wu^T), [m, F], built tile by tile of F.
    let up_tasks: Vec<(usize, usize, usize)> =
        (0..active.len()).flat_map(|ai| tiles(experts[active[ai]].gate.rows()).map(move |(a, b)| (ai, a, b))).collect();
    let up_tiles: Vec<Vec<f32>> = up_tasks
        .par_iter()
        .map_init(Vec::new, |scratch, &(ai, f0, f1)| {
            let w = &experts[active[ai]];
            let n = f1 - f0;
            let mut g = vec![0f32; m(ai) * n];
            let mut u = vec![0f32; m(ai) * n];
            gemv::rows_times_weight_rows(&h[ai], m(ai), &w.gate, f0, f1, scratch, &mut g);
            gemv::rows_times_weight_rows(&h[ai], m(ai), &w.up, f0, f1, scratch, &mut u);
            up_epilogue(w, experts.activation(), f0, f1, &mut g, &mut u);
            g
        })
        .collect();
    // Reassemble a[ai] as [m, F] rows.
    let mut first = 0;
    let a: Vec<Vec<f32>> = (0..active.len())
        .map(|ai| {
            let f = experts[active[ai]].gate.rows();
            let mut rows = vec![0f32; m(ai) * f];
            for (f0, f1) in tiles(f) {
                let t = &up_tiles[first];
                first += 1;
                for r in 0..m(ai) {
                    rows[r * f + f0..r * f + f1].copy_from_slice(&t[r * (f1 - f0)..(r + 1) * (f1 - f0)]);
                }
            }
            rows
        })
        .collect();
    let down_tasks: Vec<(usize, usize, usize)> =
        (0..active.len()).flat_map(|ai| tiles(d).map(move |(a, b)| (ai, a, b))).collect();
    let y_tiles: Vec<Vec<f32>> = down_tasks
        .par_iter()
        .map_init(Vec::new, |scratch, &(ai, d0, d1)| {
            let mut y = vec![0f32; m(ai) * (d1 - d0)];
            let w = &experts[active[ai]];
            gemv::rows_times_weight_rows(&a[ai], m(ai), &w.down, d0, d1, scratch, &mut y);
            down_epilogue(w, d0, d1, &mut y);
            y
        })
        .collect();
    write_out(active, offsets, &y_tiles, d, out);
    Ok(())
}
