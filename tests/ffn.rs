//! The CPU expert FFN against the f64 reference on fresh random data: the row kernels (few
//! rows an expert, and every expert in deterministic mode) and the GEMM path (many rows),
//! every dtype pair, row counts from 0 to 200 an expert in one call, sizes that fill no tile
//! or vector; the deterministic mode's batch invariance; the kernels themselves against f64;
//! and bad arguments.

use moe_ep::compute::cpu::ffn::Plan;
use moe_ep::compute::cpu::gemm::{GemmElement, gemm_bt, matmul_bt};
use moe_ep::compute::cpu::gemv::{self, Kernel, Lhs};
use moe_ep::compute::cpu::panels::gemm_bt_panels;
use moe_ep::compute::engine::ffn_offsets;
use moe_ep::testing::reference::{ffn_f64, rel_error};
use moe_ep::{Activation, CpuEngine, DType, Engine, ExpertSet, MoeConfig, Tensor, random};

/// Row counts of one call: none, decode, the mid range, and past every GEMM crossover.
const MIX: [usize; 7] = [0, 1, 2, 5, 17, 64, 200];

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
                let want = ffn_f64(&batch, &offs, &experts, Activation::Silu);
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
    use moe_ep::testing::reference::expert_f64_with;
    let (d, f) = (64, 96);
    let act = Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 };
    for (seed, counts) in [(11, vec![2, 0, 3]), (12, vec![9, 1, 70])] {
        let offs = ffn_offsets(&counts);
        let cfg = MoeConfig::new(counts.len(), d, f, 1).with_activation(act).with_expert_bias(true);
        let make =
            || ExpertSet::with_activation(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()), act);
        let experts = make();
        assert!(experts.iter().all(|w| w.bias.is_some()));
        // The GEMM panels' path (f32 from 32 rows an expert) with the biases in its epilogue.
        let with_panels = make().with_cpu_gemm_panels();
        assert!(with_panels.cpu_gemm_panels().is_some());
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
        for (det, set) in [(true, &experts), (false, &experts), (false, &with_panels)] {
            let mut out = Tensor::zeros(DType::F32, batch.rows(), d);
            CpuEngine.ffn(&batch, &offs, set, det, &mut out).unwrap();
            let err = rel_error(&out.to_f64_vec(), &want);
            let panels = set.cpu_gemm_panels().is_some();
            assert!(err < 2e-6, "counts {counts:?} deterministic {det} panels {panels}: rel error {err:.2e}");
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

/// `counts` rows through experts of (`d`, `f`) against the f64 reference, both settings.
fn check_mix(counts: &[usize], d: usize, f: usize, act: DType, w: DType, seed: u64) {
    let offs = ffn_offsets(counts);
    let cfg = MoeConfig::new(counts.len(), d, f, 1).with_dtypes(act, w);
    let experts = ExpertSet::new(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()));
    let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, seed, 5);
    let want = ffn_f64(&batch, &offs, &experts, Activation::Silu);
    for det in [true, false] {
        let mut out = Tensor::zeros(act, batch.rows(), d);
        CpuEngine.ffn(&batch, &offs, &experts, det, &mut out).unwrap();
        let err = rel_error(&out.to_f64_vec(), &want);
        let plan = Plan::new(act, w, det);
        assert!(
            err < tolerance(act),
            "counts {counts:?} {act}/{w} deterministic {det} ({plan:?}): rel error {err:.2e}"
        );
    }
}

#[test]
fn every_dtype_pair_and_row_mix_matches_the_f64_reference() {
    let mut seed = 100;
    for act in DType::ALL {
        for w in DType::ALL {
            seed += 1;
            check_mix(&MIX, 70, 134, act, w, seed);
        }
    }
    // Past every dtype's GEMM crossover (bf16 on the bf16 dot product crosses last), and
    // vector-sized shapes (no tails), as real models have.
    for (i, dt) in DType::ALL.into_iter().enumerate() {
        let counts = [3, 300, 0, 9];
        assert!(counts[1] >= Plan::new(dt, dt, false).gemm_min_rows, "{dt}: 300 rows should take the GEMM");
        check_mix(&counts, 70, 134, dt, dt, 10 + i as u64);
        check_mix(&counts, 64, 96, dt, dt, 20 + i as u64);
    }
}

