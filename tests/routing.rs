//! The routing rules beyond softmax top-k (sigmoid scores, selection bias, group-limited
//! top-k, scaling) against the f64 router, and layers with those rules and a shared expert
//! (DeepSeek-V2/V3 and Qwen2-MoE shapes, scaled down) against the f64 dense reference at
//! several world sizes with uneven tokens.

mod common;

use common::{Case, TIMEOUT};
use moe_ep::model::router::{route_config, top_k};
use moe_ep::testing::reference::{dense_moe_full, rel_error, route_f64_config};
use moe_ep::{
    Activation, DType, GroupScore, LayerWeights, LocalGroup, MoeConfig, MoeLayer, Placement, RouterConfig, Scoring,
    random,
};

/// DeepSeek-V3's rules on a small layer: sigmoid, selection bias, 8 groups scored by their top
/// two, 4 kept, renormalised, scaled by 2.5; an ungated shared expert.
fn deepseek_v3(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k)
        .with_norm_topk_prob(true)
        .with_router(RouterConfig::deepseek_v3(8, 4, 2.5))
        .with_shared_expert(48, false)
}

/// DeepSeek-V2's rules: softmax, 4 groups scored by their best, 2 kept, not renormalised,
/// scaled by 16 (as DeepSeek-V2 is); an ungated shared expert.
fn deepseek_v2(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k)
        .with_norm_topk_prob(false)
        .with_router(RouterConfig {
            n_group: 4,
            topk_group: 2,
            group_score: GroupScore::Max,
            routed_scaling_factor: 16.0,
            ..Default::default()
        })
        .with_shared_expert(40, false)
}

/// Qwen2-MoE: softmax top-k without renormalisation and a sigmoid-gated shared expert.
fn qwen2_moe(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k).with_norm_topk_prob(false).with_shared_expert(56, true)
}

/// gpt-oss: the router's bias on the logits, top-k on logits, softmax over the chosen k; experts
/// with biases and the clamped SwiGLU.
fn gpt_oss(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k)
        .with_norm_topk_prob(false)
        .with_router(RouterConfig::gpt_oss())
        .with_activation(Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 })
        .with_expert_bias(true)
}

/// ERNIE-4.5: softmax, selection bias, renormalised by max(sum, 1e-12); an ungated shared expert.
fn ernie(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k)
        .with_router(RouterConfig { selection_bias: true, norm_min: 1e-12, ..Default::default() })
        .with_shared_expert(48, false)
}

/// MiniMax-M2: sigmoid scores, selection bias, always renormalised.
fn minimax_m2(e: usize, k: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k).with_router(RouterConfig {
        scoring: Scoring::Sigmoid,
        selection_bias: true,
        ..Default::default()
    })
}

/// DBRX: softmax top-k, weights divided by their p-norm.
fn dbrx(e: usize, k: usize, p: f32) -> MoeConfig {
    MoeConfig::new(e, 32, 24, k).with_router(RouterConfig { norm_p: p, ..Default::default() })
}

/// Llama 4: top-1 by logit, sigmoid weight applied to the expert's input; a shared expert.
fn llama4(e: usize) -> MoeConfig {
    MoeConfig::new(e, 32, 24, 1)
        .with_norm_topk_prob(false)
        .with_router(RouterConfig { scoring: Scoring::Sigmoid, weights_on_input: true, ..Default::default() })
        .with_shared_expert(24, false)
}

#[test]
fn router_rules_match_f64() {
    let sigmoid_plain = MoeConfig::new(24, 48, 8, 4)
        .with_router(RouterConfig { scoring: Scoring::Sigmoid, ..Default::default() })
        .with_norm_topk_prob(false);
    let sigmoid_groups_no_bias = MoeConfig::new(32, 48, 8, 4)
        .with_router(RouterConfig { selection_bias: false, ..RouterConfig::deepseek_v3(8, 3, 1.0) });
    for base in [
        deepseek_v3(64, 8),
        deepseek_v3(32, 4),
        deepseek_v2(32, 6),
        qwen2_moe(12, 4),
        sigmoid_plain,
        sigmoid_groups_no_bias,
        gpt_oss(32, 4),
        gpt_oss(8, 1),
        ernie(16, 6),
        minimax_m2(24, 8),
        dbrx(16, 4, 1.0),
        dbrx(16, 4, 2.0),
        llama4(16),
    ] {
        for dt in DType::ALL {
            let cfg = base.clone().with_dtypes(dt, dt);
            let x = random::input(&cfg, 41, 5, 0);
            let gate = random::gate(&cfg, 5);
            let bias = random::selection_bias(&cfg, 5);
            let got = route_config(&x, &gate, bias.as_deref(), &cfg).unwrap();
            let (ids, ws) = route_f64_config(&x, &gate, bias.as_deref(), &cfg);
            assert_eq!(got.ids, ids, "{:?} {dt}", cfg.router);
            for (a, b) in got.weights.iter().zip(&ws) {
                assert!(((*a as f64) - b).abs() <= 1e-5 * b.abs().max(1e-3), "{:?}: {a} vs {b}", cfg.router);
            }
            if cfg.norm_topk_prob && cfg.router.norm_p == 1.0 || cfg.router.scoring == Scoring::SoftmaxTopK {
                let k = cfg.top_k;
                for t in 0..41 {
                    let s: f32 = got.weights[t * k..(t + 1) * k].iter().sum();
                    assert!((s - cfg.router.routed_scaling_factor).abs() < 1e-5 * s, "token {t}: weights sum to {s}");
                }
            }
        }
    }
}

