//! The GPU expert FFN on packed weights (MLX affine 4/8-bit with f32/f16/bf16 scales, MXFP4,
//! FP8 with block scales) against the f64 reference on the same packed bytes: f32
//! activations within 1e-5, 16-bit ones within their rounding, row counts that put experts in
//! both kernels (decode and tiled) in one call, every portable kernel choice giving the same
//! bits (the deterministic mode's batch invariance rests on it), gpt-oss's clamped SwiGLU
//! with biases, the GPU engine through the Engine trait, and the shapes it refuses.

mod common;

use common::context;
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::model::config::Activation;
use moe_ep::model::quant::QuantFormat;
use moe_ep::testing::reference::{ffn_f64, rel_error};
use moe_ep::{DType, Engine, ExpertSet, ExpertWeights, MoeConfig, Tensor, random};
use moe_ep_wgpu::ffn::{DeviceExperts, FfnKernels};
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};
use std::io::Write;

const MIXED: [usize; 6] = [0, 1, 3, 8, 9, 40];

const PORTABLE: [FfnKernels; 5] = [
    FfnKernels::Portable { decode_max: 16, prefetch: true },
    FfnKernels::Portable { decode_max: 8, prefetch: true },
    FfnKernels::Portable { decode_max: 8, prefetch: false },
    FfnKernels::Portable { decode_max: 2, prefetch: true },
    FfnKernels::Portable { decode_max: 0, prefetch: true },
];

fn formats() -> Vec<QuantFormat> {
    let a = |bits, group, dt| QuantFormat::affine(bits, group, dt).unwrap();
    vec![
        a(4, 32, DType::BF16),
        a(4, 64, DType::F16),
        a(4, 128, DType::F32),
        a(8, 32, DType::F16),
        a(8, 64, DType::BF16),
        a(8, 128, DType::F32),
        QuantFormat::Mxfp4,
        QuantFormat::fp8((128, 128)).unwrap(),
        QuantFormat::fp8((16, 32)).unwrap(),
    ]
}

