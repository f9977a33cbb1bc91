//! The device-resident GPU path: what crosses between host and device in a forward, exactly
//! (world 1: x up; ids, weights and y back; worlds 2-4: the exchange blocks too), how often it
//! submits and waits, both exchange modes (in place on mapped buffers, and through staging),
//! device tensors in and out, and the GPU router against the CPU router for every routing rule.

#[path = "../../../tests/common/mod.rs"]
mod harness;

use std::io::Write;
use std::sync::{Arc, Mutex};

use harness::{Case, TIMEOUT, uneven_tokens};
use moe_ep::compute::session::{Matrix, RouterSet};
use moe_ep::model::router::route_config;
use moe_ep::testing::reference::rel_error;
use moe_ep::{
    DType, Engine, ForwardStats, Group, GroupScore, LayerWeights, LocalGroup, MoeConfig, MoeLayer, RouterConfig,
    Scoring, Tensor, random,
};
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};

/// An engine on the one device context of exchange mode `mapped` that every rank and test
/// shares (a context per rank compiles every pipeline again, and with a device per context
/// this file hung on the H200: see `moe_ep_wgpu::context`; the last test here opens a context
/// per rank on purpose).
fn engine(mapped: Option<bool>) -> GpuEngine {
    static CONTEXTS: Mutex<Vec<(Option<bool>, Arc<GpuContext>)>> = Mutex::new(Vec::new());
    let mut all = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = all.iter().find(|(m, _)| *m == mapped) {
        return GpuEngine::with_context(c.clone());
    }
    let opts = ContextOptions { mapped_exchange: mapped, ..ContextOptions::from_env() };
    let ctx = Arc::new(GpuContext::new(&opts).unwrap_or_else(|e| panic!("GPU test needs a wgpu adapter: {e}")));
    all.push((mapped, ctx.clone()));
    GpuEngine::with_context(ctx)
}

