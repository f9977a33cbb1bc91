//! ep-bench: one expert-parallel MoE layer over thread ranks (or MPI processes), timed stage
//! by stage.
//!
//! Prints the per-stage time table (median over iterations of the slowest rank), the layer
//! time, and the data-movement and FLOP rates against the floors measured in the same run.
//!
//! Over MPI (built with `--features mpi`): `mpirun -n 4 ep-bench --group mpi`; one rank per
//! process, rank 0 prints.

use std::time::{Duration, Instant};

use clap::Parser;
use moe_ep::{
    BackendChoice, Capacity, DType, Engine, ForwardStats, Group, LayerOptions, LocalGroup, MoeLayer, OnGpuError,
    Placement, floor, random,
};
use moe_ep_tools::{fmt_time, median, preset};
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
    /// Tokens per rank.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Activation dtype (f32, f16, bf16).
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Weight dtype; defaults to the activation dtype.
    #[arg(long)]
    weight_dtype: Option<DType>,
    /// Capacity factor (dropless when absent).
    #[arg(long)]
    capacity_factor: Option<f32>,
    /// Route every token's first choice to expert 0 (worst-case load imbalance).
    #[arg(long)]
    skew: bool,
    /// Compute backend: auto gives the layer the GPU when wgpu finds one (not a software driver
    /// such as lavapipe) and lets its policy choose per call: the CPU below the crossover that
    /// warm-up measures, the GPU from it on; wgpu runs every call on any adapter (MOE_EP_ADAPTER
    /// / WGPU_BACKEND choose), failing on a GPU error; cpu never uses a GPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "wgpu"])]
    backend: String,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Report {
    preset: &'static moe_ep_tools::Preset,
    config: moe_ep::MoeConfig,
    world: usize,
    tokens_per_rank: usize,
    backend: String,
    iters: usize,
    /// Median over iterations of the slowest rank's forward, seconds.
    forward_s: f64,
    /// Per stage: median over iterations of the slowest rank, seconds.
    stages: Vec<(String, f64)>,
    movement_bytes: usize,
    movement_s: f64,
    movement_gbps: f64,
    memcpy_1t_gbps: f64,
    memcpy_all_gbps: f64,
    expert_flops: f64,
    experts_s: f64,
    /// Rank 0's stats of the last iteration.
    last_stats_rank0: ForwardStats,
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
    placement: &'a Placement,
    backend: &'a str,
    tokens: usize,
    seed: u64,
    skew: bool,
    warmup: usize,
    iters: usize,
}

/// One rank: build its layer, then time `warmup + iters` forwards (each after a barrier);
/// the timed ones' (wall seconds, stats), and the group back.
fn run_rank<G: Group>(g: G, job: &RankJob<'_>) -> moe_ep::Result<(Vec<(f64, ForwardStats)>, G)> {
    let (cfg, rank) = (job.cfg, g.rank());
    let mut w = random::layer_weights(cfg, job.seed, job.placement, rank);
    let mut x = random::input(cfg, job.tokens, job.seed, rank);
    if job.skew {
        (w.router, x) = (random::skewed_gate(&w.router), random::skewed_input(&x));
    }
    let (p, c) = (job.placement.clone(), cfg.clone());
    let layer = match job.backend {
        "cpu" => MoeLayer::from_weights(g, c, p, w, None, LayerOptions::default())?,
        policy => {
            let e = GpuEngine::new(&ContextOptions::from_env())?;
            if rank == 0 {
                println!("  rank 0 GPU engine: {}", e.name());
            }
            let options = match policy {
                "wgpu" => {
                    LayerOptions { backend: BackendChoice::Gpu, on_gpu_error: OnGpuError::Fatal, ..Default::default() }
                }
                _ => LayerOptions::default(),
            };
            MoeLayer::from_weights(g, c, p, w, Some(Box::new(e)), options)?
        }
    };
    let report = layer.warm_up()?;
    if rank == 0 {
        println!(
            "  rank 0 warm-up: {} ({}), crossover {}",
            fmt_time(report.total_s),
            report.crossover_source,
            report.crossover.map_or("none: the CPU runs every call".into(), |n| format!("GPU from {n} tokens"))
        );
        for pt in &report.points {
            println!("    N={:<5} cpu {:>10}  gpu {:>10}", pt.tokens, fmt_time(pt.cpu_s), fmt_time(pt.gpu_s));
        }
    }
    let mut out = Vec::with_capacity(job.iters);
    for i in 0..job.warmup + job.iters {
        layer.group().barrier()?;
        let t = Instant::now();
        let (_, stats) = layer.forward_with_stats(&x)?;
        let wall = t.elapsed().as_secs_f64();
        if i >= job.warmup {
            out.push((wall, stats));
        }
    }
    Ok((out, layer.into_group()))
}

