//! Every collective of a call carries what it belongs to: the layer (its id, agreed at
//! construction), the call (the handle id rank 0 drew in the counts round) and the placement.
//! A rank in another layer, another call or with another placement makes every rank fail with
//! `Mismatch` in the same call, never a wrong answer.

mod common;

use common::{TIMEOUT, small_cfg};
use moe_ep::{
    Capacity, CpuEngine, Error, Group, LocalGroup, MoeLayer, Placement, Result, combine, dispatch, model::router,
    random,
};

fn is_mismatch(e: &Error) -> bool {
    matches!(e, Error::Mismatch { .. })
}

/// Two layers of the same shape on one group; rank 1 calls B where the others call A.
#[test]
fn a_rank_in_another_layer_is_a_mismatch_on_every_rank() {
    for world in [2, 3, 4] {
        let cfg = small_cfg(2);
        let out = LocalGroup::run(world, TIMEOUT, |g| -> Result<()> {
            let rank = g.rank();
            let p = Placement::contiguous(cfg.num_experts, world)?;
            let build = |seed: u64| {
                MoeLayer::new(
                    &g,
                    cfg.clone(),
                    p.clone(),
                    random::gate(&cfg, seed),
                    random::experts(&cfg, seed, p.experts_of(rank)),
                )
            };
            let (a, b) = (build(1)?, build(1)?);
            let x = random::input(&cfg, 5 + rank, 3, rank);
            let layer = if rank == 1 { &b } else { &a };
            layer.forward(&x).map(|_| ())
        })
        .unwrap();
        for (r, o) in out.into_iter().enumerate() {
            let e = o.unwrap().expect_err("the call must fail");
            assert!(is_mismatch(&e), "world {world} rank {r}: {e}");
            assert!(e.to_string().contains("another caller"), "world {world} rank {r}: {e}");
        }
    }
}

/// Two dispatches, then one rank combines them in swapped order.
#[test]
fn handles_combined_in_swapped_order_are_a_mismatch_on_every_rank() {
    for world in [2, 3] {
        let cfg = small_cfg(2);
        let out = LocalGroup::run(world, TIMEOUT, |g| -> Result<()> {
            let rank = g.rank();
            let p = Placement::contiguous(cfg.num_experts, world)?;
            let gate = random::gate(&cfg, 2);
            let x = random::input(&cfg, 4 + 3 * rank, 2, rank);
            let routing = router::route(&x, &gate, cfg.top_k, true)?;
            let d1 = dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing)?;
            let d2 = dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing)?;
            assert_ne!(d1.handle.id(), d2.handle.id(), "every call has its own id");
            let (first, second) = if rank == 0 { (d2, d1) } else { (d1, d2) };
            let r1 = combine(&g, &CpuEngine, first.handle, &first.batch);
            let _ = combine(&g, &CpuEngine, second.handle, &second.batch);
            r1.map(|_| ())
        })
        .unwrap();
        for (r, o) in out.into_iter().enumerate() {
            let e = o.unwrap().expect_err("the first combine must fail");
            assert!(is_mismatch(&e), "world {world} rank {r}: {e}");
        }
    }
}

/// Placements that differ between ranks while giving every rank as many experts.
#[test]
fn placements_that_differ_are_a_mismatch_on_every_rank() {
    let world = 2;
    let cfg = small_cfg(2);
    let out = LocalGroup::run(world, TIMEOUT, |g| -> Result<()> {
        let rank = g.rank();
        let e = cfg.num_experts;
        // Rank 1 swaps the owners of experts 0 and e - 1: still e / 2 experts each.
        let mut owners: Vec<usize> = (0..e).map(|i| i * world / e).collect();
        if rank == 1 {
            owners.swap(0, e - 1);
        }
        let p = Placement::from_map(owners, world)?;
        let gate = random::gate(&cfg, 4);
        let x = random::input(&cfg, 6, 4, rank);
        let routing = router::route(&x, &gate, cfg.top_k, true)?;
        dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing).map(|_| ())
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let e = o.unwrap().expect_err("the dispatch must fail");
        assert!(is_mismatch(&e) && e.to_string().contains("placement"), "rank {r}: {e}");
    }
}
