//! Grouped SwiGLU experts on the CPU: each expert's rows take the path that suits their count.
//!
//! - Up to [`Plan::gemm_min_rows`] rows an expert, and always in deterministic mode: the
//!   row kernels of [`super::gemv`], split by (expert, tile of weight rows; `tile_rows`). Each
//!   weight element is read once per call in its own dtype and multiplied into the expert's
//!   rows in registers; bf16 rows against bf16 weights use the CPU's bf16 dot product where it
//!   has one (the activation between the projections is then rounded to bf16 too). A row's
//!   sums run in an order fixed by the shapes of the weights alone, so its output is the same
//!   bits whichever other rows share the call.
//! - From [`Plan::gemm_min_rows`] rows on (outside deterministic mode, weights and rows of one
//!   dtype): [`super::gemm::gemm_bt`] (`gemmkit`) in that dtype, one expert a task, the down
//!   projection written straight into the output. bf16 runs on the bf16 dot-product unit
//!   where there is one; the gate and up results are rounded to bf16 before the activation,
//!   as PyTorch's bf16 experts do.
//!
//! - Packed (quantized) experts: the row kernels at every row count, the weights decoded in
//!   registers straight from the packed bytes on AVX-512, else each task's weight rows decoded
//!   to f32 a few at a time (the same bits; [`super::packed`]).
//!
//! Sums accumulate in f32; the output is cast once.

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;

use super::gemm::{GemmElement, gemm_bt};
use super::gemv::{self, Lhs};
use super::packed;
use super::panels::{ExpertPanels, Panels, gemm_bt_panels};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::model::config::Activation;
use crate::model::weights::{ExpertSet, ExpertWeights, Weight};
use crate::tensor::{Storage, Tensor};
use crate::with_storage;

/// Weight rows of one row-kernel task over `n` weight rows of each of `experts` experts:
/// about eight tasks a thread (enough to balance them), in multiples of 16, 32 to 512 (long
/// enough that the weight streams and the per-task costs amortise). A row's sums do not
/// depend on it (see [`super::gemv`]).
fn tile_rows(n: usize, experts: usize) -> usize {
    let want = (n * experts).div_ceil(8 * rayon::current_num_threads());
    want.next_multiple_of(16).clamp(32, 512)
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

/// Which path an expert's rows take in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// bf16 rows against bf16 weights on the CPU's bf16 dot product (row kernels).
    pub native_bf16: bool,
    /// Rows from which an expert goes to the GEMM; `usize::MAX`: never (deterministic mode,
    /// or rows and weights of different dtypes).
    pub gemm_min_rows: usize,
}

impl Plan {
    /// The plan for rows of `act` against weights of `weights` (`None`: packed, which take
    /// the row kernels on f32 rows at every count) on this CPU. The crossovers are the
    /// measured ones (BENCHMARKS.md, "CPU expert FFN against transformers").
    pub fn for_weights(act: DType, weights: Option<DType>, deterministic: bool) -> Plan {
        match weights {
            Some(w) => Plan::new(act, w, deterministic),
            None => Plan { native_bf16: false, gemm_min_rows: usize::MAX },
        }
    }

    /// The plan for rows of `act` against dense weights of `weights` on this CPU.
    pub fn new(act: DType, weights: DType, deterministic: bool) -> Plan {
        let native_bf16 = act == DType::BF16 && weights == DType::BF16 && gemv::native_bf16();
        let gemm_min_rows = if deterministic || act != weights {
            usize::MAX
        } else if native_bf16 {
            256
        } else {
            96
        };
        Plan { native_bf16, gemm_min_rows }
    }

    /// This plan for a set whose weights are also held in the GEMM's panels
    /// ([`ExpertSet::with_cpu_gemm_panels`]): f32 goes to the GEMM from 32 rows an expert
    /// (no packing per call; `cpu-ffn-bench`'s `gemmkit-prepacked` on an AVX-512F Ice Lake:
    /// 168 GFLOP/s at 32 rows against the row kernels' 106, even at 16); bf16 and f16 keep
    /// their crossovers (prepacked bf16 was within 10% of the row kernels up to 128 rows).
    /// The deterministic mode never takes the GEMM.
    pub fn with_panels(self, act: DType) -> Plan {
        match act {
            DType::F32 if self.gemm_min_rows != usize::MAX => Plan { gemm_min_rows: 32, ..self },
            _ => self,
        }
    }
}

