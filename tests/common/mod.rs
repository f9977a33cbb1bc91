//! Shared harness of the multi-rank tests: run a layer on thread ranks, compare with the f64
//! dense reference.
#![allow(dead_code)]

use std::time::Duration;

use moe_ep::testing::reference::{self, Reference};
use moe_ep::{
    CpuEngine, DType, Engine, ExpertWeights, ForwardStats, Group, LayerWeights, LocalGroup, MoeConfig, MoeLayer,
    Placement, Tensor, random,
};

/// Makes each rank's compute engine (given the rank).
pub type MakeEngine<'a> = &'a (dyn Fn(usize) -> moe_ep::Result<Box<dyn Engine>> + Sync);

/// The CPU engine on every rank.
pub fn cpu_engine(_rank: usize) -> moe_ep::Result<Box<dyn Engine>> {
    Ok(Box::new(CpuEngine))
}

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Uneven token counts per rank, zeros included.
pub fn uneven_tokens(world: usize) -> Vec<usize> {
    const N: [usize; 8] = [7, 0, 13, 1, 29, 3, 0, 11];
    if world == 1 { vec![9] } else { N[..world].to_vec() }
}

/// One multi-rank run of a layer.
#[derive(Clone, Debug)]
pub struct Case {
    pub cfg: MoeConfig,
    pub world: usize,
    pub tokens: Vec<usize>,
    /// Explicit expert -> rank map; contiguous when `None`.
    pub map: Option<Vec<usize>>,
    /// Send every token's first choice to expert 0.
    pub skew: bool,
    pub seed: u64,
}

impl Case {
    pub fn new(cfg: MoeConfig, world: usize) -> Self {
        Case { tokens: uneven_tokens(world), cfg, world, map: None, skew: false, seed: 0x5eed }
    }

    pub fn placement(&self) -> Placement {
        match &self.map {
            Some(m) => Placement::from_map(m.clone(), self.world).unwrap(),
            None => Placement::contiguous(self.cfg.num_experts, self.world).unwrap(),
        }
    }

    pub fn gate(&self) -> Tensor {
        let g = random::gate(&self.cfg, self.seed);
        if self.skew { random::skewed_gate(&g) } else { g }
    }

    pub fn input(&self, rank: usize) -> Tensor {
        let x = random::input(&self.cfg, self.tokens[rank], self.seed, rank);
        if self.skew { random::skewed_input(&x) } else { x }
    }

    pub fn all_experts(&self) -> Vec<ExpertWeights> {
        random::experts(&self.cfg, self.seed, &(0..self.cfg.num_experts).collect::<Vec<_>>())
    }

    /// Build the layer on each rank and run one forward on the CPU; per rank (y, stats).
    pub fn run(&self) -> Vec<(Tensor, ForwardStats)> {
        self.run_with(&cpu_engine)
    }

    /// [`Case::run`] with each rank's engine made by `engine`.
    pub fn run_with(&self, engine: MakeEngine<'_>) -> Vec<(Tensor, ForwardStats)> {
        let outs = LocalGroup::run(self.world, TIMEOUT, |g| {
            let rank = g.rank();
            self.run_rank(g, engine(rank)?).map(|(out, _)| out)
        })
        .unwrap();
        outs.into_iter()
            .enumerate()
            .map(|(r, o)| o.unwrap_or_else(|_| panic!("rank {r} panicked")).unwrap_or_else(|e| panic!("rank {r}: {e}")))
            .collect()
    }

    /// One rank's part of the case on any group (threads, MPI): build the layer, run one
    /// forward; (y, stats) and the group back for the next case.
    pub fn run_rank<G: Group>(&self, g: G, engine: Box<dyn Engine>) -> moe_ep::Result<((Tensor, ForwardStats), G)> {
        assert_eq!(g.size(), self.world, "the group's size is the case's world");
        let rank = g.rank();
        let p = self.placement();
        let w = LayerWeights { router: self.gate(), ..random::layer_weights(&self.cfg, self.seed, &p, rank) };
        let layer = MoeLayer::with_engine_weights(g, self.cfg.clone(), p, w, engine)?;
        let out = layer.forward_with_stats(&self.input(rank))?;
        Ok((out, layer.into_group()))
    }

    /// The whole layer's weights (all experts), as [`moe_ep::layer::tp::tp_weights`] slices them.
    pub fn full_weights(&self) -> LayerWeights {
        let all = Placement::contiguous(self.cfg.num_experts, 1).unwrap();
        LayerWeights { router: self.gate(), ..random::layer_weights(&self.cfg, self.seed, &all, 0) }
    }

