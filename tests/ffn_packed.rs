//! The CPU expert FFN on packed weights (MLX affine at every bit width, group size and scale
//! dtype, MXFP4, FP8 with block scales) against the f64 reference on the same packed bytes
//! (dequantized from the formats' definitions): f32 activations within 1e-5, 16-bit ones
//! within their rounding, mixed row counts per expert (both paths) in one call, gpt-oss's
//! clamped SwiGLU with biases, a projection left dense beside packed ones, and deterministic
//! mode's batch invariance.

use moe_ep::compute::cpu::gemv::Lhs;
use moe_ep::compute::cpu::packed::{PackedPath, rows_times_weight_rows_via};
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::model::quant::QuantFormat;
use moe_ep::testing::reference::{ffn_f64, rel_error};
use moe_ep::{Activation, CpuEngine, DType, Engine, ExpertSet, ExpertWeights, MoeConfig, Tensor, random};
use std::io::Write;

fn formats() -> Vec<QuantFormat> {
    let a = |bits, group, dt| QuantFormat::affine(bits, group, dt).unwrap();
    vec![
        a(4, 32, DType::BF16),
        a(4, 64, DType::F16),
        a(4, 128, DType::F32),
        a(8, 32, DType::F32),
        a(8, 64, DType::BF16),
        a(8, 128, DType::F16),
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

fn run(batch: &Tensor, offs: &[usize], experts: &ExpertSet, det: bool) -> Tensor {
    let mut out = Tensor::zeros(batch.dtype(), batch.rows(), batch.cols());
    CpuEngine.ffn(batch, offs, experts, det, &mut out).unwrap();
    out
}

#[test]
fn every_format_matches_the_f64_reference_on_the_same_bytes() {
    let (d, f) = (256, 128);
    // Experts of 0, 1 and 3 rows (the decode path when alone) beside 70 (the GEMM path).
    for counts in [vec![1, 0, 3, 2], vec![3, 0, 70, 1]] {
        let offs = ffn_offsets(&counts);
        for (i, fmt) in formats().into_iter().enumerate() {
            for act in [DType::F32, DType::BF16] {
                let cfg = MoeConfig::new(counts.len(), d, f, 1).with_dtypes(act, DType::BF16);
                let ids: Vec<usize> = (0..counts.len()).collect();
                let experts = ExpertSet::new(random::packed_experts(&cfg, fmt, 7 + i as u64, &ids));
                let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, i as u64, 5);
                let want = ffn_f64(&batch, &offs, &experts, experts.activation());
                for det in [true, false] {
                    let err = rel_error(&run(&batch, &offs, &experts, det).to_f64_vec(), &want);
                    assert!(err < tolerance(act), "{fmt} counts {counts:?} {act} deterministic {det}: {err:.2e}");
                }
            }
        }
    }
}

#[test]
fn clamped_swiglu_with_biases_and_a_dense_projection() {
    let (d, f) = (128, 96);
    let cfg = MoeConfig::new(3, d, f, 1)
        .with_activation(Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 })
        .with_expert_bias(true);
    let fmt = QuantFormat::affine(4, 32, DType::BF16).unwrap();
    let mut experts = random::packed_experts(&cfg, fmt, 3, &[0, 1, 2]);
    // F = 96 is not whole groups of 64: mlx-lm would leave down dense beside packed gate/up.
    let g64 = QuantFormat::affine(8, 64, DType::BF16).unwrap();
    for (e, w) in experts.iter_mut().enumerate() {
        w.gate = random::packed(g64, f, d, 9, e as u64).into();
        w.up = random::packed(g64, f, d, 9, 10 + e as u64).into();
        w.down = random::uniform(DType::BF16, d, f, 0.2, 9, 20 + e as u64).into();
        assert!(w.is_packed());
    }
    let set = ExpertSet::with_activation(experts, cfg.activation);
    let counts = [2usize, 0, 9];
    let offs = ffn_offsets(&counts);
    let batch = random::uniform(DType::F32, 11, d, 4.0, 1, 2);
    let want = ffn_f64(&batch, &offs, &set, set.activation());
    for det in [true, false] {
        let err = rel_error(&run(&batch, &offs, &set, det).to_f64_vec(), &want);
        assert!(err < 1e-5, "deterministic {det}: {err:.2e}");
    }
}

