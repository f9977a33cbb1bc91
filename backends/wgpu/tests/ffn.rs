//! The GPU expert FFN against the f64 reference on fresh random data: every activation and
//! weight dtype, row counts that put experts in every bucket of one call (0, 1, 3, 8, 9, 40,
//! 200 rows), every kernel choice (the portable ones give the same bits), gpt-oss's clamped
//! SwiGLU with biases, bf16 weights beyond f16's range converted with row scales, weights
//! split over bindings, calls over the binding limit in row chunks, bad input. The
//! cooperative-matrix kernels run where the adapter has matrix units; elsewhere the test says,
//! uncaptured, what it skipped.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::{context, context_with};
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::model::config::Activation;
use moe_ep::testing::reference::{ffn_f64, rel_error};
use moe_ep::{CpuEngine, DType, Engine, ExpertSet, ExpertWeights, MoeConfig, Tensor, random};
use moe_ep_wgpu::ffn::{DeviceExperts, FfnKernels, MMA_DECODE_MAX_ROWS, Run, WeightFormat, default_tiles};
use moe_ep_wgpu::kernels::{MmaProbe, MmaTile};
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};

/// Row counts per expert that reach every bucket of both paths in one call.
const MIXED: [usize; 7] = [0, 1, 3, 8, 9, 40, 200];

/// The portable kernel choices (all the same bits).
const PORTABLE: [FfnKernels; 5] = [
    FfnKernels::Portable { decode_max: 16, prefetch: true },
    FfnKernels::Portable { decode_max: 8, prefetch: true },
    FfnKernels::Portable { decode_max: 8, prefetch: false },
    FfnKernels::Portable { decode_max: 2, prefetch: true },
    FfnKernels::Portable { decode_max: 0, prefetch: true },
];

/// Say, past libtest's capture, that a variant did not run.
fn skipped(what: &str, why: &str) {
    let _ = std::io::stderr().write_all(format!("SKIPPED {what}: {why}\n").as_bytes());
}

/// The largest relative error of a row (each against its own norm): rows of very different
/// magnitudes are each held to the bound.
fn row_error(got: &Tensor, want: &[f64]) -> f64 {
    let d = got.cols().max(1);
    let g = got.to_f64_vec();
    g.chunks(d).zip(want.chunks(d)).map(|(a, b)| rel_error(a, b)).fold(0.0, f64::max)
}

/// Bound on the relative error of an output in `act` (its rounding dominates f32 sums); the
/// cooperative kernels round the intermediate to f16 too.
fn tolerance(act: DType, mma: bool) -> f64 {
    match (act, mma) {
        (DType::F32, _) => 2e-6,
        (DType::F16, false) => 1e-3,
        (DType::F16, true) => 2.5e-3,
        (DType::BF16, _) => 8e-3,
    }
}

fn experts_for(act: DType, weights: DType, d: usize, f: usize, n: usize, bias: bool, seed: u64) -> Vec<ExpertWeights> {
    let cfg = MoeConfig::new(n, d, f, 1).with_dtypes(act, weights).with_expert_bias(bias);
    random::experts(&cfg, seed, &(0..n).collect::<Vec<_>>())
}

fn batch_for(act: DType, offs: &[usize], d: usize, seed: u64) -> Tensor {
    random::uniform(act, *offs.last().unwrap(), d, 1.0, seed, 99)
}

fn upload(ctx: &GpuContext, w: &[ExpertWeights], act: Activation, format: WeightFormat) -> DeviceExperts {
    DeviceExperts::upload_weights(ctx, &w.iter().collect::<Vec<_>>(), act, format).unwrap()
}

fn run(ctx: &GpuContext, dev: &DeviceExperts, batch: &Tensor, offs: &[usize], k: FfnKernels) -> Tensor {
    let mut out = Tensor::zeros(batch.dtype(), batch.rows(), batch.cols());
    ctx.ffn_host(dev, batch, offs, k, &mut out).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    out
}