/// See [`crate::Engine::ffn`]. Experts with [`Plan::gemm_min_rows`] rows or more go through
/// the GEMM, the others through the row kernels (the module doc says how each sums).
pub fn ffn(
    batch: &Tensor,
    offsets: &[usize],
    experts: &ExpertSet,
    deterministic: bool,
    out: &mut Tensor,
) -> Result<()> {
    crate::compute::engine::check_ffn(batch, offsets, experts, out)?;
    let Some(first) = experts.first() else { return Ok(()) };
    let dense = if first.is_packed() { None } else { first.gate.dense().map(Tensor::dtype) };
    let mut plan = Plan::for_weights(batch.dtype(), dense, deterministic);
    if experts.cpu_gemm_panels().is_some() {
        plan = plan.with_panels(batch.dtype());
    }
    let rows = |l: usize| offsets[l + 1] - offsets[l];
    let active: Vec<usize> = (0..experts.len()).filter(|&l| rows(l) > 0).collect();
    let (big, small): (Vec<usize>, Vec<usize>) = active.iter().partition(|&&l| rows(l) >= plan.gemm_min_rows);
    let (small_y, td) = rows_path(batch, offsets, &small, experts, &plan);
    let d = batch.cols();
    with_storage!(out.storage_mut(), o => {
        let x = batch.as_slice().expect("check_ffn: the batch has the output's dtype");
        let mut chunks = split_rows(o, offsets, &active, d);
        let small_chunks: Vec<&mut [_]> =
            active.iter().zip(chunks.iter_mut()).filter(|(l, _)| rows(**l) < plan.gemm_min_rows).map(|(_, c)| &mut **c).collect();
        write_out(small_chunks, &small_y, d, td);
        let big_chunks: Vec<&mut [_]> =
            active.iter().zip(chunks.iter_mut()).filter(|(l, _)| rows(**l) >= plan.gemm_min_rows).map(|(_, c)| &mut **c).collect();
        gemm_path(x, offsets, &big, experts, big_chunks);
    });
    Ok(())
}

/// The rows of `out` (`[rows, D]`) of each expert in `active` (ascending), in that order.
fn split_rows<'a, T>(out: &'a mut [T], offsets: &[usize], active: &[usize], d: usize) -> Vec<&'a mut [T]> {
    let mut rest = out;
    let mut chunks = Vec::with_capacity(active.len());
    let mut at = 0;
    for &l in active {
        let (_, tail) = rest.split_at_mut((offsets[l] - at) * d);
        let (mine, tail) = tail.split_at_mut((offsets[l + 1] - offsets[l]) * d);
        chunks.push(mine);
        rest = tail;
        at = offsets[l + 1];
    }
    chunks
}

/// The GEMM path over the experts in `big`, each writing its rows of the output (`outs`, in
/// the same order). Rows, weights and output share the dtype `T` (see [`Plan::new`]).
fn gemm_path<T: GemmElement>(x: &[T], offsets: &[usize], big: &[usize], experts: &ExpertSet, outs: Vec<&mut [T]>) {
    let d = experts.first().map_or(0, |w| w.gate.cols());
    let panels = experts.cpu_gemm_panels();
    let one = |l: usize, out: &mut [T], parallel: bool| {
        let x = &x[offsets[l] * d..offsets[l + 1] * d];
        gemm_expert(x, &experts[l], panels.and_then(|p| p.get::<T>(l)), experts.activation(), out, parallel)
    };
    // One expert a task while there are enough to share out; else each product in parallel.
    if big.len() >= 2 * rayon::current_num_threads() {
        big.par_iter().zip(outs).for_each(|(&l, out)| one(l, out, false));
    } else {
        big.iter().zip(outs).for_each(|(&l, out)| one(l, out, true));
    }
}

