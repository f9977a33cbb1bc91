//! ep-vs-tp: the same MoE layer (same weights, same inputs) as expert parallelism
//! (`MoeLayer`) and as tensor parallelism (`TpLayer`), timed end to end over a sweep of tokens
//! per rank. Each point is the median over iterations of the slowest rank's forward, after
//! warm-up; EP and TP calls alternate so drift hits both alike.
//!
//! Prints the table (EP time, TP time, TP/EP = EP's speedup, per N), the geometric means over
//! decode (N <= 64) and prefill (N >= 256) points, writes JSON and an SVG plot.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin ep-vs-tp -- --config deepseek-v3-scaled --world 2 --backend wgpu
//! mpirun -n 2 target/release/ep-vs-tp --group mpi ...        # built with --features mpi
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use moe_ep::layer::tp::tp_weights;
use moe_ep::{
    CpuEngine, DType, Engine, ForwardStats, Group, LayerWeights, LocalGroup, MoeConfig, MoeLayer, Placement, TpLayer,
    random,
};
use moe_ep_tools::{fmt_time, gather_json, median, mpi_group, preset};
use moe_ep_wgpu::{ContextOptions, GpuEngine};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Clone)]
#[command(about = "Expert parallelism against tensor parallelism on the same layer, end to end, over a token sweep")]
struct Args {
    /// Layer shape (see ep-bench --help): deepseek-v3-scaled, deepseek-v2-lite, qwen3-30b-a3b, mixtral-8x7b, tiny.
    #[arg(long, default_value = "deepseek-v3-scaled")]
    config: String,
    /// Ranks (threads). With `--group mpi` the MPI job's size instead.
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
    group: String,
    /// Engine of both layers: cpu, wgpu (every call on wgpu's adapter, one device per rank), or
    /// auto (wgpu when it finds a GPU that is not a software driver, else cpu).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "wgpu"])]
    backend: String,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// One GPU per rank (rank r takes the r-th GPU of the host) instead of every rank on the best one.
    #[arg(long)]
    gpu_per_rank: bool,
    /// Smallest and largest tokens per rank of the sweep (powers of two between).
    #[arg(long, default_value_t = 1)]
    min_tokens: usize,
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Stop the sweep after a point whose EP + TP calls took longer than this on some rank.
    #[arg(long, default_value_t = 60.0)]
    point_budget_s: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draw both curves as SVG here.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

/// One rank's timings at one token count.
#[derive(Serialize, Deserialize, Clone)]
struct RankPoint {
    tokens: usize,
    ep_s: Vec<f64>,
    tp_s: Vec<f64>,
    ep_last: ForwardStats,
    tp_last: ForwardStats,
}

/// One point of the table: medians over iterations of the slowest rank.
#[derive(Serialize)]
struct Point {
    tokens_per_rank: usize,
    ep_s: f64,
    tp_s: f64,
    /// TP time / EP time: above 1, EP is faster.
    ep_speedup: f64,
    /// Per stage, median of the slowest rank (the TP layer's stages as its docs map them).
    ep_stages: Vec<(String, f64)>,
    tp_stages: Vec<(String, f64)>,
}

#[derive(Serialize)]
struct Report {
    config: MoeConfig,
    preset: &'static moe_ep_tools::Preset,
    world: usize,
    group: String,
    backend: String,
    engine: String,
    iters: usize,
    points: Vec<Point>,
    /// Geometric means of TP/EP over N <= 64 and N >= 256 (None without such points).
    decode_ep_speedup: Option<f64>,
    prefill_ep_speedup: Option<f64>,
    stopped_early: Option<String>,
}

fn main() {
    moe_ep_tools::init_tracing();
    if let Err(e) = run(Args::parse()) {
        eprintln!("ep-vs-tp: {e}");
        std::process::exit(1);
    }
}

fn make_engine(backend: &str, device: Option<usize>) -> moe_ep::Result<Box<dyn Engine>> {
    Ok(match backend {
        "wgpu" => Box::new(GpuEngine::new(&ContextOptions { device_index: device, ..ContextOptions::from_env() })?),
        _ => Box::new(CpuEngine),
    })
}

/// One rank: build both layers, warm them up, sweep. Returns its points and the group back.
fn run_rank<G: Group>(
    g: &G,
    a: &Args,
    cfg: &MoeConfig,
    full: &LayerWeights,
    sweep: &[usize],
    bar: Option<&ProgressBar>,
) -> moe_ep::Result<(Vec<RankPoint>, Option<String>, String)> {
    let (rank, world) = (g.rank(), g.size());
    let placement = Placement::balanced(cfg.num_experts, world)?;
    let ep_w = full.ep_share(&placement, rank)?;
    let tp_w = tp_weights(full, cfg, rank, world)?;
    let device = a.gpu_per_rank.then_some(rank);
    let engine = make_engine(a.backend.as_str(), device)?;
    let engine_name = engine.name();
    let ep = MoeLayer::with_engine_weights(g, cfg.clone(), placement, ep_w, engine)?;
    let tp = TpLayer::new(g, cfg.clone(), tp_w, make_engine(a.backend.as_str(), device)?)?;
    ep.warm_up()?;
    tp.warm_up(world * a.max_tokens)?;
    let mut points = Vec::new();
    let mut stopped = None;
    for &n in sweep {
        let x = random::input(cfg, n, a.seed, rank);
        let t0 = Instant::now();
        let (mut ep_s, mut tp_s) = (Vec::new(), Vec::new());
        let (mut ep_last, mut tp_last) = (ForwardStats::default(), ForwardStats::default());
        for i in 0..a.warmup + a.iters {
            g.barrier()?;
            let t = Instant::now();
            let (_, s) = ep.forward_with_stats(&x)?;
            let e = t.elapsed().as_secs_f64();
            g.barrier()?;
            let t = Instant::now();
            let (_, u) = tp.forward_with_stats(&x)?;
            let p = t.elapsed().as_secs_f64();
            if i >= a.warmup {
                ep_s.push(e);
                tp_s.push(p);
                (ep_last, tp_last) = (s, u);
            }
        }
        points.push(RankPoint { tokens: n, ep_s, tp_s, ep_last, tp_last });
        if let Some(b) = bar {
            b.inc(1);
        }
        // Every rank learns whether any went over the budget, so all stop together.
        let spent = g.all_gather_u64(&[t0.elapsed().as_millis() as u64])?;
        let worst = spent.iter().copied().max().unwrap_or(0) as f64 / 1e3;
        if worst > a.point_budget_s && Some(&n) != sweep.last() {
            stopped =
                Some(format!("stopped after N={n}: that point took {worst:.1} s (budget {} s)", a.point_budget_s));
            break;
        }
    }
    Ok((points, stopped, engine_name))
}

fn geomean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp())
}

