//! gpu-bench: the GPU data-path kernels at one shape, each timed with GPU timestamps against a
//! wgpu buffer copy of the same bytes measured in the same run (and a copy kernel, the identity
//! gather, which shows what a shader can move); then the host-visible latency of
//! each engine stage (upload, kernel, readback) at a decode-sized batch.
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin gpu-bench -- --tokens 4096 --hidden 7168 --top-k 8 --dtype bf16
//! ```

use std::time::Instant;

use clap::Parser;
use moe_ep::{CpuEngine, DType, Engine, Tensor, random};
use moe_ep_tools::{fmt_time, init_tracing, median};
use moe_ep_wgpu::ops::{Combine, Gather, Launch};
use moe_ep_wgpu::timing::GpuTimer;
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "GPU data-path kernels against a device copy, and per-stage latency at decode size")]
struct Args {
    /// Tokens N on this rank.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Hidden size D.
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Experts per token k.
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    /// Ranks: the share (world - 1) / world of rows is remote.
    #[arg(long, default_value_t = 8)]
    world: usize,
    /// Activation dtype: f32, f16, bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed runs per kernel (median reported).
    #[arg(long, default_value_t = 50)]
    iters: u32,
    /// Tokens of the latency section (0 skips it).
    #[arg(long, default_value_t = 128)]
    latency_tokens: usize,
    /// Only the portable kernel variants (no adapter-specific faster ones).
    #[arg(long)]
    portable: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize, Debug)]
struct KernelFigure {
    stage: String,
    kernel: String,
    bytes: u64,
    median_us: f64,
    gbps: f64,
    fraction_of_copy: f64,
}

#[derive(Serialize, Debug)]
struct LatencyFigure {
    stage: String,
    gpu_median_us: f64,
    cpu_median_us: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    adapter: String,
    tokens: usize,
    hidden: usize,
    top_k: usize,
    world: usize,
    dtype: String,
    copy_bytes: u64,
    copy_median_us: f64,
    copy_gbps: f64,
    kernels: Vec<KernelFigure>,
    latency_tokens: usize,
    latency: Vec<LatencyFigure>,
}

fn perm(n: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    v.shuffle(rng);
    v
}

