//! ep-bench: one expert-parallel MoE layer over thread ranks (or MPI processes), timed stage
//! by stage over a sweep of tokens per rank, with uniform and/or skewed routing.
//!
//! Prints the warm-up's CPU/GPU crossover, then per (routing, N): the layer time, the exchange
//! and expert times, the data-movement rate against memcpy and the expert FLOP rate against the
//! CPU GEMM (floors measured in the same run); for a single point, the full per-stage table
//! (median over iterations of the slowest rank). `--json` writes every point.
//!
//! Over MPI (built with `--features mpi`): `mpirun -n 4 ep-bench --group mpi`; one rank per
//! process, rank 0 prints.

use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use moe_ep::WarmUpReport;
use moe_ep::{
    BackendChoice, Capacity, DType, Engine, ForwardStats, Group, LayerOptions, LocalGroup, MoeLayer, OnGpuError,
    Placement, random, testing::floor,
};
use moe_ep_tools::{WeightsSpec, fmt_bytes, fmt_time, median, preset};
use moe_ep_wgpu::{ContextOptions, GpuEngine};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Run an expert-parallel MoE layer on thread ranks and time every stage")]
struct Args {
    /// Layer shape after a real model: deepseek-v2-lite, qwen3-30b-a3b, mixtral-8x7b, deepseek-v3-scaled, tiny.
    #[arg(long, default_value = "deepseek-v2-lite")]
    config: String,
    /// Ranks (threads). With `--group mpi` the MPI job's size instead.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Where ranks live: threads of this process, or MPI processes (run under mpirun; needs a
    /// build with `--features mpi`).
    #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
    group: String,
    /// Tokens per rank: one count or a comma-separated sweep (e.g. 1,8,64,512,4096).
    #[arg(long, default_value = "256", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Activation dtype (f32, f16, bf16).
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Weight dtype; defaults to the activation dtype.
    #[arg(long)]
    weight_dtype: Option<DType>,
    /// Routed experts' weights: a dtype, or packed: q4, q8 (MLX affine, groups of 64, bf16
    /// scales), q4g32 (another group), mxfp4, fp8 (the router and shared expert stay dense).
    #[arg(long)]
    weights: Option<WeightsSpec>,
    /// Capacity factor (dropless when absent).
    #[arg(long)]
    capacity_factor: Option<f32>,
    /// uniform (random router), skewed (every token's first choice is expert 0: worst-case load
    /// imbalance) or both (each sweep twice, side by side).
    #[arg(long, default_value = "uniform", value_parser = ["uniform", "skewed", "both"])]
    routing: String,
    /// One GPU per rank (rank r takes the r-th GPU of the host) instead of every rank on the best one.
    #[arg(long)]
    gpu_per_rank: bool,
    /// Compute backend: auto gives the layer the GPU when wgpu finds one (not a software driver
    /// such as lavapipe) and lets its policy choose per call: the CPU below the crossover that
    /// warm-up measures, the GPU from it on; wgpu runs every call on any adapter (MOE_EP_ADAPTER
    /// / WGPU_BACKEND choose), failing on a GPU error; cpu never uses a GPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "wgpu"])]
    backend: String,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// After the warm-up forwards, more untimed forwards until the ranks have spent this long
    /// on a token count (milliseconds, the ranks' mean, agreed so that every rank runs the
    /// same number): an idle GPU runs at idle clocks (an H200's SMs at 345 MHz) and decode-sized
    /// forwards read several times slower. Default 1000 with a GPU backend, 0 with cpu.
    #[arg(long)]
    warm_ms: Option<u64>,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hold the experts also in the CPU GEMM's panels (`LayerOptions::cpu_gemm_panels`: faster
    /// CPU prefill in f32, twice the experts' host memory).
    #[arg(long)]
    cpu_gemm_panels: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One (routing, tokens) point: medians over iterations of the slowest rank.
#[derive(Serialize)]
struct Point {
    routing: String,
    tokens_per_rank: usize,
    forward_s: f64,
    /// Per stage, seconds.
    stages: Vec<(String, f64)>,
    /// Model bytes of dispatch + combine over all ranks, the time of those stages, the rate
    /// and its fraction of the parallel memcpy floor.
    movement_bytes: usize,
    movement_s: f64,
    movement_gbps: f64,
    movement_fraction_of_memcpy: f64,
    expert_flops: f64,
    experts_s: f64,
    expert_gflops: f64,
    /// Against the CPU GEMM floor; `None` on the GPU (its floors: ffn-bench).
    expert_fraction_of_cpu_gemm: Option<f64>,
    /// The experts' weight bytes a call streams over all ranks (each expert with rows once,
    /// as held: packed experts' values and scales), and that over the experts stage's time.
    expert_weight_bytes: usize,
    expert_weight_gbps: f64,
    /// Rank 0's stats of the last iteration.
    last_stats_rank0: ForwardStats,
}

#[derive(Serialize)]
struct Report {
    preset: &'static moe_ep_tools::Preset,
    config: moe_ep::MoeConfig,
    world: usize,
    group: String,
    backend: String,
    iters: usize,
    memcpy_1t_gbps: f64,
    memcpy_all_gbps: f64,
    cpu_gemm_gflops: f64,
    /// Rank 0's warm-up per routing mode (crossover and its measured points).
    warm_up: Vec<WarmUpReport>,
    points: Vec<Point>,
}

fn main() {
    moe_ep_tools::init_tracing();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("ep-bench: {e}");
        std::process::exit(1);
    }
}

