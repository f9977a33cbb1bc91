//! The failure-injection suite every [`Group`] engine passes: thread ranks in
//! `tests/failures.rs`, MPI processes in `backends/mpi` (under mpirun). Each [`Scenario`] runs
//! on every rank and checks that rank's own outcome, so the same expectations hold wherever a
//! rank lives. The misbehaving rank is always the last one.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::exchange::group::Group;
use crate::layer::moe::MoeLayer;
use crate::model::config::MoeConfig;
use crate::model::placement::Placement;
use crate::testing::{random, reference};

/// One way for a rank to misbehave, and what every rank must then see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The last rank calls `barrier` where the others call `all_gather`: a mismatch on every
    /// rank, then a poisoned group.
    CallSkew,
    /// The last rank's `all_to_all` chunks are 6 bytes where the others' are 4: a mismatch on
    /// every rank naming the sizes.
    SizeMismatch,
    /// The last rank passes one `send_counts` entry too many: its own invalid-input error, an
    /// error naming it on every peer in the same call (`PeerFailed`, or `PeerReported` when a
    /// peer heard it from another first), then a poisoned group everywhere.
    BadArguments,
    /// The last rank sleeps three timeouts between two calls, outside any `working` guard: its
    /// peers time out on it, and it fails in that same call, told that it was the one.
    StalledPeer,
    /// The last rank holds a `working` guard while it sleeps three timeouts: every rank's next
    /// call succeeds with the right bytes.
    WorkingPeer,
    /// A group without timeout (`Duration::MAX`): the calls work, a rank that is late for a
    /// second is waited for, and `working` is harmless.
    NoTimeout,
    /// The last rank is lost between two calls (its group dropped, its process gone): every
    /// other rank's next call fails naming it.
    LostPeer,
}

impl Scenario {
    /// Every scenario, in the order the suites run them.
    pub const ALL: [Scenario; 7] = [
        Scenario::CallSkew,
        Scenario::SizeMismatch,
        Scenario::BadArguments,
        Scenario::StalledPeer,
        Scenario::WorkingPeer,
        Scenario::NoTimeout,
        Scenario::LostPeer,
    ];

    /// The short name used on command lines (`call-skew`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Scenario::CallSkew => "call-skew",
            Scenario::SizeMismatch => "size-mismatch",
            Scenario::BadArguments => "bad-arguments",
            Scenario::StalledPeer => "stalled-peer",
            Scenario::WorkingPeer => "working-peer",
            Scenario::NoTimeout => "no-timeout",
            Scenario::LostPeer => "lost-peer",
        }
    }

    /// The scenario of a [`Scenario::name`].
    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The timeout the group must have for this scenario.
    pub fn timeout(self) -> Duration {
        match self {
            Scenario::NoTimeout => Duration::MAX,
            _ => Duration::from_millis(1500),
        }
    }

    /// How long after its start the scenario is over on every rank. A process that must stay
    /// alive for its peers' sake (an MPI rank, whose exit would end the job) waits that long.
    pub fn span(self) -> Duration {
        match self {
            Scenario::StalledPeer | Scenario::WorkingPeer => self.timeout() * 4,
            Scenario::LostPeer => self.timeout() * 3,
            Scenario::NoTimeout => Duration::from_secs(2),
            _ => self.timeout(),
        }
    }

    /// Whether a failed outcome poisons the groups (the MPI suite then skips `MPI_Finalize`).
    pub fn fails(self) -> bool {
        !matches!(self, Scenario::WorkingPeer | Scenario::NoTimeout)
    }

    /// Run the scenario on this rank of a group of at least two ranks (the group must have
    /// [`Scenario::timeout`]). `lose` is how this engine loses a rank (thread ranks drop the
    /// group; an MPI process aborts). `Ok` when this rank saw what it should; else what it saw.
    pub fn run<G: Group>(self, g: G, lose: impl FnOnce(G)) -> Result<(), String> {
        let (me, n) = (g.rank(), g.size());
        if n < 2 {
            return Err(format!("{}: needs at least two ranks, the group has {n}", self.name()));
        }
        if g.timeout() != self.timeout() {
            return Err(format!("{}: the group's timeout is {:?}, not {:?}", self.name(), g.timeout(), self.timeout()));
        }
        let r = match self {
            Scenario::CallSkew => call_skew(&g),
            Scenario::SizeMismatch => size_mismatch(&g),
            Scenario::BadArguments => bad_arguments(&g),
            Scenario::StalledPeer => stalled_peer(&g),
            Scenario::WorkingPeer => working_peer(&g),
            Scenario::NoTimeout => no_timeout(&g),
            Scenario::LostPeer if me == n - 1 => {
                g.barrier().map_err(|e| format!("first barrier: {e}"))?;
                lose(g);
                return Ok(());
            }
            Scenario::LostPeer => lost_peer(&g),
        };
        r.map_err(|e| format!("rank {me} of {n}, {}: {e}", self.name()))
    }
}

