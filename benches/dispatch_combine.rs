//! CPU dispatch + combine (identity experts) on thread ranks, against memcpy.
//!
//! Criterion times one dispatch + combine of every rank (`world` threads, `N` tokens each).
//! After the criterion groups, a summary prints the model bytes moved, the rate and its
//! fraction of this machine's memcpy bandwidth (1 thread and all threads) measured in the
//! same run.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use moe_ep::{
    Capacity, CpuEngine, DType, Group, LocalGroup, Placement, Workspace, combine_in, dispatch_in, model::router,
    random, testing::floor,
};

const E: usize = 64;
const D: usize = 2048;
const K: usize = 6;
const DTYPE: DType = DType::BF16;

/// Time `iters` dispatch + combine calls on `world` ranks of `n` tokens; median seconds per call
/// (each call timed on the slowest rank, ranks released together by a barrier).
fn time_dispatch_combine(world: usize, n: usize, iters: usize) -> f64 {
    let placement = Placement::contiguous(E, world).unwrap();
    let cfg = moe_ep::MoeConfig::new(E, D, 1, K).with_dtypes(DTYPE, DTYPE);
    let gate = random::gate(&cfg, 1);
    let start = Arc::new(Barrier::new(world));
    let outs = LocalGroup::run(world, Duration::from_secs(120), |g| {
        let x = random::input(&cfg, n, 1, g.rank());
        let routing = router::route(&x, &gate, K, true).unwrap();
        let ws = Workspace::new();
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters + 2 {
            start.wait();
            let t = Instant::now();
            let d = dispatch_in(&g, &CpuEngine, &ws, &placement, Capacity::Dropless, &x, &routing).unwrap();
            let (y, _) = combine_in(&g, &CpuEngine, &ws, d.handle, &d.batch).unwrap();
            times.push(t.elapsed().as_secs_f64());
            ws.recycle(d.batch);
            ws.recycle(y);
        }
        times.drain(..2);
        times
    })
    .unwrap();
    let per_rank: Vec<Vec<f64>> = outs.into_iter().map(|o| o.unwrap()).collect();
    let mut slowest: Vec<f64> = (0..iters).map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    slowest[iters / 2]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch_combine_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (world, n) in [(1, 1024), (4, 256)] {
        let bytes = world * floor::dispatch_combine_bytes(n, K, D * DTYPE.size());
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new(format!("world{world}"), n), &(world, n), |b, &(world, n)| {
            b.iter_custom(|iters| Duration::from_secs_f64(time_dispatch_combine(world, n, 3) * iters as f64))
        });
    }
    g.finish();
}

fn summary() {
    let threads = rayon::current_num_threads();
    let m1 = floor::memcpy_gbps(256 << 20, 1, 5);
    let mall = floor::memcpy_gbps(256 << 20, threads, 5);
    println!(
        "\nsummary: E={E} D={D} k={K} {DTYPE}, identity experts; floor memcpy {m1:.1} GB/s (1 thread), {mall:.1} GB/s ({threads} threads)"
    );
    for (world, n) in [(1, 1024), (1, 4096), (4, 256), (4, 1024)] {
        let bytes = world * floor::dispatch_combine_bytes(n, K, D * DTYPE.size());
        let t = time_dispatch_combine(world, n, 9);
        let gbps = bytes as f64 / t / 1e9;
        println!(
            "  world {world}, N {n:>4}/rank: {:>7.1} MB in {:>8.3} ms = {gbps:>5.1} GB/s = {:>5.1}% of 1-thread memcpy, {:>5.1}% of {threads}-thread memcpy",
            bytes as f64 / 1e6,
            t * 1e3,
            100.0 * gbps / m1,
            100.0 * gbps / mall
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