    /// The case as a tensor-parallel layer ([`moe_ep::TpLayer`]) with each rank's engine made
    /// by `engine`; per rank (y, stats).
    pub fn run_tp_with(&self, engine: MakeEngine<'_>) -> Vec<(Tensor, ForwardStats)> {
        let outs = LocalGroup::run(self.world, TIMEOUT, |g| {
            let rank = g.rank();
            self.run_tp_rank(g, engine(rank)?).map(|(out, _)| out)
        })
        .unwrap();
        let outs: Vec<_> =
            outs.into_iter().enumerate().map(|(r, o)| o.unwrap_or_else(|_| panic!("rank {r} panicked"))).collect();
        let errors: Vec<String> = outs.iter().filter_map(|o| o.as_ref().err().map(|e| e.to_string())).collect();
        assert!(errors.is_empty(), "{self:?}: {errors:#?}");
        outs.into_iter().map(|o| o.unwrap()).collect()
    }

    /// One rank's part of the case as a tensor-parallel layer on any group: (y, stats) and the
    /// group back.
    pub fn run_tp_rank<G: Group>(&self, g: G, engine: Box<dyn Engine>) -> moe_ep::Result<((Tensor, ForwardStats), G)> {
        let rank = g.rank();
        let w = moe_ep::layer::tp::tp_weights(&self.full_weights(), &self.cfg, rank, self.world)?;
        let layer = moe_ep::TpLayer::new(g, self.cfg.clone(), w, engine)?;
        let out = layer.forward_with_stats(&self.input(rank))?;
        Ok((out, layer.into_group()))
    }

    /// Compare each rank's tensor-parallel output with the reference.
    pub fn check_tp_outputs(&self, got: &[(Tensor, ForwardStats)]) {
        for (r, (y, stats)) in got.iter().enumerate() {
            self.check_tp_rank(r, y, stats);
        }
    }

    /// Compare rank `r`'s tensor-parallel output with the reference. Partials are rounded to
    /// the activation dtype once per rank before they are summed, so the tolerance grows with
    /// the world size.
    pub fn check_tp_rank(&self, r: usize, y: &Tensor, stats: &ForwardStats) {
        let w = self.reference_rank(r, &self.all_experts());
        let tol = tolerance(self.cfg.act_dtype) * (1.0 + (self.world as f64).sqrt());
        assert_eq!((y.rows(), y.cols(), y.dtype()), (self.tokens[r], self.cfg.hidden, self.cfg.act_dtype));
        assert_eq!(stats.tokens, self.tokens[r]);
        assert_close(&y.to_f64_vec(), &w.y, tol, &format!("TP {self:?} rank {r}"));
    }

    /// Compare rank `r`'s output and statistics with the f64 dense reference.
    pub fn check_rank(&self, r: usize, y: &Tensor, stats: &ForwardStats) {
        let w = self.reference_rank(r, &self.all_experts());
        let tol = tolerance(self.cfg.act_dtype);
        assert_eq!((y.rows(), y.cols()), (self.tokens[r], self.cfg.hidden), "rank {r}: output shape");
        assert_eq!(y.dtype(), self.cfg.act_dtype, "rank {r}: output dtype");
        assert_close(&y.to_f64_vec(), &w.y, tol, &format!("{self:?} rank {r}"));
        let dropped = w.dropped.iter().filter(|&&d| d).count();
        assert_eq!(stats.dropped, dropped, "rank {r}: dropped count");
        assert_eq!(stats.tokens, self.tokens[r]);
        assert_eq!(
            stats.rows_sent.iter().sum::<usize>() + dropped,
            self.tokens[r] * self.cfg.top_k,
            "rank {r}: rows sent"
        );
    }

    /// The f64 dense reference for each rank's tokens.
    pub fn reference(&self) -> Vec<Reference> {
        let experts = self.all_experts();
        (0..self.world).map(|r| self.reference_rank(r, &experts)).collect()
    }

    /// The reference for rank `r`'s tokens, with the config's selection bias and shared expert.
    pub fn reference_rank(&self, r: usize, experts: &[ExpertWeights]) -> Reference {
        let bias = random::selection_bias(&self.cfg, self.seed);
        let shared = random::shared_expert(&self.cfg, self.seed);
        reference::dense_moe_full(&self.input(r), &self.gate(), bias.as_deref(), experts, shared.as_ref(), &self.cfg)
    }

