//! Bad input and lost peers: an Error on every rank, naming what and where, within the timeout.

mod common;

use std::time::{Duration, Instant};

use common::small_cfg;
use moe_ep::testing::group_suite::Scenario;
use moe_ep::{
    Capacity, CpuEngine, DType, Error, Group, LocalGroup, MoeConfig, MoeLayer, Placement, Routing, Tensor, combine,
    dispatch, random,
};

const SHORT: Duration = Duration::from_millis(1500);

/// Run `f` on `world` thread ranks with a short timeout; each rank's error (or Ok), in order.
/// Also checks that everything ended well within a few timeouts (no hang).
fn run<T: Send>(
    world: usize,
    f: impl Fn(LocalGroup) -> Result<T, Error> + Sync,
) -> Vec<std::thread::Result<Result<T, Error>>> {
    let start = Instant::now();
    let out = LocalGroup::run(world, SHORT, f).unwrap();
    assert!(start.elapsed() < SHORT * 4, "took {:?}: something waited past its deadline", start.elapsed());
    out
}

/// Rank `bad` failed with InvalidInput naming itself, its message containing `needle`; every
/// other rank failed in `op` with PeerFailed naming `bad`.
fn assert_failed_on<T: std::fmt::Debug>(
    outs: Vec<std::thread::Result<Result<T, Error>>>,
    bad: usize,
    op: &'static str,
    needle: &str,
) {
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        if r == bad {
            assert!(matches!(e, Error::InvalidInput { rank: Some(b), .. } if b == bad), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        } else {
            assert_eq!(e, Error::PeerFailed { rank: r, op, peer: bad });
        }
    }
}

fn layer(g: LocalGroup, cfg: &MoeConfig) -> Result<MoeLayer<LocalGroup>, Error> {
    let p = Placement::contiguous(cfg.num_experts, g.size())?;
    let mine = random::experts(cfg, 1, p.experts_of(g.rank()));
    MoeLayer::new(g, cfg.clone(), p, random::gate(cfg, 1), mine)
}

#[test]
fn out_of_range_expert_id_fails_on_every_rank() {
    for world in [2, 3, 4] {
        let outs = run(world, |g| {
            let r = g.rank();
            let p = Placement::from_map((0..8).map(|e| e % world).collect(), world)?;
            let x = random::uniform(DType::F32, 3, 4, 1.0, 1, r as u64);
            let bad = if r == 1 { 8 } else { 0 };
            let routing = Routing::new(3, 1, vec![0, bad, 1], vec![1.0; 3])?;
            dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing).map(|_| ())
        });
        assert_failed_on(outs, 1, "dispatch", "expert id 8 at token 1");
    }
}

#[test]
fn wrong_input_shape_or_dtype_fails_on_every_rank() {
    let cfg = small_cfg(2);
    for (bad_cols, bad_dtype) in [(31, DType::F32), (32, DType::F16)] {
        let outs = run(4, |g| {
            let r = g.rank();
            let l = layer(g, &cfg)?;
            let x =
                if r == 2 { random::uniform(bad_dtype, 5, bad_cols, 1.0, 1, 2) } else { random::input(&cfg, 5, 1, r) };
            l.forward(&x)
        });
        assert_failed_on(outs, 2, "dispatch", "input x");
    }
}

#[test]
fn config_that_differs_between_ranks_fails_on_every_rank() {
    let outs = run(3, |g| {
        let k = if g.rank() == 2 { 3 } else { 2 };
        layer(g, &small_cfg(k)).map(|_| ())
    });
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        assert_eq!(e, Error::ConfigMismatch { rank: r, detail: "top_k is 2 on rank 0 but 3 on rank 2".into() });
    }
    // Different capacity, then a different router weight.
    let outs = run(2, |g| {
        let cap = if g.rank() == 1 { Capacity::PerExpert(4) } else { Capacity::Dropless };
        layer(g, &small_cfg(2).with_capacity(cap)).map(|_| ())
    });
    for o in outs {
        assert!(o.unwrap().unwrap_err().to_string().contains("capacity kind is 0 on rank 0 but 1 on rank 1"));
    }
    let outs = run(2, |g| {
        let cfg = small_cfg(2);
        let p = Placement::contiguous(24, 2)?;
        let mine = random::experts(&cfg, 1, p.experts_of(g.rank()));
        let gate = random::gate(&cfg, 1 + g.rank() as u64);
        MoeLayer::new(g, cfg, p, gate, mine).map(|_| ())
    });
    for o in outs {
        assert!(o.unwrap().unwrap_err().to_string().contains("router weight differs between rank 0 and rank 1"));
    }
}

#[test]
fn bad_weights_on_one_rank_fail_on_every_rank() {
    let outs = run(3, |g| {
        let cfg = small_cfg(2);
        let r = g.rank();
        let p = Placement::contiguous(24, 3)?;
        let mut mine = random::experts(&cfg, 1, p.experts_of(r));
        if r == 0 {
            mine[3].down = Tensor::zeros(DType::F32, 32, 39).into();
        }
        MoeLayer::new(g, cfg.clone(), p, random::gate(&cfg, 1), mine).map(|_| ())
    });
    assert_failed_on(
        outs,
        0,
        "MoeLayer::new",
        "rank 0: invalid input: expert 3.down has shape [32, 39], expected [32, 40]",
    );
}

#[test]
fn wrong_expert_outputs_in_combine_fail_on_every_rank() {
    let outs = run(3, |g| {
        let r = g.rank();
        let p = Placement::contiguous(6, 3)?;
        let x = random::uniform(DType::F16, 4, 8, 1.0, 1, r as u64);
        let routing = Routing::new(4, 2, vec![0, 5, 1, 2, 3, 4, 5, 0], vec![0.5; 8])?;
        let d = dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing)?;
        let outputs = if r == 0 { Tensor::zeros(DType::F16, d.batch.rows() + 1, 8) } else { d.batch.clone() };
        combine(&g, &CpuEngine, d.handle, &outputs).map(|_| ())
    });
    assert_failed_on(outs, 0, "combine", "rank 0: invalid input: expert outputs has shape");
}