/// Every portable choice on `dev`: within `tol` of `want`, and all the same bits.
fn check_portable(
    ctx: &GpuContext,
    dev: &DeviceExperts,
    batch: &Tensor,
    offs: &[usize],
    want: &[f64],
    what: &str,
) -> Tensor {
    let act = batch.dtype();
    let mut first: Option<Tensor> = None;
    for k in PORTABLE.into_iter().chain([FfnKernels::Auto { deterministic: true }]) {
        let out = run(ctx, dev, batch, offs, k);
        let err = row_error(&out, want);
        eprintln!("{what} {k:?}: row rel error {err:.2e}");
        assert!(err < tolerance(act, false), "{what} {k:?}: row rel error {err:.2e}");
        if let Some(f) = &first {
            assert_eq!(f.as_bytes(), out.as_bytes(), "{what}: {k:?} differs in bits from {PORTABLE:?}[0]");
        }
        first.get_or_insert(out);
    }
    first.unwrap()
}

/// The cooperative kernel on `dev` with default tiles and with each of `tiles` forced on both
/// projections: within tolerance of `want` and of the portable result. Says so if skipped.
fn check_mma(ctx: &GpuContext, dev: &DeviceExperts, batch: &Tensor, offs: &[usize], want: &[f64], what: &str) {
    let act = batch.dtype();
    if act == DType::F32
        || dev.dtype != DType::F16
        || !dev.hidden.is_multiple_of(8)
        || !dev.intermediate.is_multiple_of(8)
    {
        // Not the cooperative kernel's: Auto takes the portable path (checked above).
        return;
    }
    let Some(units) = ctx.ffn_matrix() else {
        skipped(
            &format!("cooperative FFN {what}"),
            &format!("{} offers no matrix units the kernel takes", ctx.describe()),
        );
        return;
    };
    let limit = ctx.limits().max_compute_workgroup_storage_size;
    let mut forced: Vec<MmaTile> = default_tiles(units, limit).into_iter().flatten().collect();
    forced.extend(forced.clone().into_iter().filter(|t| t.s == 16).map(|t| MmaTile { sv: 5 - t.sv, ..t }));
    forced.extend(forced.clone().into_iter().filter(|t| t.sv == 1).map(|t| MmaTile { nbuf: 3 - t.nbuf, ..t }));
    // Each tile on the projections it fits (the up one stages twice the weight rows).
    forced.retain(|t| t.workgroup_bytes(false) <= limit);
    forced.dedup();
    let mut choices = vec![
        FfnKernels::Auto { deterministic: false },
        FfnKernels::MMA,
        FfnKernels::Mixed { decode_max: 16 },
        FfnKernels::Mixed { decode_max: 2 },
    ];
    choices.extend(forced.iter().map(|&t| FfnKernels::Mma {
        up: (t.workgroup_bytes(true) <= limit).then_some(t),
        down: Some(t),
        run: Run::Both,
    }));
    for k in choices {
        let out = run(ctx, dev, batch, offs, k);
        let err = row_error(&out, want);
        eprintln!("{what} {k:?}: row rel error {err:.2e}");
        assert!(err < tolerance(act, true), "{what} {k:?}: row rel error {err:.2e}");
    }
    check_decode_shaped_call(ctx, dev, batch, offs, want, what);
    // A timing probe computes no FFN: refused for the whole FFN, run for a projection alone.
    let probe = MmaTile { probe: MmaProbe::NoLoads, ..forced[0] };
    let mut out = Tensor::zeros(act, batch.rows(), batch.cols());
    let whole = FfnKernels::Mma { up: Some(probe), down: None, run: Run::Both };
    let e = ctx.ffn_host(dev, batch, offs, whole, &mut out).unwrap_err();
    assert!(e.to_string().contains("timing probe"), "{what}: {e}");
    for probe in [MmaProbe::NoLoads, MmaProbe::NoProducts] {
        let alone = FfnKernels::Mma { up: Some(MmaTile { probe, ..forced[0] }), down: None, run: Run::Up };
        ctx.ffn_host(dev, batch, offs, alone, &mut out).unwrap_or_else(|e| panic!("{what} {probe:?}: {e}"));
    }
}