fn run(mut a: Args) -> Result<(), String> {
    let mpi = if a.group == "mpi" { Some(mpi_group("ep-vs-tp")?) } else { None };
    if let Some(g) = &mpi {
        a.world = g.size();
    }
    let root = mpi.as_ref().is_none_or(|g| g.rank() == 0);
    let p = preset(&a.config)?;
    let cfg = p.config(a.dtype, a.dtype);
    cfg.validate().map_err(|e| e.to_string())?;
    if a.backend == "auto" {
        let gpu = moe_ep_wgpu::list_adapters().into_iter().any(|x| x.device_type != moe_ep_wgpu::wgpu::DeviceType::Cpu);
        a.backend = if gpu { "wgpu" } else { "cpu" }.into();
    }
    if a.min_tokens == 0 || a.max_tokens < a.min_tokens {
        return Err(format!("bad sweep {}..={}", a.min_tokens, a.max_tokens));
    }
    let sweep: Vec<usize> =
        std::iter::successors(Some(a.min_tokens), |&n| Some(n * 2)).take_while(|&n| n <= a.max_tokens).collect();
    if root {
        println!(
            "ep-vs-tp: {} (E={}, D={}, F={}, k={}, {}), {} ranks as {}, backend {}; N per rank {:?}",
            p.name,
            cfg.num_experts,
            cfg.hidden,
            cfg.intermediate,
            cfg.top_k,
            cfg.act_dtype,
            a.world,
            if a.group == "mpi" { "MPI processes" } else { "threads" },
            a.backend,
            sweep
        );
        if !p.note.is_empty() {
            println!("  note: {}", p.note);
        }
        println!(
            "  EP: each rank owns {} experts whole; TP: each rank owns 1/{} of every expert's F, all-gathers the \
             tokens and reduce-scatters the partial outputs",
            cfg.num_experts.div_ceil(a.world),
            a.world
        );
    }
    let all = Placement::contiguous(cfg.num_experts, 1).map_err(|e| e.to_string())?;
    let full = random::layer_weights(&cfg, a.seed, &all, 0);
    let bar = root.then(|| {
        let b = ProgressBar::new(sweep.len() as u64);
        b.set_style(ProgressStyle::with_template("  {bar:30} {pos}/{len} points {elapsed}").expect("template"));
        b
    });
    let (per_rank, stopped, engine) = match mpi {
        Some(g) => {
            let (mine, stopped, engine) =
                run_rank(&g, &a, &cfg, &full, &sweep, bar.as_ref()).map_err(|e| e.to_string())?;
            (gather_json(&g, &mine)?, stopped, engine)
        }
        None => {
            let outs = LocalGroup::run(a.world, Duration::from_secs(3600), |g| {
                let b = (g.rank() == 0).then_some(bar.as_ref()).flatten();
                run_rank(&g, &a, &cfg, &full, &sweep, b)
            })
            .map_err(|e| e.to_string())?;
            let mut v = Vec::new();
            let mut info = (None, String::new());
            for (r, o) in outs.into_iter().enumerate() {
                let (pts, stopped, engine) = o.map_err(|_| format!("rank {r} panicked"))?.map_err(|e| e.to_string())?;
                if r == 0 {
                    info = (stopped, engine);
                }
                v.push(pts);
            }
            (v, info.0, info.1)
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if !root {
        return Ok(());
    }

    let points: Vec<Point> = (0..per_rank[0].len())
        .map(|i| {
            let iters = per_rank[0][i].ep_s.len();
            let slowest = |f: &dyn Fn(&RankPoint, usize) -> f64| {
                median(
                    &(0..iters).map(|j| per_rank.iter().map(|r| f(&r[i], j)).fold(0.0, f64::max)).collect::<Vec<_>>(),
                )
            };
            let (ep_s, tp_s) = (slowest(&|r, j| r.ep_s[j]), slowest(&|r, j| r.tp_s[j]));
            let stages = |tp: bool| {
                let last = |r: &RankPoint| if tp { r.tp_last.clone() } else { r.ep_last.clone() };
                let names = last(&per_rank[0][i]).times.entries().map(|(n, _)| n);
                names
                    .iter()
                    .enumerate()
                    .map(|(s, n)| {
                        let worst = per_rank.iter().map(|r| last(&r[i]).times.entries()[s].1).fold(0.0, f64::max);
                        (n.to_string(), worst)
                    })
                    .collect()
            };
            Point {
                tokens_per_rank: per_rank[0][i].tokens,
                ep_s,
                tp_s,
                ep_speedup: tp_s / ep_s,
                ep_stages: stages(false),
                tp_stages: stages(true),
            }
        })
        .collect();

    println!("\n  {:>6} {:>12} {:>12} {:>8}", "N", "EP", "TP", "TP/EP");
    for pt in &points {
        println!(
            "  {:>6} {:>12} {:>12} {:>7.2}x",
            pt.tokens_per_rank,
            fmt_time(pt.ep_s),
            fmt_time(pt.tp_s),
            pt.ep_speedup
        );
    }
    let speedups = |keep: &dyn Fn(usize) -> bool| {
        geomean(&points.iter().filter(|p| keep(p.tokens_per_rank)).map(|p| p.ep_speedup).collect::<Vec<_>>())
    };
    let decode = speedups(&|n| n <= 64);
    let prefill = speedups(&|n| n >= 256);
    let show = |v: Option<f64>| v.map_or("no points".into(), |v| format!("{v:.2}x"));
    println!("  decode (N <= 64) geometric mean TP/EP: {}   target >= 3x", show(decode));
    println!("  prefill (N >= 256) geometric mean TP/EP: {}   target >= 1x", show(prefill));
    if let Some(s) = &stopped {
        println!("  {s}");
    }
    println!("  engine: {engine}; medians of {} calls after {} warm-up, slowest rank per call", a.iters, a.warmup);

    let report = Report {
        config: cfg.clone(),
        preset: p,
        world: a.world,
        group: a.group.clone(),
        backend: a.backend.clone(),
        engine: engine.clone(),
        iters: a.iters,
        points,
        decode_ep_speedup: decode,
        prefill_ep_speedup: prefill,
        stopped_early: stopped,
    };
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("  wrote {}", path.display());
    }
    if let Some(path) = &a.svg {
        let title = format!("{} on {} ranks, {}", p.name, a.world, engine);
        moe_ep_tools::plot::ep_vs_tp_svg(
            path,
            &title,
            &report.points.iter().map(|p| (p.tokens_per_rank, p.ep_s, p.tp_s)).collect::<Vec<_>>(),
        )?;
        println!("  wrote {}", path.display());
    }
    Ok(())
}
