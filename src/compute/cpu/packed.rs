//! Packed (quantized) expert weights on the CPU's row kernels: the weight rows of a task are
//! decoded to f32 a block of [`BLOCK`] rows at a time ([`PackedMatrix::decode_row`]: exactly
//! the formats' values) into a small buffer that stays in cache, and each block goes through
//! the f32 row kernel ([`gemv::rows_times_rows_f32`]). Nothing the size of an expert's matrix
//! is widened; every output sums in the row kernels' one order (fixed by `K` alone), so the
//! deterministic mode's batch invariance holds on packed weights too.

use std::cell::RefCell;

use super::gemv::{self, Lhs};
use crate::dtype::Element;
use crate::model::quant::PackedMatrix;
use crate::model::weights::Weight;

/// Weight rows decoded at a time: 16 rows of K f32 values (448 KiB at K = 7168).
pub const BLOCK: usize = 16;

thread_local! {
    /// Each thread's decoded block and its products, reused between calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// [`gemv::rows_times_weight_rows`] for a dense or packed weight: `out[r * (n1 - n0) + i] =
/// x_r · w[n0 + i]` (`out` `[m, n1 - n0]`). Packed weights take f32 rows (bf16 rows are
/// widened first).
pub fn rows_times_weight_rows(x: Lhs<'_>, m: usize, w: &Weight, n0: usize, n1: usize, out: &mut [f32]) {
    match w {
        Weight::Dense(t) => gemv::rows_times_weight_rows(x, m, t, n0, n1, out),
        Weight::Packed(p) => SCRATCH.with_borrow_mut(|(block, tmp, xf)| {
            let x = match x {
                Lhs::F32(v) => v,
                Lhs::Bf16(v) => {
                    xf.resize(m * p.cols(), 0.0);
                    Element::widen_slice(&v[..m * p.cols()], xf);
                    &xf[..]
                }
            };
            packed_rows(x, m, p, n0, n1, block, tmp, out)
        }),
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
        }
        tmp.resize(m * bn, 0.0);
        gemv::rows_times_rows_f32(x, m, block, k, tmp);
        for r in 0..m {
            out[r * n + b0 - n0..r * n + b1 - n0].copy_from_slice(&tmp[r * bn..(r + 1) * bn]);
        }
    }
}
