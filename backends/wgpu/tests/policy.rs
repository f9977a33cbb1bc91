//! The layer's backend policy with a real GPU engine: warm-up measures the crossover on this
//! adapter, and the deterministic mode gives every token the same bits at any world size and
//! in any batch (the GPU FFN switches between its decode and tiled kernels by batch shape).
//!
//! Every engine of a test shares one device context (thread-safe), so its pipelines compile
//! once: the deterministic test builds 32 layers, and opening a device and compiling its FFN
//! pipelines for each took most of the test's time on the H200 (see BENCHMARKS.md).

#[path = "../../../tests/common/mod.rs"]
mod harness;

use std::sync::{Arc, OnceLock};

use harness::{TIMEOUT, check_batch_invariance, small_cfg};
use moe_ep::{BackendChoice, DType, Group, LayerOptions, LocalGroup, MoeLayer, Placement, random};
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};

/// An engine on the test's shared device context.
fn gpu() -> Box<GpuEngine> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        Arc::new(
            GpuContext::new(&ContextOptions::from_env())
                .unwrap_or_else(|e| panic!("GPU test needs a wgpu adapter: {e}")),
        )
    });
    Box::new(GpuEngine::with_context(ctx.clone()))
}

#[test]
fn deterministic_gpu_layer_is_batch_invariant() {
    eprintln!("adapter: {}", gpu().context().describe());
    for (act, w) in [(DType::F32, DType::BF16), (DType::BF16, DType::F16)] {
        // Hidden and intermediate sizes that suit the decode kernel, so that calls switch
        // between it and the tiled kernel as the batch changes.
        let mut cfg = small_cfg(3).with_dtypes(act, w).with_deterministic(true);
        cfg.hidden = 48;
        cfg.intermediate = 40;
        check_batch_invariance(&cfg, &|g, c, p, gate, e| {
            MoeLayer::with_gpu(g, c, p, gate, e, gpu(), LayerOptions::default())
        });
    }
}

#[test]
fn warm_up_measures_the_crossover_on_this_adapter() {
    let cfg = small_cfg(2);
    let placement = Placement::contiguous(cfg.num_experts, 2).unwrap();
    let gate = random::gate(&cfg, 9);
    let options = LayerOptions { backend: BackendChoice::Auto, crossover_max_tokens: 64, ..LayerOptions::default() };
    let out = LocalGroup::run(2, TIMEOUT, |g| {
        let rank = g.rank();
        let mine = random::experts(&cfg, 9, placement.experts_of(rank));
        let layer = MoeLayer::with_gpu(g, cfg.clone(), placement.clone(), gate.clone(), mine, gpu(), options.clone())?;
        let report = layer.warm_up()?;
        let (y, stats) = layer.forward_with_stats(&random::input(&cfg, 5, 9, rank))?;
        Ok::<_, moe_ep::Error>((report, stats, y.rows(), layer.crossover()))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let (report, stats, rows, crossover) = o.unwrap().unwrap();
        eprintln!("rank {r}: crossover {:?} from {:?}", report.crossover, report.points);
        assert_eq!(report.crossover_source, "measured");
        assert!(!report.points.is_empty());
        assert_eq!(report.crossover, crossover);
        let on_gpu = crossover.is_some_and(|n| 5 >= n);
        assert_eq!(stats.backend.starts_with("wgpu:"), on_gpu, "rank {r} ran on {}", stats.backend);
        assert_eq!(rows, 5);
    }
}