fn tolerance(act: DType) -> f64 {
    match act {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

fn row_error(got: &Tensor, want: &[f64]) -> f64 {
    let d = got.cols().max(1);
    got.to_f64_vec().chunks(d).zip(want.chunks(d)).map(|(a, b)| rel_error(a, b)).fold(0.0, f64::max)
}

fn run(ctx: &GpuContext, dev: &DeviceExperts, batch: &Tensor, offs: &[usize], k: FfnKernels) -> Tensor {
    let mut out = Tensor::zeros(batch.dtype(), batch.rows(), batch.cols());
    ctx.ffn_host(dev, batch, offs, k, &mut out).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    out
}

/// The tolerance of the matrix units' path, where the dequantized weights are rounded to f16
/// as they are staged (about 2^-12 of a weight).
fn mma_tolerance(act: DType) -> f64 {
    tolerance(act).max(2e-3)
}

/// Every portable choice (and the deterministic mode) within tolerance of the reference and
/// all the same bits; the fast default within tolerance (on the matrix units where the
/// adapter has them: their summation order is the hardware's).
fn check(ctx: &GpuContext, experts: &[ExpertWeights], act: Activation, batch: &Tensor, offs: &[usize], what: &str) {
    let dev = DeviceExperts::upload(ctx, &ExpertSet::with_activation(experts.to_vec(), act)).unwrap();
    assert!(dev.packed.is_some(), "{what}: uploaded packed");
    let want = ffn_f64(batch, offs, experts, act);
    let mut first: Option<Tensor> = None;
    for k in PORTABLE.into_iter().chain([FfnKernels::Auto { deterministic: true }]) {
        let out = run(ctx, &dev, batch, offs, k);
        let err = row_error(&out, &want);
        assert!(err < tolerance(batch.dtype()), "{what} {k:?}: row rel error {err:.2e}");
        if let Some(f) = &first {
            assert_eq!(f.as_bytes(), out.as_bytes(), "{what}: {k:?} differs in bits");
        }
        first.get_or_insert(out);
    }
    let fast = run(ctx, &dev, batch, offs, FfnKernels::Auto { deterministic: false });
    let err = row_error(&fast, &want);
    assert!(err < mma_tolerance(batch.dtype()), "{what} Auto: row rel error {err:.2e}");
}

/// Packed experts on the matrix units (dequantized to f16 in the cooperative kernel's staging),
/// every format, 16-bit activations, experts of 0 to 150 rows so that every tile and the
/// decode kernel beside them run in one call, gpt-oss's clamped SwiGLU with biases; FP8 with
/// partial scale blocks.
#[test]
fn packed_experts_on_the_matrix_units() {
    let ctx = context();
    if ctx.ffn_matrix().is_none() {
        let _ =
            writeln!(std::io::stderr(), "SKIPPED packed experts on the matrix units: {} offers none", ctx.describe());
        return;
    }
    // F a multiple of every format's group (128 at most).
    let (d, f) = (256, 256);
    let counts = [0usize, 1, 3, 9, 20, 40, 150];
    let offs = ffn_offsets(&counts);
    for (i, fmt) in formats().into_iter().enumerate() {
        for (act, acti) in
            [(DType::BF16, Activation::Silu), (DType::F16, Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 })]
        {
            let cfg = MoeConfig::new(counts.len(), d, f, 1)
                .with_dtypes(act, DType::BF16)
                .with_activation(acti)
                .with_expert_bias(acti != Activation::Silu);
            let experts = random::packed_experts(&cfg, fmt, 60 + i as u64, &(0..counts.len()).collect::<Vec<_>>());
            let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, i as u64, 8);
            let dev = DeviceExperts::upload(&ctx, &ExpertSet::with_activation(experts.clone(), acti)).unwrap();
            let want = ffn_f64(&batch, &offs, &experts, acti);
            for k in [FfnKernels::MMA, FfnKernels::Auto { deterministic: false }, FfnKernels::Mixed { decode_max: 8 }] {
                let err = row_error(&run(&ctx, &dev, &batch, &offs, k), &want);
                assert!(err < mma_tolerance(act), "{fmt} {act} {k:?}: row rel error {err:.2e}");
            }
        }
    }
    // FP8 with partial scale blocks on the matrix units: F = 224 is 1.75 blocks of 128 (the
    // down projection's inputs, the up projection's rows).
    let fp8 = QuantFormat::fp8((128, 128)).unwrap();
    let cfg = MoeConfig::new(3, 256, 224, 1).with_dtypes(DType::BF16, DType::BF16);
    let experts = random::packed_experts(&cfg, fp8, 77, &[0, 1, 2]);
    let offs = ffn_offsets(&[40, 0, 130]);
    let batch = random::uniform(DType::BF16, 170, 256, 1.0, 7, 7);
    let dev = DeviceExperts::upload(&ctx, &ExpertSet::new(experts.clone())).unwrap();
    let want = ffn_f64(&batch, &offs, &experts, Activation::Silu);
    let err = row_error(&run(&ctx, &dev, &batch, &offs, FfnKernels::MMA), &want);
    assert!(err < mma_tolerance(DType::BF16), "{fp8} F=224 on the matrix units: row rel error {err:.2e}");
}

#[test]
fn every_format_matches_the_f64_reference_in_both_kernels() {
    let ctx = context();
    let (d, f) = (256, 128);
    let offs = ffn_offsets(&MIXED);
    for (i, fmt) in formats().into_iter().enumerate() {
        for act in [DType::F32, DType::BF16, DType::F16] {
            let cfg = MoeConfig::new(MIXED.len(), d, f, 1).with_dtypes(act, DType::BF16);
            let experts = random::packed_experts(&cfg, fmt, 20 + i as u64, &(0..MIXED.len()).collect::<Vec<_>>());
            let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, i as u64, 3);
            check(&ctx, &experts, Activation::Silu, &batch, &offs, &format!("{fmt} {act}"));
        }
    }
}

