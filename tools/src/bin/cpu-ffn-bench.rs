//! cpu-ffn-bench: the CPU expert products by rows an expert, every candidate side by side, to
//! choose the path per row count (the crossovers in `moe_ep::compute::cpu::ffn::Plan`).
//!
//! For each dtype and each row count m, `--experts` distinct experts (enough to leave the
//! caches) each multiply m rows through gate, up and down, one expert a task on the rayon
//! pool, with:
//! - `rows`: moe-ep's row kernels (`gemv::rows_times_weight_rows`; bf16 on `vdpbf16ps` where
//!   the CPU has it);
//! - `gemmkit`: `gemm::gemm_bt` in the weights' dtype (bf16 on `vdpbf16ps` where it can);
//! - `gemmkit-prepacked`: the same products with each expert's weights packed once, before
//!   the timing, into gemmkit's panels (`cpu::panels`, what `ExpertSet::with_cpu_gemm_panels`
//!   holds: a second copy of the weights);
//! - `matrixmultiply`: f32 `sgemm`; for bf16 weights widened to f32 64 rows at a time first
//!   (the CPU FFN before issue 19);
//! - `ffn` and `ffn-det`: the whole `CpuEngine::ffn` over all those experts, default and
//!   deterministic (what the layer runs); `ffn-panels` on the set with its GEMM panels
//!   (`ExpertSet::with_cpu_gemm_panels`).
//!
//! `--packed q4,q8,mxfp4,fp8` also times packed experts (rows of `--packed-act`): their row
//! kernels by both paths (`rows`: decoded in registers; `rows-decode`: weight rows decoded
//! sixteen at a time; `cpu::packed::PackedPath`) and the FFN (the library's choice), weight
//! GB/s on the packed bytes (values and scales).
//!
//! Each figure prints beside its floors, measured in the same run: read bandwidth (weights
//! GB/s) and the square GEMM rate of gemmkit in that dtype (GFLOP/s).
//!
//! ```text
//! cargo run --release -p moe-ep-tools --bin cpu-ffn-bench -- --rows 1,2,4,8,16,32,64,128,256 --dtypes bf16,f32
//! ```

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use moe_ep::compute::cpu::gemm::{GemmElement, bf16, gemm_bt};
use moe_ep::compute::cpu::gemv::{self, Lhs};
use moe_ep::compute::cpu::packed::{self, PackedPath};
use moe_ep::compute::cpu::panels::{ExpertPanels, SetPanels, gemm_bt_panels};
use moe_ep::compute::engine::even_offsets;
use moe_ep::{Activation, CpuEngine, DType, Engine, ExpertSet, ExpertWeights, MoeConfig, Tensor, random};
use moe_ep_tools::{WeightsSpec, median};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "CPU expert products by rows an expert: row kernels, gemmkit, matrixmultiply, the FFN")]
struct Args {
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 768)]
    intermediate: usize,
    /// Distinct experts per measurement.
    #[arg(long, default_value_t = 48)]
    experts: usize,
    #[arg(long, default_value = "1,2,4,8,16,32,64,128,256", value_delimiter = ',')]
    rows: Vec<usize>,
    #[arg(long, default_value = "bf16,f32", value_delimiter = ',')]
    dtypes: Vec<DType>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Packed weight formats to time too (q4, q8, q4g32, mxfp4, fp8).
    #[arg(long, value_delimiter = ',')]
    packed: Vec<WeightsSpec>,
    /// Activation dtype of the packed runs.
    #[arg(long, default_value = "bf16")]
    packed_act: DType,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Row {
    dtype: DType,
    /// The weights: the dtype's, or a packed format.
    weights: String,
    rows_per_expert: usize,
    variant: &'static str,
    seconds: f64,
    gflops: f64,
    weight_gbps: f64,
}

