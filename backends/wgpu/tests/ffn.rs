//! The GPU expert FFN against the f64 reference on fresh random data, every activation and
//! weight dtype, shapes that do not fill a tile, experts with no rows; both tile shapes give
//! the same bits (what the deterministic mode needs); weights split over several bindings.

mod common;

use common::{context, context_with};
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::testing::reference::{expert_f64, rel_error};
use moe_ep::{CpuEngine, DType, Engine, ExpertSet, MoeConfig, Tensor, random};
use moe_ep_wgpu::kernels::Tile;
use moe_ep_wgpu::{ContextOptions, GpuEngine};
use std::sync::Arc;

/// The f64 reference of a grouped FFN call, `[rows * D]`.
fn reference(batch: &Tensor, offs: &[usize], experts: &ExpertSet) -> Vec<f64> {
    let d = batch.cols();
    let x = batch.to_f64_vec();
    let mut y = Vec::with_capacity(x.len());
    for (l, w) in experts.iter().enumerate() {
        for r in offs[l]..offs[l + 1] {
            y.extend(expert_f64(w, &x[r * d..(r + 1) * d]));
        }
    }
    y
}

/// Bound on the relative error of an output in `act` (its rounding dominates f32 sums).
fn tolerance(act: DType) -> f64 {
    match act {
        DType::F32 => 2e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

fn setup(
    act: DType,
    weights: DType,
    d: usize,
    f: usize,
    counts: &[usize],
    seed: u64,
) -> (Tensor, Vec<usize>, ExpertSet) {
    let cfg = MoeConfig::new(counts.len(), d, f, 1).with_dtypes(act, weights);
    let experts = ExpertSet::new(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()));
    let offs = ffn_offsets(counts);
    let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, seed, 99);
    (batch, offs, experts)
}

#[test]
fn ffn_matches_the_f64_reference_for_every_dtype_and_tile() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    // Sizes that fill no tile, no reduction step, piece or chunk, the second over more than one
    // chunk (the first does not even suit the decode
    // kernel's 16-byte loads: the square tile only); an expert with no rows; one with more
    // rows than a square tile; decode-sized ones.
    let counts = [3, 0, 1, 70, 16, 5];
    let mut seed = 1;
    for (d, f) in [(70, 46), (1096, 1040)] {
        let tiles: Vec<Tile> = if d % 8 == 0 {
            // The decode kernel at every row count, with and without its prefetch, and the tiled one.
            let g8 = Tile::gemv(8);
            vec![Tile::gemv(1), Tile::gemv(2), Tile::gemv(4), g8, Tile { bkw: 1 - g8.bkw, ..g8 }, Tile::SQUARE]
        } else {
            vec![Tile::SQUARE]
        };
        for act in [DType::F32, DType::F16, DType::BF16] {
            for weights in [DType::F32, DType::F16, DType::BF16] {
                seed += 1;
                let (batch, offs, experts) = setup(act, weights, d, f, &counts, seed);
                let want = reference(&batch, &offs, &experts);
                let mut outs: Vec<Tensor> = Vec::new();
                for &tile in &tiles {
                    let mut out = Tensor::zeros(act, batch.rows(), d);
                    gpu.ffn_with_tile(&batch, &offs, &experts, tile, &mut out).unwrap();
                    let err = rel_error(&out.to_f64_vec(), &want);
                    eprintln!("{d}x{f} act {act} weights {weights} tile {tile:?}: rel error {err:.2e}");
                    assert!(err < tolerance(act), "act {act} weights {weights} tile {tile:?}: rel error {err:.2e}");
                    if let Some(first) = outs.first() {
                        assert_eq!(
                            first.as_bytes(),
                            out.as_bytes(),
                            "act {act} weights {weights}: {tile:?} differs in bits"
                        );
                    }
                    outs.push(out);
                }
                let mut cpu = Tensor::zeros(act, batch.rows(), d);
                CpuEngine.ffn(&batch, &offs, &experts, true, &mut cpu).unwrap();
                let err = rel_error(&cpu.to_f64_vec(), &want);
                assert!(err < tolerance(act), "CPU act {act} weights {weights}: rel error {err:.2e}");
            }
        }
    }
}

#[test]
fn a_row_gets_the_same_bits_in_any_batch() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let (d, f) = (64, 96);
    for act in [DType::F32, DType::BF16] {
        let (batch, offs, experts) = setup(act, DType::F16, d, f, &[40, 2], 11);
        let mut all = Tensor::zeros(act, batch.rows(), d);
        gpu.ffn(&batch, &offs, &experts, true, &mut all).unwrap();
        // Row 7 of expert 0 alone, and rows 0..3 of expert 1 alone: same bits as in the batch.
        for (row, l) in [(7usize, 0usize), (40, 1), (41, 1)] {
            let one = batch.slice_rows(row, row + 1).unwrap();
            let mut o = vec![0; experts.len() + 1];
            for x in o.iter_mut().skip(l + 1) {
                *x = 1;
            }
            let mut out = Tensor::zeros(act, 1, d);
            gpu.ffn(&one, &o, &experts, true, &mut out).unwrap();
            assert_eq!(out.as_bytes(), all.slice_rows(row, row + 1).unwrap().as_bytes(), "{act} row {row}");
        }
    }
}