#[test]
fn clamped_swiglu_with_biases_on_packed_weights() {
    let ctx = context();
    let (d, f) = (128, 96);
    let act = Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 };
    let cfg = MoeConfig::new(3, d, f, 1).with_activation(act).with_expert_bias(true);
    let offs = ffn_offsets(&[2, 0, 30]);
    for fmt in [QuantFormat::affine(4, 32, DType::BF16).unwrap(), QuantFormat::Mxfp4] {
        let experts = random::packed_experts(&cfg, fmt, 4, &[0, 1, 2]);
        let batch = random::uniform(DType::F32, 32, d, 4.0, 1, 2);
        check(&ctx, &experts, act, &batch, &offs, &format!("gpt-oss {fmt}"));
    }
}

#[test]
fn the_engine_computes_packed_sets_and_refuses_what_it_cannot() {
    let engine = GpuEngine::new(&ContextOptions::from_env()).unwrap();
    let (d, f) = (128, 64);
    let cfg = MoeConfig::new(2, d, f, 1);
    let fmt = QuantFormat::affine(4, 64, DType::BF16).unwrap();
    let set = ExpertSet::new(random::packed_experts(&cfg, fmt, 2, &[0, 1]));
    let offs = ffn_offsets(&[3, 20]);
    let batch = random::uniform(DType::F32, 23, d, 1.0, 5, 5);
    for det in [false, true] {
        let mut out = Tensor::zeros(DType::F32, 23, d);
        engine.ffn(&batch, &offs, &set, det, &mut out).unwrap();
        let err = row_error(&out, &ffn_f64(&batch, &offs, &set, Activation::Silu));
        assert!(err < 1e-5, "deterministic {det}: {err:.2e}");
    }
    // A projection left dense beside packed ones: a device error (the layer runs it on the CPU).
    let mut ws: Vec<ExpertWeights> = set.to_vec();
    for w in &mut ws {
        w.down = random::uniform(DType::BF16, d, f, 0.2, 1, 1).into();
    }
    let mut out = Tensor::zeros(DType::F32, 23, d);
    let e = engine.ffn(&batch, &offs, &ExpertSet::new(ws), false, &mut out).unwrap_err();
    assert!(matches!(e, moe_ep::Error::Backend { .. }) && e.to_string().contains("share one packed format"), "{e}");
    // FP8 scale blocks that do not tile 32 inputs: a device error.
    let odd = ExpertSet::new(random::packed_experts(&cfg, QuantFormat::fp8((8, 24)).unwrap(), 1, &[0, 1]));
    let e = engine.ffn(&batch, &offs, &odd, false, &mut out).unwrap_err();
    assert!(matches!(e, moe_ep::Error::Backend { .. }), "{e}");
}

/// The whole layer on the GPU engine (every call; `with_engine_weights` never falls back)
/// with packed routed experts and a packed shared expert, at world sizes 1, 2 and 3 with
/// uneven tokens (0 included), deterministic or not, against the f64 reference on the same
/// packed bytes.
#[test]
fn the_layer_on_packed_experts_at_world_sizes_1_2_3() {
    use moe_ep::testing::reference::dense_moe_full;
    use moe_ep::{Group, LayerWeights, LocalGroup, MoeLayer, Placement};
    let fmt = QuantFormat::affine(4, 32, DType::BF16).unwrap();
    for det in [false, true] {
        let cfg = MoeConfig::new(6, 64, 64, 2)
            .with_dtypes(DType::F32, DType::BF16)
            .with_shared_expert(64, true)
            .with_deterministic(det);
        let all: Vec<usize> = (0..6).collect();
        let experts = random::packed_experts(&cfg, fmt, 8, &all);
        let mut shared = random::shared_expert(&cfg, 8).unwrap();
        shared.weights = random::packed_expert(&cfg, fmt, 9, 0);
        let gate = random::gate(&cfg, 8);
        for world in [1usize, 2, 3] {
            let tokens = [7usize, 0, 12][..world].to_vec();
            let outs = LocalGroup::run(world, std::time::Duration::from_secs(60), |g| {
                let rank = g.rank();
                let p = Placement::balanced(6, world)?;
                let mine: Vec<ExpertWeights> = p.experts_of(rank).iter().map(|&e| experts[e].clone()).collect();
                let w = LayerWeights {
                    router: gate.clone(),
                    selection_bias: None,
                    experts: mine,
                    shared: Some(shared.clone()),
                };
                let engine = GpuEngine::new(&ContextOptions::from_env())?;
                let layer = MoeLayer::with_engine_weights(g, cfg.clone(), p, w, Box::new(engine))?;
                let x = random::input(&cfg, tokens[rank], 3, rank);
                let (y, s) = layer.forward_with_stats(&x)?;
                Ok::<_, moe_ep::Error>((x, y, s.backend))
            })
            .unwrap();
            for (r, o) in outs.into_iter().enumerate() {
                let (x, y, backend) = o.unwrap().unwrap_or_else(|e| panic!("world {world} rank {r}: {e}"));
                assert!(backend.starts_with("wgpu"), "rank {r} ran on {backend}");
                let want = dense_moe_full(&x, &gate, None, &experts, Some(&shared), &cfg);
                let err = rel_error(&y.to_f64_vec(), &want.y);
                assert!(err < 1e-5, "deterministic {det} world {world} rank {r}: {err:.2e}");
            }
        }
    }
}