/// Experts also held in the GEMM's panels (`ExpertSet::with_cpu_gemm_panels`): every dtype
/// pair and a row mix across every crossover against the f64 reference; the deterministic
/// mode's bits unchanged by them; sets they cannot serve (mixed dtypes, packed) left without.
#[test]
fn gemm_panels_match_the_f64_reference() {
    let mut seed = 400;
    for act in DType::ALL {
        for w in DType::ALL {
            for (d, f, counts) in [(70, 134, vec![3, 40, 0, 130, 9]), (64, 96, vec![31, 32, 300, 1])] {
                seed += 1;
                let offs = ffn_offsets(&counts);
                let cfg = MoeConfig::new(counts.len(), d, f, 1).with_dtypes(act, w);
                let make = || ExpertSet::new(random::experts(&cfg, seed, &(0..counts.len()).collect::<Vec<_>>()));
                let (plain, panels) = (make(), make().with_cpu_gemm_panels());
                assert_eq!(panels.cpu_gemm_panels().map(|p| (p.dtype(), p.len())), Some((w, counts.len())));
                assert_eq!(panels.panel_bytes(), panels.bytes());
                let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, seed, 5);
                let want = ffn_f64(&batch, &offs, &plain, Activation::Silu);
                let run = |set: &ExpertSet, det: bool| {
                    let mut out = Tensor::zeros(act, batch.rows(), d);
                    CpuEngine.ffn(&batch, &offs, set, det, &mut out).unwrap();
                    out
                };
                let got = run(&panels, false);
                let err = rel_error(&got.to_f64_vec(), &want);
                let plan = Plan::new(act, w, false).with_panels(act);
                assert!(err < tolerance(act), "counts {counts:?} {act}/{w} ({plan:?}): rel error {err:.2e}");
                assert_eq!(
                    run(&panels, true).as_bytes(),
                    run(&plain, true).as_bytes(),
                    "{act}/{w}: deterministic bits"
                );
            }
        }
    }
    let cfg = MoeConfig::new(2, 64, 96, 1).with_dtypes(DType::BF16, DType::BF16);
    let mut mixed = random::experts(&cfg, 1, &[0, 1]);
    mixed[1].down = moe_ep::Weight::Dense(mixed[1].down.dense().unwrap().to_dtype(DType::F32));
    assert!(ExpertSet::new(mixed).with_cpu_gemm_panels().cpu_gemm_panels().is_none());
    let fmt = moe_ep::QuantFormat::affine(4, 32, DType::BF16).unwrap();
    let packed = ExpertSet::new(random::packed_experts(&cfg, fmt, 2, &[0, 1])).with_cpu_gemm_panels();
    assert!(packed.cpu_gemm_panels().is_none() && packed.panel_bytes() == 0);
    // Short slices are errors, with nothing written.
    let cfg = MoeConfig::new(1, 64, 96, 1).with_dtypes(DType::F32, DType::F32);
    let set = ExpertSet::new(random::experts(&cfg, 3, &[0])).with_cpu_gemm_panels();
    let p = set.cpu_gemm_panels().unwrap().get::<f32>(0).unwrap();
    let (mut c, mut scratch) = (vec![7f32; 2 * 96], Vec::new());
    let e = gemm_bt_panels(&[1f32; 64], &p.gate, &mut c, 2, None, false, &mut scratch).unwrap_err();
    assert!(e.to_string().contains("a has 64 elements"), "{e}");
    let e = gemm_bt_panels(&[1f32; 128], &p.gate, &mut c[..100], 2, None, false, &mut scratch).unwrap_err();
    assert!(e.to_string().contains("c has 100 elements"), "{e}");
    let e = gemm_bt_panels(&[1f32; 128], &p.gate, &mut c, 2, Some(&[0f32; 3]), false, &mut scratch).unwrap_err();
    assert!(e.to_string().contains("bias has 3 elements"), "{e}");
    assert!(c.iter().all(|&v| v == 7.0), "nothing written");
}

