//! Decode-shaped expert products on the CPU: a few rows against weight rows that are streamed
//! once, each widened into a small cache-resident buffer and dotted with every row. Faster than
//! the GEMM path when an expert has a handful of rows (no packing, no f32 copy of a weight
//! tile), but its summation order differs, so the deterministic mode never uses it.

use crate::dtype::Element;
use crate::model::weights::Weight;
use crate::with_storage;

/// Accumulator lanes of [`dot`]: enough independent sums to keep the vector units busy.
const LANES: usize = 16;

/// `sum_i a[i] * b[i]` in f32, lane-wise then across lanes. Lengths must match.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let split = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (x, y) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[r * (n1 - n0) + i] = x_r · w[n0 + i]` for the `m` rows of `x` (`[m, K]` f32) and weight
/// rows `n0..n1` of `w` (`[N, K]`, any dtype, or packed: each row decoded into `scratch`).
/// `scratch` is reused between calls.
pub fn rows_times_weight_rows(
    x: &[f32],
    m: usize,
    w: &Weight,
    n0: usize,
    n1: usize,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let k = w.cols();
    let n = n1 - n0;
    scratch.resize(k, 0.0);
    for (i, row) in (n0..n1).enumerate() {
        match w {
            Weight::Dense(t) => {
                with_storage!(t.storage(), v => Element::widen_slice(&v[row * k..(row + 1) * k], scratch))
            }
            Weight::Packed(p) => p.decode_row(row, scratch),
        }
        for r in 0..m {
            out[r * n + i] = dot(&x[r * k..(r + 1) * k], scratch);
        }
    }
}