/// Sets whose values f16 cannot hold well (past 65504, or all below 2^-8, near f16's
/// subnormals) are flagged at upload and stay on the portable kernels: Auto gives their bits,
/// an explicit request for the matrix units is refused.
#[test]
fn packed_sets_past_f16_stay_on_the_portable_kernels() {
    let ctx = context();
    let fmt = QuantFormat::affine(8, 64, DType::F32).unwrap();
    let cfg = MoeConfig::new(2, 128, 64, 1).with_dtypes(DType::BF16, DType::BF16);
    let scaled = |m: &moe_ep::Weight, factor: f32, bias_too: bool| -> moe_ep::Weight {
        let p = m.packed().unwrap();
        let moe_ep::model::quant::Scales::Affine { scales, biases } = p.scales() else { unreachable!() };
        let times = |t: &Tensor| {
            let v: Vec<f32> = t.to_f32_vec().iter().map(|v| v * factor).collect();
            Tensor::from_f32(DType::F32, t.rows(), t.cols(), &v).unwrap()
        };
        let b = if bias_too { times(biases) } else { biases.clone() };
        moe_ep::model::quant::PackedMatrix::affine(p.rows(), p.cols(), 8, 64, p.words().to_vec(), times(scales), b)
            .unwrap()
            .into()
    };
    for what in ["past f16", "tiny"] {
        let mut experts = random::packed_experts(&cfg, fmt, 3, &[0, 1]);
        if what == "past f16" {
            // One matrix past 65504 is enough.
            experts[1].up = scaled(&experts[1].up, 1e6, false);
        } else {
            // Every matrix near f16's subnormals.
            for w in &mut experts {
                (w.gate, w.up, w.down) =
                    (scaled(&w.gate, 1e-6, true), scaled(&w.up, 1e-6, true), scaled(&w.down, 1e-6, true));
            }
        }
        let dev = DeviceExperts::upload(&ctx, &ExpertSet::new(experts)).unwrap();
        assert!(!dev.packed_f16, "{what}: flagged at upload");
        let offs = ffn_offsets(&[30, 40]);
        let batch = random::uniform(DType::BF16, 70, 128, 1.0, 2, 2);
        let auto = run(&ctx, &dev, &batch, &offs, FfnKernels::Auto { deterministic: false });
        let portable = run(&ctx, &dev, &batch, &offs, PORTABLE[1]);
        assert_eq!(auto.as_bytes(), portable.as_bytes(), "{what}: Auto stays on the portable kernels");
        let mut out = Tensor::zeros(DType::BF16, 70, 128);
        let e = ctx.ffn_host(&dev, &batch, &offs, FfnKernels::MMA, &mut out).unwrap_err().to_string();
        assert!(e.contains("f16") || e.contains("matrix units"), "{what}: {e}");
    }
}