/// Deterministic mode: each row's output bits do not depend on the other rows of the call.
#[test]
fn deterministic_rows_are_the_same_bits_in_any_batch() {
    let (d, f) = (70, 134);
    for (act, w) in
        [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F16), (DType::F32, DType::BF16)]
    {
        let offs = ffn_offsets(&MIX);
        let cfg = MoeConfig::new(MIX.len(), d, f, 1).with_dtypes(act, w);
        let experts = ExpertSet::new(random::experts(&cfg, 31, &(0..MIX.len()).collect::<Vec<_>>()));
        let batch = random::uniform(act, *offs.last().unwrap(), d, 1.0, 31, 5);
        let mut all = Tensor::zeros(act, batch.rows(), d);
        CpuEngine.ffn(&batch, &offs, &experts, true, &mut all).unwrap();
        // Rows of the 200-row expert and the 17-row one, alone and in small groups.
        for (l, r0, r1) in [(6, 0, 1), (6, 37, 42), (6, 199, 200), (4, 3, 4), (4, 0, 17), (5, 60, 64), (1, 0, 1)] {
            let (a, b) = (offs[l] + r0, offs[l] + r1);
            let part = batch.slice_rows(a, b).unwrap();
            let mut counts = vec![0; MIX.len()];
            counts[l] = b - a;
            let mut out = Tensor::zeros(act, b - a, d);
            CpuEngine.ffn(&part, &ffn_offsets(&counts), &experts, true, &mut out).unwrap();
            assert_eq!(
                out.as_bytes(),
                all.slice_rows(a, b).unwrap().as_bytes(),
                "{act}/{w}: rows {r0}..{r1} of expert {l} differ alone"
            );
        }
    }
}

/// f64 `x_r · w_j` over `[m, k]` and `[n, k]` as f64 vectors.
fn dots_f64(x: &[f64], m: usize, w: &[f64], n: usize, k: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(m * n);
    for r in 0..m {
        for j in 0..n {
            out.push((0..k).map(|c| x[r * k + c] * w[j * k + c]).sum());
        }
    }
    out
}

/// Every row kernel this CPU has, on every weight dtype, both row formats, row counts past the
/// register block and lengths with vector tails, against f64; and each row alone gives the
/// same bits.
#[test]
fn row_kernels_match_f64_and_do_not_depend_on_the_row_count() {
    let mut seed = 200;
    let mut ran = Vec::new();
    for wd in DType::ALL {
        for (k, n) in [(1, 1), (15, 3), (16, 4), (17, 5), (33, 9), (64, 8), (70, 13)] {
            seed += 1;
            let w = random::uniform(wd, n + 2, k, 1.0, seed, 1);
            let m = 9;
            let xt = random::uniform(if wd == DType::BF16 { DType::BF16 } else { DType::F32 }, m, k, 1.0, seed, 2);
            let (xf, xb) = (xt.to_f32_vec(), xt.as_slice::<half::bf16>().map(|v| v.to_vec()));
            let want = dots_f64(&xt.to_f64_vec(), m, &w.to_f64_vec()[k..], n, k);
            let lhs: Vec<Lhs<'_>> = match &xb {
                Some(b) => vec![Lhs::F32(&xf), Lhs::Bf16(b)],
                None => vec![Lhs::F32(&xf)],
            };
            for (x, kernel) in lhs.into_iter().flat_map(|x| Kernel::available().into_iter().map(move |kn| (x, kn))) {
                let mut got = vec![0f32; m * n];
                if !gemv::rows_times_weight_rows_on(kernel, x, m, &w, 1, n + 1, &mut got) {
                    continue;
                }
                ran.push(kernel);
                let got64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
                let err = rel_error(&got64, &want);
                assert!(err < 1e-5, "{wd} k {k} n {n} {kernel:?}: rel error {err:.2e}");
                for r in [0, 4, 8] {
                    let one = match x {
                        Lhs::F32(v) => Lhs::F32(&v[r * k..(r + 1) * k]),
                        Lhs::Bf16(v) => Lhs::Bf16(&v[r * k..(r + 1) * k]),
                    };
                    let mut alone = vec![0f32; n];
                    assert!(gemv::rows_times_weight_rows_on(kernel, one, 1, &w, 1, n + 1, &mut alone));
                    assert_eq!(
                        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        got[r * n..(r + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{wd} k {k} n {n} {kernel:?}: row {r} alone differs"
                    );
                }
            }
        }
    }
    for kernel in Kernel::available() {
        if !ran.contains(&kernel) {
            panic!("{kernel:?} is available but never ran");
        }
    }
    let skipped = [Kernel::Bf16Dot, Kernel::Avx512, Kernel::Avx2].into_iter().filter(|k| !ran.contains(k));
    for kernel in skipped {
        let line = format!("SKIPPED row kernel {kernel:?}: this CPU lacks its features\n");
        std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).unwrap();
    }
}

