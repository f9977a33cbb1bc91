//! The CPU row kernels on packed weights against the dense bf16 one, on one thread with the
//! weights hot in cache: what each format's decoding costs where memory does not hide it.
//!
//! Criterion times `m` f32 rows times one weight matrix (`N x K`: 512 KB in bf16, so that
//! every format's weights fit a 1 MB L2 such as a Xeon's; the packed ones take a half or less) per
//! format: dense bf16 ([`gemv::rows_times_weight_rows`], the bf16 weights widened in
//! registers), and the packed kernels ([`gemv::packed_rows`]: MLX affine 4 and 8 bits in
//! groups of 64 with bf16 scales, MXFP4, FP8 E4M3 with 128 x 128 blocks). The summary prints
//! each one's weights a second (G values/s) and its time against the dense bf16 kernel's on
//! the same products, measured in the same run. Without AVX-512 the packed kernels are not
//! available (`packed_rows` returns false) and the summary says so.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use moe_ep::compute::cpu::gemv::{self, Lhs};
use moe_ep::model::quant::{PackedMatrix, QuantFormat};
use moe_ep::{DType, Tensor, random};

const N: usize = 128;
const K: usize = 2048;
const ROWS: [usize; 2] = [1, 4];

/// The dense bf16 weights and the same shape in each packed format, generated once.
struct Weights {
    dense: Tensor,
    packed: Vec<(&'static str, PackedMatrix)>,
}

fn weights() -> Weights {
    let formats = [
        ("q4", QuantFormat::affine(4, 64, DType::BF16).unwrap()),
        ("q8", QuantFormat::affine(8, 64, DType::BF16).unwrap()),
        ("mxfp4", QuantFormat::Mxfp4),
        ("fp8", QuantFormat::fp8((128, 128)).unwrap()),
    ];
    Weights {
        dense: random::uniform(DType::BF16, N, K, 0.05, 3, 2),
        packed: formats.into_iter().map(|(name, f)| (name, random::packed(f, N, K, 5, 3))).collect(),
    }
}

fn x(m: usize) -> Vec<f32> {
    random::uniform(DType::F32, m, K, 1.0, 7, 1).to_f32_vec()
}

fn dense(w: &Tensor, x: &[f32], m: usize, out: &mut [f32]) {
    gemv::rows_times_weight_rows(Lhs::F32(x), m, w, 0, N, out);
}

fn packed(p: &PackedMatrix, x: &[f32], m: usize, out: &mut [f32]) -> bool {
    gemv::packed_rows(x, m, p, 0, N, out)
}

fn bench(c: &mut Criterion, w: &Weights) {
    let mut g = c.benchmark_group("packed_rows");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    for m in ROWS {
        let (xs, mut out) = (x(m), vec![0f32; m * N]);
        g.bench_with_input(BenchmarkId::new("bf16", m), &m, |b, &m| b.iter(|| dense(&w.dense, &xs, m, &mut out)));
        for (name, p) in &w.packed {
            if !packed(p, &xs, m, &mut out) {
                continue;
            }
            g.bench_with_input(BenchmarkId::new(*name, m), &m, |b, &m| b.iter(|| packed(p, &xs, m, &mut out)));
        }
    }
    g.finish();
}

/// Best of `reps` batches of calls of about 20 ms, seconds a call.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let calls = ((0.02 / t.elapsed().as_secs_f64().max(1e-7)) as usize).max(1);
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed().as_secs_f64() / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn summary(w: &Weights) {
    println!("\npacked row kernels, one thread, {N} x {K} weights hot in cache (best of 40 batches):");
    for m in ROWS {
        let (xs, mut out) = (x(m), vec![0f32; m * N]);
        let base = best(40, || dense(&w.dense, &xs, m, &mut out));
        let rate = |s: f64| (N * K) as f64 / s / 1e9;
        println!("  m={m}: bf16 (dense) {:>8.1} us  {:>5.2} G weights/s", base * 1e6, rate(base));
        for (name, p) in &w.packed {
            if !packed(p, &xs, m, &mut out) {
                println!("  m={m}: {name:<12} not run: no AVX-512 packed kernel on this CPU");
                continue;
            }
            let s = best(40, || {
                packed(p, &xs, m, &mut out);
            });
            println!(
                "  m={m}: {name:<12} {:>8.1} us  {:>5.2} G weights/s  {:.2}x the bf16 kernel's speed",
                s * 1e6,
                rate(s),
                base / s
            );
        }
    }
}

fn main() {
    let w = weights();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &w);
    c.final_summary();
    summary(&w);
}