#[derive(Serialize)]
struct Report {
    hidden: usize,
    intermediate: usize,
    experts: usize,
    threads: usize,
    read_gbps: f64,
    gemm_gflops: Vec<(DType, f64)>,
    rows: Vec<Row>,
}

fn main() {
    let args = Args::parse();
    let threads = rayon::current_num_threads();
    let read = read_gbps(1 << 29, 5);
    println!(
        "cpu-ffn-bench: D={} F={}, {} experts, {threads} threads; read bandwidth {read:.1} GB/s; row kernels {:?}",
        args.hidden,
        args.intermediate,
        args.experts,
        gemv::Kernel::available()
    );
    let mut report = Report {
        hidden: args.hidden,
        intermediate: args.intermediate,
        experts: args.experts,
        threads,
        read_gbps: read,
        gemm_gflops: Vec::new(),
        rows: Vec::new(),
    };
    for &dt in &args.dtypes {
        let gemm = match dt {
            DType::BF16 => square_gemm_gflops::<bf16>(1024),
            _ => square_gemm_gflops::<f32>(1024),
        };
        report.gemm_gflops.push((dt, gemm));
        println!("\n{dt}: gemmkit square GEMM 1024^3 on every thread {gemm:.0} GFLOP/s");
        println!("{:>5} {:<16} {:>10} {:>9} {:>9}", "m", "variant", "time", "GFLOP/s", "GB/s");
        let cfg = MoeConfig::new(args.experts, args.hidden, args.intermediate, 1).with_dtypes(dt, dt);
        let experts = random::experts(&cfg, 7, &(0..args.experts).collect::<Vec<_>>());
        for &m in &args.rows {
            for (variant, secs) in time_variants(&cfg, &experts, m, args.reps) {
                let flops = 6.0 * (m * args.hidden * args.intermediate * args.experts) as f64;
                let bytes = (3 * args.hidden * args.intermediate * args.experts * dt.size()) as f64;
                let r = Row {
                    dtype: dt,
                    weights: dt.to_string(),
                    rows_per_expert: m,
                    variant,
                    seconds: secs,
                    gflops: flops / secs / 1e9,
                    weight_gbps: bytes / secs / 1e9,
                };
                println!(
                    "{m:>5} {variant:<16} {:>8.2}ms {:>9.1} {:>5.1} ({:.0}% of read; {:.0}% of GEMM)",
                    secs * 1e3,
                    r.gflops,
                    r.weight_gbps,
                    100.0 * r.weight_gbps / read,
                    100.0 * r.gflops / gemm
                );
                report.rows.push(r);
            }
        }
    }
    for spec in &args.packed {
        packed_runs(&args, *spec, read, &mut report);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("wrote {}", path.display());
    }
}