/// The rows of `offs`' experts of at most [`MMA_DECODE_MAX_ROWS`] rows alone (a call whose
/// every expert is that small): Auto runs them on the decode kernel, so its bits are the
/// portable kernels', within tolerance of `want`'s rows.
fn check_decode_shaped_call(
    ctx: &GpuContext,
    dev: &DeviceExperts,
    batch: &Tensor,
    offs: &[usize],
    want: &[f64],
    what: &str,
) {
    let d = batch.cols();
    let (mut counts, mut bytes, mut want_rows) = (Vec::new(), Vec::new(), Vec::new());
    for w in offs.windows(2) {
        let small = w[1] - w[0] <= MMA_DECODE_MAX_ROWS;
        counts.push(if small { w[1] - w[0] } else { 0 });
        if small && w[1] > w[0] {
            bytes.extend_from_slice(batch.slice_rows(w[0], w[1]).unwrap().as_bytes());
            want_rows.extend_from_slice(&want[w[0] * d..w[1] * d]);
        }
    }
    let small_offs = ffn_offsets(&counts);
    let rows = *small_offs.last().unwrap();
    assert!(rows > 0, "{what}: this check needs an expert of 1..={MMA_DECODE_MAX_ROWS} rows in the test's counts");
    let small = Tensor::from_bytes(batch.dtype(), rows, d, &bytes).unwrap();
    let auto = run(ctx, dev, &small, &small_offs, FfnKernels::Auto { deterministic: false });
    let portable = run(ctx, dev, &small, &small_offs, FfnKernels::Portable { decode_max: 8, prefetch: true });
    assert_eq!(auto.as_bytes(), portable.as_bytes(), "{what}: a decode-shaped call left the decode kernel");
    let err = row_error(&auto, &want_rows);
    assert!(err < tolerance(batch.dtype(), false), "{what} decode-shaped call: row rel error {err:.2e}");
}

#[test]
fn every_kernel_matches_the_f64_reference_for_every_dtype_pair() {
    let ctx = context();
    // Sizes that fill no tile, piece or chunk (the first not even the decode kernel's 16-byte
    // loads: the tiled kernel only), the last over more than one chunk of the reduction.
    let mut seed = 1;
    for (d, f, dtypes) in [
        (70, 46, vec![DType::F32, DType::F16, DType::BF16]),
        (136, 88, vec![DType::F32, DType::F16, DType::BF16]),
        (1096, 1040, vec![DType::BF16]),
    ] {
        let counts: &[usize] = if d > 1000 { &[0, 1, 9, 70] } else { &MIXED };
        let offs = ffn_offsets(counts);
        for &act in &dtypes {
            for weights in [DType::F32, DType::F16, DType::BF16] {
                seed += 1;
                let w = experts_for(act, weights, d, f, counts.len(), false, seed);
                let batch = batch_for(act, &offs, d, seed);
                let want = ffn_f64(&batch, &offs, &w, Activation::Silu);
                let what = format!("{d}x{f} act {act} weights {weights}");
                let dev = upload(&ctx, &w, Activation::Silu, WeightFormat::Native);
                let plain = check_portable(&ctx, &dev, &batch, &offs, &want, &what);
                if weights == DType::BF16 {
                    // bf16 as f16 with row scales (what adapters with matrix units store):
                    // exact for these magnitudes, so the same bits.
                    let scaled = upload(&ctx, &w, Activation::Silu, WeightFormat::F16Scaled);
                    assert!(scaled.scaled && scaled.dtype == DType::F16);
                    let s = check_portable(&ctx, &scaled, &batch, &offs, &want, &format!("{what} (f16 scaled)"));
                    assert_eq!(s.as_bytes(), plain.as_bytes(), "{what}: scaled f16 weights differ in bits");
                    check_mma(&ctx, &scaled, &batch, &offs, &want, &what);
                } else {
                    check_mma(&ctx, &dev, &batch, &offs, &want, &what);
                }
                let mut cpu = Tensor::zeros(act, batch.rows(), d);
                CpuEngine.ffn(&batch, &offs, &ExpertSet::new(w), true, &mut cpu).unwrap();
                let err = row_error(&cpu, &want);
                assert!(err < tolerance(act, false), "CPU {what}: row rel error {err:.2e}");
            }
        }
    }
}

