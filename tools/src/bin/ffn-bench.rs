//! ffn-bench: the grouped expert FFN on the CPU and the GPU at decode and prefill sizes, each
//! against its floor measured in the same run: decode streams every active expert's weights
//! once (GB/s against the memory bandwidth: a device copy kernel on the GPU, a parallel memcpy
//! on the CPU); prefill is FLOP-bound (TFLOP/s; the CPU against the GEMM crate's own rate on
//! square products on every core, the GPU beside PyTorch's, `tools/scripts/torch_ffn.py`).
//! Then the CPU/GPU crossover a layer of this shape measures at warm-up.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin ffn-bench -- --preset mixtral-8x7b --weights bf16 --act bf16
//! ```

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::{CpuEngine, DType, Engine, ExpertSet, LayerOptions, LocalGroup, MoeLayer, Placement, Tensor, random};
use moe_ep_tools::{fmt_time, init_tracing, median, preset};
use moe_ep_wgpu::kernels::Tile;
use moe_ep_wgpu::ops::Gather;
use moe_ep_wgpu::timing::GpuTimer;
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Expert FFN (CPU and GPU) against memory bandwidth and FLOP rate; the CPU/GPU crossover")]
struct Args {
    /// Layer shape (see ep-bench --list).
    #[arg(long, default_value = "mixtral-8x7b")]
    preset: String,
    /// Local experts (default: all of the preset's, as on one rank).
    #[arg(long)]
    experts: Option<usize>,
    /// Weight dtype: f32, f16, bf16.
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// Activation dtype.
    #[arg(long, default_value = "bf16")]
    act: String,
    /// Decode sizes: tokens per call (each routed to top-k of the local experts).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    decode: Vec<usize>,
    /// Prefill sizes: tokens per call.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048])]
    prefill: Vec<usize>,
    /// cpu, wgpu or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Timed runs per point on the GPU (the CPU does a quarter, at least 3).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// Also time these tile shapes at the decode sizes on the GPU (tuning), each as
    /// BMxBNxTMxTNxBKWxKIND (KIND 0 tiled, 1 decode, 2 cooperative), e.g. 4x64x4x1x0x1 (the
    /// decode kernel, 4 rows, 64 threads).
    #[arg(long, value_delimiter = ',')]
    try_tiles: Vec<String>,
    /// Only kernels with the deterministic mode's summation order (no cooperative matrices).
    #[arg(long)]
    deterministic: bool,
    /// Skip the crossover measurement.
    #[arg(long)]
    no_crossover: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize, Debug)]
struct Point {
    backend: String,
    phase: &'static str,
    tokens: usize,
    rows: usize,
    active_experts: usize,
    median_s: f64,
    weight_bytes: u64,
    weight_gbps: f64,
    /// Weight GB/s over the memory floor (decode's figure of merit).
    fraction_of_bandwidth: f64,
    flops: f64,
    tflops: f64,
    /// TFLOP/s over the FLOP floor (CPU: the GEMM crate's square rate; GPU: none, see torch).
    fraction_of_flops: Option<f64>,
}

#[derive(Serialize, Debug, Default)]
struct Report {
    preset: String,
    local_experts: usize,
    hidden: usize,
    intermediate: usize,
    top_k: usize,
    weights: String,
    act: String,
    cpu_threads: usize,
    cpu_copy_gbps: Option<f64>,
    cpu_gemm_gflops: Option<f64>,
    adapter: Option<String>,
    gpu_copy_gbps: Option<f64>,
    points: Vec<Point>,
    crossover: Option<moe_ep::WarmUpReport>,
}

fn main() {
    init_tracing();
    if let Err(e) = run(Args::parse()) {
        eprintln!("ffn-bench: {e}");
        std::process::exit(1);
    }
}

/// Rows per local expert for `tokens` tokens, each routed to `k` distinct experts at random.
fn route_counts(tokens: usize, k: usize, experts: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = vec![0; experts];
    for _ in 0..tokens {
        for e in sample(&mut rng, experts, k.min(experts)) {
            counts[e] += 1;
        }
    }
    counts
}

/// Parallel memcpy of 1 GiB on every core: bytes read + written per second.
fn cpu_copy_gbps() -> f64 {
    let n = 1usize << 28;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let chunk = n / rayon::current_num_threads().max(1) / 4;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / median(&times) / 1e9
}

