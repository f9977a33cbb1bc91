//! One forward call of an expert-parallel layer, on one engine session.
//!
//! The call is four stretches of engine work between host points, each run by one
//! [`Session::sync`]:
//!
//! ```text
//! route        x -> ids, weights (read back: the plan needs them)      | counts round
//! pack         x -> send blocks              (world > 1)               | exchange out
//! experts      recv + x -> batch -> FFN (+ shared) -> blocks back       | exchange back
//! combine      outputs + received back (+ shared) -> y (read back, or kept on the device)
//! ```
//!
//! At world 1 there is no exchange, and experts and combine run in one submit: two submits
//! and two waits a call. A stretch that fails with a device error reruns on the CPU when the
//! policy allows (outside deterministic mode): the CPU takes over the call from there, with
//! what the host holds (the input, the routing, the received blocks) and recomputing what lived
//! only on the device. A rank that fails for good still takes part in the remaining exchanges,
//! as failed, so that its peers fail in the same call instead of waiting.

use std::time::Instant;

use crate::compute::engine::Engine;
use crate::compute::policy::is_device_error;
use crate::compute::session::{Buf, DeviceTensor, Extra, Matrix, Routed, RouterSet, Session, Weights};
use crate::error::{Error, Result};
use crate::exchange::dispatch::{self as steps, add_traffic};
use crate::exchange::group::Group;
use crate::exchange::layout::DispatchLayout;
use crate::model::config::{Activation, MoeConfig};
use crate::model::placement::Placement;
use crate::model::router::Routing;
use crate::model::weights::{ExpertSet, SharedExpert};
use crate::stats::ForwardStats;
use crate::tensor::Tensor;

/// The input of a forward call.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    Host(&'a Tensor),
    Device(&'a DeviceTensor),
}

impl Input<'_> {
    pub(crate) fn rows(&self) -> usize {
        match self {
            Input::Host(t) => t.rows(),
            Input::Device(t) => t.rows(),
        }
    }
}

/// The output of a forward call, where the caller wants it.
pub(crate) enum Output {
    Host(Tensor),
    Device(DeviceTensor),
}

/// The shared expert as the layer runs it: a one-expert set (engines keep it resident like the
/// routed experts) and the optional `[1, D]` gate.
pub(crate) struct Shared {
    pub set: ExpertSet,
    pub gate: Option<Matrix>,
}

impl Shared {
    pub(crate) fn new(s: SharedExpert, activation: Activation) -> Self {
        Shared { set: ExpertSet::with_activation(vec![s.weights], activation), gate: s.gate.map(Matrix::new) }
    }
    /// The ids engines may keep copies under.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.set.id()).chain(self.gate.as_ref().map(Matrix::id))
    }
}

/// What a forward call needs of its layer.
pub(crate) struct Parts<'l, G: Group> {
    pub group: &'l G,
    pub config: &'l MoeConfig,
    pub placement: &'l Placement,
    pub router: &'l RouterSet,
    pub experts: &'l ExpertSet,
    pub shared: Option<&'l Shared>,
    pub layer_id: u64,
}

/// The session's buffers of one call.
#[derive(Default, Clone, Copy)]
struct Bufs {
    x: Option<Buf>,
    /// The rows that travel with weights on the expert input (Llama 4): `x[t] * w[t, j]`.
    scaled: Option<Buf>,
    routed: Option<Routed>,
    recv: Option<Buf>,
    out: Option<Buf>,
    shared: Option<(Buf, Extra)>,
    back: Option<Buf>,
    back_recv: Option<Buf>,
}

/// Where the call is: what a failure must still take part in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Route,
    Pack,
    Experts,
    Combine,
}

struct Run<'a, G: Group> {
    p: &'a Parts<'a, G>,
    x: Input<'a>,
    /// The engine the policy chose, then the CPU after a fallback.
    engine: &'a dyn Engine,
    fallback: Option<&'a dyn Engine>,
    /// The GPU engine, whose tensors a device input and output are.
    device: Option<&'a dyn Engine>,
    s: Box<dyn Session<'a> + 'a>,
    b: Bufs,
    routing: Option<Routing>,
    stats: ForwardStats,
}

