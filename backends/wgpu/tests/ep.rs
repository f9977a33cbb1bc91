//! EP on thread ranks, each with its own GPU context: the GPU path equals the CPU path bit for
//! bit, and both match the f64 dense reference.

#[path = "../../../tests/common/mod.rs"]
mod harness;

use harness::{Case, small_cfg};
use moe_ep::{Capacity, DType, Engine};
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

/// GPU run equals CPU run bitwise on every rank (outputs and statistics), and the reference.
fn same_as_cpu(case: &Case) {
    let cpu = case.run();
    let gpu = case.run_with(&gpu_engine);
    for (r, ((yc, sc), (yg, sg))) in cpu.iter().zip(&gpu).enumerate() {
        assert!(yc.as_bytes() == yg.as_bytes(), "{case:?}: rank {r}: GPU output differs from CPU");
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
