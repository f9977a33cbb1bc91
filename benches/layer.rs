//! Criterion benches of the CPU kernels (expert FFN, row gather, weighted combine), the
//! thread-rank exchange, and the whole layer as expert parallelism and as tensor parallelism.
//!
//! After the criterion groups, a summary prints each figure beside its floor measured in the
//! same run: FFN GFLOP/s against gemmkit's square bf16 GEMM on all threads (the FFN's own
//! dtype; the f32 rate beside it), gather,
//! combine and exchange GB/s against memcpy.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use moe_ep::compute::engine::even_offsets;
use moe_ep::layer::tp::tp_weights;
use moe_ep::{
    CpuEngine, DType, Engine, ExpertSet, Group, LocalGroup, MoeConfig, MoeLayer, Placement, Tensor, TpLayer, random,
    testing::floor,
};

/// A small layer: fast enough for criterion on two cores, big enough to leave the caches.
fn cfg() -> MoeConfig {
    MoeConfig::new(16, 512, 1024, 4).with_dtypes(DType::BF16, DType::BF16)
}

fn ffn_case(rows: usize) -> (Tensor, Vec<usize>, ExpertSet, Tensor) {
    let c = cfg();
    let experts = ExpertSet::new(random::experts(&c, 1, &(0..4).collect::<Vec<_>>()));
    let batch = random::input(&c, rows, 2, 0);
    let out = Tensor::zeros(c.act_dtype, rows, c.hidden);
    (batch, even_offsets(rows, 4), experts, out)
}

fn time_ffn(rows: usize, deterministic: bool, reps: usize) -> f64 {
    let (batch, offsets, experts, mut out) = ffn_case(rows);
    CpuEngine.ffn(&batch, &offsets, &experts, deterministic, &mut out).unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        CpuEngine.ffn(&batch, &offsets, &experts, deterministic, &mut out).unwrap();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// gemmkit's bf16 rate on `m`-square products, one per rayon thread at once: GFLOP/s over all
/// threads, median of `reps` (the bf16 counterpart of `floor::gemm_gflops`).
fn bf16_gemm_gflops(m: usize, reps: usize) -> f64 {
    use half::bf16;
    let threads = rayon::current_num_threads();
    let a = vec![bf16::from_f32(0.5); m * m];
    let b = vec![bf16::from_f32(0.25); m * m];
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            rayon::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|_| {
                        let mut c = vec![bf16::ZERO; m * m];
                        moe_ep::compute::cpu::gemm::gemm_bt(&a, &b, &mut c, m, m, m, None, false);
                        std::hint::black_box(&c);
                    });
                }
            });
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (threads * 2 * m * m * m) as f64 / times[times.len() / 2] / 1e9
}

/// (gather seconds, combine seconds) for `rows` output rows of top-4 over a source of 4x rows.
fn time_gather_combine(rows: usize, reps: usize) -> (f64, f64) {
    let c = cfg();
    let src = random::input(&c, rows * 4, 3, 0);
    let idx: Vec<u32> = (0..rows * 4).map(|i| ((i * 7919) % (rows * 4)) as u32).collect();
    let mut dst = Tensor::zeros(c.act_dtype, rows * 4, c.hidden);
    let mut y = Tensor::zeros(c.act_dtype, rows, c.hidden);
    let w = vec![0.25f32; rows * 4];
    let t = Instant::now();
    for _ in 0..reps {
        CpuEngine.gather_rows(&[&src], &idx, &mut dst).unwrap();
    }
    let g = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        CpuEngine.weighted_sum(&[&src], &idx, &w, 4, &mut y).unwrap();
    }
    (g, t.elapsed().as_secs_f64() / reps as f64)
}

/// Median seconds of an exchange of `bytes` to every peer on `world` thread ranks.
fn time_exchange(world: usize, bytes: usize, reps: usize) -> f64 {
    let outs = LocalGroup::run(world, Duration::from_secs(60), |g| {
        let send = vec![g.rank() as u8; bytes * world];
        let mut recv = vec![0u8; bytes * world];
        let counts = vec![bytes; world];
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            g.barrier().unwrap();
            let t = Instant::now();
            g.exchange_v_known_into(&send, &counts, &mut recv, &counts).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        times
    })
    .unwrap();
    let per_rank: Vec<Vec<f64>> = outs.into_iter().map(|o| o.unwrap()).collect();
    slowest_median(&per_rank)
}

fn slowest_median(per_rank: &[Vec<f64>]) -> f64 {
    let mut s: Vec<f64> = (0..per_rank[0].len()).map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max)).collect();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Median seconds of one forward of the EP (`tp = false`) or TP layer on `world` thread ranks