#[test]
fn weights_split_over_bindings_give_the_same_result() {
    let (d, f) = (32, 48);
    let (batch, offs, experts) = setup(DType::F32, DType::BF16, d, f, &[2, 3, 0, 4, 1], 5);
    let whole = GpuEngine::with_context(Arc::new(context()));
    // Bindings of 2 expert matrices at most: 3 shards for 5 experts.
    let opts = ContextOptions { max_binding_bytes: Some((2 * d * f * 2) as u64), ..ContextOptions::from_env() };
    let split = GpuEngine::with_context(Arc::new(context_with(&opts)));
    let mut a = Tensor::zeros(DType::F32, batch.rows(), d);
    let mut b = Tensor::zeros(DType::F32, batch.rows(), d);
    whole.ffn(&batch, &offs, &experts, false, &mut a).unwrap();
    split.ffn(&batch, &offs, &experts, false, &mut b).unwrap();
    assert_eq!(split.resident(&experts).unwrap().shards.len(), 3);
    assert_eq!(a.as_bytes(), b.as_bytes());
    let err = rel_error(&a.to_f64_vec(), &reference(&batch, &offs, &experts));
    assert!(err < tolerance(DType::F32), "rel error {err:.2e}");
}

#[test]
fn calls_over_the_binding_limit_run_in_row_chunks_with_the_same_bits() {
    // Rows of D = 64, F = 96: 384 f32 bytes per intermediate row; a 64 KiB binding cap takes
    // 170 rows (106 after the cooperative tile's padding), so 300 rows run as 3 chunks, cutting
    // experts in two.
    let (d, f) = (64, 96);
    let (batch, offs, experts) = setup(DType::BF16, DType::BF16, d, f, &[90, 0, 130, 80], 8);
    let whole = GpuEngine::with_context(Arc::new(context()));
    let opts = ContextOptions { max_binding_bytes: Some(64 << 10), ..ContextOptions::from_env() };
    let chunked = GpuEngine::with_context(Arc::new(context_with(&opts)));
    let mut a = Tensor::zeros(DType::BF16, batch.rows(), d);
    let mut b = Tensor::zeros(DType::BF16, batch.rows(), d);
    whole.ffn(&batch, &offs, &experts, true, &mut a).unwrap();
    chunked.ffn(&batch, &offs, &experts, true, &mut b).unwrap();
    assert_eq!(a.as_bytes(), b.as_bytes(), "chunked and whole calls differ");
    let err = rel_error(&b.to_f64_vec(), &reference(&batch, &offs, &experts));
    assert!(err < tolerance(DType::BF16), "rel error {err:.2e}");
}

#[test]
fn bad_ffn_input_is_an_error() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let (batch, offs, experts) = setup(DType::F32, DType::F32, 16, 8, &[2, 2], 3);
    let mut out = Tensor::zeros(DType::F32, batch.rows(), 16);
    let e = gpu.ffn(&batch, &[0, 2], &experts, false, &mut out).unwrap_err();
    assert!(e.to_string().contains("offsets"), "{e}");
    let e = gpu.ffn(&batch, &[0, 3, 2], &experts, false, &mut out).unwrap_err();
    assert!(e.to_string().contains("offsets"), "{e}");
    let mut short = Tensor::zeros(DType::F32, 3, 16);
    let e = gpu.ffn(&batch, &offs, &experts, false, &mut short).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
    // Odd sizes with 16-bit values: a device error (the layer's policy then uses the CPU).
    let (batch, offs, experts) = setup(DType::BF16, DType::BF16, 15, 8, &[1, 1], 3);
    let mut out = Tensor::zeros(DType::BF16, 2, 15);
    let e = gpu.ffn(&batch, &offs, &experts, false, &mut out).unwrap_err();
    assert!(moe_ep::compute::policy::is_device_error(&e) && e.to_string().contains("even"), "{e}");
}

#[test]
fn cooperative_variant_matches_the_reference_where_offered() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let big = [0, 100];
    // The deterministic mode never takes it; f32 and bf16 never do.
    assert_eq!(gpu.tile_for(&big, 64, 64, DType::F16, DType::F16, true), Tile::SQUARE);
    assert_eq!(gpu.tile_for(&big, 64, 64, DType::BF16, DType::BF16, false), Tile::SQUARE);
    if !gpu.context().coop_f16() {
        eprintln!(
            "{} offers no 16x16x16 f16 cooperative matrices with f32 accumulators: f16 prefill uses the portable kernel",
            gpu.context().describe()
        );
        assert_eq!(gpu.tile_for(&big, 64, 64, DType::F16, DType::F16, false), Tile::SQUARE);
        return;
    }
    assert_eq!(gpu.tile_for(&big, 64, 64, DType::F16, DType::F16, false), Tile::COOP);
    // Sizes that do not fill the 64-wide tiles; an expert
    // without rows, one with a partial row tile, one with several.
    for (d, f) in [(96, 80), (48, 112), (512, 1408)] {
        let (batch, offs, experts) = setup(DType::F16, DType::F16, d, f, &[3, 0, 70, 130], 21);
        let want = reference(&batch, &offs, &experts);
        let mut coop = Tensor::zeros(DType::F16, batch.rows(), d);
        gpu.ffn_with_tile(&batch, &offs, &experts, Tile::COOP, &mut coop).unwrap();
        let err = rel_error(&coop.to_f64_vec(), &want);
        let mut plain = Tensor::zeros(DType::F16, batch.rows(), d);
        gpu.ffn_with_tile(&batch, &offs, &experts, Tile::SQUARE, &mut plain).unwrap();
        let vs_plain = rel_error(&coop.to_f64_vec(), &plain.to_f64_vec());
        eprintln!("{d}x{f}: cooperative rel error {err:.2e} (against the portable kernel {vs_plain:.2e})");
        // The f16 intermediate adds about one f16 rounding to the output's.
        assert!(
            err < 2.5e-3 && vs_plain < 2.5e-3,
            "{d}x{f}: rel error {err:.2e}, {vs_plain:.2e} against the portable kernel"
        );
    }
}