#[test]
fn group_limited_selection_keeps_only_the_best_groups() {
    // 8 experts in 4 groups of 2; softmax, groups scored by their best, 2 kept, k = 2.
    let rules = RouterConfig { n_group: 4, topk_group: 2, ..Default::default() };
    // Group maxima: g0 = 1.0, g1 = 3.0, g2 = 2.9, g3 = 0.0. Expert 3 (3.0) and expert 4 (2.9)
    // lead; expert 5 (2.8) is third overall but g2 is kept, so it stays a candidate.
    let logits = [1.0f32, 0.5, 2.0, 3.0, 2.9, 2.8, 0.0, -1.0];
    let r = top_k(&logits, 8, 3, false, &rules, None).unwrap();
    assert_eq!(r.ids, vec![3, 4, 5]);
    // With one group kept, only g1's experts can be chosen: 3, then 2.
    let one = RouterConfig { topk_group: 1, ..rules };
    let r = top_k(&logits, 8, 2, false, &one, None).unwrap();
    assert_eq!(r.ids, vec![3, 2]);
    // Weights are the softmax over all 8 experts, not over the kept ones.
    let z: f32 = logits.iter().map(|l| (l - 3.0).exp()).sum();
    assert!((r.weights[0] - 1.0 / z).abs() < 1e-6);
    // Top-two-sum: g2 = 2.9 + 2.8 beats g1 = 3.0 + 2.0, so with one group kept it is g2.
    let two = RouterConfig { group_score: GroupScore::TopTwoSum, ..one };
    let r = top_k(&logits, 8, 2, false, &two, None).unwrap();
    assert_eq!(r.ids, vec![4, 5]);
    // More experts than the kept groups hold is refused.
    let e = top_k(&logits, 8, 3, false, &one, None).unwrap_err().to_string();
    assert!(e.contains("topk_group"), "{e}");
}

#[test]
fn selection_bias_changes_choices_but_not_weights() {
    let rules = RouterConfig { scoring: Scoring::Sigmoid, selection_bias: true, ..Default::default() };
    // Expert 2 has the best score, but a bias of -1 moves expert 0 ahead of it.
    let logits = [1.0f32, 0.0, 2.0, -1.0];
    let bias = [0.0f32, 0.0, -1.0, 0.0];
    let r = top_k(&logits, 4, 2, false, &rules, Some(&bias)).unwrap();
    assert_eq!(r.ids, vec![0, 1]);
    let sig = |z: f32| 1.0 / (1.0 + (-z).exp());
    assert_eq!(r.weights, vec![sig(1.0), sig(0.0)]);
    // Missing, unexpected and wrong-length biases are errors.
    assert!(top_k(&logits, 4, 2, false, &rules, None).unwrap_err().to_string().contains("none was given"));
    let plain = RouterConfig::default();
    assert!(top_k(&logits, 4, 2, false, &plain, Some(&bias)).is_err());
    assert!(top_k(&logits, 4, 2, false, &rules, Some(&bias[..3])).unwrap_err().to_string().contains("3 entries"));
}

#[test]
fn bias_changes_some_routes_on_random_data() {
    let cfg = deepseek_v3(64, 8);
    let x = random::input(&cfg, 64, 9, 0);
    let gate = random::gate(&cfg, 9);
    let bias = random::selection_bias(&cfg, 9).unwrap();
    let with = route_config(&x, &gate, Some(&bias), &cfg).unwrap();
    let zero = vec![0f32; 64];
    let without = route_config(&x, &gate, Some(&zero), &cfg).unwrap();
    let changed = (0..64).filter(|t| with.ids[t * 8..(t + 1) * 8] != without.ids[t * 8..(t + 1) * 8]).count();
    assert!(changed > 8, "the bias changed the experts of only {changed} of 64 tokens");
}

