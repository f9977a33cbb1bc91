//! Packed (quantized) expert weights on the CPU's row kernels, by one of two paths
//! ([`PackedPath`]) that give the same bits:
//! - in registers ([`gemv::packed_rows`], AVX-512): each 16 weight values decoded straight
//!   from the packed bytes and multiplied into the rows; the packed bytes stream once, so
//!   decode reads 4.5 bits a weight instead of bf16's 16;
//! - decoded ([`BLOCK`] weight rows at a time, [`PackedMatrix::decode_row`]: exactly the
//!   formats' values) into a small buffer that stays in cache, each block through the f32 row
//!   kernel ([`gemv::rows_times_rows_f32`]): the decoding is shared by all the task's rows, so
//!   this path wins from a few rows on, and it runs on every CPU.
//!
//! Nothing the size of an expert's matrix is widened; every output sums in the row kernels'
//! one order (fixed by `K` alone), so the deterministic mode's batch invariance holds on
//! packed weights too, whichever path each task takes.

use std::cell::RefCell;

use super::gemv::{self, Lhs};
use crate::dtype::Element;
use crate::model::quant::{PackedMatrix, QuantFormat};
use crate::model::weights::Weight;

/// Weight rows decoded at a time: 16 rows of K f32 values (448 KiB at K = 7168).
pub const BLOCK: usize = 16;

thread_local! {
    /// Each thread's decoded block and its products, reused between calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Which way packed weight rows meet the activation rows (the same bits either way; see the
/// module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedPath {
    /// The library's choice: `Registers`, except FP8 from [`FP8_DECODE_MIN_ROWS`] rows a
    /// task (its conversion costs more per value than the other formats'; decoded once per
    /// block it was 1.26x faster at 64 rows an expert on a 16-core Sapphire Rapids and 1.32x on
    /// a 2-core Ice Lake). `cpu-ffn-bench --packed`, 1-64 rows an expert: `Registers` 3-11x
    /// faster than `Decode` up to 4 rows, 1.1-2.6x at 16, level to 1.3x at 64 (FP8 aside).
    Auto,
    /// Decoded in registers where this CPU has the kernel, else as `Decode`.
    Registers,
    /// Weight rows decoded to f32 a block at a time.
    Decode,
}

/// Rows from which [`PackedPath::Auto`] decodes FP8 weight rows first.
pub const FP8_DECODE_MIN_ROWS: usize = 64;

/// [`gemv::rows_times_weight_rows`] for a dense or packed weight: `out[r * (n1 - n0) + i] =
/// x_r · w[n0 + i]` (`out` `[m, n1 - n0]`). Packed weights take f32 rows (bf16 rows are
/// widened first; 4-bit formats' rows are put in pair order, see [`pair_order`]).
pub fn rows_times_weight_rows(x: Lhs<'_>, m: usize, w: &Weight, n0: usize, n1: usize, out: &mut [f32]) {
    rows_times_weight_rows_via(x, m, w, n0, n1, out, PackedPath::Auto)
}

/// [`rows_times_weight_rows`] with packed weights taking `path`.
pub fn rows_times_weight_rows_via(
    x: Lhs<'_>,
    m: usize,
    w: &Weight,
    n0: usize,
    n1: usize,
    out: &mut [f32],
    path: PackedPath,
) {
    match w {
        Weight::Dense(t) => gemv::rows_times_weight_rows(x, m, t, n0, n1, out),
        Weight::Packed(p) => SCRATCH.with_borrow_mut(|(block, tmp, xf)| {
            let k = p.cols();
            let pairs = pair_order(p);
            let x: &[f32] = match x {
                Lhs::F32(v) if !pairs => v,
                Lhs::F32(v) => {
                    xf.clear();
                    xf.extend_from_slice(&v[..m * k]);
                    to_pair_order(xf);
                    xf
                }
                Lhs::Bf16(v) => {
                    xf.resize(m * k, 0.0);
                    Element::widen_slice(&v[..m * k], xf);
                    if pairs {
                        to_pair_order(xf);
                    }
                    xf
                }
            };
            let registers = match path {
                PackedPath::Auto => !(matches!(p.format(), QuantFormat::Fp8 { .. }) && m >= FP8_DECODE_MIN_ROWS),
                PackedPath::Registers => true,
                PackedPath::Decode => false,
            };
            if !(registers && gemv::packed_rows(x, m, p, n0, n1, out)) {
                packed_rows(x, m, p, n0, n1, block, tmp, out)
            }
        }),
    }
}

/// Whether `p`'s products sum in pair order (its 4-bit formats): within each 32 columns the
/// 16 even columns, then the 16 odd ones, the order in which the register kernel takes a
/// word's nibbles apart. The activation rows and the decoded weight rows are put in that
/// order, so both paths multiply the same pairs in the same order.
fn pair_order(p: &PackedMatrix) -> bool {
    p.format().bits() == 4
}

/// Each 32 values of `v` (whole 32s: 4-bit formats' rows are) put in pair order.
fn to_pair_order(v: &mut [f32]) {
    for c in v.chunks_exact_mut(32) {
        let t: [f32; 32] = (&*c).try_into().expect("32 values");
        for l in 0..16 {
            c[l] = t[2 * l];
            c[16 + l] = t[2 * l + 1];
        }
    }
}

/// The packed case of [`rows_times_weight_rows`], with the thread's buffers.
#[allow(clippy::too_many_arguments)]
fn packed_rows(
    x: &[f32],
    m: usize,
    p: &PackedMatrix,
    n0: usize,
    n1: usize,
    block: &mut Vec<f32>,
    tmp: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (k, n) = (p.cols(), n1 - n0);
    for b0 in (n0..n1).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(n1);
        let bn = b1 - b0;
        block.resize(bn * k, 0.0);
        for (i, row) in block.chunks_mut(k.max(1)).enumerate().take(bn) {
            p.decode_row(b0 + i, row);
            if pair_order(p) {
                to_pair_order(row);
            }
        }
        tmp.resize(m * bn, 0.0);
        gemv::rows_times_rows_f32(x, m, block, k, tmp);
        for r in 0..m {
            out[r * n + b0 - n0..r * n + b1 - n0].copy_from_slice(&tmp[r * bn..(r + 1) * bn]);
        }
    }
}