/// Packed experts of `spec`: the row kernels on packed weights and the FFN, by rows an expert.
fn packed_runs(args: &Args, spec: WeightsSpec, read: f64, report: &mut Report) {
    let dt = args.packed_act;
    let (d, f, e) = (args.hidden, args.intermediate, args.experts);
    println!("\n{spec} weights, {dt} rows ({:.1} MB an expert, packed)", spec.expert_bytes(d, f) as f64 / 1e6);
    println!("{:>5} {:<16} {:>10} {:>9} {:>9}", "m", "variant", "time", "GFLOP/s", "GB/s");
    let cfg = MoeConfig::new(e, d, f, 1).with_dtypes(dt, DType::BF16);
    let experts = spec.experts(&cfg, 7, &(0..e).collect::<Vec<_>>());
    for &m in &args.rows {
        let x = random::uniform(dt, m, d, 1.0, 3, 1);
        let time = |g: &(dyn Fn() + Sync)| {
            g();
            median(&(0..args.reps).map(|_| timed(g)).collect::<Vec<_>>())
        };
        let mut v = vec![];
        for (name, path) in [("rows", PackedPath::Registers), ("rows-decode", PackedPath::Decode)] {
            // `ffn` below runs the library's choice (PackedPath::Auto).
            v.push((name, time(&|| experts.par_iter().for_each(|w| rows_expert(&x, w, path)))));
        }
        let set = ExpertSet::new(experts.clone());
        let batch = random::uniform(dt, m * e, d, 1.0, 3, 2);
        let offsets = even_offsets(batch.rows(), e);
        let y = std::sync::Mutex::new(Tensor::zeros(dt, batch.rows(), d));
        for (name, det) in [("ffn", false), ("ffn-det", true)] {
            v.push((name, time(&|| CpuEngine.ffn(&batch, &offsets, &set, det, &mut y.lock().unwrap()).unwrap())));
        }
        for (variant, secs) in v {
            let (flops, bytes) = (6.0 * (m * d * f * e) as f64, (e * spec.expert_bytes(d, f)) as f64);
            let r = Row {
                dtype: dt,
                weights: spec.to_string(),
                rows_per_expert: m,
                variant,
                seconds: secs,
                gflops: flops / secs / 1e9,
                weight_gbps: bytes / secs / 1e9,
            };
            println!(
                "{m:>5} {variant:<16} {:>8.2}ms {:>9.1} {:>5.1} ({:.0}% of read)",
                secs * 1e3,
                r.gflops,
                r.weight_gbps,
                100.0 * r.weight_gbps / read
            );
            report.rows.push(r);
        }
    }
}

/// (variant, median seconds) of every candidate on `m` rows an expert.
fn time_variants(cfg: &MoeConfig, experts: &[ExpertWeights], m: usize, reps: usize) -> Vec<(&'static str, f64)> {
    let dt = cfg.act_dtype;
    let x = random::uniform(dt, m, cfg.hidden, 1.0, 3, 1);
    let time = |f: &(dyn Fn() + Sync)| {
        f();
        median(&(0..reps).map(|_| timed(f)).collect::<Vec<_>>())
    };
    let mut out = vec![("rows", time(&|| experts.par_iter().for_each(|w| rows_expert(&x, w, PackedPath::Auto))))];
    out.push(match dt {
        DType::BF16 => {
            ("gemmkit", time(&|| experts.par_iter().for_each(|w| drop(black_box(gemm_expert::<bf16>(&x, w))))))
        }
        _ => ("gemmkit", time(&|| experts.par_iter().for_each(|w| drop(black_box(gemm_expert::<f32>(&x, w)))))),
    });
    out.push(match dt {
        DType::BF16 => prepacked_variant::<bf16>(&x, experts, &time),
        _ => prepacked_variant::<f32>(&x, experts, &time),
    });
    out.push(("matrixmultiply", time(&|| experts.par_iter().for_each(|w| mm_expert(&x, w)))));
    let set = ExpertSet::new(experts.to_vec());
    let batch = random::uniform(dt, m * experts.len(), cfg.hidden, 1.0, 3, 2);
    let offsets = even_offsets(batch.rows(), experts.len());
    let y = std::sync::Mutex::new(Tensor::zeros(dt, batch.rows(), cfg.hidden));
    for (name, det) in [("ffn", false), ("ffn-det", true)] {
        out.push((name, time(&|| CpuEngine.ffn(&batch, &offsets, &set, det, &mut y.lock().unwrap()).unwrap())));
    }
    let set = set.with_cpu_gemm_panels();
    out.push(("ffn-panels", time(&|| CpuEngine.ffn(&batch, &offsets, &set, false, &mut y.lock().unwrap()).unwrap())));
    out
}

