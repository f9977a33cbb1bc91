//! moe-run: load one MoE layer of a Hugging Face checkpoint (config.json + safetensors) on
//! thread ranks, each rank mapping only the router and its own experts, and run it on random
//! inputs: bytes read per rank against the files' size, then per-stage times.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin moe-run -- --checkpoint ~/models/Qwen3-30B-A3B --layer 1 --world 4
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use moe_ep::{
    BackendChoice, Checkpoint, ForwardStats, Group, LayerOptions, LocalGroup, MoeLayer, Placement, StageTimes, random,
};
use moe_ep_tools::{fmt_time, init_tracing, median};
use moe_ep_wgpu::{ContextOptions, GpuEngine};

#[derive(Parser, Debug)]
#[command(about = "Run one MoE layer of a safetensors checkpoint over thread ranks")]
struct Args {
    /// Directory with config.json and model.safetensors (or an index and its shards).
    #[arg(long)]
    checkpoint: std::path::PathBuf,
    /// Decoder layer (must be an MoE layer).
    #[arg(long)]
    layer: usize,
    /// Ranks (threads); experts are placed in contiguous blocks.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Tokens per rank (random inputs).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// cpu, gpu (every call on wgpu's adapter) or auto (the layer's measured crossover).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "gpu", "auto"])]
    backend: String,
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.1} kB", b as f64 / 1e3),
    }
}

fn main() {
    init_tracing();
    if let Err(e) = run(Args::parse()) {
        eprintln!("moe-run: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let probe = Checkpoint::open(&a.checkpoint)?;
    let cfg = probe.moe_config(a.layer)?;
    println!(
        "{:?} layer {}: E={} D={} F={} k={} {}, renormalised {}; files {}",
        probe.family(),
        a.layer,
        cfg.num_experts,
        cfg.hidden,
        cfg.intermediate,
        cfg.top_k,
        cfg.weight_dtype,
        cfg.norm_topk_prob,
        fmt_bytes(probe.file_bytes())
    );
    drop(probe);
    let placement = Placement::contiguous(cfg.num_experts, a.world)?;
    let results = LocalGroup::run(a.world, Duration::from_secs(600), |g| {
        let rank = g.rank();
        let t = Instant::now();
        let ckpt = Checkpoint::open(&a.checkpoint)?;
        let gate = ckpt.router(a.layer)?;
        let mine = ckpt.experts(a.layer, placement.experts_of(rank))?;
        let load = (t.elapsed().as_secs_f64(), ckpt.bytes_read(), ckpt.file_bytes());
        let (c, p) = (cfg.clone(), placement.clone());
        let layer = match a.backend.as_str() {
            "cpu" => MoeLayer::new(g, c, p, gate, mine)?,
            choice => {
                let e = GpuEngine::new(&ContextOptions::from_env())?;
                let backend = if choice == "gpu" { BackendChoice::Gpu } else { BackendChoice::Auto };
                MoeLayer::with_gpu(g, c, p, gate, mine, Box::new(e), LayerOptions { backend, ..Default::default() })?
            }
        };
        layer.warm_up()?;
        let x = random::input(&cfg, a.tokens, 7, rank);
        let mut runs: Vec<(f64, ForwardStats)> = Vec::with_capacity(a.iters);
        for _ in 0..a.iters {
            layer.group().barrier()?;
            let t = Instant::now();
            let (_, s) = layer.forward_with_stats(&x)?;
            runs.push((t.elapsed().as_secs_f64(), s));
        }
        Ok::<_, moe_ep::Error>((load, runs))
    })?;
    for (r, res) in results.into_iter().enumerate() {
        let ((secs, read, total), runs) = res.map_err(|_| format!("rank {r} panicked"))??;
        println!(
            "rank {r}: read {} of {} ({:.1}%) in {}; {} experts",
            fmt_bytes(read),
            fmt_bytes(total),
            100.0 * read as f64 / total as f64,
            fmt_time(secs),
            placement.experts_of(r).len()
        );
        if r == 0 {
            let walls: Vec<f64> = runs.iter().map(|(w, _)| *w).collect();
            println!(
                "rank 0: forward median {} over {} calls ({})",
                fmt_time(median(&walls)),
                a.iters,
                runs[0].1.backend
            );
            let stage = |f: fn(&StageTimes) -> f64| median(&runs.iter().map(|(_, s)| f(&s.times)).collect::<Vec<_>>());
            for (name, _) in runs[0].1.times.entries() {
                let v = stage(match name {
                    "route" => |t| t.route,
                    "plan" => |t| t.plan,
                    "pack" => |t| t.pack,
                    "exchange" => |t| t.exchange,
                    "scatter" => |t| t.scatter,
                    "experts" => |t| t.experts,
                    "gather" => |t| t.gather,
                    "exchange_back" => |t| t.exchange_back,
                    _ => |t| t.combine,
                });
                println!("  {name:<14} {:>10}", fmt_time(v));
            }
        }
    }
    Ok(())
}