fn run(mut args: Args) -> Result<(), String> {
    let mpi = if args.group == "mpi" { Some(moe_ep_tools::mpi_group("ep-bench")?) } else { None };
    if let Some(g) = &mpi {
        args.world = g.size();
    }
    let root = mpi.as_ref().is_none_or(|g| g.rank() == 0);
    let p = preset(&args.config)?;
    let wdt = args.weight_dtype.unwrap_or(args.dtype);
    let mut cfg = p.config(args.dtype, wdt);
    if let Some(f) = args.capacity_factor {
        cfg = cfg.with_capacity(Capacity::Factor(f));
    }
    cfg.validate().map_err(|e| e.to_string())?;
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
    let job = RankJob {
        cfg: &cfg,
        placement: &placement,
        backend,
        tokens: args.tokens,
        seed: args.seed,
        skew: args.skew,
        warmup: args.warmup,
        iters: args.iters,
    };
    if !root {
        // Other MPI ranks: the same layer, silently; rank 0 reports.
        let g = mpi.expect("only MPI has other ranks");
        let (mine, g) = run_rank(g, &job).map_err(|e| e.to_string())?;
        moe_ep_tools::gather_json(&g, &mine)?;
        return Ok(());
    }

    println!(
        "ep-bench: {} (E={}, D={}, F={}, k={}), {} ranks as {}, {} tokens per rank",
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
        "  activations {}, weights {}, {}, backend {backend} ({} CPU threads){}",
        cfg.act_dtype,
        cfg.weight_dtype,
        if args.capacity_factor.is_some() { "capacity factor" } else { "dropless" },
        rayon::current_num_threads(),
        if args.skew { ", skewed routing" } else { "" }
    );
    if args.backend == "auto" {
        match gpus.first() {
            Some(g) => println!("  auto: wgpu found {g}: the layer's policy picks CPU or GPU per call"),
            None => println!("  auto: wgpu found no GPU (software drivers are skipped), so the CPU runs every stage"),
        }
    }

    let memcpy_1t = floor::memcpy_gbps(256 << 20, 1, 5);
    let memcpy_all = floor::memcpy_gbps(256 << 20, rayon::current_num_threads(), 5);
    println!(
        "  floor: memcpy {memcpy_1t:.1} GB/s on 1 thread, {memcpy_all:.1} GB/s on {} (read + write)",
        rayon::current_num_threads()
    );

    let weight_bytes = cfg.num_experts * 3 * cfg.hidden * cfg.intermediate * wdt.size();
    println!("  generating {:.2} GB of expert weights ...", weight_bytes as f64 / 1e9);
    let t0 = Instant::now();
    let total_iters = args.warmup + args.iters;
    let per_rank = match mpi {
        Some(g) => {
            let (mine, g) = run_rank(g, &job).map_err(|e| e.to_string())?;
            moe_ep_tools::gather_json(&g, &mine)?
        }
        None => {
            let outs = LocalGroup::run(args.world, Duration::from_secs(600), |g| run_rank(g, &job).map(|(out, _)| out))
                .map_err(|e| e.to_string())?;
            let mut per_rank = Vec::new();
            for (r, o) in outs.into_iter().enumerate() {
                per_rank.push(o.map_err(|_| format!("rank {r} panicked"))?.map_err(|e| e.to_string())?);
            }
            per_rank
        }
    };
    println!("  setup + {total_iters} iterations took {:.1} s", t0.elapsed().as_secs_f64());

    // Per iteration, the slowest rank; then the median over iterations.
    let slowest = |f: &dyn Fn(&(f64, ForwardStats)) -> f64| -> f64 {
        let per_iter: Vec<f64> =
            (0..args.iters).map(|i| per_rank.iter().map(|r| f(&r[i])).fold(0.0, f64::max)).collect();
        median(&per_iter)
    };
    let forward = slowest(&|s| s.0);
    let names = per_rank[0][0].1.times.entries().map(|(n, _)| n);
    let stages: Vec<(String, f64)> =
        names.iter().enumerate().map(|(i, n)| (n.to_string(), slowest(&|s| s.1.times.entries()[i].1))).collect();

    println!("\n  {:<14} {:>12} {:>8}", "stage", "time", "share");
    let sum: f64 = stages.iter().map(|s| s.1).sum();
    for (n, t) in &stages {
        println!("  {:<14} {:>12} {:>7.1}%", n, fmt_time(*t), 100.0 * t / sum);
    }
    println!("  {:<14} {:>12}", "forward", fmt_time(forward));
    println!("  {:.0} tokens/s over all ranks", (args.tokens * args.world) as f64 / forward);

    let rb = cfg.hidden * cfg.act_dtype.size();
    let movement_bytes = args.world * floor::dispatch_combine_bytes(args.tokens, cfg.top_k, rb);
    let movement = slowest(&|s| {
        let t = &s.1.times;
        t.plan + t.pack + t.exchange + t.scatter + t.gather + t.exchange_back + t.combine
    });
    let gbps = movement_bytes as f64 / movement / 1e9;
    println!(
        "\n  dispatch + combine: {:.1} MB moved (model bytes, all ranks) in {} = {gbps:.2} GB/s; floor memcpy {memcpy_all:.1} GB/s -> {:.1}%",
        movement_bytes as f64 / 1e6,
        fmt_time(movement),
        100.0 * gbps / memcpy_all
    );
    let flops = floor::expert_flops(args.tokens * args.world * cfg.top_k, cfg.hidden, cfg.intermediate);
    let experts = slowest(&|s| s.1.times.experts);
    println!(
        "  experts: {:.1} GFLOP in {} = {:.1} GFLOP/s (slowest rank)",
        flops / 1e9,
        fmt_time(experts),
        flops / experts / 1e9
    );
    let s0 = &per_rank[0][args.iters - 1].1;
    println!(
        "  rank 0: rows sent per rank {:?}, received {:?}, dropped {}",
        s0.rows_sent, s0.rows_received, s0.dropped
    );

    if let Some(path) = &args.json {
        let report = Report {
            preset: p,
            config: cfg.clone(),
            world: args.world,
            tokens_per_rank: args.tokens,
            backend: backend.into(),
            iters: args.iters,
            forward_s: forward,
            stages,
            movement_bytes,
            movement_s: movement,
            movement_gbps: gbps,
            memcpy_1t_gbps: memcpy_1t,
            memcpy_all_gbps: memcpy_all,
            expert_flops: flops,
            experts_s: experts,
            last_stats_rank0: s0.clone(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("  wrote {}", path.display());
    }
    Ok(())
}
