//! moe-run: load one MoE layer of a Hugging Face checkpoint (config.json + safetensors) on
//! thread ranks or MPI processes, each rank reading only the router (with its bias), the shared
//! expert and its own experts, and run it on random inputs: bytes read and held per rank
//! against the files' size, the resident set, then per-stage times. It first prints what it
//! found: the family, the experts' layout (per-expert or fused) and encoding (f32, f16, bf16,
//! FP8 or MXFP4 decoded to bf16), the weights' dtype. An unsupported family, encoding or
//! routing rule is an error that lists what is supported.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin moe-run -- --checkpoint ~/models/Qwen3-30B-A3B --layer 1 --world 4
//! mpirun -n 4 target/release/moe-run --group mpi --checkpoint ~/models/DeepSeek-V2-Lite --layer 1   # --features mpi
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use moe_ep::{
    BackendChoice, Checkpoint, ForwardStats, Group, LayerOptions, LoadOptions, LocalGroup, MoeConfig, MoeLayer,
    Placement, Quantize, random,
};
use moe_ep_tools::{fmt_bytes, fmt_time, gather_json, init_tracing, median, mpi_group, resident_bytes};
use moe_ep_wgpu::{ContextOptions, GpuEngine};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "Run one MoE layer of a safetensors checkpoint over thread ranks or MPI processes")]
struct Args {
    /// Directory with config.json and model.safetensors (or an index and its shards).
    #[arg(long)]
    checkpoint: std::path::PathBuf,
    /// Decoder layer (must be an MoE layer).
    #[arg(long)]
    layer: usize,
    /// Ranks (threads); experts are placed in balanced contiguous blocks. With `--group mpi`
    /// the MPI job's size instead.
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Where ranks live: threads of this process, or MPI processes (run under mpirun; needs a
    /// build with `--features mpi`).
    #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
    group: String,
    /// Tokens per rank (random inputs).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// cpu, gpu (every call on wgpu's adapter) or auto (the layer's measured crossover).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "gpu", "auto"])]
    backend: String,
    /// Timed forward calls (at least one).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Decode quantized experts (FP8, MXFP4, MLX affine) at load instead of keeping them packed.
    #[arg(long)]
    decode: bool,
    /// Quantize dense experts at load with MLX's affine rounding: BITS,GROUP (4,64; 8,64, ...).
    #[arg(long, value_delimiter = ',')]
    quantize: Vec<u32>,
}

impl Args {
    fn load_options(&self) -> moe_ep::Result<LoadOptions> {
        let quantize = match self.quantize[..] {
            [] => None,
            [bits, group] => Some(Quantize::new(bits, group)?),
            _ => return Err(moe_ep::Error::invalid("--quantize takes BITS,GROUP")),
        };
        Ok(LoadOptions { decode: self.decode, quantize })
    }
}

fn main() {
    init_tracing();
    if let Err(e) = run(Args::parse()) {
        eprintln!("moe-run: {e}");
        std::process::exit(1);
    }
}

/// What one rank reports: load, memory, per-call (wall seconds, stats).
#[derive(Serialize, Deserialize)]
struct RankReport {
    rank: usize,
    experts: usize,
    load_s: f64,
    bytes_read: u64,
    file_bytes: u64,
    /// Bytes of the weights this rank holds (router, bias, shared expert, its experts).
    held_bytes: u64,
    /// Bytes of its routed experts as held (packed ones: values and scales), and the kinds.
    expert_bytes: u64,
    expert_kinds: String,
    /// This process's resident set after loading (with thread ranks: all ranks together).
    rss_after_load: Option<u64>,
    runs: Vec<(f64, ForwardStats)>,
}

/// One rank: open the checkpoint, read its share, build and warm the layer, time the calls.
fn run_rank<G: Group>(g: G, a: &Args, cfg: &MoeConfig, placement: &Placement) -> moe_ep::Result<(RankReport, G)> {
    let rank = g.rank();
    let t = Instant::now();
    let ckpt = Checkpoint::open(&a.checkpoint)?;
    let w = ckpt.layer_weights_with(a.layer, placement, rank, &a.load_options()?)?;
    let held_bytes = w.bytes() as u64;
    let expert_bytes = w.experts.iter().map(|e| e.bytes() as u64).sum();
    let expert_kinds = w.experts.first().map_or("none".into(), |e| format!("{:?}", e.kinds().map(|k| k.to_string())));
    let load_s = t.elapsed().as_secs_f64();
    let (bytes_read, file_bytes) = (ckpt.bytes_read(), ckpt.file_bytes());
    drop(ckpt);
    let rss_after_load = resident_bytes();
    let (c, p) = (cfg.clone(), placement.clone());
    let layer = match a.backend.as_str() {
        "cpu" => MoeLayer::from_weights(g, c, p, w, None, LayerOptions::default())?,
        choice => {
            let e = GpuEngine::new(&ContextOptions::from_env())?;
            let backend = if choice == "gpu" { BackendChoice::Gpu } else { BackendChoice::Auto };
            MoeLayer::from_weights(g, c, p, w, Some(Box::new(e)), LayerOptions { backend, ..Default::default() })?
        }
    };
    layer.warm_up()?;
    let x = random::input(cfg, a.tokens, 7, rank);
    let mut runs = Vec::new();
    for _ in 0..a.iters {
        layer.group().barrier()?;
        let t = Instant::now();
        let (_, s) = layer.forward_with_stats(&x)?;
        runs.push((t.elapsed().as_secs_f64(), s));
    }
    let experts = placement.experts_of(rank).len();
    let report = RankReport {
        rank,
        experts,
        load_s,
        bytes_read,
        file_bytes,
        held_bytes,
        expert_bytes,
        expert_kinds,
        rss_after_load,
        runs,
    };
    Ok((report, layer.into_group()))
}

fn run(mut a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mpi = if a.group == "mpi" { Some(mpi_group("moe-run")?) } else { None };
    if let Some(g) = &mpi {
        a.world = g.size();
    }
    let root = mpi.as_ref().is_none_or(|g| g.rank() == 0);
    let probe = Checkpoint::open(&a.checkpoint)?;
    let cfg = probe.moe_config(a.layer)?;
    let found = probe.found(a.layer)?;
    if root {
        println!("found: {found}");
        println!(
            "{:?} layer {}: E={} D={} F={} k={} {}, renormalised {}, routing {:?}, shared expert {:?}; files {}",
            probe.family(),
            a.layer,
            cfg.num_experts,
            cfg.hidden,
            cfg.intermediate,
            cfg.top_k,
            cfg.weight_dtype,
            cfg.norm_topk_prob,
            cfg.router,
            cfg.shared_expert,
            fmt_bytes(probe.file_bytes())
        );
    }
    drop(probe);
    let placement = Placement::balanced(cfg.num_experts, a.world)?;
    let reports: Vec<RankReport> = match mpi {
        Some(g) => {
            // Each process holds one rank: its resident set is that rank's alone.
            let (mine, g) = run_rank(g, &a, &cfg, &placement)?;
            gather_json(&g, &mine)?
        }
        None => {
            let results = LocalGroup::run(a.world, Duration::from_secs(600), |g| {
                run_rank(g, &a, &cfg, &placement).map(|(r, _)| r)
            })?;
            let mut v = Vec::new();
            for (r, res) in results.into_iter().enumerate() {
                v.push(res.map_err(|_| format!("rank {r} panicked"))??);
            }
            v
        }
    };
    if !root {
        return Ok(());
    }
    let ranks_per_process = if a.group == "mpi" { "one rank per process" } else { "all ranks in this process" };
    for r in &reports {
        println!(
            "rank {}: {} experts; read {} of {} ({:.1}%) in {}; holds {}; resident set {} ({ranks_per_process})",
            r.rank,
            r.experts,
            fmt_bytes(r.bytes_read),
            fmt_bytes(r.file_bytes),
            100.0 * r.bytes_read as f64 / r.file_bytes as f64,
            fmt_time(r.load_s),
            fmt_bytes(r.held_bytes),
            r.rss_after_load.map_or("n/a".into(), fmt_bytes),
        );
    }
    let runs = &reports[0].runs;
    let r0 = &reports[0];
    // Each expert with rows streams its weights once a call: rank 0's active experts' bytes
    // (as held, packed ones' values and scales) over its experts stage.
    let per_expert = r0.expert_bytes / r0.experts.max(1) as u64;
    let gbps: Vec<f64> = runs
        .iter()
        .map(|(_, s)| {
            let active = s.rows_per_local_expert.iter().filter(|&&c| c > 0).count() as u64;
            let t = s.gpu_times.map_or(s.times.experts, |g| g.ffn);
            (active * per_expert) as f64 / t / 1e9
        })
        .collect();
    println!(
        "rank 0 experts {}: {} held; expert weights streamed at {:.1} GB/s (median; active experts' bytes over the experts stage)",
        r0.expert_kinds,
        fmt_bytes(r0.expert_bytes),
        median(&gbps)
    );
    let walls: Vec<f64> = runs.iter().map(|(w, _)| *w).collect();
    println!("rank 0: forward median {} over {} calls ({})", fmt_time(median(&walls)), a.iters, runs[0].1.backend);
    for (i, (name, _)) in runs[0].1.times.entries().iter().enumerate() {
        let v = median(&runs.iter().map(|(_, s)| s.times.entries()[i].1).collect::<Vec<_>>());
        println!("  {name:<14} {:>10}", fmt_time(v));
    }
    Ok(())
}