/// Say, uncaptured, that a variant did not run.
fn skipped(what: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

/// The exchange modes this adapter can run: staging always, in place where offered.
fn modes() -> Vec<Option<bool>> {
    let mut m = vec![Some(false)];
    match GpuEngine::new(&ContextOptions { mapped_exchange: Some(true), ..ContextOptions::from_env() }) {
        Ok(_) => m.push(Some(true)),
        Err(e) => skipped(&format!("in-place exchange buffers: {e}")),
    }
    m
}

fn cfg() -> MoeConfig {
    // Sizes that take the decode kernel at a few rows an expert and the tiled one beyond.
    MoeConfig::new(12, 64, 96, 3).with_dtypes(DType::BF16, DType::BF16).with_shared_expert(32, true)
}

/// Each rank's (y, stats) of one forward of `case` on a GPU engine in exchange mode `mapped`.
fn run(case: &Case, mapped: Option<bool>, device: bool) -> Vec<(Tensor, ForwardStats)> {
    let out = LocalGroup::run(case.world, TIMEOUT, |g| {
        let rank = g.rank();
        let e = engine(mapped);
        let p = case.placement();
        let w = LayerWeights { router: case.gate(), ..random::layer_weights(&case.cfg, case.seed, &p, rank) };
        let layer = MoeLayer::with_engine_weights(g, case.cfg.clone(), p, w, Box::new(e.clone()))?;
        let x = case.input(rank);
        if device {
            let (y, s) = layer.forward_device(&e.to_device(&x)?)?;
            Ok((e.to_host(&y)?, s))
        } else {
            layer.forward_with_stats(&x)
        }
    })
    .unwrap();
    out.into_iter().map(|o| o.expect("no panic").expect("forward ok")).collect()
}

/// The bytes that must cross, from the call's own counts: x up (host input), every received
/// block up; ids and weights, every send block and y back (host output). Blocks carry a status
/// block of whole rows (16 bytes at least) per peer.
fn expected(s: &ForwardStats, cfg: &MoeConfig, device: bool) -> (u64, u64) {
    let rb = cfg.hidden * cfg.act_dtype.size();
    let status = 16usize.div_ceil(rb);
    let (w, r) = (s.world, s.rank);
    let peers = |v: &[usize]| v.iter().enumerate().filter(|&(p, _)| p != r).map(|(_, &n)| n + status).sum::<usize>();
    let (out, inn) = if w > 1 { (peers(&s.rows_sent), peers(&s.rows_received)) } else { (0, 0) };
    let x = if device { 0 } else { s.tokens * rb };
    let up = x + (inn + out) * rb;
    let back = s.tokens * cfg.top_k * 8 + (out + inn) * rb + x;
    (up as u64, back as u64)
}

#[test]
fn a_forward_moves_what_it_must_and_nothing_else() {
    let mut seen = 0;
    for mapped in modes() {
        for world in [1, 2, 3, 4] {
            for device in [false, true] {
                let case = Case::new(cfg(), world);
                let cpu = case.run();
                let t = std::time::Instant::now();
                let outs = run(&case, mapped, device);
                eprintln!("world {world} mapped {mapped:?} device {device}: {:.2} s", t.elapsed().as_secs_f64());
                for (r, (y, s)) in outs.iter().enumerate() {
                    let what = format!("world {world} rank {r} mapped {mapped:?} device {device}");
                    let (up, back) = expected(s, &case.cfg, device);
                    assert_eq!((s.host_upload_bytes, s.host_readback_bytes), (up, back), "{what}: host bytes");
                    // One submit and one wait per stretch between host points: route, then (world
                    // > 1) pack, experts; then the combine. A rank without tokens has no output
                    // to compute, so its last stretch is empty and not submitted.
                    let syncs = if world == 1 { 2 } else { 4 } - u64::from(s.tokens == 0);
                    assert_eq!((s.gpu_submits, s.gpu_waits), (syncs, syncs), "{what}: submits and waits");
                    let err = rel_error(&y.to_f64_vec(), &cpu[r].0.to_f64_vec());
                    assert!(err < 2e-2, "{what}: the GPU layer differs from the CPU layer by {err:.2e}");
                    seen += 1;
                }
            }
        }
    }
    assert!(seen >= 2 * (1 + 2 + 3 + 4));
}

#[test]
fn both_exchange_modes_give_the_same_bits() {
    let all = modes();
    if all.len() < 2 {
        skipped("comparison of the exchange modes (one mode only)");
        return;
    }
    let case = Case::new(cfg(), 3);
    let staged = run(&case, Some(false), false);
    let in_place = run(&case, Some(true), false);
    for (r, (a, b)) in staged.iter().zip(&in_place).enumerate() {
        assert!(a.0.as_bytes() == b.0.as_bytes(), "rank {r}: the exchange modes differ");
    }
}

/// A device failure in the middle of a forward (here: the FFN of one rank, after the
/// exchange) hands the rest of that rank's call to the CPU, which takes the received rows from
/// the host (staging) or back from the device (in place): the outputs match the CPU layer's.
#[test]
fn a_gpu_failure_mid_forward_is_finished_on_the_cpu() {
    for mapped in modes() {
        for world in [1, 3] {
            let case = Case::new(cfg(), world);
            let cpu = case.run();
            let out = LocalGroup::run(world, TIMEOUT, |g| {
                let rank = g.rank();
                let e = engine(mapped);
                if rank == world - 1 {
                    e.fail_next_ffns(1);
                }
                let p = case.placement();
                let w = LayerWeights { router: case.gate(), ..random::layer_weights(&case.cfg, case.seed, &p, rank) };
                let opts = moe_ep::LayerOptions { backend: moe_ep::BackendChoice::Gpu, ..Default::default() };
                let layer = MoeLayer::from_weights(g, case.cfg.clone(), p, w, Some(Box::new(e)), opts)?;
                layer.forward_with_stats(&case.input(rank))
            })
            .unwrap();
            for (r, o) in out.into_iter().enumerate() {
                let (y, s) = o.unwrap().unwrap_or_else(|e| panic!("world {world} rank {r} mapped {mapped:?}: {e}"));
                let what = format!("world {world} rank {r} mapped {mapped:?}");
                assert_eq!(s.fallbacks, usize::from(r == world - 1), "{what}: {:?}", s.fallback_error);
                let err = rel_error(&y.to_f64_vec(), &cpu[r].0.to_f64_vec());
                assert!(err < 2e-2, "{what}: differs from the CPU layer by {err:.2e}");
                if r == world - 1 {
                    assert!(s.fallback_error.as_deref().is_some_and(|e| e.contains("injected")), "{what}");
                }
            }
        }
    }
}

/// Llama 4's rule on the GPU (rows scaled by their weight before they travel, summed with
/// weight 1) and gpt-oss's router: the layer against the f64 reference at worlds 1-3.
#[test]
fn input_scaled_and_gpt_oss_routing_on_the_gpu_match_the_reference() {
    let llama4 = MoeConfig::new(12, 64, 96, 2)
        .with_norm_topk_prob(false)
        .with_router(RouterConfig { scoring: Scoring::Sigmoid, weights_on_input: true, ..Default::default() })
        .with_shared_expert(32, false)
        .with_dtypes(DType::BF16, DType::BF16);
    let gpt_oss = MoeConfig::new(12, 64, 96, 4).with_norm_topk_prob(false).with_router(RouterConfig::gpt_oss());
    for cfg in [llama4, gpt_oss] {
        for world in [1, 2, 3] {
            let case = Case::new(cfg.clone(), world);
            case.check_outputs(case.run_with(&|_| Ok(Box::new(engine(None)))));
        }
    }
}

/// Rows past the size that goes through the reused upload staging buffers (x, and the
/// received blocks at world 2): the same results as the CPU layer, in both exchange modes.
#[test]
fn large_uploads_through_staging_buffers_match_the_cpu() {
    for mapped in modes() {
        let mut case = Case::new(cfg(), 2);
        case.tokens = vec![2100, 1700];
        let cpu = case.run();
        for (r, (y, s)) in run(&case, mapped, false).iter().enumerate() {
            assert!(s.host_upload_bytes >= 1 << 18, "rank {r}: {} bytes uploaded", s.host_upload_bytes);
            let err = rel_error(&y.to_f64_vec(), &cpu[r].0.to_f64_vec());
            assert!(err < 2e-2, "rank {r} mapped {mapped:?}: differs from the CPU layer by {err:.2e}");
        }
    }
}

/// A device input of another engine is an error naming it, on that rank, and its peers fail too.
#[test]
fn a_device_tensor_of_another_engine_is_refused() {
    let case = Case::new(cfg(), 2);
    let out = LocalGroup::run(2, TIMEOUT, |g| {
        let rank = g.rank();
        let (mine, other) = (engine(None), engine(None));
        let p = case.placement();
        let w = LayerWeights { router: case.gate(), ..random::layer_weights(&case.cfg, case.seed, &p, rank) };
        let layer = MoeLayer::with_engine_weights(g, case.cfg.clone(), p, w, Box::new(mine.clone()))?;
        let x = case.input(rank);
        let holder = if rank == 1 { &other } else { &mine };
        layer.forward_device(&holder.to_device(&x)?).map(|_| ())
    })
    .unwrap();
    let errors: Vec<String> = out.into_iter().map(|o| o.unwrap().unwrap_err().to_string()).collect();
    assert!(errors[1].contains("none of the layer's engines"), "{errors:?}");
    assert!(errors[0].contains("rank 1"), "{errors:?}");
}

/// Every routing rule: the GPU router's ids equal the CPU router's and its weights agree to
/// rounding, for every dtype of tokens and router weight, k up to 16.
#[test]
fn gpu_router_matches_the_cpu_router_for_every_rule() {
    let gpu = engine(None);
    let rules = [
        ("softmax", RouterConfig::default(), true),
        (
            "softmax, no renormalisation, scaled",
            RouterConfig { routed_scaling_factor: 2.5, ..Default::default() },
            false,
        ),
        ("sigmoid", RouterConfig { scoring: Scoring::Sigmoid, ..Default::default() }, true),
        ("grouped by max (V2)", RouterConfig { n_group: 8, topk_group: 3, ..Default::default() }, false),
        ("DeepSeek-V3 (bias, top-two groups)", RouterConfig::deepseek_v3(8, 4, 2.5), true),
        (
            "sigmoid with bias, ungrouped",
            RouterConfig { scoring: Scoring::Sigmoid, selection_bias: true, ..Default::default() },
            true,
        ),
        (
            "softmax, top-two groups",
            RouterConfig { n_group: 4, topk_group: 2, group_score: GroupScore::TopTwoSum, ..Default::default() },
            true,
        ),
        ("gpt-oss (logit bias, softmax over the chosen k)", RouterConfig::gpt_oss(), false),
        ("DBRX (p-norm 2)", RouterConfig { norm_p: 2.0, ..Default::default() }, true),
        (
            "ERNIE (selection bias, norm floor)",
            RouterConfig { selection_bias: true, norm_min: 0.6, ..Default::default() },
            true,
        ),
        (
            "MiniMax-M2 (sigmoid, selection bias, eps)",
            RouterConfig { scoring: Scoring::Sigmoid, selection_bias: true, norm_eps: 1e-20, ..Default::default() },
            true,
        ),
        (
            "Llama 4 (sigmoid of the chosen logits on the input)",
            RouterConfig { scoring: Scoring::Sigmoid, weights_on_input: true, ..Default::default() },
            false,
        ),
    ];
    let mut seed = 40;
    for (name, rule, norm) in rules {
        for k in [1, 4, 16] {
            for (xt, wt) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F32)] {
                seed += 1;
                let cfg = MoeConfig::new(64, 96, 32, k).with_router(rule).with_norm_topk_prob(norm).with_dtypes(xt, wt);
                if cfg.validate().is_err() {
                    continue;
                }
                let x = random::input(&cfg, 37, seed, 0);
                let gate = random::gate(&cfg, seed);
                let bias = random::selection_bias(&cfg, seed);
                let want = route_config(&x, &gate, bias.as_deref(), &cfg).unwrap();
                let router = RouterSet { gate: Matrix::new(gate), selection_bias: bias };
                let mut s = gpu.session().unwrap();
                let xb = s.upload(&x).unwrap();
                let routed = s.route(xb, &router, &cfg).unwrap();
                s.sync().unwrap();
                let got = s.routing(routed).unwrap();
                let what = format!("{name}, k {k}, {xt}/{wt}");
                assert_eq!(got.ids, want.ids, "{what}: ids");
                let (g, w): (Vec<f64>, Vec<f64>) =
                    got.weights.iter().zip(&want.weights).map(|(&a, &b)| (a as f64, b as f64)).unzip();
                let err = rel_error(&g, &w);
                assert!(err < 1e-5, "{what}: weights differ by {err:.2e}");
            }
        }
    }
}

