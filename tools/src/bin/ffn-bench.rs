//! ffn-bench: the grouped expert FFN on the CPU and the GPU at decode and prefill sizes, each
//! against its floor measured in the same run: decode streams every active expert's weights
//! once (GB/s against the memory bandwidth: a device copy kernel on the GPU, a parallel memcpy
//! on the CPU); prefill is FLOP-bound (TFLOP/s; the CPU against the GEMM crate's own rate on
//! square products on every core, the GPU beside PyTorch's, `tools/scripts/torch_ffn.py`).
//! Then the CPU/GPU crossover a layer of this shape measures at warm-up.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin ffn-bench -- --preset mixtral-8x7b --weights bf16 --act bf16
//! ffn-bench --suite --torch tools/scripts/torch_ffn.py --json benchmarks/ffn-h200.json
//! ```
//!
//! `--suite` times the GPU FFN (bf16) at issue 15's shapes and sizes, DeepSeek-V3 (E=256,
//! D=7168, F=2048, k=8), Qwen3-30B-A3B (E=128, D=2048, F=768, k=8) and Mixtral-8x7B (E=8,
//! D=4096, F=14336, k=2), and, with `--torch`, PyTorch (`tools/scripts/torch_ffn.py`:
//! `torch._grouped_mm`) on the same expert row counts in the same command; `--json` then gets
//! the list of points `{shape, tokens, rows, moe_ep_s, torch_s, torch_impl, ..}`.
//! `--sweep-up` / `--sweep-down` also time each projection alone with the listed
//! cooperative-matrix tiles (`BMxBNxBKwWMxWNbNBUFvSVsS`, e.g. `16x64x64w1x4b2v1s16`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::{CpuEngine, DType, Engine, ExpertSet, LayerOptions, LocalGroup, MoeLayer, Placement, Tensor, random};
use moe_ep_tools::{WeightsSpec, fmt_time, init_tracing, median, preset};
use moe_ep_wgpu::ffn::{DeviceExperts, FfnKernels, Run, WeightFormat};
use moe_ep_wgpu::kernels::MmaTile;
use moe_ep_wgpu::ops::Gather;
use moe_ep_wgpu::timing::{GpuTimer, LaunchProfile};
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
    /// Weights: f32, f16, bf16, or packed: q4, q8 (MLX affine, groups of 64, bf16 scales),
    /// q4g32 (another group), mxfp4, fp8 (E4M3, 128 x 128 block scales).
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
    /// GPU: run each point's call untimed for at least this long first (milliseconds), so the
    /// card's clocks have left their idle state (an idle H200's SM clock reads 345 MHz, 1980
    /// under load); a few milliseconds of timed runs after seconds of host-side work measure
    /// the idle clocks (on the H200: Mixtral-8x7B N=1 1.35 ms cold, 304 us warm; 300 ms of
    /// warm-up once left a point at 2.4x its time in the runs before and after).
    #[arg(long, default_value_t = 1000)]
    warm_ms: u64,
    /// Also time the up projection alone with each of these cooperative-matrix tiles
    /// (tuning), as BMxBNxBKwWMxWNbNBUFvSVsS, e.g. 16x64x64w1x4b2v1s16; a `p1` suffix times
    /// the tile without its products, `p2` without its loads from memory (timing probes).
    #[arg(long, value_delimiter = ',')]
    sweep_up: Vec<String>,
    /// Likewise for the down projection.
    #[arg(long, value_delimiter = ',')]
    sweep_down: Vec<String>,
    /// Also time each point with the decode kernel for experts of up to each of these row
    /// counts (at most 16) and the cooperative kernel above (tuning the split).
    #[arg(long, value_delimiter = ',')]
    decode_max: Vec<usize>,
    /// Also time each launch of one call of each point alone (its own pass between two
    /// timestamps) and print them.
    #[arg(long)]
    launches: bool,
    /// Run issue 15's suite (three shapes, GPU only) instead of one preset.
    #[arg(long)]
    suite: bool,
    /// Sweeps only at these token counts (default: every size).
    #[arg(long, value_delimiter = ',')]
    sweep_tokens: Vec<usize>,
    /// Suite: first measure what a fresh engine costs before its first FFN call: opening a
    /// device, and compiling the FFN pipelines of a small layer (D=48, F=40, bf16 weights).
    #[arg(long)]
    startup: bool,
    /// Suite: only shapes whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// tools/scripts/torch_ffn.py: time PyTorch on the same row counts in the same command.
    #[arg(long)]
    torch: Option<std::path::PathBuf>,
    /// Distinct expert weights generated on the host; the other experts repeat them (each
    /// expert still has its own device memory). 0: all distinct.
    #[arg(long, default_value_t = 0)]
    distinct: usize,
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
    if a.suite {
        return suite(&a);
    }
    let p = preset(&a.preset)?;
    let (spec, act): (WeightsSpec, DType) = (a.weights.parse()?, a.act.parse()?);
    let wdt = spec.dense_dtype();
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
        "shape: {} ({local} local experts, D={d}, F={f}, k={k}), weights {spec}, activations {act}; {:.2} GB of expert weights",
        p.name,
        (local * spec.expert_bytes(d, f)) as f64 / 1e9
    );
    let t = Instant::now();
    let experts = ExpertSet::new(spec.experts(&cfg, 1, &(0..local).collect::<Vec<_>>()));
    println!("weights generated in {}", fmt_time(t.elapsed().as_secs_f64()));
    let mut rep = Report {
        preset: p.name.into(),
        local_experts: local,
        hidden: d,
        intermediate: f,
        top_k: k,
        weights: spec.to_string(),
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
        // The bytes a call streams: each active expert's matrices as held (packed: values and
        // scales).
        let weight_bytes = (active * spec.expert_bytes(d, f)) as u64;
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
        println!("adapter: {}; matrix units: {:?}", ctx.describe(), ctx.ffn_matrix());
        let timer = GpuTimer::new(&ctx, a.iters)?;
        let copy = gpu_copy_gbps(&ctx, &timer, a.iters)?;
        println!("GPU floor: copy kernel {copy:.0} GB/s (read + write)");
        rep.adapter = Some(ctx.describe());
        rep.gpu_copy_gbps = Some(copy);
        let engine = GpuEngine::with_context(ctx.clone());
        let dev = engine.resident(&experts)?;
        let sweep = Sweep::parse(&a, &ctx)?;
        let warm = Duration::from_millis(a.warm_ms);
        for &(phase, tokens) in &sizes {
            let counts = route_counts(tokens, k, local, tokens as u64);
            let call = Call::new(&ctx, act, d, &counts, tokens)?;
            let kernels = FfnKernels::Auto { deterministic: a.deterministic };
            let secs = call.time(&ctx, &timer, &dev, kernels, a.iters, warm)?;
            rep.points.push(point("gpu", phase, tokens, &counts, secs, copy, None));
            if a.launches {
                call.profile(&ctx, &dev, kernels)?;
            }
            sweep.run(&ctx, &timer, &dev, &call, a.iters)?;
            call.recycle(&ctx);
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

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One call's device buffers: the batch (random rows) and the output.
struct Call {
    act: DType,
    offs: Vec<usize>,
    batch: moe_ep_wgpu::wgpu::Buffer,
    out: moe_ep_wgpu::wgpu::Buffer,
}

impl Call {
    fn new(ctx: &GpuContext, act: DType, d: usize, counts: &[usize], seed: usize) -> Res<Call> {
        let offs = ffn_offsets(counts);
        let rows = *offs.last().unwrap();
        let x = random::uniform(act, rows, d, 1.0, 2, seed as u64);
        let batch = ctx.upload("ffn batch", x.as_bytes())?;
        let out = ctx.storage("ffn output", x.as_bytes().len() as u64)?;
        Ok(Call { act, offs, batch, out })
    }

    /// Record this call with `kernels` into `enc` (its scratch buffers pushed on `scratch`).
    fn encode(
        &self,
        ctx: &GpuContext,
        dev: &DeviceExperts,
        kernels: FfnKernels,
        enc: &mut moe_ep_wgpu::wgpu::CommandEncoder,
        scratch: &mut Vec<moe_ep_wgpu::wgpu::Buffer>,
    ) -> moe_ep::Result<()> {
        ctx.encode_ffn_with(enc, dev, self.act, &self.offs, kernels, &self.batch, &self.out, scratch)
    }

    /// Median GPU time of `iters` calls with `kernels`, after untimed calls (the first
    /// compiles) repeated for at least `warm` of wall time.
    fn time(
        &self,
        ctx: &GpuContext,
        timer: &GpuTimer,
        dev: &DeviceExperts,
        kernels: FfnKernels,
        iters: u32,
        warm: Duration,
    ) -> Res<f64> {
        let mut scratch = Vec::new();
        let start = Instant::now();
        let mut batch = 1;
        loop {
            let mut enc = ctx.encoder("ffn warm");
            for _ in 0..batch {
                self.encode(ctx, dev, kernels, &mut enc, &mut scratch)?;
            }
            ctx.submit(enc)?;
            ctx.wait()?;
            for b in scratch.drain(..) {
                ctx.recycle(b);
            }
            if start.elapsed() >= warm {
                break;
            }
            batch = (batch * 2).min(64);
        }
        let mut failed = None;
        let times = timer.time(ctx, iters, |enc| {
            if let Err(e) = self.encode(ctx, dev, kernels, enc, &mut scratch) {
                failed = Some(e);
            }
        });
        for b in scratch {
            ctx.recycle(b);
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(median(&times?))
    }

    /// Time each launch of one call with `kernels` alone and print them with their sum.
    fn profile(&self, ctx: &GpuContext, dev: &DeviceExperts, kernels: FfnKernels) -> Res<()> {
        let profile = Arc::new(LaunchProfile::new(ctx, 512)?);
        ctx.profile_launches(Some(profile.clone()));
        let mut scratch = Vec::new();
        let mut enc = ctx.encoder("ffn profiled");
        let res = self.encode(ctx, dev, kernels, &mut enc, &mut scratch);
        ctx.profile_launches(None);
        res?;
        ctx.submit(enc)?;
        let launches = profile.take(ctx)?;
        for b in scratch {
            ctx.recycle(b);
        }
        let total: f64 = launches.iter().map(|l| l.1).sum();
        println!("    launches, each alone ({} in all, {}):", launches.len(), fmt_time(total));
        for (label, secs) in launches {
            println!("      {:>10}  {label}", fmt_time(secs));
        }
        Ok(())
    }

    fn recycle(self, ctx: &GpuContext) {
        ctx.recycle(self.batch);
        ctx.recycle(self.out);
    }
}

/// Tiles to time each projection with alone (`--sweep-up`, `--sweep-down`).
struct Sweep {
    up: Vec<MmaTile>,
    down: Vec<MmaTile>,
    decode_max: Vec<usize>,
}

impl Sweep {
    fn parse(a: &Args, ctx: &GpuContext) -> Res<Sweep> {
        let sg = ctx.ffn_matrix().map_or(32, |u| u.subgroup);
        let parse = |v: &[String]| -> Res<Vec<MmaTile>> {
            v.iter()
                .map(|s| {
                    MmaTile::parse(s, sg)
                        .ok_or_else(|| format!("tile {s:?}: not a valid BMxBNxBKwWMxWNbNBUFvSVsS").into())
                })
                .collect()
        };
        Ok(Sweep { up: parse(&a.sweep_up)?, down: parse(&a.sweep_down)?, decode_max: a.decode_max.clone() })
    }

    /// Time the default tiles' projections alone, then each listed tile's; print them.
    fn run(&self, ctx: &GpuContext, timer: &GpuTimer, dev: &DeviceExperts, call: &Call, iters: u32) -> Res<()> {
        if ctx.ffn_matrix().is_none() {
            return Ok(());
        }
        let line = |label: String, k: FfnKernels, iters: u32| match call.time(
            ctx,
            timer,
            dev,
            k,
            iters,
            Duration::from_millis(20),
        ) {
            Ok(t) => println!("    {label:<40} {}", fmt_time(t)),
            Err(e) => println!("    {label:<40} failed: {e}"),
        };
        for &m in &self.decode_max {
            line(format!("decode kernel up to {m} rows"), FfnKernels::Mixed { decode_max: m }, iters);
        }
        if self.up.is_empty() && self.down.is_empty() {
            return Ok(());
        }
        // Each projection alone, with fewer runs (the tiles' sweeps are long).
        let tile_iters = iters.min(10);
        let up = |t| FfnKernels::Mma { up: t, down: None, run: Run::Up };
        let down = |t| FfnKernels::Mma { up: None, down: t, run: Run::Down };
        line("up alone, default tiles".into(), up(None), tile_iters);
        line("down alone, default tiles".into(), down(None), tile_iters);
        for &t in &self.up {
            line(format!("up alone, {}", t.label()), up(Some(t)), tile_iters);
        }
        for &t in &self.down {
            line(format!("down alone, {}", t.label()), down(Some(t)), tile_iters);
        }
        Ok(())
    }
}

/// One point of the suite's JSON (`benchmarks/ffn-<card>.json`).
#[derive(Serialize, Debug)]
struct SuitePoint {
    shape: String,
    tokens: usize,
    rows: usize,
    moe_ep_s: f64,
    torch_s: Option<f64>,
    torch_impl: Option<String>,
    active_experts: usize,
    weight_bytes: u64,
    weight_gbps: f64,
    copy_gbps: f64,
    fraction_of_copy: f64,
    tflops: f64,
    /// torch_s / moe_ep_s: above 1 moe-ep is faster.
    torch_over_moe_ep: Option<f64>,
    adapter: String,
}

/// (name, experts, hidden, intermediate, top-k, tokens per call) of issue 15's measurements.
const SUITE: &[Shape<'static>] = &[
    ("deepseek-v3", 256, 7168, 2048, 8, &[1, 16, 128, 512, 4096]),
    ("qwen3-30b-a3b", 128, 2048, 768, 8, &[1, 16, 128, 4096]),
    ("mixtral-8x7b", 8, 4096, 14336, 2, &[1, 16, 64, 512, 2048]),
    // Only with `--only smoke`: a small shape for trying the tool anywhere.
    ("smoke", 16, 256, 512, 4, &[1, 16, 64]),
];

fn suite(a: &Args) -> Res<()> {
    let act: DType = a.act.parse()?;
    let ctx = Arc::new(GpuContext::new(&ContextOptions::from_env())?);
    println!("adapter: {}; matrix units: {:?}", ctx.describe(), ctx.ffn_matrix());
    let timer = GpuTimer::new(&ctx, a.iters)?;
    let copy = gpu_copy_gbps(&ctx, &timer, a.iters)?;
    println!("GPU floor: copy kernel {copy:.0} GB/s (read + write)");
    let sweep = Sweep::parse(a, &ctx)?;
    if a.startup {
        startup(act)?;
    }
    let mut points = Vec::new();
    for &(name, e, d, f, k, tokens) in SUITE {
        let picked = a.only.as_deref().map_or(name != "smoke", |o| name.contains(o));
        if !picked {
            continue;
        }
        points.extend(suite_shape(a, &ctx, &timer, &sweep, act, copy, (name, e, d, f, k, tokens))?);
        if let Some(path) = &a.json {
            std::fs::write(path, serde_json::to_string_pretty(&points)?)?;
        }
    }
    if let Some(path) = &a.json {
        println!("wrote {}", path.display());
    }
    Ok(())
}

type Shape<'a> = (&'a str, usize, usize, usize, usize, &'a [usize]);

fn suite_shape(
    a: &Args,
    ctx: &GpuContext,
    timer: &GpuTimer,
    sweep: &Sweep,
    act: DType,
    copy: f64,
    (name, e, d, f, k, tokens): Shape<'_>,
) -> Res<Vec<SuitePoint>> {
    let spec: WeightsSpec = a.weights.parse()?;
    let wdt = spec.dense_dtype();
    let cfg = moe_ep::MoeConfig::new(e, d, f, k).with_dtypes(act, wdt);
    let distinct = if a.distinct == 0 { e } else { a.distinct.min(e) };
    let t = Instant::now();
    let host = spec.experts(&cfg, 1, &(0..distinct).collect::<Vec<_>>());
    let refs: Vec<&moe_ep::ExpertWeights> = (0..e).map(|i| &host[i % distinct]).collect();
    let gen_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let format = if ctx.ffn_matrix().is_some() { WeightFormat::F16Scaled } else { WeightFormat::Native };
    let dev = DeviceExperts::upload_weights(ctx, &refs, moe_ep::model::config::Activation::Silu, format)?;
    ctx.wait()?;
    let up_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let compiled = ctx.prepare_ffn(&dev, act)?;
    println!(
        "{name}: E={e} D={d} F={f} k={k}, {spec} weights ({distinct} distinct on the host), {act} activations; \
         generated in {}, uploaded ({:.1} GB) in {}; {compiled} pipelines compiled in {}",
        fmt_time(gen_s),
        dev.bytes as f64 / 1e9,
        fmt_time(up_s),
        fmt_time(t.elapsed().as_secs_f64())
    );
    let mut points = Vec::new();
    let mut calls = Vec::new();
    let warm = Duration::from_millis(a.warm_ms);
    for &n in tokens {
        let counts = route_counts(n, k, e, n as u64);
        let call = Call::new(ctx, act, d, &counts, n)?;
        let secs = call.time(ctx, timer, &dev, FfnKernels::Auto { deterministic: false }, a.iters, warm)?;
        let rows: usize = counts.iter().sum();
        let active = counts.iter().filter(|&&c| c > 0).count();
        let most = counts.iter().max().copied().unwrap_or(0);
        // The bytes a call streams: each active expert's matrices as held (packed: values and
        // scales).
        let weight_bytes = (active * spec.expert_bytes(d, f)) as u64;
        let gbps = weight_bytes as f64 / secs / 1e9;
        let tflops = 6.0 * (rows * d * f) as f64 / secs / 1e12;
        println!(
            "  N={n:<5} rows={rows:<6} active={active:<3} most={most:<4} {:>10}  weights {gbps:>7.0} GB/s ({:>5.1}% of copy)  {tflops:>7.1} TFLOP/s",
            fmt_time(secs),
            100.0 * gbps / copy
        );
        if a.launches {
            call.profile(ctx, &dev, FfnKernels::Auto { deterministic: false })?;
        }
        if a.sweep_tokens.is_empty() || a.sweep_tokens.contains(&n) {
            sweep.run(ctx, timer, &dev, &call, a.iters)?;
        }
        call.recycle(ctx);
        points.push(SuitePoint {
            shape: name.into(),
            tokens: n,
            rows,
            moe_ep_s: secs,
            torch_s: None,
            torch_impl: None,
            active_experts: active,
            weight_bytes,
            weight_gbps: gbps,
            copy_gbps: copy,
            fraction_of_copy: gbps / copy,
            tflops,
            torch_over_moe_ep: None,
            adapter: ctx.describe(),
        });
        calls.push(serde_json::json!({"tokens": n, "counts": counts}));
    }
    drop(dev);
    ctx.wait()?;
    if let Some(script) = &a.torch {
        torch_points(script, name, (e, d, f), &calls, a.iters, &mut points)?;
    }
    Ok(points)
}

/// Run the PyTorch script on the same row counts and fill in its times.
fn torch_points(
    script: &std::path::Path,
    name: &str,
    (e, d, f): (usize, usize, usize),
    calls: &[serde_json::Value],
    iters: u32,
    points: &mut [SuitePoint],
) -> Res<()> {
    let dir = std::env::temp_dir();
    let counts = dir.join(format!("ffn-bench-{name}-counts.json"));
    let out = dir.join(format!("ffn-bench-{name}-torch.json"));
    std::fs::write(&counts, serde_json::to_string(calls)?)?;
    let status = std::process::Command::new("python3")
        .arg(script)
        .args(["--hidden", &d.to_string(), "--intermediate", &f.to_string(), "--experts", &e.to_string()])
        .args(["--iters", &iters.to_string(), "--counts-json"])
        .arg(&counts)
        .arg("--json")
        .arg(&out)
        .status()?;
    if !status.success() {
        println!("  torch: {} exited with {status}", script.display());
        return Ok(());
    }
    let res: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    for (pt, tp) in points.iter_mut().zip(res["points"].as_array().into_iter().flatten()) {
        let t = tp["median_s"].as_f64();
        pt.torch_s = t;
        pt.torch_impl = tp["impl"].as_str().map(str::to_string);
        pt.torch_over_moe_ep = t.map(|t| t / pt.moe_ep_s);
        println!(
            "  {name} N={:<5} moe-ep {:>10}  torch {:>10}  torch/moe-ep {:.2}",
            pt.tokens,
            fmt_time(pt.moe_ep_s),
            t.map_or("-".into(), fmt_time),
            pt.torch_over_moe_ep.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// What a fresh engine pays before its first call, three times: a device, and the FFN
/// pipelines of a small layer (what each engine of a test on its own context compiles).
fn startup(act: DType) -> Res<()> {
    for wdt in [DType::BF16, DType::F16] {
        let cfg = moe_ep::MoeConfig::new(8, 48, 40, 2).with_dtypes(act, wdt);
        let set = moe_ep::ExpertSet::new(random::experts(&cfg, 1, &(0..8).collect::<Vec<_>>()));
        for i in 0..3 {
            let t = Instant::now();
            let ctx = GpuContext::new(&ContextOptions::from_env())?;
            let open = t.elapsed().as_secs_f64();
            let dev = DeviceExperts::upload(&ctx, &set)?;
            let t = Instant::now();
            let mut n = 0;
            for a in [act, DType::F32] {
                n += ctx.prepare_ffn(&dev, a)?;
            }
            println!(
                "startup {i} ({wdt} weights): device opened in {}, {n} FFN pipelines (both modes, {act} and f32 rows) compiled in {}",
                fmt_time(open),
                fmt_time(t.elapsed().as_secs_f64())
            );
        }
    }
    Ok(())
}