/// A GPU copy kernel (the identity row gather) over 512 MiB: bytes read + written per second.
fn gpu_copy_gbps(ctx: &GpuContext, timer: &GpuTimer, iters: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let rb = 16384usize;
    let rows = (32768usize).min(ctx.max_binding_bytes() as usize / rb);
    let src = ctx.storage("copy src", (rows * rb) as u64)?;
    let dst = ctx.storage("copy dst", (rows * rb) as u64)?;
    let idx: Vec<u32> = (0..rows as u32).collect();
    let idx = ctx.upload("copy idx", bytemuck::cast_slice(&idx))?;
    let g = Gather { a: &src, a_rows: rows, b: None, b_rows: 0, idx: &idx, dst: &dst, rows, row_bytes: rb };
    // SAFETY: identity indices, all below `rows`.
    let launch = unsafe { ctx.gather_unchecked(&g) }?;
    let t = timer.time(ctx, iters, |enc| launch.encode_pass(enc))?;
    Ok(2.0 * (rows * rb) as f64 / median(&t) / 1e9)
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let p = preset(&a.preset)?;
    let (wdt, act): (DType, DType) = (a.weights.parse()?, a.act.parse()?);
    let local = a.experts.unwrap_or(p.num_experts);
    let cfg = p.config(act, wdt);
    let (d, f, k) = (cfg.hidden, cfg.intermediate, cfg.top_k);
    let (use_cpu, use_gpu) = match a.backend.as_str() {
        "cpu" => (true, false),
        "wgpu" => (false, true),
        "both" => (true, true),
        other => return Err(format!("--backend {other}: expected cpu, wgpu or both").into()),
    };
    println!(
        "shape: {} ({local} local experts, D={d}, F={f}, k={k}), weights {wdt}, activations {act}; {:.2} GB of expert weights",
        p.name,
        (3 * local * d * f * wdt.size()) as f64 / 1e9
    );
    let t = Instant::now();
    let experts = ExpertSet::new(random::experts(&cfg, 1, &(0..local).collect::<Vec<_>>()));
    println!("weights generated in {}", fmt_time(t.elapsed().as_secs_f64()));
    let mut rep = Report {
        preset: p.name.into(),
        local_experts: local,
        hidden: d,
        intermediate: f,
        top_k: k,
        weights: wdt.to_string(),
        act: act.to_string(),
        cpu_threads: rayon::current_num_threads(),
        ..Default::default()
    };

    let sizes: Vec<(&'static str, usize)> =
        a.decode.iter().map(|&n| ("decode", n)).chain(a.prefill.iter().map(|&n| ("prefill", n))).collect();
    let point = |backend: &str,
                 phase: &'static str,
                 tokens: usize,
                 counts: &[usize],
                 secs: f64,
                 bw: f64,
                 peak: Option<f64>| {
        let rows: usize = counts.iter().sum();
        let active = counts.iter().filter(|&&c| c > 0).count();
        let weight_bytes = (active * 3 * d * f * wdt.size()) as u64;
        let flops = 2.0 * 3.0 * (rows * d * f) as f64;
        let weight_gbps = weight_bytes as f64 / secs / 1e9;
        let tflops = flops / secs / 1e12;
        let fraction_of_flops = peak.map(|p| flops / secs / p);
        println!(
            "  {backend:<5} {phase:<7} N={tokens:<5} rows={rows:<6} active={active:<3} {:>10}  weights {weight_gbps:>7.1} GB/s ({:>5.1}% of {bw:.0})  {tflops:>7.3} TFLOP/s{}",
            fmt_time(secs),
            100.0 * weight_gbps / bw,
            fraction_of_flops.map(|x| format!(" ({:.1}% of the GEMM rate)", 100.0 * x)).unwrap_or_default()
        );
        Point {
            backend: backend.into(),
            phase,
            tokens,
            rows,
            active_experts: active,
            median_s: secs,
            weight_bytes,
            weight_gbps,
            fraction_of_bandwidth: weight_gbps / bw,
            flops,
            tflops,
            fraction_of_flops,
        }
    };

    let mut gpu_engine = None;
    if use_gpu {
        let ctx = Arc::new(GpuContext::new(&ContextOptions::from_env())?);
        println!("adapter: {}", ctx.describe());
        let timer = GpuTimer::new(&ctx, a.iters)?;
        let copy = gpu_copy_gbps(&ctx, &timer, a.iters)?;
        println!("GPU floor: copy kernel {copy:.0} GB/s (read + write)");
        rep.adapter = Some(ctx.describe());
        rep.gpu_copy_gbps = Some(copy);
        let engine = GpuEngine::with_context(ctx.clone());
        let dev = engine.resident(&experts)?;
        let mut tries: Vec<(&'static str, usize, Option<Tile>)> = sizes.iter().map(|&(p, n)| (p, n, None)).collect();
        for spec in &a.try_tiles {
            let v: Vec<u32> = spec.split('x').map(str::parse).collect::<Result<_, _>>()?;
            let [bm, bn, tm, tn, bkw, split] = v[..] else {
                return Err(format!("--try-tiles {spec}: need 6 numbers").into());
            };
            let t = Tile { bm, bn, tm, tn, bkw, split: split == 1, coop: split == 2 };
            tries.extend(a.decode.iter().map(|&n| ("decode", n, Some(t))));
        }
        for &(phase, tokens, forced) in &tries {
            let counts = route_counts(tokens, k, local, tokens as u64);
            let offs = ffn_offsets(&counts);
            let rows = *offs.last().unwrap();
            let batch = random::uniform(act, rows, d, 1.0, 2, tokens as u64);
            let tile = forced.unwrap_or_else(|| engine.tile_for(&offs, d, f, act, wdt, a.deterministic));
            let bufs = ctx.ffn_scratch(batch.as_bytes(), act, rows, d, f, tile)?;
            let mut scratch = Vec::new();
            let launches = ctx.ffn_launches(&dev, act, &offs, tile, &bufs.view(), &mut scratch)?;
            let times = timer.time(&ctx, a.iters, |enc| {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for l in &launches {
                    l.encode(&mut pass);
                }
            })?;
            if std::env::var_os("FFN_BENCH_PER_LAUNCH").is_some() {
                for l in &launches {
                    let t = timer.time(&ctx, a.iters, |enc| {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        l.encode(&mut pass);
                    })?;
                    println!("    {:<40} {}", l.label(), fmt_time(median(&t)));
                }
            }
            let label = match forced {
                Some(t) => format!("gpu {}x{}x{}x{}x{}x{}", t.bm, t.bn, t.tm, t.tn, t.bkw, t.split as u8),
                None if tile.split => format!("gpu/v{}", tile.bm),
                None if tile.coop => "gpu/c".into(),
                None => "gpu/q".into(),
            };
            rep.points.push(point(&label, phase, tokens, &counts, median(&times), copy, None));
            for b in scratch {
                ctx.recycle(b);
            }
            bufs.recycle(&ctx);
        }
        gpu_engine = Some(engine);
    }
    if use_cpu {
        let copy = cpu_copy_gbps();
        let gemm = moe_ep::testing::floor::gemm_gflops(1024, 3) * 1e9;
        println!(
            "CPU floors ({} threads): parallel memcpy {copy:.1} GB/s (read + write); matrixmultiply f32 1024^3 on every core {:.1} GFLOP/s",
            rayon::current_num_threads(),
            gemm / 1e9
        );
        rep.cpu_copy_gbps = Some(copy);
        rep.cpu_gemm_gflops = Some(gemm / 1e9);
        let iters = (a.iters / 4).max(3);
        for &(phase, tokens) in &sizes {
            let counts = route_counts(tokens, k, local, tokens as u64);
            let offs = ffn_offsets(&counts);
            let rows = *offs.last().unwrap();
            let batch = random::uniform(act, rows, d, 1.0, 2, tokens as u64);
            let mut out = Tensor::zeros(act, rows, d);
            CpuEngine.ffn(&batch, &offs, &experts, false, &mut out)?;
            let mut times = Vec::new();
            for _ in 0..iters {
                let t = Instant::now();
                CpuEngine.ffn(&batch, &offs, &experts, false, &mut out)?;
                times.push(t.elapsed().as_secs_f64());
            }
            rep.points.push(point("cpu", phase, tokens, &counts, median(&times), copy, Some(gemm)));
        }
    }
    if let (Some(engine), true, false) = (gpu_engine, use_cpu, a.no_crossover) {
        // A one-rank layer of this shape, as a user builds it: warm-up measures the crossover.
        let all = experts.weights().to_vec();
        drop(experts);
        let gate = random::gate(&cfg, 3);
        let mut c = cfg.clone();
        c.num_experts = local;
        let gate = if local == cfg.num_experts { gate } else { random::gate(&c, 3) };
        let group = LocalGroup::world(1, std::time::Duration::from_secs(600))?.remove(0);
        let layer = MoeLayer::with_gpu(
            group,
            c.clone(),
            Placement::contiguous(local, 1)?,
            gate,
            all,
            Box::new(engine),
            LayerOptions { crossover_budget_s: 2.0, ..LayerOptions::default() },
        )?;
        let r = layer.warm_up()?;
        println!("crossover (local compute of a call: FFN over N*k rows + combine; median):");
        for pt in &r.points {
            println!("  N={:<5} cpu {:>10}  gpu {:>10}", pt.tokens, fmt_time(pt.cpu_s), fmt_time(pt.gpu_s));
        }
        println!(
            "crossover: {} ({}); warm-up {} (engines {})",
            r.crossover.map_or("never (CPU only)".to_string(), |n| format!("GPU from N = {n} tokens")),
            r.crossover_source,
            fmt_time(r.total_s),
            fmt_time(r.engine_s)
        );
        rep.crossover = Some(r);
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rep)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