#[test]
fn gpt_oss_clamped_swiglu_with_biases_matches_the_ffn_f64() {
    let ctx = context();
    let act_fn = Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 };
    let (d, f) = (96, 64);
    let offs = ffn_offsets(&MIXED);
    for (act, weights) in [(DType::F32, DType::BF16), (DType::BF16, DType::BF16), (DType::F16, DType::F16)] {
        let w = experts_for(act, weights, d, f, MIXED.len(), true, 40);
        // Inputs large enough that the clamp at 7 binds for some outputs.
        let batch = random::uniform(act, *offs.last().unwrap(), d, 6.0, 41, 99);
        let want = ffn_f64(&batch, &offs, &w, act_fn);
        let what = format!("gpt-oss act {act} weights {weights}");
        for format in [WeightFormat::Native, WeightFormat::F16Scaled] {
            let dev = upload(&ctx, &w, act_fn, format);
            assert!(dev.biased);
            check_portable(&ctx, &dev, &batch, &offs, &want, &what);
            check_mma(&ctx, &dev, &batch, &offs, &want, &what);
        }
        // The engine takes such expert sets now (it refused them before).
        let gpu = GpuEngine::with_context(Arc::new(context()));
        let set = ExpertSet::with_activation(w, act_fn);
        let mut out = Tensor::zeros(act, batch.rows(), d);
        gpu.ffn(&batch, &offs, &set, false, &mut out).unwrap();
        let err = row_error(&out, &want);
        assert!(err < tolerance(act, gpu.context().ffn_matrix().is_some()), "{what} engine: {err:.2e}");
    }
}

/// bf16 weights with one magnitude per expert: above f16's 65504, below its normal range,
/// ordinary; one ordinary row with an outlier above 65504.
fn wide_range_experts(d: usize, f: usize) -> Vec<ExpertWeights> {
    let scales = [3.0e5f32, 2.0e-7, 1.0, 1.0];
    let base = experts_for(DType::BF16, DType::F32, d, f, scales.len(), false, 60);
    base.iter()
        .zip(scales)
        .enumerate()
        .map(|(e, (w, s))| {
            let scaled = |t: &moe_ep::Weight, outlier: bool| {
                let mut v: Vec<f32> = t.to_f32_vec().iter().map(|x| x * s).collect();
                if outlier {
                    v[5] = 7.0e4;
                    v[t.cols() + 1] = -1.0e5;
                }
                Tensor::from_f32(DType::BF16, t.rows(), t.cols(), &v).unwrap()
            };
            ExpertWeights::new(scaled(&w.gate, e == 3), scaled(&w.up, false), scaled(&w.down, e == 3))
        })
        .collect()
}