/// The ranks' token counts in these tests, so that a change there is seen here.
#[test]
fn uneven_tokens_include_an_empty_rank() {
    assert!(uneven_tokens(4).contains(&0));
}

/// Every rank thread opening its own context at the same time, computing and dropping it
/// while the others still compute (what `ep-bench` does): the contexts share the process's
/// one device on the adapter, and the outputs are the shared context's bits. On the H200 this
/// pattern, with a device per context, hung in 6 and crashed in 4 of 27 runs of this file's
/// previous version (NVIDIA's driver destroying devices beside other threads' work).
#[test]
fn contexts_opened_and_dropped_on_every_rank_thread_share_one_device() {
    for mapped in modes() {
        for world in [2, 4] {
            let case = Case::new(cfg(), world);
            let shared = run(&case, mapped, true);
            for round in 0..3 {
                let out = LocalGroup::run(world, TIMEOUT, |g| -> moe_ep::Result<(Tensor, bool)> {
                    let rank = g.rank();
                    let opts = ContextOptions { mapped_exchange: mapped, ..ContextOptions::from_env() };
                    let e = GpuEngine::new(&opts)?;
                    let same = e.context().shares_device(engine(mapped).context());
                    let p = case.placement();
                    let w =
                        LayerWeights { router: case.gate(), ..random::layer_weights(&case.cfg, case.seed, &p, rank) };
                    let layer = MoeLayer::with_engine_weights(g, case.cfg.clone(), p, w, Box::new(e.clone()))?;
                    let (y, _) = layer.forward_device(&e.to_device(&case.input(rank))?)?;
                    Ok((e.to_host(&y)?, same))
                })
                .unwrap();
                for (r, o) in out.into_iter().enumerate() {
                    let what = format!("world {world} mapped {mapped:?} round {round} rank {r}");
                    let (y, same) = o.expect("no panic").unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(same, "{what}: a second device on the adapter");
                    assert!(y.as_bytes() == shared[r].0.as_bytes(), "{what}: differs from the shared context");
                }
            }
        }
    }
}