/// Run one forward call of `p`'s layer on `engine` (`fallback`: the CPU, when a device error may
/// hand it the call). Collective.
pub(crate) fn run<'a, G: Group>(
    p: &'a Parts<'a, G>,
    engine: &'a dyn Engine,
    fallback: Option<&'a dyn Engine>,
    device: Option<&'a dyn Engine>,
    x: Input<'a>,
    device_out: bool,
) -> Result<(Output, ForwardStats)> {
    let (rank, world) = (p.group.rank(), p.group.size());
    let stats = ForwardStats { rank, world, tokens: x.rows(), backend: engine.name(), ..Default::default() };
    let fallback = fallback.filter(|_| !p.config.deterministic);
    let s = engine.session().map_err(|e| e.on_rank(rank))?;
    let mut r = Run { p, x, engine, fallback, device, s, b: Bufs::default(), routing: None, stats };
    let y = {
        let _span = tracing::debug_span!("forward", rank, tokens = r.stats.tokens).entered();
        r.forward(device_out)
    };
    add_traffic(&mut r.stats, r.s.traffic());
    r.stats.gpu_times = r.s.gpu_times();
    Ok((y?, r.stats))
}

impl<'a, G: Group> Run<'a, G> {
    fn rank(&self) -> usize {
        self.p.group.rank()
    }
    fn world(&self) -> usize {
        self.p.group.size()
    }

    fn forward(&mut self, device_out: bool) -> Result<Output> {
        let t = Instant::now();
        let routed = self.stage(Stage::Route, Self::route).map_err(|e| e.on_rank(self.rank()));
        self.stats.times.route = t.elapsed().as_secs_f64();
        let l = &self.plan(routed)?;
        if self.world() > 1 {
            let t = Instant::now();
            self.guarded(l, Stage::Pack, |r| r.pack(l))?;
            self.stats.times.pack = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let recv = self.exchange(l, Stage::Pack)?;
            self.b.recv = Some(recv);
            self.stats.times.exchange += t.elapsed().as_secs_f64();
            self.guarded(l, Stage::Experts, |r| r.experts(l, true))?;
            let t = Instant::now();
            let back = self.exchange(l, Stage::Experts)?;
            self.b.back_recv = Some(back);
            self.stats.times.exchange_back = t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let before = self.stats.times.experts + self.stats.times.shared;
        let y = self.guarded(l, Stage::Combine, |r| r.combine(l, device_out));
        // World 1 (or after a fallback) runs the experts inside this stretch: they keep their own figures.
        let inside = self.stats.times.experts + self.stats.times.shared - before;
        self.stats.times.combine = (t.elapsed().as_secs_f64() - inside).max(0.0);
        y
    }

    /// Run `f` for `stage`; on a device error with a fallback, hand the call to the CPU and run
    /// it again there.
    fn stage<T>(&mut self, stage: Stage, f: impl Fn(&mut Self) -> Result<T>) -> Result<T> {
        // Heartbeats while this rank computes: its peers, waiting in the next exchange, do not
        // take a long stretch (a prefill, a lopsided placement) for a stall (Group::working).
        let group = self.p.group;
        let _busy = group.working();
        let _span = tracing::debug_span!("stage", stage = stage_name(stage), rank = group.rank()).entered();
        match f(self) {
            Err(e) if self.fallback.is_some() && is_device_error(&e) => {
                self.fall_back(stage, &e)?;
                f(self)
            }
            Err(e) if self.p.config.deterministic && is_device_error(&e) && self.engine.is_accelerator() => {
                Err(Error::Backend {
                    rank: Some(self.rank()),
                    backend: "policy",
                    what: format!(
                        "the GPU failed in deterministic mode, where a CPU rerun would change the output's bits: {e}"
                    ),
                })
            }
            r => r,
        }
    }

    /// [`Run::stage`] after the counts round: a rank that fails for good still takes part in
    /// the exchanges left, as failed, then returns its error.
    fn guarded<T>(&mut self, l: &DispatchLayout, stage: Stage, f: impl Fn(&mut Self) -> Result<T>) -> Result<T> {
        self.stage(stage, f).or_else(|e| {
            let e = e.on_rank(self.rank());
            if self.world() > 1 && stage < Stage::Combine {
                steps::exchange_as_failed(self.p.group, l, stage <= Stage::Pack)?;
            }
            Err(e)
        })
    }

    /// Hand the rest of the call to the CPU: a CPU session with what the host holds (the input,
    /// the routing, the blocks received so far); the stage recomputes the rest.
    fn fall_back(&mut self, stage: Stage, e: &Error) -> Result<()> {
        let cpu = self.fallback.take().expect("called with a fallback");
        tracing::warn!(rank = self.rank(), error = %e, "GPU failed; the CPU finishes the call");
        self.stats.fallbacks = 1;
        self.stats.fallback_error = Some(format!("{}: {e}", stage_name(stage)));
        let mut failed = std::mem::replace(&mut self.s, cpu.session()?);
        add_traffic(&mut self.stats, failed.traffic());
        let recover = |failed: &mut Box<dyn Session<'a> + 'a>, b: Option<Buf>| -> Result<Option<Tensor>> {
            b.map(|b| {
                failed.download(b).map_err(|d| Error::Backend {
                    rank: None,
                    backend: "policy",
                    what: format!("the GPU failed ({e}) and the rows it held cannot be read back: {d}"),
                })
            })
            .transpose()
        };
        let (recv, back_recv) = (recover(&mut failed, self.b.recv)?, recover(&mut failed, self.b.back_recv)?);
        let host_x = match self.x {
            Input::Host(_) => None,
            Input::Device(d) => Some(
                self.device
                    .map_or_else(|| Err(Error::invalid("a device input without a device engine")), |g| g.to_host(d))?,
            ),
        };
        drop(failed);
        self.engine = cpu;
        self.b = Bufs::default();
        self.b.x = Some(match (self.x, host_x) {
            (Input::Host(t), _) => self.s.upload(t)?,
            (_, Some(t)) => self.s.upload_owned(t)?,
            _ => unreachable!("a device input was read back above"),
        });
        if let Some(r) = &self.routing {
            self.b.routed = Some(self.s.adopt_routing(r.clone())?);
        }
        self.b.recv = recv.map(|t| self.s.upload_owned(t)).transpose()?;
        self.b.back_recv = back_recv.map(|t| self.s.upload_owned(t)).transpose()?;
        Ok(())
    }

    /// The input in the current session, checked against the config.
    fn input(&mut self) -> Result<Buf> {
        if let Some(x) = self.b.x {
            return Ok(x);
        }
        let cfg = self.p.config;
        let x = match self.x {
            Input::Host(t) => {
                t.expect("input x", cfg.act_dtype, None, cfg.hidden)?;
                self.s.upload(t)?
            }
            Input::Device(d) => {
                d.expect("input x", cfg.act_dtype, cfg.hidden)?;
                if d.owner() == self.engine.id() {
                    self.s.adopt(d)?
                } else {
                    let g = self.device.filter(|g| g.id() == d.owner()).ok_or_else(|| {
                        Error::invalid(format!("input x {d:?} is held by none of the layer's engines"))
                    })?;
                    self.s.upload_owned(g.to_host(d)?)?
                }
            }
        };
        self.b.x = Some(x);
        Ok(x)
    }

    /// The rows the experts receive: `x`'s (a token's row for each of its slots), or with the
    /// routing weights on the expert input one scaled row per (token, slot).
    fn source(&mut self) -> Result<Buf> {
        let x = self.input()?;
        if !self.p.config.router.weights_on_input {
            return Ok(x);
        }
        if let Some(s) = self.b.scaled {
            return Ok(s);
        }
        let routed = self.b.routed.expect("routed before the rows travel");
        let s = self.s.scale_rows(x, routed)?;
        self.b.scaled = Some(s);
        Ok(s)
    }

    /// The combine's weights: the routing's (and the extra slot's), or all 1 when the weights
    /// scaled the expert input instead.
    fn combine_weights(&mut self, extra: Extra) -> Result<Weights<'static>> {
        let routed = self.b.routed.expect("routed before the combine");
        if !self.p.config.router.weights_on_input {
            return Ok(Weights::Routed { routed, extra });
        }
        Ok(match (extra, &self.routing) {
            (Extra::None | Extra::One, _) => Weights::Ones,
            (Extra::Scale(_), Some(r)) => {
                let ones = Routing { weights: vec![1.0; r.weights.len()], ..r.clone() };
                Weights::Routed { routed: self.s.adopt_routing(ones)?, extra }
            }
            (Extra::Scale(_), None) => return Err(Error::invalid("internal: no routing before the combine")),
        })
    }

