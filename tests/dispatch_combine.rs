//! Public dispatch / combine with caller-side experts: the data movement is bitwise exact.

mod common;

use common::{TIMEOUT, uneven_tokens};
use moe_ep::{Capacity, CpuEngine, DType, Group, LocalGroup, Placement, Routing, Tensor, combine, dispatch, random};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random routing: k distinct experts per token, positive weights.
fn random_routing(n: usize, k: usize, e: usize, seed: u64) -> Routing {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(n * k);
    let mut ws = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k {
            let c = rng.random_range(0..e as u32);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        ids.extend(chosen);
        ws.extend((0..k).map(|_| rng.random_range(0.05f32..1.0)));
    }
    Routing::new(n, k, ids, ws).unwrap()
}

struct RankRun {
    x: Tensor,
    routing: Routing,
    batch: Tensor,
    offsets: Vec<usize>,
    y: Tensor,
}

fn run_identity(
    world: usize,
    e: usize,
    k: usize,
    d: usize,
    dtype: DType,
    map: Option<Vec<usize>>,
    cap: Capacity,
) -> (Vec<RankRun>, Placement) {
    let tokens = uneven_tokens(world);
    let placement = match map {
        Some(m) => Placement::from_map(m, world).unwrap(),
        None => Placement::contiguous(e, world).unwrap(),
    };
    let outs = LocalGroup::run(world, TIMEOUT, |g| {
        let r = g.rank();
        let x = random::uniform(dtype, tokens[r], d, 3.0, 99, r as u64);
        let routing = random_routing(tokens[r], k, e, 1000 + r as u64);
        let disp = dispatch(&g, &CpuEngine, &placement, cap, &x, &routing)?;
        let batch = disp.batch.clone();
        // Identity experts: the outputs are the batch itself.
        let (y, _) = combine(&g, &CpuEngine, disp.handle, &disp.batch)?;
        Ok::<_, moe_ep::Error>(RankRun { x, routing, batch, offsets: disp.expert_offsets, y })
    })
    .unwrap();
    (outs.into_iter().map(|o| o.unwrap().unwrap()).collect(), placement)
}

/// What each rank's batch must be: for each local expert, rows from rank 0, 1, ... in token order.
fn expected_batch(
    runs: &[RankRun],
    placement: &Placement,
    rank: usize,
    dtype: DType,
    d: usize,
) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut offsets = vec![0];
    for &e in placement.experts_of(rank) {
        let mut rows = 0;
        for src in runs {
            let k = src.routing.k;
            for t in 0..src.routing.n {
                for j in 0..k {
                    if src.routing.ids[t * k + j] as usize == e {
                        let rb = d * dtype.size();
                        bytes.extend_from_slice(&src.x.as_bytes()[t * rb..(t + 1) * rb]);
                        rows += 1;
                    }
                }
            }
        }
        offsets.push(offsets.last().unwrap() + rows);
    }
    (bytes, offsets)
}

/// y[t] = sum_j w_j * x[t], f32 in slot order, cast once: exactly what combine promises.
fn expected_identity_output(run: &RankRun, dtype: DType) -> Tensor {
    let (n, k, d) = (run.routing.n, run.routing.k, run.x.cols());
    let xs = run.x.to_f32_vec();
    let mut y = vec![0f32; n * d];
    for t in 0..n {
        for c in 0..d {
            let mut acc = 0f32;
            for j in 0..k {
                acc += run.routing.weights[t * k + j] * xs[t * d + c];
            }
            y[t * d + c] = acc;
        }
    }
    Tensor::from_f32(dtype, n, d, &y).unwrap()
}

#[test]
fn batch_holds_the_routed_rows_bitwise_in_documented_order() {
    for world in [1, 2, 3, 4, 8] {
        for dtype in DType::ALL {
            let (e, k, d) = (24, 3, 13);
            let (runs, placement) = run_identity(world, e, k, d, dtype, None, Capacity::Dropless);
            for r in 0..world {
                let (bytes, offsets) = expected_batch(&runs, &placement, r, dtype, d);
                assert_eq!(runs[r].offsets, offsets, "world {world} rank {r} offsets");
                assert_eq!(runs[r].batch.as_bytes(), &bytes[..], "world {world} rank {r} {dtype} batch");
            }
        }
    }
}

