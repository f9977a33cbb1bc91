//! Router against f64, and the route plan's order and capacity rules.

use moe_ep::model::router::{route, softmax_top_k};
use moe_ep::testing::reference::route_f64;
use moe_ep::{Capacity, DType, MoeConfig, Placement, RoutePlan, Routing, random};

#[test]
fn router_matches_f64_for_k_up_to_16() {
    for (e, k) in [(8, 1), (8, 2), (24, 6), (64, 8), (32, 16)] {
        for dt in DType::ALL {
            let cfg = MoeConfig::new(e, 48, 8, k).with_dtypes(dt, dt);
            let x = random::input(&cfg, 37, 11, 0);
            let gate = random::gate(&cfg, 11);
            for norm in [true, false] {
                let got = route(&x, &gate, k, norm).unwrap();
                let (ids, ws) = route_f64(&x, &gate, k, norm);
                assert_eq!(got.ids, ids, "E={e} k={k} {dt}");
                for (a, b) in got.weights.iter().zip(&ws) {
                    assert!(((*a as f64) - b).abs() <= 1e-5 * b.abs().max(1e-3), "{a} vs {b}");
                }
                if norm {
                    for t in 0..37 {
                        let s: f32 = got.weights[t * k..(t + 1) * k].iter().sum();
                        assert!((s - 1.0).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_expert_id_and_order_is_descending() {
    let logits = [0.5f32, 2.0, 2.0, -1.0, 2.0, 0.5];
    let r = softmax_top_k(&logits, 6, 4, false).unwrap();
    assert_eq!(r.ids, vec![1, 2, 4, 0]);
    assert!(r.weights.windows(2).all(|w| w[0] >= w[1]));
    assert!(softmax_top_k(&logits, 6, 7, false).is_err());
}

#[test]
fn plan_orders_blocks_by_local_expert_then_token_and_drops_first_choice_first() {
    // 2 ranks, 4 experts: rank 0 owns 0, 1; rank 1 owns 2, 3.
    let p = Placement::contiguous(4, 2).unwrap();
    let ids = vec![
        3, 1, // token 0
        1, 3, // token 1
        3, 2, // token 2
        0, 3, // token 3
    ];
    let r = Routing::new(4, 2, ids, vec![0.5; 8]).unwrap();
    let plan = RoutePlan::new(0, &r, &p, Capacity::Dropless).unwrap();
    assert_eq!(plan.counts, vec![vec![1, 2], vec![1, 4]]);
    // Block for rank 1: expert 2 (token 2), then expert 3 (tokens 0, 1, 2, 3).
    assert_eq!(plan.block_tokens[1], vec![2, 0, 1, 2, 3]);
    assert_eq!(plan.block_tokens[0], vec![3, 0, 1]);
    // Capacity 2 per expert: expert 3 takes slot-0 of tokens 0 and 2 before any slot-1.
    let plan = RoutePlan::new(0, &r, &p, Capacity::PerExpert(2)).unwrap();
    assert_eq!(plan.dropped_per_expert, vec![0, 0, 0, 2]);
    assert_eq!(plan.dest[2 + 1], moe_ep::exchange::plan::DROPPED); // token 1 slot 1 (expert 3)
    assert_eq!(plan.dest[3 * 2 + 1], moe_ep::exchange::plan::DROPPED); // token 3 slot 1 (expert 3)
    assert_eq!(plan.block_tokens[1], vec![2, 0, 2]);
    // Factor: ceil(1.0 * 4 * 2 / 4) = 2, the same plan.
    assert_eq!(RoutePlan::new(0, &r, &p, Capacity::Factor(1.0)).unwrap(), plan);
}

#[test]
fn balanced_placement_spreads_the_remainder() {
    let p = Placement::balanced(10, 4).unwrap();
    assert_eq!(p.owners(), vec![0, 0, 0, 1, 1, 1, 2, 2, 3, 3]);
    assert_eq!(Placement::balanced(8, 4).unwrap(), Placement::contiguous(8, 4).unwrap());
    assert!(Placement::balanced(3, 4).is_err());
}

#[test]
fn tensor_accessors_return_none_or_errors_out_of_range() {
    let t = moe_ep::Tensor::from_f32(DType::BF16, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    assert_eq!(t.get_f32(1, 2), Some(6.0));
    assert_eq!(t.get_f32(2, 0), None);
    assert_eq!(t.get_f32(0, 3), None);
    assert!(t.slice_rows(1, 3).is_err());
    assert!(t.expect("t", DType::F32, Some(2), 3).unwrap_err().to_string().contains("t has dtype bf16, expected f32"));
}