    /// Run on the CPU and compare every rank with the reference; returns the stats.
    pub fn check(&self) -> Vec<ForwardStats> {
        self.check_outputs(self.run())
    }

    /// Compare each rank's (y, stats) with the reference; returns the stats.
    pub fn check_outputs(&self, got: Vec<(Tensor, ForwardStats)>) -> Vec<ForwardStats> {
        for (r, (y, stats)) in got.iter().enumerate() {
            self.check_rank(r, y, stats);
        }
        // Conservation: what rank a sent to rank b is what b received from a.
        for a in 0..self.world {
            for b in 0..self.world {
                assert_eq!(got[a].1.rows_sent[b], got[b].1.rows_received[a], "rows {a} -> {b}");
            }
        }
        got.into_iter().map(|(_, s)| s).collect()
    }
}

/// Norm-wise relative error allowed against f64 for an activation dtype. Expert outputs and the
/// layer output are each rounded to it once; the weight dtype adds no error, since the reference
/// uses the same (already rounded) weights.
pub fn tolerance(act: DType) -> f64 {
    match act {
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1.2e-2,
    }
}

/// Norm-wise relative error within `tol`, and no single element off by more than
/// `8 * tol * max|want|` (catches one misplaced row that a norm would hide).
pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let rel = reference::rel_error(got, want);
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.1e}");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 8.0 * tol * scale, "{what}: element {i}: got {a}, want {b} (scale {scale})");
    }
    // Outputs must not be trivially zero: the reference has signal.
    assert!(want.is_empty() || scale > 0.0, "{what}: reference is all zeros");
}

pub fn small_cfg(k: usize) -> MoeConfig {
    MoeConfig::new(24, 32, 40, k)
}

/// Deterministic bytes from (seed, src, dst, i).
pub fn pattern(seed: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((seed as usize * 131 + src * 31 + dst * 7 + i * 13) % 251) as u8).collect()
}

/// Uneven bytes from `src` to `dst`, zero for some pairs.
pub fn count(src: usize, dst: usize, scale: usize) -> usize {
    ((src * 5 + dst * 3) % 4) * scale + (src + 2 * dst) % 3
}