#[test]
fn identity_experts_give_back_the_weighted_input_bitwise() {
    for world in [1, 2, 3, 4, 8] {
        for dtype in DType::ALL {
            let (runs, _) = run_identity(world, 24, 4, 17, dtype, None, Capacity::Dropless);
            for (r, run) in runs.iter().enumerate() {
                let want = expected_identity_output(run, dtype);
                assert_eq!(run.y.as_bytes(), want.as_bytes(), "world {world} rank {r} {dtype}");
            }
        }
    }
}

#[test]
fn top1_with_unit_weight_returns_x_exactly() {
    for world in [1, 2, 3, 4, 8] {
        for dtype in DType::ALL {
            let tokens = uneven_tokens(world);
            let placement = Placement::from_map((0..11).map(|e| (e * 7) % world).collect(), world).unwrap();
            let outs = LocalGroup::run(world, TIMEOUT, |g| {
                let r = g.rank();
                let x = random::uniform(dtype, tokens[r], 9, 100.0, 5, r as u64);
                let mut routing = random_routing(tokens[r], 1, 11, 77 + r as u64);
                routing.weights.iter_mut().for_each(|w| *w = 1.0);
                let disp = dispatch(&g, &CpuEngine, &placement, Capacity::Dropless, &x, &routing)?;
                let (y, _) = combine(&g, &CpuEngine, disp.handle, &disp.batch)?;
                Ok::<_, moe_ep::Error>((x, y))
            })
            .unwrap();
            for (r, o) in outs.into_iter().enumerate() {
                let (x, y) = o.unwrap().unwrap();
                assert!(x.to_f32_vec().iter().any(|&v| v != 0.0) || x.is_empty());
                assert_eq!(x.as_bytes(), y.as_bytes(), "world {world} rank {r} {dtype}");
            }
        }
    }
}

#[test]
fn dropped_slots_contribute_nothing_and_weights_are_not_renormalised() {
    for world in [1, 2, 4] {
        let (e, k, d) = (8, 2, 5);
        let tokens = uneven_tokens(world);
        let placement = Placement::contiguous(e, world).unwrap();
        let outs = LocalGroup::run(world, TIMEOUT, |g| {
            let r = g.rank();
            let x = random::uniform(DType::F32, tokens[r], d, 1.0, 3, r as u64);
            // Every token: expert 0 first, expert 1 second.
            let n = tokens[r];
            let routing = Routing::new(
                n,
                k,
                (0..n).flat_map(|_| [0u32, 1]).collect(),
                (0..n).flat_map(|_| [0.75f32, 0.25]).collect(),
            )
            .unwrap();
            let disp = dispatch(&g, &CpuEngine, &placement, Capacity::PerExpert(2), &x, &routing)?;
            let (y, stats) = combine(&g, &CpuEngine, disp.handle, &disp.batch)?;
            Ok::<_, moe_ep::Error>((x, y, stats))
        })
        .unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            let (x, y, stats) = o.unwrap().unwrap();
            let n = tokens[r];
            // Tokens 0 and 1 keep both slots; later tokens lose both (each expert is full).
            assert_eq!(stats.dropped, 2 * n.saturating_sub(2), "rank {r}");
            for t in 0..n {
                for c in 0..d {
                    let xv = x.get_f32(t, c).unwrap();
                    let want = if t < 2 { 0.75 * xv + 0.25 * xv } else { 0.0 };
                    assert_eq!(y.get_f32(t, c), Some(want), "rank {r} token {t}");
                }
            }
        }
    }
}

#[test]
fn explicit_map_and_capacity_keep_movement_exact() {
    let map = vec![2, 0, 2, 2, 0, 1, 2];
    for cap in [Capacity::Dropless, Capacity::PerExpert(3)] {
        let (runs, placement) = run_identity(3, 7, 2, 6, DType::BF16, Some(map.clone()), cap);
        for (r, run) in runs.iter().enumerate() {
            if cap == Capacity::Dropless {
                let (bytes, _) = expected_batch(&runs, &placement, r, DType::BF16, 6);
                assert_eq!(run.batch.as_bytes(), &bytes[..]);
                assert_eq!(run.y.as_bytes(), expected_identity_output(run, DType::BF16).as_bytes());
            } else {
                assert!(run.offsets.windows(2).all(|w| w[1] - w[0] <= 3 * 3), "at most cap rows per source");
            }
        }
    }
}