/// What every rank needs to build and time its layer.
struct RankJob<'a> {
    cfg: &'a moe_ep::MoeConfig,
    weights: WeightsSpec,
    placement: &'a Placement,
    backend: &'a str,
    gpu_per_rank: bool,
    cpu_gemm_panels: bool,
    tokens: &'a [usize],
    seed: u64,
    skew: bool,
    warmup: usize,
    warm: std::time::Duration,
    iters: usize,
    bar: Option<&'a ProgressBar>,
}

/// Per token count, the timed calls' (wall seconds, stats).
type Sweep = Vec<Vec<(f64, ForwardStats)>>;

/// One rank: build its layer and warm it up, then for each token count run `warmup` untimed
/// forwards, more until the ranks' mean time on it reaches `warm`, and time `iters` forwards
/// (each after a barrier). The warm-up report, the sweep, and the group back.
fn run_rank<G: Group>(g: G, job: &RankJob<'_>) -> moe_ep::Result<((WarmUpReport, Sweep), G)> {
    let (cfg, rank) = (job.cfg, g.rank());
    let mut w = random::layer_weights(cfg, job.seed, job.placement, rank);
    if let WeightsSpec::Packed(_) = job.weights {
        w.experts = job.weights.experts(cfg, job.seed, job.placement.experts_of(rank));
    }
    if job.skew {
        w.router = random::skewed_gate(&w.router);
    }
    let (p, c) = (job.placement.clone(), cfg.clone());
    let base = LayerOptions { cpu_gemm_panels: job.cpu_gemm_panels, ..LayerOptions::default() };
    let layer = match job.backend {
        "cpu" => MoeLayer::from_weights(g, c, p, w, None, base)?,
        policy => {
            let opts = ContextOptions {
                device_index: job.gpu_per_rank.then_some(rank),
                timestamps: true,
                ..ContextOptions::from_env()
            };
            let e = GpuEngine::new(&opts)?;
            if rank == 0 {
                println!("  rank 0 GPU engine: {}", e.name());
            }
            let options = match policy {
                "wgpu" => LayerOptions { backend: BackendChoice::Gpu, on_gpu_error: OnGpuError::Fatal, ..base },
                _ => base,
            };
            MoeLayer::from_weights(g, c, p, w, Some(Box::new(e)), options)?
        }
    };
    let report = layer.warm_up()?;
    let mut sweep = Vec::new();
    for &n in job.tokens {
        let mut x = random::input(cfg, n, job.seed, rank);
        if job.skew {
            x = random::skewed_input(&x);
        }
        let mut out = Vec::with_capacity(job.iters);
        let start = Instant::now();
        for _ in 0..job.warmup {
            layer.group().barrier()?;
            layer.forward_with_stats(&x)?;
        }
        loop {
            let mut spent = [start.elapsed().as_secs_f32()];
            layer.group().all_reduce_sum_f32(&mut spent)?;
            if f64::from(spent[0]) / layer.group().size() as f64 >= job.warm.as_secs_f64() {
                break;
            }
            layer.forward_with_stats(&x)?;
        }
        for _ in 0..job.iters {
            layer.group().barrier()?;
            let t = Instant::now();
            let (_, stats) = layer.forward_with_stats(&x)?;
            out.push((t.elapsed().as_secs_f64(), stats));
        }
        sweep.push(out);
        if let Some(b) = job.bar {
            b.inc(1);
        }
    }
    Ok(((report, sweep), layer.into_group()))
}