/// One expert's rows `x` (`[m, D]`) through the GEMM into `out` (`[m, D]`), all in `T`; the
/// weights from their panels `p` (the same matrices as `w`'s) when the set has them.
fn gemm_expert<T: GemmElement>(
    x: &[T],
    w: &ExpertWeights,
    p: Option<&ExpertPanels<T>>,
    act: Activation,
    out: &mut [T],
    parallel: bool,
) {
    let (f, d) = (w.gate.rows(), w.gate.cols());
    let m = x.len() / d;
    let mut scratch = Vec::new();
    // `a · W^T (+ bias)` for one projection `wt`, from its panels `pt` where there are some.
    let mut product = |a: &[T], wt: &Weight, pt: Option<&Panels<T>>, c: &mut [T], bias: Option<&[T]>| match pt {
        Some(pt) => gemm_bt_panels(a, pt, c, m, bias, parallel, &mut scratch).expect("check_ffn: the shapes fit"),
        None => {
            let b = wt.dense().and_then(Tensor::as_slice::<T>);
            let b = b.expect("Plan: dense weights of the rows' dtype on the GEMM path");
            gemm_bt(a, b, c, m, wt.cols(), wt.rows(), bias, parallel)
        }
    };
    let (mut g, mut u) = (vec![T::default(); m * f], vec![T::default(); m * f]);
    product(x, &w.gate, p.map(|p| &p.gate), &mut g, None);
    product(x, &w.up, p.map(|p| &p.up), &mut u, None);
    let (mut gf, mut uf) = (vec![0f32; m * f], vec![0f32; m * f]);
    T::widen_slice(&g, &mut gf);
    T::widen_slice(&u, &mut uf);
    up_epilogue(w, act, 0, f, &mut gf, &mut uf);
    T::narrow_slice(&gf, &mut g);
    let bias: Option<Vec<T>> = w.bias.as_ref().map(|b| b.down.iter().map(|&v| T::from_f32(v)).collect());
    product(&g, &w.down, p.map(|p| &p.down), out, bias.as_deref());
}

/// Rows in the row kernels' input format: borrowed bf16 on the bf16 dot product, else f32.
enum Rows<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Cow<'a, [bf16]>),
}

impl Rows<'_> {
    fn lhs(&self) -> Lhs<'_> {
        match self {
            Rows::F32(v) => Lhs::F32(v),
            Rows::Bf16(v) => Lhs::Bf16(v),
        }
    }
}

/// Rows `r0..r1` of `t` in the row kernels' format under `plan`.
fn input_rows<'a>(t: &'a Tensor, r0: usize, r1: usize, plan: &Plan) -> Rows<'a> {
    let c = t.cols();
    match t.storage() {
        Storage::BF16(v) if plan.native_bf16 => Rows::Bf16(Cow::Borrowed(&v[r0 * c..r1 * c])),
        Storage::F32(v) => Rows::F32(Cow::Borrowed(&v[r0 * c..r1 * c])),
        s => {
            let mut out = vec![0f32; (r1 - r0) * c];
            with_storage!(s, v => Element::widen_slice(&v[r0 * c..r1 * c], &mut out));
            Rows::F32(Cow::Owned(out))
        }
    }
}

/// Tiles `[c * tile, min((c + 1) * tile, n))` of `0..n`.
fn tiles(n: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(tile)).map(move |c| (c * tile, ((c + 1) * tile).min(n)))
}

