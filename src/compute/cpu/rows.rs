//! Row gathers on the CPU: the one data-movement kernel of dispatch and combine.

use rayon::prelude::*;

use crate::compute::engine::{KEEP_ROW, ZERO_ROW, check_gather, check_weighted_sum};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;
use crate::with_storage;

/// Below this many bytes a row kernel runs on the calling thread. With ranks as threads that
/// share one rayon pool, a small copy would otherwise wait behind other ranks' expert tasks.
pub(crate) const PAR_MIN_BYTES: usize = 16 << 20;

/// Which source and row a concatenated index names.
#[inline]
pub(crate) fn locate(starts: &[usize], i: usize) -> (usize, usize) {
    // starts is short (2-3 sources): a linear scan beats a binary search.
    let mut s = 0;
    while i >= starts[s + 1] {
        s += 1;
    }
    (s, i - starts[s])
}

/// `dst[i] = cat(srcs)[idx[i]]`; see [`crate::Engine::gather_rows`].
pub fn gather_rows(srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()> {
    let starts = check_gather(srcs, idx, dst)?;
    let rb = dst.row_bytes();
    if rb == 0 {
        return Ok(());
    }
    let src_bytes: Vec<&[u8]> = srcs.iter().map(|s| s.as_bytes()).collect();
    let grain = (1usize << 16).div_ceil(rb).max(1);
    dst.as_bytes_mut().par_chunks_mut(rb).with_min_len(grain).zip(idx.par_iter()).for_each(|(row, &i)| {
        if i == ZERO_ROW {
            row.fill(0);
        } else if i == KEEP_ROW {
            // The caller's row stays.
        } else {
            let (s, r) = locate(&starts, i as usize);
            row.copy_from_slice(&src_bytes[s][r * rb..(r + 1) * rb]);
        }
    });
    Ok(())
}

/// `y[t] = sum_j w[t,j] * cat(srcs)[idx[t,j]]`; see [`crate::Engine::weighted_sum`].
pub fn weighted_sum(srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()> {
    let starts = check_weighted_sum(srcs, idx, weights, k, y)?;
    let d = y.cols();
    if d == 0 {
        return Ok(());
    }
    // Bytes read: every routed row once.
    let parallel = idx.len() * d * y.dtype().size() >= PAR_MIN_BYTES;
    let grain = (1usize << 14).div_ceil(d * k).max(1);
    with_storage!(y.storage_mut(), out => {
        let one = |(acc, row): &mut (Vec<f32>, Vec<f32>), (t, yrow): (usize, &mut [_])| {
            acc.fill(0.0);
            for j in 0..k {
                let i = idx[t * k + j];
                if i == ZERO_ROW {
                    continue;
                }
                let w = weights[t * k + j];
                let (s, r) = locate(&starts, i as usize);
                with_storage!(srcs[s].storage(), src => Element::widen_slice(&src[r * d..(r + 1) * d], row));
                axpy(acc, w, row);
            }
            Element::narrow_slice(acc, yrow);
        };
        let init = || (vec![0f32; d], vec![0f32; d]);
        if parallel {
            out.par_chunks_mut(d).with_min_len(grain).enumerate().for_each_init(init, one);
        } else {
            let mut scratch = init();
            out.chunks_mut(d).enumerate().for_each(|item| one(&mut scratch, item));
        }
    });
    Ok(())
}

/// `acc[i] = acc[i] + w * row[i]`: the product rounded to f32, then the sum rounded (Rust never
/// fuses them). The GPU combine performs exactly these operations, so the two agree bit for bit.
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, row: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += w * v;
    }
}
