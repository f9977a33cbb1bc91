//! EP on thread ranks, each with its own GPU context: the GPU data path (dispatch, combine)
//! equals the CPU's bit for bit; the whole layer on the GPU (with its FFN) matches the f64
//! dense reference and the CPU layer's statistics.

#[path = "../../../tests/common/mod.rs"]
mod harness;

use harness::{Case, TIMEOUT, small_cfg};
use moe_ep::{Capacity, CpuEngine, DType, Engine, Group, LocalGroup, Tensor, model::router, random};
use moe_ep_wgpu::{ContextOptions, GpuEngine};

fn gpu_engine(rank: usize) -> moe_ep::Result<Box<dyn Engine>> {
    let e = GpuEngine::new(&ContextOptions::from_env())
        .map_err(|e| panic!("GPU test needs a wgpu adapter (rank {rank}): {e}"))
        .unwrap();
    if rank == 0 {
        eprintln!("adapter: {}", e.context().describe());
    }
    Ok(Box::new(e))
}

/// Dispatch, identity experts and combine with `engine` on every rank: the combined rows.
fn data_path(case: &Case, engine: harness::MakeEngine<'_>) -> Vec<Tensor> {
    LocalGroup::run(case.world, TIMEOUT, |g| {
        let rank = g.rank();
        let e = engine(rank)?;
        let x = case.input(rank);
        let cfg = &case.cfg;
        let bias = random::selection_bias(cfg, case.seed);
        let routing = router::route_config(&x, &case.gate(), bias.as_deref(), cfg)?;
        let d = moe_ep::dispatch(&g, e.as_ref(), &case.placement(), cfg.capacity, &x, &routing)?;
        let out = d.batch;
        moe_ep::combine(&g, e.as_ref(), d.handle, &out).map(|(y, _)| y)
    })
    .unwrap()
    .into_iter()
    .enumerate()
    .map(|(r, o)| o.unwrap_or_else(|_| panic!("rank {r} panicked")).unwrap_or_else(|e| panic!("rank {r}: {e}")))
    .collect()
}

/// The GPU data path equals the CPU's bitwise on every rank; the GPU layer matches the
/// reference, and the CPU layer's statistics.
fn same_as_cpu(case: &Case) {
    let cpu_path = data_path(case, &|_| Ok(Box::new(CpuEngine)));
    let gpu_path = data_path(case, &gpu_engine);
    for (r, (c, g)) in cpu_path.iter().zip(&gpu_path).enumerate() {
        assert!(c.as_bytes() == g.as_bytes(), "{case:?}: rank {r}: GPU data path differs from CPU");
    }
    let cpu = case.run();
    let gpu = case.run_with(&gpu_engine);
    for (r, ((_, sc), (_, sg))) in cpu.iter().zip(&gpu).enumerate() {
        assert_eq!(
            (sc.dropped, &sc.rows_sent, &sc.rows_received),
            (sg.dropped, &sg.rows_sent, &sg.rows_received),
            "rank {r}: statistics"
        );
        assert!(sg.backend.starts_with("wgpu:"), "rank {r} ran on {}", sg.backend);
    }
    case.check_outputs(gpu);
}

#[test]
fn gpu_path_equals_cpu_path_at_every_world_size() {
    for world in [1, 2, 3, 4] {
        for k in [1, 2, 6] {
            same_as_cpu(&Case::new(small_cfg(k), world));
        }
    }
}

#[test]
fn gpu_path_every_dtype_capacity_and_skew() {
    for act in DType::ALL {
        same_as_cpu(&Case::new(small_cfg(2).with_dtypes(act, DType::BF16), 3));
    }
    for cap in [Capacity::Factor(1.0), Capacity::PerExpert(2)] {
        same_as_cpu(&Case::new(small_cfg(3).with_capacity(cap), 4));
    }
    let mut skewed = Case::new(small_cfg(2), 2);
    skewed.skew = true;
    same_as_cpu(&skewed);
}

#[test]
fn gpu_layer_with_deepseek_routing_and_shared_experts() {
    for world in [2, 3] {
        same_as_cpu(&Case::new(harness::deepseek_v3_cfg(), world));
        same_as_cpu(&Case::new(small_cfg(2).with_norm_topk_prob(false).with_shared_expert(24, true), world));
    }
}

#[test]
fn tp_layer_on_the_gpu_matches_the_reference() {
    for world in [2, 3] {
        for cfg in [small_cfg(2).with_dtypes(DType::BF16, DType::BF16), harness::deepseek_v3_cfg()] {
            let case = Case::new(cfg, world);
            let got = case.run_tp_with(&gpu_engine);
            assert!(got.iter().all(|(_, s)| s.backend.starts_with("wgpu:")));
            case.check_tp_outputs(&got);
        }
    }
}