#[test]
fn bf16_weights_beyond_f16_range_convert_with_row_scales() {
    let ctx = context();
    let (d, f) = (64, 48);
    let w = wide_range_experts(d, f);
    let offs = ffn_offsets(&[3, 9, 40, 1]);
    for act in [DType::BF16, DType::F32] {
        // Activations beyond f16's range too, on some rows.
        let mut x = batch_for(act, &offs, d, 61).to_f32_vec();
        for v in &mut x[2 * d..3 * d] {
            *v *= 2.0e5;
        }
        let batch = Tensor::from_f32(act, *offs.last().unwrap(), d, &x).unwrap();
        let want = ffn_f64(&batch, &offs, &w, Activation::Silu);
        let native = upload(&ctx, &w, Activation::Silu, WeightFormat::Native);
        let scaled = upload(&ctx, &w, Activation::Silu, WeightFormat::F16Scaled);
        let what = format!("wide-range bf16 weights, act {act}");
        let a = check_portable(&ctx, &native, &batch, &offs, &want, &what);
        let b = check_portable(&ctx, &scaled, &batch, &offs, &want, &format!("{what} (f16 scaled)"));
        assert_eq!(a.as_bytes(), b.as_bytes(), "{what}: row scales changed bits");
        check_mma(&ctx, &scaled, &batch, &offs, &want, &what);
    }
    // A non-finite weight cannot be scaled: an error naming it.
    let mut bad = wide_range_experts(d, f);
    let mut v = bad[1].up.to_f32_vec();
    v[3 * d + 2] = f32::INFINITY;
    bad[1].up = Tensor::from_f32(DType::BF16, f, d, &v).unwrap().into();
    let refs: Vec<&ExpertWeights> = bad.iter().collect();
    let e = DeviceExperts::upload_weights(&ctx, &refs, Activation::Silu, WeightFormat::F16Scaled).unwrap_err();
    assert!(e.to_string().contains("expert 1: up row 3"), "{e}");
}

#[test]
fn a_row_gets_the_same_bits_in_any_batch() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let (d, f) = (64, 96);
    for act in [DType::F32, DType::BF16] {
        let w = experts_for(act, DType::F16, d, f, 2, false, 11);
        let experts = ExpertSet::new(w);
        let offs = ffn_offsets(&[40, 2]);
        let batch = batch_for(act, &offs, d, 11);
        let mut all = Tensor::zeros(act, batch.rows(), d);
        gpu.ffn(&batch, &offs, &experts, true, &mut all).unwrap();
        // Row 7 of expert 0 alone, and rows 0..3 of expert 1 alone: same bits as in the batch.
        for (row, l) in [(7usize, 0usize), (40, 1), (41, 1)] {
            let one = batch.slice_rows(row, row + 1).unwrap();
            let o: Vec<usize> = (0..=experts.len()).map(|i| usize::from(i > l)).collect();
            let mut out = Tensor::zeros(act, 1, d);
            gpu.ffn(&one, &o, &experts, true, &mut out).unwrap();
            assert_eq!(out.as_bytes(), all.slice_rows(row, row + 1).unwrap().as_bytes(), "{act} row {row}");
        }
    }
}

#[test]
fn weights_split_over_bindings_give_the_same_result() {
    let (d, f) = (32, 48);
    let w = experts_for(DType::F32, DType::BF16, d, f, 5, false, 5);
    let offs = ffn_offsets(&[2, 3, 0, 4, 1]);
    let batch = batch_for(DType::F32, &offs, d, 5);
    let experts = ExpertSet::new(w.clone());
    let whole = GpuEngine::with_context(Arc::new(context()));
    // Bindings of 2 expert matrices at most: 3 shards for 5 experts.
    let opts = ContextOptions { max_binding_bytes: Some((2 * d * f * 2) as u64), ..ContextOptions::from_env() };
    let split = GpuEngine::with_context(Arc::new(context_with(&opts)));
    let mut a = Tensor::zeros(DType::F32, batch.rows(), d);
    let mut b = Tensor::zeros(DType::F32, batch.rows(), d);
    whole.ffn(&batch, &offs, &experts, true, &mut a).unwrap();
    split.ffn(&batch, &offs, &experts, true, &mut b).unwrap();
    assert_eq!(split.resident(&experts).unwrap().shards.len(), 3);
    assert_eq!(a.as_bytes(), b.as_bytes());
    let err = row_error(&a, &ffn_f64(&batch, &offs, &w, Activation::Silu));
    assert!(err < tolerance(DType::F32, false), "rel error {err:.2e}");
}