/// `matmul_bt` (the router's product) against f64, and a row's bits whatever the row count.
#[test]
fn matmul_bt_matches_f64_and_is_batch_invariant() {
    let (m, k, n) = (37, 70, 24);
    let a = random::uniform(DType::F32, m, k, 1.0, 41, 1).to_f32_vec();
    let b = random::uniform(DType::F32, n, k, 1.0, 41, 2).to_f32_vec();
    let mut c = vec![0f32; m * n];
    matmul_bt(&a, &b, &mut c, m, k, n);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let err = rel_error(&to64(&c), &dots_f64(&to64(&a), m, &to64(&b), n, k));
    assert!(err < 1e-6, "rel error {err:.2e}");
    let mut one = vec![0f32; n];
    matmul_bt(&a[20 * k..21 * k], &b, &mut one, 1, k, n);
    assert_eq!(one, c[20 * n..21 * n], "row 20 alone");
}

/// `gemm_bt` in every dtype, with and without the bias, against f64 on the rounded inputs.
#[test]
fn gemm_bt_matches_f64_in_every_dtype() {
    let (m, k, n) = (150, 70, 45);
    for (i, dt) in DType::ALL.into_iter().enumerate() {
        let a = random::uniform(dt, m, k, 1.0, 51 + i as u64, 1);
        let b = random::uniform(dt, n, k, 1.0, 51 + i as u64, 2);
        let bias = random::uniform(dt, 1, n, 1.0, 51 + i as u64, 3);
        let mut want = dots_f64(&a.to_f64_vec(), m, &b.to_f64_vec(), n, k);
        let bv = bias.to_f64_vec();
        for (j, v) in want.iter_mut().enumerate() {
            *v += bv[j % n];
        }
        let c = match dt {
            DType::F32 => run_gemm::<f32>(&a, &b, &bias, true),
            DType::BF16 => run_gemm::<half::bf16>(&a, &b, &bias, false),
            DType::F16 => run_gemm::<half::f16>(&a, &b, &bias, true),
        };
        let err = rel_error(&c.to_f64_vec(), &want);
        assert!(err < tolerance(dt), "{dt}: rel error {err:.2e}");
    }
}

/// `a · b^T + bias` through `gemm_bt` in `T`, as a tensor.
fn run_gemm<T: GemmElement>(a: &Tensor, b: &Tensor, bias: &Tensor, parallel: bool) -> Tensor {
    let (m, k, n) = (a.rows(), a.cols(), b.rows());
    let mut c = vec![T::default(); m * n];
    gemm_bt(a.as_slice::<T>().unwrap(), b.as_slice().unwrap(), &mut c, m, k, n, bias.as_slice(), parallel);
    Tensor::from_vec(m, n, c).unwrap()
}