/// `e` blames `peer` (`None`: any rank but this one).
fn blames(e: &Error, me: usize, peer: Option<usize>) -> bool {
    e.peer().is_some_and(|p| peer.map_or(p != me, |want| p == want))
}

/// The call after a failed one must be refused.
fn poisoned_after<G: Group>(g: &G) -> Result<(), String> {
    match g.barrier() {
        Err(Error::Poisoned { rank, .. }) if rank == g.rank() => Ok(()),
        other => Err(format!("the call after the failure returned {other:?}, not Poisoned")),
    }
}

fn call_skew<G: Group>(g: &G) -> Result<(), String> {
    let (me, odd) = (g.rank(), g.size() - 1);
    let r = if me == odd { g.barrier() } else { g.all_gather(&[1, 2]).map(|_| ()) };
    match r {
        Err(e @ Error::Mismatch { rank, .. }) if rank == me && blames(&e, me, (me != odd).then_some(odd)) => {
            let want = if me == odd { "it called all_gather (call #0)" } else { "it called barrier (call #0)" };
            if !e.to_string().contains(want) {
                return Err(format!("the mismatch does not say \"{want}\": {e}"));
            }
            poisoned_after(g)
        }
        other => Err(format!("expected a Mismatch blaming the other call, got {other:?}")),
    }
}

fn size_mismatch<G: Group>(g: &G) -> Result<(), String> {
    let (me, n, odd) = (g.rank(), g.size(), g.size() - 1);
    let chunk = if me == odd { 6 } else { 4 };
    let r = g.all_to_all(&vec![7u8; chunk * n]);
    let want = if me == odd { "it sent 4 bytes, this rank expects 6" } else { "it sent 6 bytes, this rank expects 4" };
    match r {
        Err(e @ Error::Mismatch { rank, .. })
            if rank == me && blames(&e, me, (me != odd).then_some(odd)) && e.to_string().contains(want) =>
        {
            poisoned_after(g)
        }
        other => Err(format!("expected a Mismatch saying \"{want}\", got {other:?}")),
    }
}

fn bad_arguments<G: Group>(g: &G) -> Result<(), String> {
    let (me, n, odd) = (g.rank(), g.size(), g.size() - 1);
    let counts = vec![0; if me == odd { n + 1 } else { n }];
    let r = g.exchange_v_known_into(&[], &counts, &mut [], &vec![0; n]);
    match (me == odd, r) {
        (true, Err(e @ Error::InvalidInput { rank: Some(r), .. }))
            if r == me && e.to_string().contains(&format!("send_counts has {} entries", n + 1)) => {}
        // First-hand from the bad rank, or from a peer that heard it first.
        (
            false,
            Err(e @ (Error::PeerFailed { op: "exchange_v", .. } | Error::PeerReported { op: "exchange_v", .. })),
        ) if blames(&e, me, Some(odd)) => {}
        (_, other) => return Err(format!("unexpected outcome {other:?}")),
    }
    poisoned_after(g)
}

