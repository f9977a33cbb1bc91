//! Shared harness of the multi-rank tests: run a layer on thread ranks, compare with the f64
//! dense reference.
#![allow(dead_code)]

use std::time::Duration;

use moe_ep::reference::{self, Reference};
use moe_ep::{
    CpuEngine, DType, Engine, ExpertWeights, ForwardStats, Group, LocalGroup, MoeConfig, MoeLayer, Placement, Tensor,
    random,
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
        let mine = random::experts(&self.cfg, self.seed, p.experts_of(rank));
        let layer = MoeLayer::with_engine(g, self.cfg.clone(), p, self.gate(), mine, engine)?;
        let out = layer.forward_with_stats(&self.input(rank))?;
        Ok((out, layer.into_group()))
    }

    /// Compare rank `r`'s output and statistics with the f64 dense reference.
    pub fn check_rank(&self, r: usize, y: &Tensor, stats: &ForwardStats) {
        let experts = self.all_experts();
        let w = reference::dense_moe(&self.input(r), &self.gate(), &experts, &self.cfg);
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
        let gate = self.gate();
        (0..self.world).map(|r| reference::dense_moe(&self.input(r), &gate, &experts, &self.cfg)).collect()
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
