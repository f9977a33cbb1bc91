//! The tensor-parallel layer (the baseline of ep-vs-tp) against the f64 dense reference at
//! several world sizes with uneven tokens, with every routing rule and a shared expert;
//! its slices cover the intermediate dimension; bad input is an error on every rank.

mod common;

use common::{Case, TIMEOUT, cpu_engine, deepseek_v3_cfg, small_cfg};
use moe_ep::layer::tp::{tp_slice, tp_weights};
use moe_ep::{Capacity, DType, Group, LocalGroup, TpLayer};

#[test]
fn slices_cover_the_intermediate_dimension_in_balanced_blocks() {
    for (f, world) in [(40, 3), (8, 8), (2048, 8), (13, 4), (7, 1)] {
        let slices: Vec<_> = (0..world).map(|r| tp_slice(f, world, r)).collect();
        assert_eq!(slices[0].start, 0);
        assert_eq!(slices[world - 1].end, f);
        assert!(slices.windows(2).all(|w| w[0].end == w[1].start));
        let unit = [64, 8, 2, 1].into_iter().find(|&u| f % u == 0 && f / u >= world).unwrap();
        let (min, max) = (slices.iter().map(|s| s.len()).min(), slices.iter().map(|s| s.len()).max());
        assert!(max.unwrap() - min.unwrap() <= unit, "{f} over {world}: {slices:?}");
        assert!(slices.iter().all(|s| s.start % unit == 0 && s.len() % unit == 0 && !s.is_empty()));
    }
    // Aligned where the size allows: 40 over 3 in units of 8, 2048 over 8 in units of 64.
    assert_eq!((0..3).map(|r| tp_slice(40, 3, r).len()).collect::<Vec<_>>(), vec![16, 16, 8]);
    assert_eq!(tp_slice(2048, 8, 7), 1792..2048);
}

#[test]
fn tp_layer_matches_the_reference_at_several_world_sizes() {
    for world in [1, 2, 3, 4] {
        for cfg in [
            small_cfg(2),
            small_cfg(6).with_dtypes(DType::BF16, DType::BF16),
            deepseek_v3_cfg(),
            small_cfg(2).with_norm_topk_prob(false).with_shared_expert(24, true).with_dtypes(DType::F16, DType::F32),
        ] {
            let case = Case::new(cfg, world);
            let got = case.run_tp_with(&cpu_engine);
            case.check_tp_outputs(&got);
            // Both exchanges' bytes, the same on the way out and back in.
            let rb = case.cfg.hidden * case.cfg.act_dtype.size();
            let total: usize = case.tokens.iter().sum();
            for (r, (_, s)) in got.iter().enumerate() {
                let n = case.tokens[r];
                assert_eq!(s.bytes_sent, n * rb * (world - 1) + (total - n) * rb, "rank {r}");
            }
        }
    }
}

#[test]
fn tp_and_ep_agree_on_the_same_tokens() {
    // F = 40 over 3 ranks: slices of 16, 16, 8.
    let case = Case::new(small_cfg(3).with_dtypes(DType::F32, DType::BF16), 3);
    let tp = case.run_tp_with(&cpu_engine);
    let ep = case.run();
    for (r, ((a, _), (b, _))) in tp.iter().zip(&ep).enumerate() {
        let rel = moe_ep::testing::reference::rel_error(&a.to_f64_vec(), &b.to_f64_vec());
        assert!(rel < 1e-5, "rank {r}: TP and EP differ by {rel:.2e}");
    }
}

#[test]
fn tp_errors_reach_every_rank() {
    let cfg = small_cfg(2);
    let case = Case::new(cfg.clone(), 3);
    let full = case.full_weights();
    // A rank with a slice of the wrong width.
    let errs = LocalGroup::run(3, TIMEOUT, |g| {
        let rank = g.rank();
        let w = tp_weights(&full, &cfg, if rank == 2 { 0 } else { rank }, 3).unwrap();
        TpLayer::new(g, cfg.clone(), w, cpu_engine(rank).unwrap()).map(|_| ())
    })
    .unwrap();
    let errs: Vec<String> = errs.into_iter().map(|e| e.unwrap().unwrap_err().to_string()).collect();
    assert!(errs[2].contains("rank 2") && errs[2].contains("slice of 8"), "{}", errs[2]);
    assert!(errs[0].contains("rank 2"), "{}", errs[0]);
    // EP shares of the same weights: only the placement's experts, replicated parts whole.
    let p = moe_ep::Placement::contiguous(24, 3).unwrap();
    let share = full.ep_share(&p, 1).unwrap();
    assert_eq!(share.experts, full.experts[8..16].to_vec());
    assert_eq!(share.router, full.router);
    assert!(full.ep_share(&p, 3).unwrap_err().to_string().contains("rank 3"));
    // A capacity limit is refused; an input of the wrong width fails on every rank.
    let capped = cfg.clone().with_capacity(Capacity::PerExpert(2));
    let errs = LocalGroup::run(2, TIMEOUT, |g| {
        let rank = g.rank();
        let w = tp_weights(&full, &cfg, rank, 2).unwrap();
        TpLayer::new(g, capped.clone(), w, cpu_engine(rank).unwrap()).map(|_| ())
    })
    .unwrap();
    assert!(errs.into_iter().all(|e| e.unwrap().unwrap_err().to_string().contains("Dropless")));
    let errs = LocalGroup::run(2, TIMEOUT, |g| {
        let rank = g.rank();
        let w = tp_weights(&full, &cfg, rank, 2).unwrap();
        let layer = TpLayer::new(g, cfg.clone(), w, cpu_engine(rank).unwrap())?;
        let x = moe_ep::testing::random::uniform(DType::F32, 3, if rank == 1 { 31 } else { 32 }, 1.0, 1, rank as u64);
        layer.forward(&x).map(|_| ())
    })
    .unwrap();
    let errs: Vec<String> = errs.into_iter().map(|e| e.unwrap().unwrap_err().to_string()).collect();
    assert!(errs[1].contains("rank 1") && errs[1].contains("input x"), "{}", errs[1]);
    assert!(errs[0].contains("rank 1"), "{}", errs[0]);
}