#[test]
fn deepseek_v3_layer_matches_the_reference_at_several_world_sizes() {
    for dt in [DType::F32, DType::BF16] {
        for world in [1, 2, 3, 4] {
            let case = Case::new(deepseek_v3(24, 4).with_dtypes(dt, dt), world);
            let stats = case.check();
            assert!(stats.iter().any(|s| s.times.shared > 0.0), "the shared expert stage ran");
            // Every world size (world 1 runs the experts inside its combine stretch) times them apart.
            assert!(stats.iter().any(|s| s.times.experts > 0.0), "world {world}: no experts time in {stats:?}");
            for s in &stats {
                assert!(s.times.entries().iter().all(|(_, v)| v.is_finite() && *v >= 0.0), "{:?}", s.times);
            }
        }
    }
}

#[test]
fn deepseek_v2_layer_matches_the_reference_at_several_world_sizes() {
    for world in [1, 2, 3, 4] {
        Case::new(deepseek_v2(24, 3), world).check();
    }
}

#[test]
fn qwen2_moe_layer_with_a_gated_shared_expert_matches_the_reference() {
    for dt in [DType::F32, DType::F16] {
        for world in [1, 2, 3] {
            Case::new(qwen2_moe(12, 4).with_dtypes(dt, dt), world).check();
        }
    }
}