/// of `n` tokens each.
fn time_layer(world: usize, n: usize, tp: bool, reps: usize) -> f64 {
    let c = cfg();
    let all = Placement::contiguous(c.num_experts, 1).unwrap();
    let full = random::layer_weights(&c, 1, &all, 0);
    let outs = LocalGroup::run(world, Duration::from_secs(60), |g| {
        let rank = g.rank();
        let x = random::input(&c, n, 5, rank);
        let g = &g;
        let forward: Box<dyn Fn() -> moe_ep::Result<Tensor>> = if tp {
            let layer = TpLayer::new(g, c.clone(), tp_weights(&full, &c, rank, world)?, Box::new(CpuEngine))?;
            Box::new(move || layer.forward(&x))
        } else {
            let p = Placement::contiguous(c.num_experts, world)?;
            let w = full.ep_share(&p, rank)?;
            let layer = MoeLayer::with_engine_weights(g, c.clone(), p, w, Box::new(CpuEngine))?;
            Box::new(move || layer.forward(&x))
        };
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            g.barrier()?;
            let t = Instant::now();
            forward()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        Ok::<_, moe_ep::Error>(times)
    })
    .unwrap();
    let per_rank: Vec<Vec<f64>> = outs.into_iter().map(|o| o.unwrap().unwrap()).collect();
    slowest_median(&per_rank)
}

fn bench(c: &mut Criterion) {
    let l = cfg();
    let mut g = c.benchmark_group("kernels_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    for rows in [16, 512] {
        g.throughput(Throughput::Elements(floor::expert_flops(rows, l.hidden, l.intermediate) as u64));
        g.bench_with_input(BenchmarkId::new("ffn_flops", rows), &rows, |b, &rows| {
            let (batch, offsets, experts, mut out) = ffn_case(rows);
            b.iter(|| CpuEngine.ffn(&batch, &offsets, &experts, false, &mut out).unwrap())
        });
    }
    g.throughput(Throughput::Bytes((2 * 2048 * l.hidden * l.act_dtype.size()) as u64));
    g.bench_function("gather_rows/2048", |b| {
        b.iter_custom(|n| Duration::from_secs_f64(time_gather_combine(512, 1).0 * n as f64))
    });
    g.finish();

    let mut g = c.benchmark_group("exchange_threads");
    g.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    for world in [2, 4] {
        g.throughput(Throughput::Bytes((world * world * (1 << 20)) as u64));
        g.bench_with_input(BenchmarkId::new("1MiB_per_peer", world), &world, |b, &w| {
            b.iter_custom(|n| Duration::from_secs_f64(time_exchange(w, 1 << 20, 3) * n as f64))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("layer_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (n, tp) in [(4, false), (4, true), (256, false), (256, true)] {
        let name = if tp { "tp" } else { "ep" };
        g.bench_with_input(BenchmarkId::new(format!("{name}_world2"), n), &n, |b, &n| {
            b.iter_custom(|it| Duration::from_secs_f64(time_layer(2, n, tp, 3) * it as f64))
        });
    }
    g.finish();
}

fn summary() {
    let l = cfg();
    let threads = rayon::current_num_threads();
    let memcpy = floor::memcpy_gbps(256 << 20, threads, 5);
    let gemm = floor::gemm_gflops(512, 3);
    let gemm16 = bf16_gemm_gflops(512, 3);
    println!(
        "\nsummary ({threads} threads): floors memcpy {memcpy:.1} GB/s, GEMM 512^3 bf16 {gemm16:.1} GFLOP/s, f32 {gemm:.1} GFLOP/s"
    );
    for (rows, det) in [(16, false), (512, false), (512, true), (2048, false)] {
        let t = time_ffn(rows, det, 5);
        let gf = floor::expert_flops(rows, l.hidden, l.intermediate) / t / 1e9;
        println!(
            "  ffn {rows:>5} rows (4 experts, D={}, F={}){}: {gf:>6.1} GFLOP/s = {:>5.1}% of bf16 GEMM",
            l.hidden,
            l.intermediate,
            if det { ", deterministic" } else { "" },
            100.0 * gf / gemm16
        );
    }
    let (gt, ct) = time_gather_combine(2048, 5);
    let row = l.hidden * l.act_dtype.size();
    let gb = 2.0 * (2048 * 4 * row) as f64 / gt / 1e9;
    let cb = ((2048 * 4 + 2048) * row) as f64 / ct / 1e9;
    println!(
        "  gather 8192 rows: {gb:.1} GB/s = {:.1}% of memcpy; combine 2048 x top-4: {cb:.1} GB/s = {:.1}%",
        100.0 * gb / memcpy,
        100.0 * cb / memcpy
    );
    for world in [2, 4] {
        let t = time_exchange(world, 4 << 20, 5);
        let gbps = 2.0 * (world * world * (4 << 20)) as f64 / t / 1e9;
        println!(
            "  exchange {world} ranks x 4 MiB per peer: {gbps:.1} GB/s (read + write) = {:.1}% of memcpy",
            100.0 * gbps / memcpy
        );
    }
    for n in [4, 256] {
        let (ep, tp) = (time_layer(2, n, false, 5), time_layer(2, n, true, 5));
        println!("  layer world 2, N {n}/rank: EP {:.3} ms, TP {:.3} ms, TP/EP {:.2}x", ep * 1e3, tp * 1e3, tp / ep);
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