fn stalled_peer<G: Group>(g: &G) -> Result<(), String> {
    let (me, n, odd) = (g.rank(), g.size(), g.size() - 1);
    g.barrier().map_err(|e| format!("first barrier: {e}"))?;
    if me == odd {
        std::thread::sleep(g.timeout() * 3);
    }
    let r = g.all_to_all(&vec![me as u8; 8 * n]);
    match (me == odd, r) {
        // The stalled rank fails in this same call, and names itself.
        (true, Err(e @ Error::PeerReported { rank, op: "all_to_all", peer, .. })) if rank == me && peer == me => {
            if !e.to_string().contains("this rank stalled") {
                return Err(format!("the stalled rank's error does not say it stalled: {e}"));
            }
        }
        (false, Err(Error::Timeout { rank, op: "all_to_all", peer, .. })) if rank == me && peer == odd => {}
        (false, Err(Error::PeerReported { rank, op: "all_to_all", peer, .. })) if rank == me && peer == odd => {}
        (_, other) => return Err(format!("unexpected outcome {other:?}")),
    }
    poisoned_after(g)
}

/// One exchange_v of uneven, patterned bytes, checked.
fn patterned_exchange<G: Group>(g: &G, seed: usize) -> Result<(), String> {
    let (me, n) = (g.rank(), g.size());
    let len = |a: usize, b: usize| (a * 7 + b * 13 + seed) % 11 * 5;
    let byte = |a: usize, b: usize, i: usize| ((a * 31 + b * 7 + i * 13 + seed) % 251) as u8;
    let counts: Vec<usize> = (0..n).map(|p| len(me, p)).collect();
    let send: Vec<u8> = (0..n).flat_map(|p| (0..len(me, p)).map(move |i| byte(me, p, i))).collect();
    let (got, rc) = g.exchange_v(&send, &counts).map_err(|e| e.to_string())?;
    let want: Vec<u8> = (0..n).flat_map(|p| (0..len(p, me)).map(move |i| byte(p, me, i))).collect();
    if rc != (0..n).map(|p| len(p, me)).collect::<Vec<_>>() || got != want {
        return Err("exchange_v delivered other bytes".into());
    }
    Ok(())
}

fn working_peer<G: Group>(g: &G) -> Result<(), String> {
    let (me, odd) = (g.rank(), g.size() - 1);
    g.barrier().map_err(|e| format!("first barrier: {e}"))?;
    if me == odd {
        let busy = g.working();
        if !busy.is_beating() {
            return Err("this group's working guard sends no heartbeat".into());
        }
        std::thread::sleep(g.timeout() * 3);
    }
    patterned_exchange(g, 3)?;
    g.barrier().map_err(|e| format!("last barrier: {e}"))
}

fn no_timeout<G: Group>(g: &G) -> Result<(), String> {
    let (me, odd) = (g.rank(), g.size() - 1);
    let busy = g.working();
    patterned_exchange(g, 5)?;
    drop(busy);
    if me == odd {
        std::thread::sleep(Duration::from_secs(1));
    }
    patterned_exchange(g, 6)?;
    g.barrier().map_err(|e| format!("last barrier: {e}"))
}

fn lost_peer<G: Group>(g: &G) -> Result<(), String> {
    let (me, n, odd) = (g.rank(), g.size(), g.size() - 1);
    g.barrier().map_err(|e| format!("first barrier: {e}"))?;
    match g.all_to_all(&vec![1u8; 4 * n]) {
        Err(e @ (Error::PeerLost { .. } | Error::Timeout { .. } | Error::PeerReported { .. }))
            if blames(&e, me, Some(odd)) =>
        {
            Ok(())
        }
        other => Err(format!("expected an error naming the lost rank {odd}, got {other:?}")),
    }
}

/// The lopsided layer of the liveness test: every expert on rank 0, a prefill long enough
/// that rank 0 computes for several timeouts, the other ranks waiting on it all along.
pub struct Lopsided {
    pub cfg: MoeConfig,
    /// Tokens per rank (the last rank of three has none).
    pub tokens: Vec<usize>,
    pub seed: u64,
}

impl Lopsided {
    /// The group timeout of the test.
    pub const TIMEOUT: Duration = Duration::from_secs(2);

