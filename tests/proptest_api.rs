//! Property tests over the public API's shapes and ids: whatever the arguments, an `Ok` that
//! keeps its invariants or an `Err`, never a panic; and dispatch + combine with identity
//! experts give, bit for bit, `sum_j w_j x` on thread ranks.

use std::time::Duration;

use half::bf16;
use moe_ep::exchange::plan::DROPPED;
use moe_ep::model::placement::{MAX_EXPERTS, MAX_WORLD};
use moe_ep::model::router;
use moe_ep::{Capacity, CpuEngine, DType, Group, LocalGroup, Placement, RoutePlan, Routing, Tensor, combine, dispatch};
use proptest::prelude::*;

/// Dimensions that are small, or near the top of `usize` (where products overflow).
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..9, 1 => (usize::MAX >> 3)..=usize::MAX, 1 => (1usize << 31)..(1usize << 33)]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// Whether `[rows, cols]` of `dtype` fits an allocation (the constructors' rule).
fn fits(rows: usize, cols: usize, dtype: DType) -> bool {
    let max = isize::MAX as usize / dtype.size();
    rows.checked_mul(cols).is_some_and(|n| n <= max) && cols <= max
}

proptest! {
    #[test]
    fn tensor_constructors_check_their_shape(rows in dim(), cols in dim(), len in 0usize..40, dt in dtype()) {
        let data: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
        let fitting = fits(rows, cols, dt) && rows.wrapping_mul(cols) == len;
        let t = Tensor::from_f32(dt, rows, cols, &data);
        prop_assert_eq!(t.is_ok(), fitting, "from_f32 [{}, {}] with {} values", rows, cols, len);
        let v = Tensor::from_vec(rows, cols, data.clone());
        prop_assert_eq!(v.is_ok(), fits(rows, cols, DType::F32) && rows.wrapping_mul(cols) == len);
        // Shapes past an allocation are errors without allocating; small ones are zeros.
        if !fits(rows, cols, dt) {
            prop_assert!(Tensor::try_zeros(dt, rows, cols).is_err());
        } else if rows.saturating_mul(cols) < 1 << 12 {
            let z = Tensor::try_zeros(dt, rows, cols).unwrap();
            prop_assert_eq!((z.rows(), z.cols(), z.len(), z.dtype()), (rows, cols, rows * cols, dt));
            prop_assert!(z.as_bytes().iter().all(|&b| b == 0));
            prop_assert_eq!(z.as_bytes().len(), rows * cols * dt.size());
        }
    }

    #[test]
    fn tensor_accessors_stay_in_bounds(
        rows in 0usize..6, cols in 0usize..6, r in dim(), c in dim(), a in dim(), b in dim(), dt in dtype(),
    ) {
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32 - 7.25).collect();
        let mut t = Tensor::from_f32(dt, rows, cols, &data).unwrap();
        match t.get_f32(r, c) {
            Some(v) => {
                prop_assert!(r < rows && c < cols);
                prop_assert_eq!(v, Tensor::from_f32(dt, 1, 1, &[data[r * cols + c]]).unwrap().to_f32_vec()[0]);
            }
            None => prop_assert!(r >= rows || c >= cols),
        }
        match t.slice_rows(a, b) {
            Ok(s) => {
                prop_assert!(a <= b && b <= rows);
                prop_assert_eq!(s.rows(), b - a);
                let rb = t.row_bytes();
                prop_assert_eq!(s.as_bytes(), &t.as_bytes()[a * rb..b * rb]);
            }
            Err(_) => prop_assert!(a > b || b > rows),
        }
        prop_assert!(t.expect("t", dt, Some(r), c).is_ok() == (r == rows && c == cols));
        prop_assert_eq!(t.as_slice::<f32>().is_some(), dt == DType::F32);
        prop_assert_eq!(t.as_mut_slice::<bf16>().map(|s| s.len()), (dt == DType::BF16).then_some(rows * cols));
        // The writable view has exactly the elements.
        let n = moe_ep::with_storage!(t.storage_mut(), v => v.len());
        prop_assert_eq!(n, rows * cols);
    }

    #[test]
    fn placements_check_every_id(
        owner in prop::collection::vec(0usize..6, 0..10),
        world in prop_oneof![5 => 0usize..6, 1 => Just(MAX_WORLD + 1), 1 => Just(usize::MAX)],
        e in dim(),
        rank in dim(),
        experts in prop_oneof![5 => 0usize..20, 1 => Just(MAX_EXPERTS + 1), 1 => Just(usize::MAX)],
    ) {
        let valid = (1..=MAX_WORLD).contains(&world) && !owner.is_empty() && owner.iter().all(|&r| r < world);
        let p = Placement::from_map(owner.clone(), world);
        prop_assert_eq!(p.is_ok(), valid);
        if let Ok(p) = p {
            prop_assert_eq!(p.owner(e), owner.get(e).copied());
            match p.local_index(e) {
                Some(l) => prop_assert_eq!(p.experts_of(owner[e])[l], e),
                None => prop_assert!(e >= owner.len()),
            }
            let mine = p.experts_of(rank);
            prop_assert!(mine.iter().all(|&x| owner[x] == rank));
            prop_assert_eq!(mine.len(), owner.iter().filter(|&&r| r == rank).count());
        }
        // The other constructors: errors or placements of the size asked for, never a panic.
        for p in [Placement::contiguous(experts, world), Placement::balanced(experts, world)].into_iter().flatten() {
            prop_assert_eq!((p.num_experts(), p.world()), (experts, world));
            prop_assert_eq!((0..world).map(|r| p.experts_of(r).len()).sum::<usize>(), experts);
        }
    }

    #[test]
    fn route_plans_check_ranks_and_ids(
        world in 1usize..5,
        owner in prop::collection::vec(0usize..4, 1..8),
        rank in prop_oneof![4 => 0usize..5, 1 => Just(usize::MAX)],
        n in 0usize..7,
        k in 1usize..4,
        bad in prop::option::of(0usize..28),
        cap in prop::option::of(0usize..4),
        d in dim(),
    ) {
        let owner: Vec<usize> = owner.into_iter().map(|r| r % world).collect();
        let e = owner.len();
        let p = Placement::from_map(owner.clone(), world).unwrap();
        let mut ids: Vec<u32> = (0..n * k).map(|i| ((i * 5 + 3) % e) as u32).collect();
        if let Some(i) = bad.filter(|&i| i < ids.len()) {
            ids[i] = (e + i) as u32;
        }
        let routing = Routing::new(n, k, ids.clone(), vec![0.5; n * k]).unwrap();
        let capacity = cap.map_or(Capacity::Dropless, Capacity::PerExpert);
        let plan = RoutePlan::new(rank, &routing, &p, capacity);
        let in_range = ids.iter().all(|&i| (i as usize) < e);
        prop_assert_eq!(plan.is_ok(), rank < world && in_range);
        let Ok(plan) = plan else { return Ok(()) };
        prop_assert_eq!(plan.rows_to(d), if d < world { plan.block_tokens[d].len() } else { 0 });
        for dst in 0..world {
            prop_assert_eq!(plan.counts[dst].iter().sum::<usize>(), plan.rows_to(dst));
        }
        for (i, (&dest, &row)) in plan.dest.iter().zip(&plan.row).enumerate() {
            if dest == DROPPED {
                continue;
            }
            prop_assert_eq!(dest as usize, owner[ids[i] as usize]);
            prop_assert_eq!(plan.block_tokens[dest as usize][row as usize] as usize, i / k);
        }
        let kept: usize = (0..world).map(|dst| plan.rows_to(dst)).sum();
        prop_assert_eq!(kept + plan.dropped(), n * k);
        // A routing built by hand with inconsistent lengths is an error, not a panic.
        let broken = Routing { n: usize::MAX, k, ids: ids.clone(), weights: vec![0.5; ids.len()] };
        prop_assert!(RoutePlan::new(0, &broken, &p, capacity).is_err());
    }

    #[test]
    fn the_router_checks_shapes_and_k(
        n in 0usize..9, d in 0usize..6, e in 0usize..20, dd in 0usize..2, k in 0usize..20, renorm in any::<bool>(),
    ) {
        let x = moe_ep::random::uniform(DType::F32, n, d, 1.0, 3, 1);
        let gate = moe_ep::random::uniform(DType::BF16, e, d + dd, 1.0, 3, 2);
        let r = router::route(&x, &gate, k, renorm);
        let valid = dd == 0 && e >= 1 && (1..=16).contains(&k) && k <= e;
        prop_assert_eq!(r.is_ok(), valid, "n {} d {} e {} gate cols {} k {}: {:?}", n, d, e, d + dd, k, r.as_ref().err());
        if let Ok(r) = r {
            prop_assert_eq!((r.n, r.k, r.ids.len(), r.weights.len()), (n, k, n * k, n * k));
            prop_assert!(r.ids.iter().all(|&i| (i as usize) < e));
            for t in 0..n {
                let mut row: Vec<u32> = r.ids[t * k..(t + 1) * k].to_vec();
                row.sort();
                row.dedup();
                prop_assert_eq!(row.len(), k, "token {} chose an expert twice", t);
            }
        }
    }
}

