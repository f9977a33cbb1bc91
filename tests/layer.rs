//! The EP layer against the f64 dense reference at world sizes 1, 2, 3, 4, 8.

mod common;

use common::{Case, small_cfg};
use moe_ep::{Capacity, DType};

const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

#[test]
fn every_world_size_and_top_k_matches_reference() {
    for world in WORLDS {
        for k in [1, 2, 3, 6, 8] {
            Case::new(small_cfg(k), world).check();
        }
    }
}

#[test]
fn without_renormalisation() {
    for world in [1, 3, 4] {
        Case::new(small_cfg(4).with_norm_topk_prob(false), world).check();
    }
}

#[test]
fn every_dtype_pair() {
    for act in DType::ALL {
        for w in DType::ALL {
            for world in [2, 3] {
                Case::new(small_cfg(2).with_dtypes(act, w), world).check();
            }
        }
    }
}

#[test]
fn explicit_placement_with_uneven_and_empty_ranks() {
    // E = 10 on 3 ranks: 6, 0 and 4 experts, interleaved ids.
    let map = vec![0, 2, 0, 0, 2, 0, 2, 0, 2, 0];
    for k in [1, 3] {
        let mut c = Case::new(moe_ep::MoeConfig::new(10, 24, 20, k), 3);
        c.map = Some(map.clone());
        c.tokens = vec![6, 11, 0];
        let stats = c.check();
        assert_eq!(stats[1].rows_received.iter().sum::<usize>(), 0, "rank 1 owns no experts");
        assert!(stats[1].rows_sent.iter().sum::<usize>() > 0, "rank 1 still sends its tokens");
    }
    // E = 7 on 4 ranks.
    let mut c = Case::new(moe_ep::MoeConfig::new(7, 16, 24, 2), 4);
    c.map = Some(vec![3, 1, 0, 3, 2, 1, 0]);
    c.check();
}

#[test]
fn capacity_modes_drop_first_choice_first_and_count() {
    for world in [1, 2, 3, 4, 8] {
        for cap in [Capacity::PerExpert(1), Capacity::PerExpert(2), Capacity::Factor(1.0), Capacity::Factor(0.5)] {
            let stats = Case::new(small_cfg(3).with_capacity(cap), world).check();
            if world >= 4 && cap == Capacity::PerExpert(1) {
                assert!(stats.iter().any(|s| s.dropped > 0), "test must exercise drops");
            }
        }
    }
}

#[test]
fn skewed_routing_all_tokens_to_one_expert() {
    for world in WORLDS {
        for k in [1, 4] {
            let mut c = Case::new(small_cfg(k), world);
            c.skew = true;
            let stats = c.check();
            // Expert 0 (rank 0) got every token's first choice.
            let total: usize = c.tokens.iter().sum();
            assert!(stats[0].rows_per_local_expert[0] >= total);
        }
        let mut c = Case::new(small_cfg(2).with_capacity(Capacity::PerExpert(2)), world);
        c.skew = true;
        c.check();
    }
}

#[test]
fn zero_tokens_everywhere() {
    for world in [1, 3] {
        let mut c = Case::new(small_cfg(2), world);
        c.tokens = vec![0; world];
        c.check();
    }
}

#[test]
fn two_runs_are_bitwise_equal() {
    for world in [1, 3, 4] {
        let c = Case::new(small_cfg(4).with_dtypes(DType::BF16, DType::BF16), world);
        let a = c.run();
        let b = c.run();
        for (r, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.0.as_bytes(), y.0.as_bytes(), "rank {r}");
        }
    }
}

/// The layer cases that MPI processes run too (backends/mpi/examples/mpi_suite.rs).
#[test]
fn shared_layer_suite_on_thread_ranks() {
    for world in [2, 3, 4] {
        for case in common::suite_cases(world) {
            case.check();
        }
    }
}