    /// A layer of 4 experts of `[1024, 1024]`, top-2, f32, and a token count per rank for
    /// `world` ranks such that rank 0's expert compute takes about `6 * TIMEOUT` at
    /// `rows_per_s` routed rows per second (the CPU FFN gets faster per row with more rows an
    /// expert than the measurement had, so the margin is wide).
    pub fn new(world: usize, rows_per_s: f64) -> Self {
        let cfg = MoeConfig::new(4, 1024, 1024, 2);
        let total = (rows_per_s * Self::TIMEOUT.as_secs_f64() * 6.0 / cfg.top_k as f64).ceil() as usize;
        let mut tokens = vec![total / world.max(1); world];
        tokens[0] += total % world.max(1);
        if world >= 3 {
            // Uneven, and one rank without tokens that still waits through both exchanges.
            tokens[0] += tokens[world - 1];
            tokens[world - 1] = 0;
        }
        Lopsided { cfg, tokens, seed: 0x10b5 }
    }

    /// Routed rows per second of the CPU expert compute here, measured on one rank.
    pub fn measure_rate() -> f64 {
        let cfg = MoeConfig::new(4, 1024, 1024, 2);
        // Rows an expert of the order of the test's (the GEMM path's rate grows with them).
        let n = 2048;
        let out = crate::exchange::group::LocalGroup::run(1, Duration::from_secs(600), |g| {
            let p = Placement::contiguous(cfg.num_experts, 1)?;
            let mine = random::experts(&cfg, 1, p.experts_of(0));
            let layer = MoeLayer::new(g, cfg.clone(), p, random::gate(&cfg, 1), mine)?;
            let x = random::input(&cfg, n, 1, 0);
            layer.forward(&x)?;
            let t = Instant::now();
            layer.forward(&x)?;
            Ok::<_, Error>(t.elapsed().as_secs_f64())
        });
        match out.ok().and_then(|mut v| v.pop()).and_then(|r| r.ok()).and_then(|r| r.ok()) {
            Some(secs) if secs > 0.0 => (n * cfg.top_k) as f64 / secs,
            _ => 1e4,
        }
    }

    /// This rank's part: build the layer (experts all on rank 0), one forward, then the
    /// checks: `Ok`, the right shape, sampled rows against the f64 reference, and on rank 0
    /// an expert compute longer than two timeouts (else the test tested nothing).
    pub fn run<G: Group>(&self, g: G) -> Result<(), String> {
        let (me, n) = (g.rank(), g.size());
        let cfg = &self.cfg;
        let placement = Placement::from_map(vec![0; cfg.num_experts], n).map_err(|e| e.to_string())?;
        let mine = random::experts(cfg, self.seed, placement.experts_of(me));
        let gate = random::gate(cfg, self.seed);
        let layer = MoeLayer::new(g, cfg.clone(), placement, gate.clone(), mine).map_err(|e| e.to_string())?;
        let x = random::input(cfg, self.tokens[me], self.seed, me);
        let (y, stats) = layer.forward_with_stats(&x).map_err(|e| format!("rank {me}: forward: {e}"))?;
        if (y.rows(), y.cols()) != (x.rows(), cfg.hidden) {
            return Err(format!("rank {me}: output shape [{}, {}]", y.rows(), y.cols()));
        }
        if me == 0 && stats.times.experts < 2.0 * Self::TIMEOUT.as_secs_f64() {
            return Err(format!(
                "rank 0 computed its experts in {:.2} s, less than two timeouts: size the test up",
                stats.times.experts
            ));
        }
        self.check_rows(me, &x, &y, &gate)
    }

    /// Rows 0, 1, the middle and the last of this rank against the f64 reference.
    fn check_rows(&self, me: usize, x: &crate::Tensor, y: &crate::Tensor, gate: &crate::Tensor) -> Result<(), String> {
        let rows = x.rows();
        let all = random::experts(&self.cfg, self.seed, &(0..self.cfg.num_experts).collect::<Vec<_>>());
        let mut picks: Vec<usize> =
            [0, 1, rows / 2, rows.saturating_sub(1)].into_iter().filter(|&r| r < rows).collect();
        picks.dedup();
        for r in picks {
            let xs = x.slice_rows(r, r + 1).map_err(|e| e.to_string())?;
            let want = reference::dense_moe(&xs, gate, &all, &self.cfg).y;
            let got = y.slice_rows(r, r + 1).map_err(|e| e.to_string())?.to_f64_vec();
            let rel = reference::rel_error(&got, &want);
            if rel.is_nan() || rel > 2e-5 {
                return Err(format!("rank {me}: row {r} differs from the reference by {rel:.2e}"));
            }
        }
        Ok(())
    }
}