/// Every group operation with uneven sizes (zero included), checked on this rank: the same
/// code runs on thread ranks (tests/group.rs) and on MPI processes (backends/mpi).
pub fn group_ops<G: Group>(g: &G, seed: u64, scale: usize) -> moe_ep::Result<()> {
    let (me, n) = (g.rank(), g.size());
    // Variable exchange with a counts round.
    let send_counts: Vec<usize> = (0..n).map(|d| count(me, d, scale)).collect();
    let send: Vec<u8> = (0..n).flat_map(|d| pattern(seed, me, d, send_counts[d])).collect();
    let (recv, recv_counts) = g.exchange_v(&send, &send_counts)?;
    let want: Vec<u8> = (0..n).flat_map(|s| pattern(seed, s, me, count(s, me, scale))).collect();
    assert_eq!(recv_counts, (0..n).map(|s| count(s, me, scale)).collect::<Vec<_>>(), "rank {me}: counts");
    assert!(recv == want, "rank {me}: exchange_v payload");
    // Equal chunks.
    let c = 3 + scale;
    let send: Vec<u8> = (0..n).flat_map(|d| pattern(seed + 1, me, d, c)).collect();
    let recv = g.all_to_all(&send)?;
    assert!(recv == (0..n).flat_map(|s| pattern(seed + 1, s, me, c)).collect::<Vec<_>>(), "rank {me}: all_to_all");
    // All-gather, all-reduce (bitwise the same on every rank), barrier.
    let all = g.all_gather(&pattern(seed + 2, me, 0, 5 + scale))?;
    assert!(
        all == (0..n).flat_map(|s| pattern(seed + 2, s, 0, 5 + scale)).collect::<Vec<_>>(),
        "rank {me}: all_gather"
    );
    let mut v: Vec<f32> = (0..257).map(|i| (i as f32 * 0.37 + me as f32).sin() * 1e3).collect();
    g.all_reduce_sum_f32(&mut v)?;
    let want: Vec<f32> =
        (0..257).map(|i| (0..n).fold(0.0f32, |a, p| a + (i as f32 * 0.37 + p as f32).sin() * 1e3)).collect();
    assert!(v.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {me}: all_reduce");
    let bits = g.all_gather_u64(&v.iter().map(|x| x.to_bits() as u64).collect::<Vec<_>>())?;
    assert!((0..n).all(|p| bits[p * 257..(p + 1) * 257] == bits[..257]), "rank {me}: all_reduce differs between ranks");
    g.barrier()
}

/// The layer cases every group engine runs against the dense reference.
pub fn suite_cases(world: usize) -> Vec<Case> {
    let mut cases: Vec<Case> = [1, 2, 6].into_iter().map(|k| Case::new(small_cfg(k), world)).collect();
    cases.push(Case::new(small_cfg(2).with_dtypes(DType::BF16, DType::BF16), world));
    cases.push(Case::new(small_cfg(2).with_dtypes(DType::F16, DType::F32), world));
    cases.push(Case::new(small_cfg(3).with_capacity(moe_ep::Capacity::Factor(1.0)), world));
    let mut skewed = Case::new(small_cfg(2), world);
    skewed.skew = true;
    cases.push(skewed);
    cases.push(Case::new(deepseek_v3_cfg(), world));
    cases.push(Case::new(small_cfg(2).with_norm_topk_prob(false).with_shared_expert(24, true), world));
    cases
}

/// DeepSeek-V3's routing on [`small_cfg`]: sigmoid, selection bias, 4 groups scored by their
/// top two, 2 kept, renormalised, scaled by 2.5; an ungated shared expert of 48.
pub fn deepseek_v3_cfg() -> MoeConfig {
    small_cfg(4).with_router(moe_ep::RouterConfig::deepseek_v3(4, 2, 2.5)).with_shared_expert(48, false)
}

/// Builds one rank's layer from (group, config, placement, router weight, that rank's experts).
pub type BuildLayer<'a> = &'a (
        dyn Fn(LocalGroup, MoeConfig, Placement, Tensor, Vec<ExpertWeights>) -> moe_ep::Result<MoeLayer<LocalGroup>>
            + Sync
    );

/// Run the tokens `x` (`[M, D]`) through one forward of a `world`-rank layer, rank `r` taking
/// `split[r]` of them in order; the outputs in the tokens' order.
pub fn run_split(cfg: &MoeConfig, x: &Tensor, split: &[usize], build: BuildLayer<'_>) -> Tensor {
    let world = split.len();
    assert_eq!(split.iter().sum::<usize>(), x.rows(), "the split covers the tokens");
    let starts: Vec<usize> = split.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
    let placement = Placement::contiguous(cfg.num_experts, world).unwrap();
    let gate = random::gate(cfg, 77);
    let outs = LocalGroup::run(world, TIMEOUT, |g| {
        let rank = g.rank();
        let mine = random::experts(cfg, 77, placement.experts_of(rank));
        let layer = build(g, cfg.clone(), placement.clone(), gate.clone(), mine)?;
        layer.forward(&x.slice_rows(starts[rank], starts[rank] + split[rank])?)
    })
    .unwrap();
    let mut bytes = Vec::new();
    for (r, o) in outs.into_iter().enumerate() {
        let y = o.unwrap_or_else(|_| panic!("rank {r} panicked")).unwrap_or_else(|e| panic!("rank {r}: {e}"));
        bytes.extend_from_slice(y.as_bytes());
    }
    let mut y = Tensor::zeros(cfg.act_dtype, x.rows(), cfg.hidden);
    y.as_bytes_mut().copy_from_slice(&bytes);
    y
}

/// The deterministic mode's promise for layers made by `build`: every token's output has the
/// same bits at world sizes 1, 2 and 4, with the tokens split unevenly (a rank may have none),
/// and when a few tokens run alone.
pub fn check_batch_invariance(cfg: &MoeConfig, build: BuildLayer<'_>) {
    let m = 37;
    let x = random::uniform(cfg.act_dtype, m, cfg.hidden, 1.0, 91, 3);
    let want = run_split(cfg, &x, &[m], build);
    for split in [vec![5, 32], vec![30, 7], vec![0, 11, 25, 1], vec![9, 9, 0, 19]] {
        let got = run_split(cfg, &x, &split, build);
        for t in 0..m {
            assert_eq!(
                got.slice_rows(t, t + 1).unwrap().as_bytes(),
                want.slice_rows(t, t + 1).unwrap().as_bytes(),
                "token {t} differs with split {split:?}"
            );
        }
    }
    // Tokens 3..6 alone, on one rank and on two.
    let few = x.slice_rows(3, 6).unwrap();
    for split in [vec![3], vec![1, 2]] {
        let got = run_split(cfg, &few, &split, build);
        assert_eq!(got.as_bytes(), want.slice_rows(3, 6).unwrap().as_bytes(), "tokens 3..6 alone, split {split:?}");
    }
}