#[test]
fn calls_over_the_binding_limit_run_in_row_chunks_with_the_same_bits() {
    // Rows of D = 64, F = 96: 384 f32 bytes per intermediate row; a 64 KiB binding cap takes
    // 170 rows, so 300 rows run as 2 chunks, cutting an expert in two.
    let (d, f) = (64, 96);
    let w = experts_for(DType::BF16, DType::BF16, d, f, 4, false, 8);
    let offs = ffn_offsets(&[90, 0, 130, 80]);
    let batch = batch_for(DType::BF16, &offs, d, 8);
    let experts = ExpertSet::new(w.clone());
    let whole = GpuEngine::with_context(Arc::new(context()));
    let opts = ContextOptions { max_binding_bytes: Some(64 << 10), ..ContextOptions::from_env() };
    let chunked = GpuEngine::with_context(Arc::new(context_with(&opts)));
    for deterministic in [true, false] {
        let mut a = Tensor::zeros(DType::BF16, batch.rows(), d);
        let mut b = Tensor::zeros(DType::BF16, batch.rows(), d);
        whole.ffn(&batch, &offs, &experts, deterministic, &mut a).unwrap();
        chunked.ffn(&batch, &offs, &experts, deterministic, &mut b).unwrap();
        if deterministic {
            assert_eq!(a.as_bytes(), b.as_bytes(), "chunked and whole calls differ");
        }
        let err = row_error(&b, &ffn_f64(&batch, &offs, &w, Activation::Silu));
        assert!(err < tolerance(DType::BF16, true), "rel error {err:.2e}");
    }
}

#[test]
fn bad_ffn_input_is_an_error() {
    let ctx = context();
    let w = experts_for(DType::F32, DType::F32, 16, 8, 2, false, 3);
    let dev = upload(&ctx, &w, Activation::Silu, WeightFormat::Native);
    let batch = ctx.storage("batch", 4 * 16 * 4).unwrap();
    let out = ctx.storage("out", 4 * 16 * 4).unwrap();
    let encode = |offs: &[usize], b: &wgpu::Buffer, o: &wgpu::Buffer| {
        let mut enc = ctx.encoder("t");
        let mut scratch = Vec::new();
        ctx.encode_ffn(&mut enc, &dev, DType::F32, offs, false, b, o, &mut scratch).map(|_| ())
    };
    use moe_ep_wgpu::wgpu;
    for bad in [&[0, 2][..], &[0, 3, 2], &[1, 2, 3], &[0, 2, 4, 4]] {
        let e = encode(bad, &batch, &out).unwrap_err();
        assert!(e.to_string().contains("offsets"), "{bad:?}: {e}");
    }
    // 5 rows do not fit buffers of 4 (pool sizes round up: take exact ones).
    let small = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4 * 16 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = encode(&[0, 2, 5], &small, &out).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let big = ctx.storage("big", 1024).unwrap();
    let e = encode(&[0, 2, 5], &big, &small).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
    let no_storage = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 1024,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let e = encode(&[0, 2, 4], &no_storage, &out).unwrap_err();
    assert!(e.to_string().contains("STORAGE"), "{e}");
    assert!(encode(&[0, 2, 4], &batch, &out).is_ok());
    // Odd sizes with 16-bit values: a device error (the layer's policy then uses the CPU).
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let w = experts_for(DType::BF16, DType::BF16, 15, 8, 2, false, 3);
    let offs = ffn_offsets(&[1, 1]);
    let batch = batch_for(DType::BF16, &offs, 15, 3);
    let mut out = Tensor::zeros(DType::BF16, 2, 15);
    let e = gpu.ffn(&batch, &offs, &ExpertSet::new(w), false, &mut out).unwrap_err();
    assert!(moe_ep::compute::policy::is_device_error(&e) && e.to_string().contains("even"), "{e}");
    // A cooperative kernel asked for where it does not apply: an error, not a wrong answer.
    let f32_dev =
        upload(&ctx, &experts_for(DType::F32, DType::F32, 16, 8, 2, false, 3), Activation::Silu, WeightFormat::Native);
    let t = FfnKernels::MMA;
    let x = batch_for(DType::F32, &[0, 1, 2], 16, 3);
    let mut y = Tensor::zeros(DType::F32, 2, 16);
    assert!(ctx.ffn_host(&f32_dev, &x, &[0, 1, 2], t, &mut y).is_err());
}