fn run(mut args: Args) -> Result<(), String> {
    let mut mpi = if args.group == "mpi" { Some(moe_ep_tools::mpi_group("ep-bench")?) } else { None };
    if let Some(g) = &mpi {
        args.world = g.size();
    }
    let root = mpi.as_ref().is_none_or(|g| g.rank() == 0);
    let p = preset(&args.config)?;
    let spec = args.weights.unwrap_or(WeightsSpec::Dense(args.weight_dtype.unwrap_or(args.dtype)));
    let wdt = spec.dense_dtype();
    let mut cfg = p.config(args.dtype, wdt);
    if let Some(f) = args.capacity_factor {
        cfg = cfg.with_capacity(Capacity::Factor(f));
    }
    cfg.validate().map_err(|e| e.to_string())?;
    if args.tokens.is_empty() || args.iters == 0 {
        return Err("--tokens needs at least one count and --iters at least 1".into());
    }
    let placement = Placement::balanced(cfg.num_experts, args.world).map_err(|e| e.to_string())?;
    let gpus: Vec<String> = moe_ep_wgpu::list_adapters()
        .into_iter()
        .filter(|a| a.device_type != moe_ep_wgpu::wgpu::DeviceType::Cpu)
        .map(|a| format!("{} ({:?})", a.name, a.backend))
        .collect();
    let backend = match args.backend.as_str() {
        "auto" if !gpus.is_empty() => "auto",
        "auto" | "cpu" => "cpu",
        "wgpu" => "wgpu",
        other => return Err(format!("unknown backend {other}")),
    };
    let routings: Vec<bool> = match args.routing.as_str() {
        "uniform" => vec![false],
        "skewed" => vec![true],
        _ => vec![false, true],
    };

    let (memcpy_1t, memcpy_all, gemm) = if root {
        println!(
            "ep-bench: {} (E={}, D={}, F={}, k={}), {} ranks as {}, tokens per rank {:?}",
            p.name,
            cfg.num_experts,
            cfg.hidden,
            cfg.intermediate,
            cfg.top_k,
            args.world,
            if args.group == "mpi" { "MPI processes" } else { "threads" },
            args.tokens
        );
        if cfg.num_experts % args.world != 0 {
            println!(
                "  placement: {} experts do not divide over {} ranks; blocks of {} and {}",
                cfg.num_experts,
                args.world,
                cfg.num_experts / args.world + 1,
                cfg.num_experts / args.world
            );
        }
        if !p.note.is_empty() {
            println!("  note: {}", p.note);
        }
        println!(
            "  activations {}, expert weights {spec} ({} an expert), {}, backend {backend}{} ({} CPU threads), routing {}",
            cfg.act_dtype,
            fmt_bytes(spec.expert_bytes(cfg.hidden, cfg.intermediate) as u64),
            if args.capacity_factor.is_some() { "capacity factor" } else { "dropless" },
            if args.gpu_per_rank { ", one GPU per rank" } else { "" },
            rayon::current_num_threads(),
            args.routing
        );
        if args.backend == "auto" {
            match gpus.first() {
                Some(g) => println!("  auto: wgpu found {g}: the layer's policy picks CPU or GPU per call"),
                None => {
                    println!("  auto: wgpu found no GPU (software drivers are skipped), so the CPU runs every stage")
                }
            }
        }
        let m1 = floor::memcpy_gbps(256 << 20, 1, 5);
        let mall = floor::memcpy_gbps(256 << 20, rayon::current_num_threads(), 5);
        let gemm = floor::gemm_gflops(1024, 3);
        println!(
            "  floors: memcpy {m1:.1} GB/s on 1 thread, {mall:.1} GB/s on {} (read + write); CPU f32 GEMM {gemm:.1} GFLOP/s",
            rayon::current_num_threads()
        );
        let weight_bytes = cfg.num_experts * 3 * cfg.hidden * cfg.intermediate * wdt.size();
        println!("  generating {:.2} GB of expert weights per routing mode ...", weight_bytes as f64 / 1e9);
        (m1, mall, gemm)
    } else {
        (0.0, 0.0, 0.0)
    };
    let bar = root.then(|| {
        let b = ProgressBar::new((routings.len() * args.tokens.len()) as u64);
        b.set_style(ProgressStyle::with_template("  {bar:30} {pos}/{len} points {elapsed}").expect("template"));
        b
    });

    let t0 = Instant::now();
    let mut warm_ups = Vec::new();
    let mut points = Vec::new();
    for &skew in &routings {
        let job = RankJob {
            cfg: &cfg,
            weights: spec,
            placement: &placement,
            backend,
            gpu_per_rank: args.gpu_per_rank,
            cpu_gemm_panels: args.cpu_gemm_panels,
            tokens: &args.tokens,
            seed: args.seed,
            skew,
            warmup: args.warmup,
            warm: std::time::Duration::from_millis(args.warm_ms.unwrap_or(if backend == "cpu" { 0 } else { 1000 })),
            iters: args.iters,
            bar: bar.as_ref(),
        };
        let per_rank: Vec<(WarmUpReport, Sweep)> = match mpi.take() {
            Some(g) => {
                let (mine, g) = run_rank(g, &job).map_err(|e| e.to_string())?;
                let all = moe_ep_tools::gather_json(&g, &mine)?;
                mpi = Some(g);
                all
            }
            None => {
                let outs = LocalGroup::run(args.world, Duration::from_secs(600), |g| {
                    let job = RankJob { bar: if g.rank() == 0 { job.bar } else { None }, ..job };
                    run_rank(g, &job).map(|(out, _)| out)
                })
                .map_err(|e| e.to_string())?;
                let mut per_rank = Vec::new();
                for (r, o) in outs.into_iter().enumerate() {
                    per_rank.push(o.map_err(|_| format!("rank {r} panicked"))?.map_err(|e| e.to_string())?);
                }
                per_rank
            }
        };
        if !root {
            continue;
        }
        warm_ups.push(per_rank[0].0.clone());
        for (i, &n) in args.tokens.iter().enumerate() {
            let runs: Vec<&[(f64, ForwardStats)]> = per_rank.iter().map(|r| r.1[i].as_slice()).collect();
            let eb = spec.expert_bytes(cfg.hidden, cfg.intermediate);
            points.push(summarize(&cfg, &runs, n, (args.world, eb), skew, backend, memcpy_all, gemm));
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if !root {
        return Ok(());
    }
    println!("  setup and {} points took {:.1} s", points.len(), t0.elapsed().as_secs_f64());
    for (w, skew) in warm_ups.iter().zip(&routings) {
        println!(
            "  warm-up ({}): {} ({}), crossover {}",
            if *skew { "skewed" } else { "uniform" },
            fmt_time(w.total_s),
            w.crossover_source,
            w.crossover.map_or("none: the CPU runs every call".into(), |n| format!("GPU from {n} tokens"))
        );
        for pt in &w.points {
            println!("    N={:<5} cpu {:>10}  gpu {:>10}", pt.tokens, fmt_time(pt.cpu_s), fmt_time(pt.gpu_s));
        }
    }

    if points.len() == 1 {
        let pt = &points[0];
        println!("\n  {:<14} {:>12} {:>8}", "stage", "time", "share");
        let sum: f64 = pt.stages.iter().map(|s| s.1).sum();
        for (n, t) in &pt.stages {
            println!("  {:<14} {:>12} {:>7.1}%", n, fmt_time(*t), 100.0 * t / sum);
        }
        println!("  {:<14} {:>12}", "forward", fmt_time(pt.forward_s));
    }
    println!(
        "\n  {:<8} {:>6} {:>10} {:>12} {:>10} {:>10} {:>10} {:>18} {:>12} {:>18}",
        "routing",
        "N",
        "forward",
        "tokens/s",
        "exchange",
        "experts",
        "other",
        "move GB/s (memcpy)",
        "weight GB/s",
        "expert GFLOP/s"
    );
    for pt in &points {
        let stage = |name: &str| pt.stages.iter().find(|s| s.0 == name).map_or(0.0, |s| s.1);
        let exchange = stage("exchange") + stage("exchange_back");
        let other = pt.forward_s - exchange - pt.experts_s;
        println!(
            "  {:<8} {:>6} {:>10} {:>12.0} {:>10} {:>10} {:>10} {:>10.2} ({:>4.1}%) {:>12.1} {:>10.1}{}",
            pt.routing,
            pt.tokens_per_rank,
            fmt_time(pt.forward_s),
            (pt.tokens_per_rank * args.world) as f64 / pt.forward_s,
            fmt_time(exchange),
            fmt_time(pt.experts_s),
            fmt_time(other.max(0.0)),
            pt.movement_gbps,
            100.0 * pt.movement_fraction_of_memcpy,
            pt.expert_weight_gbps,
            pt.expert_gflops,
            pt.expert_fraction_of_cpu_gemm.map_or(String::new(), |f| format!(" ({:.1}% GEMM)", 100.0 * f)),
        );
    }
    let last = &points[points.len() - 1].last_stats_rank0;
    println!(
        "  rank 0, last point: rows sent per rank {:?}, received {:?}, dropped {}",
        last.rows_sent, last.rows_received, last.dropped
    );
    if points.iter().any(|p| p.last_stats_rank0.gpu_submits > 0) {
        println!(
            "\n  rank 0, host traffic and GPU time per forward (last call):\n  {:<8} {:>6} {:>12} {:>12} {:>12} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "routing", "N", "up (rows)", "up (index)", "back", "submits", "router", "gather", "ffn", "combine"
        );
        for pt in &points {
            let s = &pt.last_stats_rank0;
            let g = s.gpu_times.unwrap_or_default();
            println!(
                "  {:<8} {:>6} {:>12} {:>12} {:>12} {:>4}/{:<3} {:>10} {:>10} {:>10} {:>10}",
                pt.routing,
                pt.tokens_per_rank,
                s.host_upload_bytes,
                s.host_index_bytes,
                s.host_readback_bytes,
                s.gpu_submits,
                s.gpu_waits,
                fmt_time(g.router),
                fmt_time(g.gather),
                fmt_time(g.ffn),
                fmt_time(g.combine)
            );
        }
    }

    if let Some(path) = &args.json {
        let report = Report {
            preset: p,
            config: cfg.clone(),
            world: args.world,
            group: args.group.clone(),
            backend: backend.into(),
            iters: args.iters,
            memcpy_1t_gbps: memcpy_1t,
            memcpy_all_gbps: memcpy_all,
            cpu_gemm_gflops: gemm,
            warm_up: warm_ups,
            points,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("  wrote {}", path.display());
    }
    Ok(())
}

/// One point from every rank's timed calls: per call the slowest rank, then the median.
#[allow(clippy::too_many_arguments)]
fn summarize(
    cfg: &moe_ep::MoeConfig,
    runs: &[&[(f64, ForwardStats)]],
    n: usize,
    (world, expert_bytes): (usize, usize),
    skew: bool,
    backend: &str,
    memcpy_all: f64,
    gemm: f64,
) -> Point {
    let iters = runs[0].len();
    let slowest = |f: &dyn Fn(&(f64, ForwardStats)) -> f64| -> f64 {
        median(&(0..iters).map(|i| runs.iter().map(|r| f(&r[i])).fold(0.0, f64::max)).collect::<Vec<_>>())
    };
    let names = runs[0][0].1.times.entries().map(|(n, _)| n);
    let stages: Vec<(String, f64)> =
        names.iter().enumerate().map(|(i, n)| (n.to_string(), slowest(&|s| s.1.times.entries()[i].1))).collect();
    let rb = cfg.hidden * cfg.act_dtype.size();
    let movement_bytes = world * floor::dispatch_combine_bytes(n, cfg.top_k, rb);
    let movement_s = slowest(&|s| {
        let t = &s.1.times;
        t.plan + t.pack + t.exchange + t.scatter + t.gather + t.exchange_back + t.combine
    });
    let movement_gbps = movement_bytes as f64 / movement_s / 1e9;
    let expert_flops = floor::expert_flops(n * world * cfg.top_k, cfg.hidden, cfg.intermediate);
    // On a GPU the experts run inside a stretch of recorded work: their GPU time (timestamps)
    // is the figure; on the CPU the stage's wall time.
    let experts_s = slowest(&|s| s.1.gpu_times.map_or(s.1.times.experts, |g| g.ffn));
    let expert_gflops = expert_flops / experts_s / 1e9;
    let last = iters - 1;
    let active: usize = runs.iter().map(|r| r[last].1.rows_per_local_expert.iter().filter(|&&c| c > 0).count()).sum();
    let expert_weight_bytes = active * expert_bytes;
    let on_cpu = runs[0].iter().all(|r| r.1.backend == "cpu");
    Point {
        routing: if skew { "skewed" } else { "uniform" }.into(),
        tokens_per_rank: n,
        forward_s: slowest(&|s| s.0),
        stages,
        movement_bytes,
        movement_s,
        movement_gbps,
        movement_fraction_of_memcpy: movement_gbps / memcpy_all,
        expert_flops,
        experts_s,
        expert_gflops,
        // Each rank's experts run on its own share of the cores; the floor is all cores.
        expert_fraction_of_cpu_gemm: (on_cpu || backend == "cpu").then(|| expert_gflops / gemm),
        expert_weight_bytes,
        expert_weight_gbps: expert_weight_bytes as f64 / experts_s / 1e9,
        last_stats_rank0: runs[0][iters - 1].1.clone(),
    }
}