#[test]
fn missing_or_mismatched_bias_and_shared_expert_are_errors_on_every_rank() {
    let cfg = deepseek_v3(16, 4);
    let p = Placement::contiguous(16, 2).unwrap();
    let run = |edit: &(dyn Fn(usize, &mut LayerWeights) + Sync)| -> Vec<String> {
        LocalGroup::run(2, TIMEOUT, |g| {
            let rank = moe_ep::Group::rank(&g);
            let mut w = random::layer_weights(&cfg, 1, &p, rank);
            edit(rank, &mut w);
            MoeLayer::from_weights(g, cfg.clone(), p.clone(), w, None, Default::default()).map(|_| ())
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().expect_err("an error").to_string())
        .collect()
    };
    // A rank without the bias: that rank says what is missing, the other names it.
    let e = run(&|rank, w| {
        if rank == 1 {
            w.selection_bias = None;
        }
    });
    assert!(e[1].contains("rank 1") && e[1].contains("selection bias"), "{}", e[1]);
    assert!(e[0].contains("rank 1"), "{}", e[0]);
    // No shared expert at all.
    let e = run(&|_, w| w.shared = None);
    assert!(e.iter().all(|m| m.contains("shared expert")), "{e:?}");
    // Shared expert weights that differ between ranks.
    let e = run(&|rank, w| {
        if rank == 1 {
            let s = w.shared.as_mut().unwrap();
            s.weights.up = random::uniform(DType::F32, 48, 32, 0.1, 77, 0).into();
        }
    });
    assert!(e.iter().all(|m| m.contains("shared expert weight differs")), "{e:?}");
    // A bias that differs between ranks.
    let e = run(&|rank, w| {
        if rank == 1 {
            w.selection_bias.as_mut().unwrap()[3] += 0.5;
        }
    });
    assert!(e.iter().all(|m| m.contains("selection bias differs")), "{e:?}");
    // A shared expert of the wrong size.
    let e =
        run(&|_, w| w.shared.as_mut().unwrap().weights.down = random::uniform(DType::F32, 32, 40, 0.1, 1, 1).into());
    assert!(e.iter().all(|m| m.contains("shared expert.down")), "{e:?}");
}

#[test]
fn invalid_routing_rules_are_refused() {
    let bad = |r: RouterConfig| MoeConfig::new(16, 8, 8, 4).with_router(r).validate().unwrap_err().to_string();
    assert!(bad(RouterConfig { n_group: 3, ..Default::default() }).contains("divide"));
    assert!(bad(RouterConfig { n_group: 4, topk_group: 5, ..Default::default() }).contains("topk_group"));
    assert!(bad(RouterConfig { n_group: 16, topk_group: 2, ..Default::default() }).contains("keep at least"));
    let two = RouterConfig { n_group: 16, topk_group: 4, group_score: GroupScore::TopTwoSum, ..Default::default() };
    assert!(bad(two).contains("at least 2 experts per group"));
    assert!(bad(RouterConfig { routed_scaling_factor: f32::NAN, ..Default::default() }).contains("routed_scaling"));
}

#[test]
fn softmax_over_the_chosen_k_selects_on_biased_logits() {
    // gpt-oss: logits + bias = [1.5, 0.0, 2.5, 0.0]; top-2 = experts 2, 0; softmax of (2.5, 1.5).
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    let bias = [0.5f32, -2.0, 2.0, 1.0];
    let r = top_k(&logits, 4, 2, false, &RouterConfig::gpt_oss(), Some(&bias)).unwrap();
    assert_eq!(r.ids, vec![2, 0]);
    let (a, b) = (1.0f32, (-1.0f32).exp());
    assert!((r.weights[0] - a / (a + b)).abs() < 1e-6 && (r.weights[1] - b / (a + b)).abs() < 1e-6, "{:?}", r.weights);
    // Without its bias the rule is refused; groups or a selection bias with it are invalid.
    assert!(top_k(&logits, 4, 2, false, &RouterConfig::gpt_oss(), None).is_err());
    let bad = RouterConfig { n_group: 2, ..RouterConfig::gpt_oss() };
    assert!(bad.validate(4, 2).unwrap_err().to_string().contains("no groups"));
}

#[test]
fn renormalisation_by_p_norm_with_epsilon_and_minimum() {
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let soft: Vec<f32> = {
        let z: f32 = logits.iter().map(|l| (l - 2.0).exp()).sum();
        logits.iter().map(|l| (l - 2.0).exp() / z).collect()
    };
    // DBRX p = 2: w / sqrt(w0^2 + w1^2).
    let r = top_k(&logits, 4, 2, true, &RouterConfig { norm_p: 2.0, ..Default::default() }, None).unwrap();
    let n2 = (soft[0] * soft[0] + soft[1] * soft[1]).sqrt();
    assert!((r.weights[0] - soft[0] / n2).abs() < 1e-6 && (r.weights[1] - soft[1] / n2).abs() < 1e-6);
    // ERNIE's minimum: a denominator below it is raised to it.
    let r = top_k(&logits, 4, 2, true, &RouterConfig { norm_min: 10.0, ..Default::default() }, None).unwrap();
    assert!((r.weights[0] - soft[0] / 10.0).abs() < 1e-7, "{:?}", r.weights);
    // An epsilon is added to the sum.
    let r = top_k(&logits, 4, 2, true, &RouterConfig { norm_eps: 1.0, ..Default::default() }, None).unwrap();
    assert!((r.weights[0] - soft[0] / (soft[0] + soft[1] + 1.0)).abs() < 1e-6);
    let bad = |r: RouterConfig| r.validate(4, 2).unwrap_err().to_string();
    assert!(bad(RouterConfig { norm_p: 0.0, ..Default::default() }).contains("norm_p"));
    assert!(bad(RouterConfig { norm_min: -1.0, ..Default::default() }).contains("norm_min"));
    assert!(bad(RouterConfig { norm_eps: f32::INFINITY, ..Default::default() }).contains("norm_eps"));
    assert!(bad(RouterConfig { selection_bias: true, logit_bias: true, ..Default::default() }).contains("not both"));
}

#[test]
fn gpt_oss_ernie_minimax_and_dbrx_layers_match_the_reference() {
    for world in [1, 2, 3] {
        for cfg in [gpt_oss(12, 4), ernie(12, 4), minimax_m2(12, 3), dbrx(12, 4, 1.0), dbrx(12, 2, 2.0)] {
            for dt in [DType::F32, DType::BF16] {
                Case::new(cfg.clone().with_dtypes(dt, dt), world).check();
            }
        }
    }
}

/// Llama 4's rule in both layers (EP, and TP on the CPU) against the reference at worlds 1-3
/// with uneven tokens, with and without a shared expert, in f32 and bf16.
#[test]
fn input_scaled_routing_matches_the_reference_in_both_layers() {
    for world in [1, 2, 3] {
        // Llama 4 is top-1; top-2 checks the rule with several slots a token.
        let top2 = MoeConfig { top_k: 2, ..llama4(12) };
        for cfg in [llama4(12), top2] {
            for dt in [DType::F32, DType::BF16] {
                let case = Case::new(cfg.clone().with_dtypes(dt, dt), world);
                case.check();
                case.check_tp_outputs(&case.run_tp_with(&common::cpu_engine));
            }
        }
    }
}

#[test]
fn input_scaled_reference_differs_from_output_scaled() {
    // The reference's Llama 4 rule is not the output-scaled one (the SwiGLU is not linear).
    let cfg = llama4(8);
    let (x, gate) = (random::input(&cfg, 5, 3, 0), random::gate(&cfg, 3));
    let all = Placement::contiguous(8, 1).unwrap();
    let w = random::layer_weights(&cfg, 3, &all, 0);
    let on_input = dense_moe_full(&x, &gate, None, &w.experts, w.shared.as_ref(), &cfg);
    let mut plain = cfg.clone();
    plain.router.weights_on_input = false;
    let on_output = dense_moe_full(&x, &gate, None, &w.experts, w.shared.as_ref(), &plain);
    assert_eq!(on_input.ids, on_output.ids);
    assert!(rel_error(&on_input.y, &on_output.y) > 1e-3);
}
