//! The floors that benchmarks compare against: memory bandwidth measured on this machine,
//! and the bytes and FLOPs a layer must move or compute (DESIGN.md, performance model).

use std::time::Instant;

use rayon::prelude::*;

/// Bytes dispatch + combine must move for `rows` = N*k routed rows of `row_bytes` and `n`
/// tokens: dispatch reads and writes every routed row once; combine reads every routed row
/// and writes each token's output once.
pub fn dispatch_combine_bytes(n: usize, k: usize, row_bytes: usize) -> usize {
    let routed = n * k * row_bytes;
    2 * routed + routed + n * row_bytes
}

/// FLOPs of the SwiGLU experts over `rows` routed rows: three `D x F` matrix products.
pub fn expert_flops(rows: usize, hidden: usize, intermediate: usize) -> f64 {
    6.0 * rows as f64 * hidden as f64 * intermediate as f64
}

/// memcpy bandwidth in GB/s (bytes read + bytes written, per second), best of `reps`, over
/// a `bytes`-sized buffer, with `threads` threads (1: one plain `copy_from_slice`; more: the
/// rayon pool, one chunk each).
pub fn memcpy_gbps(bytes: usize, threads: usize, reps: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        if threads <= 1 {
            dst.copy_from_slice(&src);
        } else {
            let chunk = bytes.div_ceil(threads);
            dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        }
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * bytes as f64 / best / 1e9
}

/// The CPU GEMM's f32 rate (`gemmkit`, the CPU engine's GEMM path) on `m`-square products,
/// one per rayon thread at once: GFLOP/s over all threads, median of `reps`.
pub fn gemm_gflops(m: usize, reps: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let a = vec![0.5f32; m * m];
    let b = vec![0.25f32; m * m];
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        (0..threads).into_par_iter().for_each(|_| {
            let mut c = vec![0f32; m * m];
            crate::compute::cpu::gemm::gemm_bt(&a, &b, &mut c, m, m, m, None, false);
            std::hint::black_box(&c);
        });
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (threads * 2 * m * m * m) as f64 / times[times.len() / 2] / 1e9
}