    /// Stage 1: route on the engine, read the routing back.
    fn route(&mut self) -> Result<Routing> {
        let x = self.input()?;
        let routed = self.s.route(x, self.p.router, self.p.config)?;
        self.s.sync()?;
        self.b.routed = Some(routed);
        self.s.routing(routed)
    }

    /// Plan and counts round (collective): the layout of the call.
    fn plan(&mut self, routed: Result<Routing>) -> Result<DispatchLayout> {
        let (p, rank, world) = (self.p, self.rank(), self.world());
        let t = Instant::now();
        let row = (p.config.hidden * p.config.act_dtype.size(), p.config.act_dtype);
        let planned =
            routed.and_then(|r| steps::plan(rank, world, p.placement, p.config.capacity, r.n, &r).map(|pl| (pl, r)));
        let (plan_only, routing) = match planned {
            Ok((pl, r)) => (Ok(pl), Some(r)),
            Err(e) => (Err(e), None),
        };
        self.stats.times.plan = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let counts = steps::counts_round(p.group, p.placement, &plan_only, row, p.layer_id)?;
        self.stats.times.exchange = t.elapsed().as_secs_f64();
        let plan = plan_only?;
        let by_slot = p.config.router.weights_on_input;
        let shape = (p.config.act_dtype, p.config.hidden);
        let layout = DispatchLayout::new(&plan, &counts.counts, shape, counts.handle, by_slot)?;
        layout.fill_stats(&plan, &counts.counts, &mut self.stats);
        self.routing = routing;
        Ok(layout)
    }