fn main() {
    init_tracing();
    if let Err(e) = run(Args::parse()) {
        eprintln!("gpu-bench: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dtype: DType = a.dtype.parse()?;
    let ctx = GpuContext::new(&ContextOptions { fast_variants: !a.portable, ..ContextOptions::from_env() })?;
    let adapter = ctx.describe();
    println!("adapter: {adapter}{}", if a.portable { " (portable kernels only)" } else { "" });
    let timer = GpuTimer::new(&ctx, a.iters)?;
    let (n, k, d) = (a.tokens, a.top_k, a.hidden);
    let rb = d * dtype.size();
    let slots = n * k;
    let remote = slots * (a.world - 1) / a.world.max(1);
    let local = slots - remote;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!(
        "shape: N={n} D={d} k={k} {dtype}, world {} ({remote} remote rows, {local} local), {} MB of routed rows",
        a.world,
        slots as u64 * rb as u64 / 1_000_000
    );

    // Device buffers, filled with random rows.
    let x = random::uniform(dtype, n, d, 1.0, 1, 0);
    let recv = random::uniform(dtype, remote, d, 1.0, 2, 0);
    let batch = random::uniform(dtype, slots, d, 1.0, 3, 0);
    let xb = ctx.upload("x", x.as_bytes())?;
    let recvb = ctx.upload("recv", recv.as_bytes())?;
    let batchb = ctx.upload("batch", batch.as_bytes())?;
    let out_rows = ctx.storage("out rows", (slots * rb) as u64)?;
    let y = ctx.storage("y", (n * rb) as u64)?;

    // Indices as the plan makes them: pack reads each token k times in destination order,
    // scatter reads every received row and the local ones, gather back permutes the batch,
    // combine reads each token's k rows from the outputs and the received-back rows.
    let tokens_k: Vec<u32> = {
        let mut v: Vec<u32> = (0..slots as u32).map(|s| s / k as u32).collect();
        v.shuffle(&mut rng);
        v
    };
    let pack_idx = ctx.upload("pack idx", bytemuck::cast_slice(&tokens_k))?;
    let scatter_src: Vec<u32> = {
        let mut v: Vec<u32> = (0..remote as u32).collect();
        v.extend(tokens_k[..local].iter().map(|&t| remote as u32 + t));
        v.shuffle(&mut rng);
        v
    };
    let scatter_idx = ctx.upload("scatter idx", bytemuck::cast_slice(&scatter_src))?;
    let back_idx = ctx.upload("gather back idx", bytemuck::cast_slice(&perm(slots, &mut rng)))?;
    let combine_src = perm(slots, &mut rng);
    let combine_idx = ctx.upload("combine idx", bytemuck::cast_slice(&combine_src))?;
    let weights: Vec<f32> = random::uniform(DType::F32, slots, 1, 1.0, 4, 0).to_f32_vec();
    let wb = ctx.upload("weights", bytemuck::cast_slice(&weights))?;
    let outputs_rows = local; // combine source a: this rank's outputs; b: received back

    let gather =
        |src: &moe_ep_wgpu::wgpu::Buffer, src_rows, b: Option<(&moe_ep_wgpu::wgpu::Buffer, usize)>, idx, rows| {
            // SAFETY: every index built above is in range for its sources.
            unsafe {
                ctx.gather_unchecked(&Gather {
                    a: src,
                    a_rows: src_rows,
                    b: b.map(|(b, _)| b),
                    b_rows: b.map_or(0, |(_, r)| r),
                    idx,
                    dst: &out_rows,
                    rows,
                    row_bytes: rb,
                })
            }
        };
    let combine_args = Combine {
        a: &batchb,
        a_rows: outputs_rows,
        b: Some(&out_rows),
        b_rows: slots - outputs_rows,
        idx: &combine_idx,
        c: None,
        c_rows: 0,
        weights: moe_ep_wgpu::ops::CombineWeights::PerSlot(&wb),
        dst: &y,
        rows: n,
        k,
        dtype,
        row_bytes: rb,
    };
    let combine_bytes = ((slots + n) * rb) as u64;
    let identity: Vec<u32> = (0..slots as u32).collect();
    let identity_idx = ctx.upload("identity idx", bytemuck::cast_slice(&identity))?;
    let launches: Vec<(&str, Launch, u64)> = vec![
        (
            "copy kernel (gather_rows, identity order)",
            gather(&batchb, slots, None, &identity_idx, slots)?,
            2 * (slots * rb) as u64,
        ),
        ("pack (packet_gather)", gather(&xb, n, None, &pack_idx, slots)?, 2 * (slots * rb) as u64),
        (
            "scatter (dispatch_local + scatter_remote)",
            gather(&recvb, remote, Some((&xb, n)), &scatter_idx, slots)?,
            2 * (slots * rb) as u64,
        ),
        (
            "gather back (combine_gather_remote)",
            gather(&batchb, slots, None, &back_idx, slots)?,
            2 * (slots * rb) as u64,
        ),
        // SAFETY: the combine indices are a permutation of the sources' rows.
        ("combine (zero-copy weighted sum)", unsafe { ctx.combine_unchecked(&combine_args) }?, combine_bytes),
        ("combine, bounds-checked (safe ops API)", ctx.combine(&combine_args)?, combine_bytes),
    ];

    // The floor: a buffer copy of the routed rows, in the same run.
    let copy_bytes = (slots * rb) as u64;
    let copy_dst = ctx.storage("copy dst", copy_bytes)?;
    let copy_times =
        timer.time(&ctx, a.iters, |enc| enc.copy_buffer_to_buffer(&batchb, 0, &copy_dst, 0, copy_bytes))?;
    let copy_t = median(&copy_times[1..]);
    let copy_gbps = 2.0 * copy_bytes as f64 / copy_t / 1e9;
    println!("\n{:<44} {:>10} {:>11} {:>10}", "stage", "median", "GB/s", "of copy");
    println!(
        "{:<44} {:>10} {:>11.0} {:>10}",
        "device copy (copy_buffer_to_buffer, r+w)",
        fmt_time(copy_t),
        copy_gbps,
        "1.00"
    );
    let mut kernels = Vec::new();
    for (stage, launch, bytes) in &launches {
        let times = timer.time(&ctx, a.iters, |enc| launch.encode_pass(enc))?;
        let t = median(&times[1..]);
        let gbps = *bytes as f64 / t / 1e9;
        println!("{stage:<44} {:>10} {gbps:>11.0} {:>10.2}", fmt_time(t), gbps / copy_gbps);
        kernels.push(KernelFigure {
            stage: stage.to_string(),
            kernel: launch.label().to_string(),
            bytes: *bytes,
            median_us: t * 1e6,
            gbps,
            fraction_of_copy: gbps / copy_gbps,
        });
    }

    // Host-visible latency per stage at decode size: upload, one submit, readback.
    let mut latency = Vec::new();
    if a.latency_tokens > 0 {
        let nl = a.latency_tokens;
        let gpu = GpuEngine::with_context(std::sync::Arc::new(ctx));
        let x = random::uniform(dtype, nl, d, 1.0, 5, 0);
        let rows = random::uniform(dtype, nl * k, d, 1.0, 6, 0);
        let idx: Vec<u32> = {
            let mut v: Vec<u32> = (0..(nl * k) as u32).map(|s| s / k as u32).collect();
            v.shuffle(&mut rng);
            v
        };
        let p = perm(nl * k, &mut rng);
        let w = random::uniform(DType::F32, nl * k, 1, 1.0, 7, 0).to_f32_vec();
        println!("\nlatency at N={nl} (upload + kernel + readback, wall clock, median of {})", a.iters);
        println!("{:<44} {:>10} {:>10}", "stage", "wgpu", "cpu");
        type Stage<'s> = Box<dyn Fn(&dyn Engine) -> moe_ep::Result<()> + 's>;
        let stages: Vec<(&str, Stage)> = vec![
            ("pack", Box::new(|e: &dyn Engine| e.gather_rows(&[&x], &idx, &mut Tensor::zeros(dtype, nl * k, d)))),
            (
                "gather back",
                Box::new(|e: &dyn Engine| e.gather_rows(&[&rows], &p, &mut Tensor::zeros(dtype, nl * k, d))),
            ),
            (
                "combine",
                Box::new(|e: &dyn Engine| e.weighted_sum(&[&rows], &p, &w, k, &mut Tensor::zeros(dtype, nl, d))),
            ),
        ];
        for (name, f) in &stages {
            let time = |e: &dyn Engine| -> moe_ep::Result<f64> {
                f(e)?;
                let mut v = Vec::new();
                for _ in 0..a.iters {
                    let t = Instant::now();
                    f(e)?;
                    v.push(t.elapsed().as_secs_f64());
                }
                Ok(median(&v))
            };
            let (g, c) = (time(&gpu)?, time(&CpuEngine)?);
            println!("{name:<44} {:>10} {:>10}", fmt_time(g), fmt_time(c));
            latency.push(LatencyFigure { stage: name.to_string(), gpu_median_us: g * 1e6, cpu_median_us: c * 1e6 });
        }
    }

    if let Some(path) = a.json {
        let report = Report {
            adapter,
            tokens: n,
            hidden: d,
            top_k: k,
            world: a.world,
            dtype: dtype.to_string(),
            copy_bytes,
            copy_median_us: copy_t * 1e6,
            copy_gbps,
            kernels,
            latency_tokens: a.latency_tokens,
            latency,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