#[test]
fn a_peer_that_panics_before_forward_is_named() {
    let cfg = small_cfg(2);
    let outs = run(4, |g| {
        let r = g.rank();
        let l = layer(g, &cfg)?;
        if r == 3 {
            panic!("rank 3 dies on purpose");
        }
        l.forward(&random::input(&cfg, 6, 1, r))
    });
    for (r, o) in outs.into_iter().enumerate() {
        if r == 3 {
            assert!(o.is_err(), "rank 3 panicked");
        } else {
            let e = o.unwrap().unwrap_err();
            assert_eq!(e.peer(), Some(3), "rank {r}: {e}");
        }
    }
}

#[test]
fn a_peer_that_dies_between_dispatch_and_combine_is_named() {
    let outs = run(3, |g| {
        let r = g.rank();
        let p = Placement::contiguous(6, 3)?;
        let x = random::uniform(DType::F32, 4, 8, 1.0, 1, r as u64);
        let routing = Routing::new(4, 1, vec![0, 2, 4, 5], vec![1.0; 4])?;
        let d = dispatch(&g, &CpuEngine, &p, Capacity::Dropless, &x, &routing)?;
        if r == 1 {
            drop(g);
            return Ok(());
        }
        combine(&g, &CpuEngine, d.handle, &d.batch).map(|_| ())
    });
    for (r, o) in outs.into_iter().enumerate() {
        let res = o.unwrap();
        if r == 1 {
            assert!(res.is_ok());
        } else {
            let e = res.unwrap_err();
            // Rank 2 may hear it first-hand or from rank 0; either way rank 1 is named.
            assert_eq!(e.peer(), Some(1), "rank {r}: {e}");
            assert!(matches!(e, Error::PeerLost { .. } | Error::PeerReported { .. }), "rank {r}: {e}");
        }
    }
}

#[test]
fn a_stalled_peer_times_out_naming_it() {
    let cfg = small_cfg(1);
    let start = Instant::now();
    let outs = LocalGroup::run(3, Duration::from_millis(300), |g| {
        let r = g.rank();
        let l = layer(g, &cfg)?;
        if r == 0 {
            std::thread::sleep(Duration::from_millis(900));
        }
        l.forward(&random::input(&cfg, 2, 1, r))
    })
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        match r {
            // Rank 0 arrives late: its peers have given up on it, and say so in the same call.
            0 => assert!(matches!(e, Error::PeerReported { rank: 0, op: "all_to_all", peer: 0, .. }), "{e}"),
            _ => assert_eq!(
                e,
                Error::Timeout { rank: r, op: "all_to_all", peer: 0, timeout: Duration::from_millis(300) }
            ),
        }
    }
}

#[test]
fn invalid_configs_are_rejected_with_a_reason() {
    assert!(MoeConfig::new(8, 16, 16, 0).validate().unwrap_err().to_string().contains("top_k = 0"));
    assert!(MoeConfig::new(8, 16, 16, 17).validate().is_err());
    assert!(MoeConfig::new(4, 16, 16, 5).validate().is_err());
    assert!(MoeConfig::new(8, 16, 16, 2).with_capacity(Capacity::Factor(-1.0)).validate().is_err());
    assert!(Placement::contiguous(10, 4).unwrap_err().to_string().contains("explicit"));
    assert!(Placement::from_map(vec![0, 4], 4).unwrap_err().to_string().contains("expert 1 on rank 4"));
    assert!(Routing::new(2, 2, vec![0; 3], vec![0.0; 4]).is_err());
    assert!(Tensor::from_f32(DType::F16, 2, 3, &[0.0; 5]).is_err());
}

/// Run `scenario` of the suite every group engine passes at 2, 3 and 4 thread ranks at once;
/// every rank must see what the scenario expects.
fn suite(scenario: Scenario) {
    let start = Instant::now();
    let worlds = [2, 3, 4];
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = worlds
            .iter()
            .map(|&w| s.spawn(move || LocalGroup::run(w, scenario.timeout(), |g| scenario.run(g, drop)).unwrap()))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (w, outs) in worlds.iter().zip(outcomes) {
        for (r, o) in outs.into_iter().enumerate() {
            let o = o.unwrap_or_else(|_| panic!("{}: rank {r} of {w} panicked", scenario.name()));
            o.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // No hang: everything ended soon after the scenario's own sleeps.
    assert!(start.elapsed() < scenario.span() + Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn suite_call_skew() {
    suite(Scenario::CallSkew);
}

#[test]
fn suite_size_mismatch() {
    suite(Scenario::SizeMismatch);
}

#[test]
fn suite_bad_arguments() {
    suite(Scenario::BadArguments);
}

#[test]
fn suite_stalled_peer() {
    suite(Scenario::StalledPeer);
}

#[test]
fn suite_working_peer() {
    suite(Scenario::WorkingPeer);
}

#[test]
fn suite_no_timeout() {
    suite(Scenario::NoTimeout);
}

#[test]
fn suite_lost_peer() {
    suite(Scenario::LostPeer);
}

#[test]
fn every_scenario_has_a_test_here() {
    // The tests above, by name: a new scenario must get one (and a run in backends/mpi).
    let here = include_str!("failures.rs");
    for s in Scenario::ALL {
        let name = format!("Scenario::{s:?})");
        assert!(here.contains(&name), "no test runs {name}");
        assert_eq!(Scenario::from_name(s.name()), Some(s));
    }
}