#[test]
fn deterministic_mode_is_batch_invariant_on_packed_weights() {
    let (d, f) = (128, 128);
    for fmt in [QuantFormat::affine(4, 64, DType::BF16).unwrap(), QuantFormat::Mxfp4] {
        for act in [DType::F32, DType::BF16] {
            let cfg = MoeConfig::new(2, d, f, 1).with_dtypes(act, DType::BF16);
            let experts = ExpertSet::new(random::packed_experts(&cfg, fmt, 5, &[0, 1]));
            let counts = [1usize, 40];
            let offs = ffn_offsets(&counts);
            let batch = random::uniform(act, 41, d, 1.0, 3, 4);
            let all = run(&batch, &offs, &experts, true);
            // Each row alone, through its expert.
            for r in [0usize, 1, 20, 40] {
                let row = batch.slice_rows(r, r + 1).unwrap();
                let alone = if r == 0 { [1, 0] } else { [0, 1] };
                let one = run(&row, &ffn_offsets(&alone), &experts, true);
                assert_eq!(one.as_bytes(), all.slice_rows(r, r + 1).unwrap().as_bytes(), "{fmt} {act} row {r}");
            }
        }
    }
}

#[test]
fn packed_sets_check_their_kinds() {
    let cfg = MoeConfig::new(2, 64, 64, 1);
    let mut ws: Vec<ExpertWeights> = random::packed_experts(&cfg, QuantFormat::Mxfp4, 1, &[0, 1]);
    ws[1].up = random::packed(QuantFormat::affine(4, 32, DType::BF16).unwrap(), 64, 64, 1, 9).into();
    let set = ExpertSet::new(ws);
    let batch = random::uniform(DType::F32, 2, 64, 1.0, 1, 1);
    let mut out = Tensor::zeros(DType::F32, 2, 64);
    let e = CpuEngine.ffn(&batch, &[0, 1, 2], &set, false, &mut out).unwrap_err().to_string();
    assert!(e.contains("local expert 1 has weights"), "{e}");
}

/// The two packed paths (weights decoded in registers, where this CPU has the kernel; weight
/// rows decoded to f32 first) give the same bits for every format, row count and weight-row
/// range (odd starts, counts off the 4-row blocks), and both are within f32 rounding of the
/// f64 dot product of the decoded values. FP8 with 32-column blocks and K = 100, 112, 120 has
/// a partial last step (4, 16, 24 columns); 16-column blocks take the decoding path under
/// either choice.
#[test]
fn register_and_decoded_packed_paths_agree_in_bits() {
    use moe_ep::compute::cpu::gemv::{self, Kernel};
    let avx512 = Kernel::available().contains(&Kernel::Avx512);
    if !avx512 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the register path: no AVX-512 on this CPU (both calls decode; compared anyway)"
        );
    }
    let mut cases: Vec<(QuantFormat, usize)> = formats().into_iter().map(|f| (f, 256)).collect();
    cases.push((QuantFormat::fp8((4, 32)).unwrap(), 112));
    cases.push((QuantFormat::fp8((4, 32)).unwrap(), 100));
    cases.push((QuantFormat::fp8((4, 32)).unwrap(), 120));
    cases.push((QuantFormat::fp8((32, 16)).unwrap(), 96));
    for (i, (fmt, k)) in cases.into_iter().enumerate() {
        let n = 45;
        let w: moe_ep::Weight = random::packed(fmt, n, k, 40 + i as u64, 1).into();
        let moe_ep::Weight::Packed(p) = &w else { unreachable!() };
        // The register kernel takes every format but FP8 blocks narrower than 32 columns.
        let registers = avx512 && !matches!(fmt, QuantFormat::Fp8 { block_cols: 16, .. });
        let mut one = [0f32];
        assert_eq!(gemv::packed_rows(&vec![1.0; k], 1, p, 0, 1, &mut one), registers, "{fmt}: register kernel");
        let mut decoded = vec![0f32; n * k];
        for (r, row) in decoded.chunks_mut(k).enumerate() {
            p.decode_row(r, row);
        }
        for m in [1usize, 2, 3, 4, 5, 9, 17] {
            let x = random::uniform(DType::F32, m, k, 1.0, i as u64, m as u64).to_f32_vec();
            for (n0, n1) in [(0, n), (3, 10), (13, 14), (8, 45)] {
                let run = |path| {
                    let mut out = vec![f32::NAN; m * (n1 - n0)];
                    rows_times_weight_rows_via(Lhs::F32(&x), m, &w, n0, n1, &mut out, path);
                    out
                };
                let (reg, dec) = (run(PackedPath::Registers), run(PackedPath::Decode));
                let what = format!("{fmt} K={k} m={m} rows {n0}..{n1}");
                assert_eq!(
                    reg.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    dec.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{what}: the paths differ in bits"
                );
                // Each output against the f64 dot product, relative to the sum of its
                // products' magnitudes (a dot product's rounding bound; a single output can
                // cancel to near 0).
                for r in 0..m {
                    for (i, j) in (n0..n1).enumerate() {
                        let terms = (0..k).map(|c| x[r * k + c] as f64 * decoded[j * k + c] as f64);
                        let (want, size) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                        let err = (reg[r * (n1 - n0) + i] as f64 - want).abs() / size.max(f64::MIN_POSITIVE);
                        assert!(err < 1e-6, "{what} output [{r}, {j}]: {err:.2e} of the products' size from f64");
                    }
                }
            }
        }
    }
}