    /// Stage 2: pack the send blocks and make them visible to the host.
    fn pack(&mut self, l: &DispatchLayout) -> Result<()> {
        let x = self.source()?;
        let send = steps::pack(self.s.as_mut(), l, x)?;
        self.s.sync()?;
        self.b.back = Some(send);
        Ok(())
    }

    /// An exchange (collective): out after `Stage::Pack`, back after `Stage::Experts`.
    fn exchange(&mut self, l: &DispatchLayout, after: Stage) -> Result<Buf> {
        let g = self.p.group;
        let send = self.b.back.take().expect("a send block before an exchange");
        let r = match after {
            Stage::Pack => steps::exchange_out(g, self.s.as_mut(), l, send),
            _ => steps::exchange_back(g, self.s.as_mut(), l, send),
        };
        r.map_err(|e| e.on_rank(self.rank()))
    }

    /// Stage 3: scatter, the experts, the shared expert, and (world > 1) the blocks back.
    /// Adds its wall time to `stats.times`: the shared expert's recording to `shared`, the rest
    /// (on a GPU session, the wait for all of it) to `experts`.
    fn experts(&mut self, l: &DispatchLayout, back: bool) -> Result<()> {
        let start = Instant::now();
        let p = self.p;
        let cfg = p.config;
        let x = self.input()?;
        let recv = match self.b.recv {
            Some(r) => r,
            None => self.s.alloc(cfg.act_dtype, 0, cfg.hidden)?,
        };
        let rows = self.source()?;
        let batch = steps::scatter(self.s.as_mut(), l, recv, rows)?;
        let out = self.s.alloc(cfg.act_dtype, batch.rows(), cfg.hidden)?;
        self.s.ffn(batch, &l.expert_offsets, p.experts, cfg.deterministic, out)?;
        self.b.out = Some(out);
        let t = Instant::now();
        self.b.shared = match p.shared {
            Some(sh) if x.rows() > 0 => {
                let o = self.s.alloc(cfg.act_dtype, x.rows(), cfg.hidden)?;
                self.s.ffn(x, &[0, x.rows()], &sh.set, cfg.deterministic, o)?;
                let extra = match &sh.gate {
                    Some(g) => Extra::Scale(self.s.gate_scale(x, g)?),
                    None => Extra::One,
                };
                Some((o, extra))
            }
            _ => None,
        };
        // Wall time of the shared expert's work as recorded (all of it on the CPU; a GPU runs it
        // at the next sync, inside the experts stage).
        let shared = t.elapsed().as_secs_f64();
        self.stats.times.shared += shared;
        if back {
            self.b.back = Some(steps::gather_back(self.s.as_mut(), l, out)?);
            self.s.sync()?;
        }
        self.stats.times.experts += start.elapsed().as_secs_f64() - shared;
        Ok(())
    }

    /// Stage 4: the weighted sum (the experts first if this session has no outputs yet:
    /// world 1, or after a fallback), then the output where the caller wants it.
    fn combine(&mut self, l: &DispatchLayout, device_out: bool) -> Result<Output> {
        let cfg = self.p.config;
        if self.b.out.is_none() {
            self.experts(l, false)?;
        }
        let out = self.b.out.expect("experts ran");
        let back = match self.b.back_recv {
            Some(b) => b,
            None => self.s.alloc(cfg.act_dtype, 0, cfg.hidden)?,
        };
        let (extra_rows, extra) = match self.b.shared {
            Some((rows, e)) if l.n > 0 => (Some(rows), e),
            _ => (None, Extra::None),
        };
        let weights = self.combine_weights(extra)?;
        let y = steps::weighted_sum(self.s.as_mut(), l, out, back, extra_rows, weights)?;
        match (device_out, self.device) {
            (false, _) => Ok(Output::Host(self.s.download(y)?)),
            (true, Some(g)) if g.id() != self.engine.id() => Ok(Output::Device(g.to_device(&self.s.download(y)?)?)),
            (true, _) => Ok(Output::Device(self.s.export(y)?)),
        }
    }
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Route => "route",
        Stage::Pack => "pack",
        Stage::Experts => "experts",
        Stage::Combine => "combine",
    }
}