fn timed(f: &(dyn Fn() + Sync)) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// One expert through the row kernels, as the FFN's row path does (no tiling), packed weights
/// by `path`.
fn rows_expert(x: &Tensor, w: &ExpertWeights, path: PackedPath) {
    let (m, f, d) = (x.rows(), w.gate.rows(), w.gate.cols());
    let xf = x.to_f32_vec();
    let native = x.dtype() == DType::BF16 && gemv::native_bf16() && !w.is_packed();
    let lhs = if native { Lhs::Bf16(x.as_slice().unwrap()) } else { Lhs::F32(&xf) };
    let (mut g, mut u, mut y) = (vec![0f32; m * f], vec![0f32; m * f], vec![0f32; m * d]);
    packed::rows_times_weight_rows_via(lhs, m, &w.gate, 0, f, &mut g, path);
    packed::rows_times_weight_rows_via(lhs, m, &w.up, 0, f, &mut u, path);
    Activation::Silu.apply_slice(&mut g, &u);
    let a = Tensor::from_f32(x.dtype(), m, f, &g).unwrap();
    let lhs = if native { Lhs::Bf16(a.as_slice().unwrap()) } else { Lhs::F32(&g) };
    packed::rows_times_weight_rows_via(lhs, m, &w.down, 0, d, &mut y, path);
    std::hint::black_box(&y);
}

/// A dense projection (the GEMM candidates take dense experts only).
fn dense(w: &moe_ep::Weight) -> &Tensor {
    w.dense().expect("the GEMM candidates take dense experts")
}

/// One expert through gemmkit in `T` (the FFN's GEMM path).
fn gemm_expert<T: GemmElement>(x: &Tensor, w: &ExpertWeights) -> Vec<T> {
    let (m, f, d) = (x.rows(), w.gate.rows(), w.gate.cols());
    fn s<T: GemmElement>(t: &Tensor) -> &[T] {
        t.as_slice::<T>().unwrap()
    }
    let (xs, wg, wu, wd) = (s::<T>(x), s::<T>(dense(&w.gate)), s::<T>(dense(&w.up)), s::<T>(dense(&w.down)));
    let (mut g, mut u, mut y) = (vec![T::default(); m * f], vec![T::default(); m * f], vec![T::default(); m * d]);
    gemm_bt(xs, wg, &mut g, m, d, f, None, false);
    gemm_bt(xs, wu, &mut u, m, d, f, None, false);
    let (mut gf, mut uf) = (vec![0f32; m * f], vec![0f32; m * f]);
    T::widen_slice(&g, &mut gf);
    T::widen_slice(&u, &mut uf);
    Activation::Silu.apply_slice(&mut gf, &uf);
    T::narrow_slice(&gf, &mut g);
    gemm_bt(&g, wd, &mut y, m, f, d, None, false);
    y
}

/// `gemmkit-prepacked` on every expert: the library's panels (`SetPanels`) made outside the
/// timing, checked once against the unpacked product.
fn prepacked_variant<T: GemmElement>(
    x: &Tensor,
    experts: &[ExpertWeights],
    time: &dyn Fn(&(dyn Fn() + Sync)) -> f64,
) -> (&'static str, f64) {
    let set = SetPanels::new(experts).expect("dense experts of one dtype");
    let packed: Vec<&ExpertPanels<T>> = (0..experts.len()).map(|l| set.get::<T>(l).expect("the rows' dtype")).collect();
    // The same products as the unpacked path, up to summation order and the intermediate's rounding.
    let (got, want) = (prepacked_expert::<T>(x, packed[0]), gemm_expert::<T>(x, &experts[0]));
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|e| e * e).sum::<f64>().sqrt();
    let diff = norm(&mut got.iter().zip(&want).map(|(a, b)| f64::from(a.to_f32() - b.to_f32())));
    let rel = diff / norm(&mut want.iter().map(|b| f64::from(b.to_f32()))).max(f64::MIN_POSITIVE);
    let tol = if T::DTYPE == DType::F32 { 1e-5 } else { 1e-2 };
    assert!(rel < tol, "gemmkit-prepacked differs from gemmkit by {rel:.2e} (relative, over the output)");
    ("gemmkit-prepacked", time(&|| packed.par_iter().for_each(|p| drop(black_box(prepacked_expert::<T>(x, p))))))
}