#[test]
fn the_router_refuses_logits_it_cannot_count() {
    // [2^40, 0] tokens against [2^30, 0] gate rows: 2^70 logits.
    let x = Tensor::zeros(DType::F32, 1 << 40, 0);
    let gate = Tensor::zeros(DType::F32, 1 << 30, 0);
    assert!(router::route(&x, &gate, 2, true).unwrap_err().to_string().contains("cannot be allocated"));
}

/// One rank's tokens for the dispatch property: `[n, D]` values, ids and weights `[n, k]`.
#[derive(Debug, Clone)]
struct RankInput {
    n: usize,
    x: Vec<f32>,
    ids: Vec<u32>,
    w: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Exchange {
    owner: Vec<usize>,
    world: usize,
    d: usize,
    k: usize,
    cap: Option<usize>,
    dtype: DType,
    ranks: Vec<RankInput>,
}

fn exchange_case() -> impl Strategy<Value = Exchange> {
    (1usize..=4, 1usize..=7, 1usize..=4, 1usize..=3, prop::option::of(0usize..3), dtype()).prop_flat_map(
        |(world, e, d, k, cap, dtype)| {
            let rank = (0usize..6).prop_flat_map(move |n| {
                (
                    prop::collection::vec(-1f32..1f32, n * d),
                    prop::collection::vec(0..e as u32, n * k),
                    prop::collection::vec(-2f32..2f32, n * k),
                )
                    .prop_map(move |(x, ids, w)| RankInput { n, x, ids, w })
            });
            (prop::collection::vec(0..world, e), prop::collection::vec(rank, world))
                .prop_map(move |(owner, ranks)| Exchange { owner, world, d, k, cap, dtype, ranks })
        },
    )
}

/// `y[t] = sum_j w[t,j] * x[t]` over the kept slots, slot order, f32, one rounding; slots
/// dropped by a per-expert capacity (first choice first, tokens in order) add nothing.
fn identity_combine(c: &Exchange, r: &RankInput) -> Tensor {
    let x = Tensor::from_f32(c.dtype, r.n, c.d, &r.x).unwrap().to_f32_vec();
    let mut kept = vec![true; r.n * c.k];
    if let Some(cap) = c.cap {
        let mut taken = vec![0usize; c.owner.len()];
        for j in 0..c.k {
            for t in 0..r.n {
                let e = r.ids[t * c.k + j] as usize;
                kept[t * c.k + j] = taken[e] < cap;
                taken[e] += 1;
            }
        }
    }
    let mut y = vec![0f32; r.n * c.d];
    for t in 0..r.n {
        for j in (0..c.k).filter(|&j| kept[t * c.k + j]) {
            for i in 0..c.d {
                y[t * c.d + i] += r.w[t * c.k + j] * x[t * c.d + i];
            }
        }
    }
    Tensor::from_f32(c.dtype, r.n, c.d, &y).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn dispatch_and_combine_with_identity_experts_sum_the_weighted_input(c in exchange_case()) {
        let p = Placement::from_map(c.owner.clone(), c.world).unwrap();
        let capacity = c.cap.map_or(Capacity::Dropless, Capacity::PerExpert);
        let outs = LocalGroup::run(c.world, Duration::from_secs(20), |g| {
            let r = &c.ranks[g.rank()];
            let x = Tensor::from_f32(c.dtype, r.n, c.d, &r.x)?;
            let routing = Routing::new(r.n, c.k, r.ids.clone(), r.w.clone())?;
            let d = dispatch(&g, &CpuEngine, &p, capacity, &x, &routing)?;
            let batch = d.batch.clone();
            combine(&g, &CpuEngine, d.handle, &batch).map(|(y, _)| y)
        })
        .unwrap();
        for (rank, o) in outs.into_iter().enumerate() {
            let y = o.expect("no panic").expect("dispatch and combine succeed");
            let want = identity_combine(&c, &c.ranks[rank]);
            prop_assert_eq!(y.as_bytes(), want.as_bytes(), "rank {} of {:?}", rank, c);
        }
    }
}
