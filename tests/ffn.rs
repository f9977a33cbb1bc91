//! The CPU expert FFN against the f64 reference on fresh random data: the GEMM path (always
//! taken in deterministic mode) and the decode path (a few rows an expert), every dtype pair,
//! sizes that fill no tile, experts without rows; and bad arguments.

use moe_ep::compute::engine::ffn_offsets;
use moe_ep::testing::reference::{expert_f64, rel_error};
use moe_ep::{CpuEngine, DType, Engine, ExpertSet, MoeConfig, Tensor, random};

fn tolerance(act: DType) -> f64 {
    match act {
        DType::F32 => 2e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

#[test]
fn both_paths_match_the_f64_reference() {
    let (d, f) = (70, 134);
    let mut seed = 0;
    for counts in [vec![1, 0, 4, 2, 3], vec![3, 0, 17, 70, 1]] {
        let offs = ffn_offsets(&counts);
        for act in DType::ALL {
            for w in DType::ALL {
                seed += 1;
                let cfg = MoeConfig::new(counts.len(), d, f, 1).with_dtypes(act, w);
                let experts = ExpertSet::new(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()));
                let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, seed, 5);
                let x = batch.to_f64_vec();
                let mut want = Vec::new();
                for (l, e) in experts.iter().enumerate() {
                    for r in offs[l]..offs[l + 1] {
                        want.extend(expert_f64(e, &x[r * d..(r + 1) * d]));
                    }
                }
                for det in [true, false] {
                    let mut out = Tensor::zeros(act, batch.rows(), d);
                    CpuEngine.ffn(&batch, &offs, &experts, det, &mut out).unwrap();
                    let err = rel_error(&out.to_f64_vec(), &want);
                    assert!(
                        err < tolerance(act),
                        "counts {counts:?} {act}/{w} deterministic {det}: rel error {err:.2e}"
                    );
                }
            }
        }
    }
}

/// gpt-oss's experts: clamped SwiGLU (alpha 1.702, limit 7) with biases on every projection,
/// on both paths, against the f64 formulas. The inputs are scaled so that the clamps bind
/// for a good share of the values.
#[test]
fn clamped_swiglu_with_biases_matches_the_f64_reference() {
    use moe_ep::Activation;
    use moe_ep::testing::reference::expert_f64_with;
    let (d, f) = (64, 96);
    let act = Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 };
    for (seed, counts) in [(11, vec![2, 0, 3]), (12, vec![9, 1, 70])] {
        let offs = ffn_offsets(&counts);
        let cfg = MoeConfig::new(counts.len(), d, f, 1).with_activation(act).with_expert_bias(true);
        let experts =
            ExpertSet::with_activation(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()), act);
        assert!(experts.iter().all(|w| w.bias.is_some()));
        let batch = random::uniform(DType::F32, *offs.last().unwrap(), d, 12.0, seed, 5);
        let x = batch.to_f64_vec();
        let mut want = Vec::new();
        let mut clamped = 0;
        for (l, e) in experts.iter().enumerate() {
            for r in offs[l]..offs[l + 1] {
                let h = &x[r * d..(r + 1) * d];
                let g0: f64 = (0..d).map(|c| e.gate.dense().unwrap().get_f32(0, c).unwrap() as f64 * h[c]).sum();
                clamped += usize::from(g0 > 7.0);
                want.extend(expert_f64_with(e, act, h));
            }
        }
        assert!(clamped > 0, "the data should reach the clamp");
        for det in [true, false] {
            let mut out = Tensor::zeros(DType::F32, batch.rows(), d);
            CpuEngine.ffn(&batch, &offs, &experts, det, &mut out).unwrap();
            let err = rel_error(&out.to_f64_vec(), &want);
            assert!(err < 2e-6, "counts {counts:?} deterministic {det}: rel error {err:.2e}");
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let cfg = MoeConfig::new(2, 16, 8, 1);
    let experts = ExpertSet::new(random::experts(&cfg, 1, &[0, 1]));
    let batch = random::uniform(DType::F32, 4, 16, 1.0, 1, 1);
    let mut out = Tensor::zeros(DType::F32, 4, 16);
    for bad in [vec![0, 4], vec![0, 3, 2], vec![1, 2, 4], vec![0, 2, 5]] {
        let e = CpuEngine.ffn(&batch, &bad, &experts, false, &mut out).unwrap_err();
        assert!(e.to_string().contains("offsets"), "{bad:?}: {e}");
    }
    let mut wrong = Tensor::zeros(DType::BF16, 4, 16);
    let e = CpuEngine.ffn(&batch, &[0, 2, 4], &experts, false, &mut wrong).unwrap_err();
    assert!(e.to_string().contains("output"), "{e}");
}