/// One expert through gemmkit on its panels, as [`gemm_expert`] computes it.
fn prepacked_expert<T: GemmElement>(x: &Tensor, p: &ExpertPanels<T>) -> Vec<T> {
    let (m, f, d) = (x.rows(), p.gate.out_features(), p.gate.in_features());
    let mut scratch = Vec::new();
    let xs = x.as_slice::<T>().unwrap();
    let (mut g, mut u, mut y) = (vec![T::default(); m * f], vec![T::default(); m * f], vec![T::default(); m * d]);
    gemm_bt_panels(xs, &p.gate, &mut g, m, None, false, &mut scratch).unwrap();
    gemm_bt_panels(xs, &p.up, &mut u, m, None, false, &mut scratch).unwrap();
    let (mut gf, mut uf) = (vec![0f32; m * f], vec![0f32; m * f]);
    T::widen_slice(&g, &mut gf);
    T::widen_slice(&u, &mut uf);
    Activation::Silu.apply_slice(&mut gf, &uf);
    T::narrow_slice(&gf, &mut g);
    gemm_bt_panels(&g, &p.down, &mut y, m, None, false, &mut scratch).unwrap();
    y
}

/// One expert through matrixmultiply f32, weights widened 64 rows at a time when not f32.
fn mm_expert(x: &Tensor, w: &ExpertWeights) {
    let (m, f, d) = (x.rows(), w.gate.rows(), w.gate.cols());
    let xf = x.to_f32_vec();
    let proj = |a: &[f32], t: &Tensor, out: &mut [f32]| {
        let (n, k) = (t.rows(), t.cols());
        let mut tile = vec![0f32; 64 * k];
        for n0 in (0..n).step_by(64) {
            let n1 = (n0 + 64).min(n);
            let rows = t.slice_rows(n0, n1).unwrap().to_f32_vec();
            tile[..rows.len()].copy_from_slice(&rows);
            // SAFETY: a is [m, k], tile holds n1 - n0 rows of k, out is [m, n] (column block n0..n1).
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n1 - n0,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    tile.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    out.as_mut_ptr().add(n0),
                    n as isize,
                    1,
                );
            }
        }
    };
    let (mut g, mut u, mut y) = (vec![0f32; m * f], vec![0f32; m * f], vec![0f32; m * d]);
    proj(&xf, dense(&w.gate), &mut g);
    proj(&xf, dense(&w.up), &mut u);
    Activation::Silu.apply_slice(&mut g, &u);
    proj(&g, dense(&w.down), &mut y);
    std::hint::black_box(&y);
}

/// Bytes read per second over `bytes` of memory on every rayon thread, best of `reps`.
fn read_gbps(bytes: usize, reps: usize) -> f64 {
    let v = vec![1u64; bytes / 8];
    let best = (0..reps)
        .map(|_| {
            timed(&|| {
                let s: u64 = v.par_chunks(1 << 17).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).sum();
                std::hint::black_box(s);
            })
        })
        .fold(f64::INFINITY, f64::min);
    bytes as f64 / best / 1e9
}

/// gemmkit's rate in `T` on `m`-square products, one per rayon thread at once (GFLOP/s).
fn square_gemm_gflops<T: GemmElement>(m: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let a = vec![T::from_f32(0.5); m * m];
    let b = vec![T::from_f32(0.25); m * m];
    let t = median(
        &(0..3)
            .map(|_| {
                timed(&|| {
                    (0..threads).into_par_iter().for_each(|_| {
                        let mut c = vec![T::default(); m * m];
                        gemm_bt(&a, &b, &mut c, m, m, m, None, false);
                        std::hint::black_box(&c);
                    })
                })
            })
            .collect::<Vec<_>>(),
    );
    (threads * 2 * m * m * m) as f64 / t / 1e9
}