/// The row-kernel path over the experts in `small`: per expert, its f32 output tiles
/// (`[m, tile]` for each tile of D, in order), not yet cast.
fn rows_path(
    batch: &Tensor,
    offsets: &[usize],
    small: &[usize],
    experts: &ExpertSet,
    plan: &Plan,
) -> (Vec<Vec<Vec<f32>>>, usize) {
    let d = batch.cols();
    let f = experts.first().map_or(0, |w| w.gate.rows());
    // One tile size for every expert (their F may differ; the tiles only balance the work).
    let (tf, td) = (tile_rows(f, small.len()), tile_rows(d, small.len()));
    let m = |ai: usize| offsets[small[ai] + 1] - offsets[small[ai]];
    let h: Vec<Rows<'_>> = small.iter().map(|&l| input_rows(batch, offsets[l], offsets[l + 1], plan)).collect();
    // a[ai] = act(h Wg^T, h Wu^T), [m, F], tile by tile of F.
    let up_tasks: Vec<(usize, usize, usize)> = (0..small.len())
        .flat_map(|ai| tiles(experts[small[ai]].gate.rows(), tf).map(move |(a, b)| (ai, a, b)))
        .collect();
    let up_tiles: Vec<Vec<f32>> = up_tasks
        .par_iter()
        .map(|&(ai, f0, f1)| {
            let w = &experts[small[ai]];
            let n = f1 - f0;
            let (mut g, mut u) = (vec![0f32; m(ai) * n], vec![0f32; m(ai) * n]);
            packed::rows_times_weight_rows(h[ai].lhs(), m(ai), &w.gate, f0, f1, &mut g);
            packed::rows_times_weight_rows(h[ai].lhs(), m(ai), &w.up, f0, f1, &mut u);
            up_epilogue(w, experts.activation(), f0, f1, &mut g, &mut u);
            g
        })
        .collect();
    drop(h);
    let a = assemble(&up_tiles, small.len(), &m, &|ai| experts[small[ai]].gate.rows(), tf, plan);
    let down_tasks: Vec<(usize, usize, usize)> =
        (0..small.len()).flat_map(|ai| tiles(d, td).map(move |(a, b)| (ai, a, b))).collect();
    let y_tiles: Vec<Vec<f32>> = down_tasks
        .par_iter()
        .map(|&(ai, d0, d1)| {
            let w = &experts[small[ai]];
            let mut y = vec![0f32; m(ai) * (d1 - d0)];
            packed::rows_times_weight_rows(a[ai].lhs(), m(ai), &w.down, d0, d1, &mut y);
            down_epilogue(w, d0, d1, &mut y);
            y
        })
        .collect();
    let per = d.div_ceil(td);
    let mut it = y_tiles.into_iter();
    ((0..small.len()).map(|_| it.by_ref().take(per).collect()).collect(), td)
}

/// Each expert's activations `[m, F]` from its tiles (`[m, tf]`, tile by tile of F, experts
/// one after another), rounded to bf16 for the bf16 dot product.
fn assemble(
    tiles_in: &[Vec<f32>],
    experts: usize,
    m: &dyn Fn(usize) -> usize,
    f: &dyn Fn(usize) -> usize,
    tf: usize,
    plan: &Plan,
) -> Vec<Rows<'static>> {
    let mut next = tiles_in.iter();
    (0..experts)
        .map(|ai| {
            let (m, f) = (m(ai), f(ai));
            let mut rows = vec![0f32; m * f];
            for (f0, f1) in tiles(f, tf) {
                let t = next.next().expect("one tile per tile of F");
                for r in 0..m {
                    rows[r * f + f0..r * f + f1].copy_from_slice(&t[r * (f1 - f0)..(r + 1) * (f1 - f0)]);
                }
            }
            if plan.native_bf16 {
                let mut b = vec![bf16::ZERO; m * f];
                Element::narrow_slice(&rows, &mut b);
                Rows::Bf16(Cow::Owned(b))
            } else {
                Rows::F32(Cow::Owned(rows))
            }
        })
        .collect()
}

/// Narrow each expert's f32 output tiles (`y[ai][t]`, `[m, td]`) into its rows (`dst[ai]`).
fn write_out<T: Element>(dst: Vec<&mut [T]>, y: &[Vec<Vec<f32>>], d: usize, td: usize) {
    dst.into_par_iter().zip(y).for_each(|(dst, y)| {
        for (t, (d0, d1)) in tiles(d, td).enumerate() {
            let n = d1 - d0;
            for (r, row) in dst.chunks_mut(d).enumerate() {
                T::narrow_slice(&y[t][r * n..(r + 1) * n], &mut row[d0..d1]);
            }
        }
    });
}
