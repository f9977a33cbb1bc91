//! `MoeLayer`: route, dispatch, experts, combine on one rank of a group.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::compute::cpu::CpuEngine;
use crate::compute::engine::Engine;
use crate::compute::policy::{BackendChoice, LayerOptions, OnGpuError, is_device_error};
use crate::compute::session::{DeviceTensor, Matrix, RouterSet};
use crate::compute::warmup::{WarmUpReport, measure_crossover};
use crate::error::{Error, Result};
use crate::exchange::agree::{Field, agree};
use crate::exchange::group::Group;
use crate::layer::forward::{self, Input, Output, Parts, Shared};
use crate::model::config::MoeConfig;
use crate::model::placement::Placement;
use crate::model::weights::{ExpertSet, ExpertWeights, LayerWeights, SharedExpert};
use crate::stats::{ForwardStats, LayerMetrics};
use crate::tensor::Tensor;

/// `crossover` value: not decided yet (measured at warm-up or on the first call).
const UNDECIDED: usize = usize::MAX - 1;
/// `crossover` value: never the GPU.
const NEVER: usize = usize::MAX;

/// The engines of a layer and the policy between them.
struct Engines {
    /// Runs every call without a GPU engine, and the calls below the crossover: the CPU
    /// engine, or the one engine given to [`MoeLayer::with_engine`].
    base: Box<dyn Engine>,
    /// The GPU engine, if the layer has one.
    gpu: Option<Box<dyn Engine>>,
    options: LayerOptions,
    /// Tokens from which the GPU runs a call ([`UNDECIDED`], [`NEVER`], or a count).
    crossover: AtomicUsize,
    /// Set by the first complete warm-up.
    warm: Mutex<Option<WarmUpReport>>,
    /// The ids of the expert sets (routed, shared), released from every engine on drop.
    set_ids: Vec<u64>,
}

impl Drop for Engines {
    fn drop(&mut self) {
        for &id in &self.set_ids {
            self.base.release(id);
            if let Some(g) = &self.gpu {
                g.release(id);
            }
        }
    }
}

/// One rank's part of an expert-parallel MoE layer: the router and its selection bias
/// (replicated), this rank's experts, the shared expert (replicated) if the model has one,
/// and the group it shares with the other ranks.
pub struct MoeLayer<G: Group> {
    group: G,
    config: MoeConfig,
    placement: Placement,
    router: RouterSet,
    experts: ExpertSet,
    shared: Option<Shared>,
    engines: Engines,
    /// Every rank's id of this layer (agreed at construction): what its calls carry.
    id: u64,
    metrics: Mutex<LayerMetrics>,
}

impl<G: Group> std::fmt::Debug for MoeLayer<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("rank", &self.group.rank())
            .field("world", &self.group.size())
            .field("config", &self.config)
            .field("local_experts", &self.placement.experts_of(self.group.rank()))
            .field("base", &self.engines.base.name())
            .field("gpu", &self.engines.gpu.as_ref().map(|g| g.name()))
            .field("options", &self.engines.options)
            .finish()
    }
}

/// The crossover a layer starts with under `options` ([`UNDECIDED`] until measured, [`NEVER`]
/// without a GPU engine). Errors for a fixed crossover in deterministic mode.
fn initial_crossover(options: &LayerOptions, has_gpu: bool, deterministic: bool) -> Result<usize> {
    Ok(match (options.backend, has_gpu) {
        (_, false) | (BackendChoice::Cpu, _) => NEVER,
        (BackendChoice::Gpu, _) => 0,
        (BackendChoice::Auto, _) if deterministic => 0,
        (BackendChoice::Auto, _) => UNDECIDED,
        (BackendChoice::Crossover(_), _) if deterministic => {
            return Err(Error::invalid(
                "deterministic mode runs every call on one backend: a CPU/GPU crossover would make a \
                 token's bits depend on its batch (use backend auto, cpu or gpu)",
            ));
        }
        (BackendChoice::Crossover(n), _) => n.min(NEVER - 2),
    })
}

/// The agreement fields of the replicated weights: router, selection bias, shared expert.
pub(crate) fn replicated_fields(gate: &Tensor, bias: Option<&[f32]>, shared: Option<&SharedExpert>) -> Vec<Field> {
    let bias_bits: Vec<u32> = bias.iter().copied().flatten().map(|v| v.to_bits()).collect();
    let shared_parts: Vec<&[u8]> = shared.map_or(Vec::new(), |s| {
        let w = &s.weights;
        let mut parts: Vec<&[u8]> = w.projections().iter().flat_map(|p| p.raw_parts()).collect();
        parts.extend(s.gate.as_ref().map(|g| g.as_bytes()));
        parts
    });
    vec![
        Field::hash("router weight", &[gate.as_bytes()]),
        Field::hash("selection bias", &[bytemuck::cast_slice(&bias_bits)]),
        Field::hash("shared expert weight", &shared_parts),
    ]
}

impl<G: Group> MoeLayer<G> {
    /// Build this rank's layer on the CPU engine. Collective: every rank of `group` calls it.
    ///
    /// `gate` is the router weight `[E, D]` (the same on every rank); `experts` are this rank's
    /// experts in increasing global id (`placement.experts_of(rank)`). Errors, on every rank,
    /// when a shape or dtype is wrong on some rank or when the config, placement or router
    /// weight differ between ranks (the message names the field and the ranks).
    pub fn new(
        group: G,
        config: MoeConfig,
        placement: Placement,
        gate: Tensor,
        experts: Vec<ExpertWeights>,
    ) -> Result<Self> {
        let w = LayerWeights::new(gate, experts);
        Self::build(group, config, placement, w, Box::new(CpuEngine), None, LayerOptions::default())
    }

    /// [`MoeLayer::new`] with one engine that runs every call, whatever its size; its
    /// errors are returned as they are (no fallback).
    pub fn with_engine(
        group: G,
        config: MoeConfig,
        placement: Placement,
        gate: Tensor,
        experts: Vec<ExpertWeights>,
        engine: Box<dyn Engine>,
    ) -> Result<Self> {
        Self::build(group, config, placement, LayerWeights::new(gate, experts), engine, None, LayerOptions::default())
    }

    /// [`MoeLayer::with_engine`] with all of this rank's [`LayerWeights`] (see
    /// [`MoeLayer::from_weights`]).
    pub fn with_engine_weights(
        group: G,
        config: MoeConfig,
        placement: Placement,
        weights: LayerWeights,
        engine: Box<dyn Engine>,
    ) -> Result<Self> {
        Self::build(group, config, placement, weights, engine, None, LayerOptions::default())
    }

    /// [`MoeLayer::new`] with a GPU engine beside the CPU one, chosen per call by `options`
    /// (and the environment: [`crate::compute::policy::BACKEND_ENV`], [`crate::compute::policy::GPU_ERRORS_ENV`]).
    /// With [`BackendChoice::Auto`] the crossover is measured by [`MoeLayer::warm_up`] (or
    /// by the first forward call, if warm-up was not called). Errors also when the options
    /// or the environment do not parse, or ask for a crossover in deterministic mode.
    pub fn with_gpu(
        group: G,
        config: MoeConfig,
        placement: Placement,
        gate: Tensor,
        experts: Vec<ExpertWeights>,
        gpu: Box<dyn Engine>,
        options: LayerOptions,
    ) -> Result<Self> {
        let w = LayerWeights::new(gate, experts);
        Self::build(group, config, placement, w, Box::new(CpuEngine), Some(gpu), options)
    }

    /// The general constructor: all of this rank's [`LayerWeights`] (router, selection bias,
    /// local experts, shared expert), on the CPU engine and, with `gpu`, a GPU engine chosen per
    /// call by `options` as in [`MoeLayer::with_gpu`]. Collective. Errors as
    /// [`MoeLayer::with_gpu`] does, and when the selection bias or the shared expert is missing,
    /// unexpected, misshapen or differs between ranks.
    pub fn from_weights(
        group: G,
        config: MoeConfig,
        placement: Placement,
        weights: LayerWeights,
        gpu: Option<Box<dyn Engine>>,
        options: LayerOptions,
    ) -> Result<Self> {
        Self::build(group, config, placement, weights, Box::new(CpuEngine), gpu, options)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        group: G,
        config: MoeConfig,
        placement: Placement,
        weights: LayerWeights,
        cpu: Box<dyn Engine>,
        gpu: Option<Box<dyn Engine>>,
        options: LayerOptions,
    ) -> Result<Self> {
        let rank = group.rank();
        let _span = tracing::debug_span!("moe_layer_new", rank).entered();
        let replicated = config.validate().and_then(|_| weights.validate_replicated(&config));
        let LayerWeights { router: gate, selection_bias, experts, shared } = weights;
        let local = (|| {
            config.validate()?;
            if placement.world() != group.size() {
                return Err(Error::invalid(format!(
                    "placement is for {} ranks but the group has {}",
                    placement.world(),
                    group.size()
                )));
            }
            if placement.num_experts() != config.num_experts {
                return Err(Error::invalid(format!(
                    "placement maps {} experts but the config has {}",
                    placement.num_experts(),
                    config.num_experts
                )));
            }
            // The replicated parts (router, bias, shared expert), compared across ranks below.
            replicated?;
            let mine = placement.experts_of(rank);
            if experts.len() != mine.len() {
                return Err(Error::invalid(format!(
                    "{} expert weights given but the placement puts {} experts on this rank",
                    experts.len(),
                    mine.len()
                )));
            }
            for (w, &e) in experts.iter().zip(mine) {
                w.validate(&config, &format!("expert {e}"))?;
            }
            let options = if gpu.is_some() { options.clone().with_env()? } else { options.clone() };
            let crossover = initial_crossover(&options, gpu.is_some(), config.deterministic)?;
            Ok((options, crossover))
        })()
        .map_err(|e| e.on_rank(rank));

        // Agreement round: status, then every field that must match, then hashes of the
        // placement and the replicated weights.
        let mut fields: Vec<Field> =
            config.fingerprint_fields().into_iter().map(|(n, v)| Field::number(n, v)).collect();
        let owners: Vec<u64> = placement.owners().iter().map(|&r| r as u64).collect();
        fields.push(Field::hash("placement", &[bytemuck::cast_slice(&owners)]));
        fields.extend(replicated_fields(&gate, selection_bias.as_deref(), shared.as_ref()));
        let id = agree(&group, "MoeLayer::new", local.is_err(), &fields)?;
        let (options, crossover) = local?;
        let panels = |set: ExpertSet| if options.cpu_gemm_panels { set.with_cpu_gemm_panels() } else { set };
        let experts = panels(ExpertSet::with_activation(experts, config.activation));
        let shared = shared.map(|s| Shared::new(s, config.activation)).map(|s| Shared { set: panels(s.set), ..s });
        let router = RouterSet { gate: Matrix::new(gate), selection_bias };
        let mut set_ids = vec![experts.id(), router.gate.id()];
        set_ids.extend(shared.iter().flat_map(Shared::ids));
        let engines = Engines {
            base: cpu,
            gpu,
            options,
            crossover: AtomicUsize::new(crossover),
            warm: Mutex::new(None),
            set_ids,
        };
        Ok(MoeLayer {
            group,
            config,
            placement,
            router,
            experts,
            shared,
            engines,
            id,
            metrics: Mutex::new(LayerMetrics { rank, ..Default::default() }),
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
    pub fn group(&self) -> &G {
        &self.group
    }
    /// The engine that runs calls without a GPU engine and those below the crossover (the CPU
    /// engine, or the one given to [`MoeLayer::with_engine`]).
    pub fn base_engine(&self) -> &dyn Engine {
        self.engines.base.as_ref()
    }
    /// The GPU engine, if the layer has one.
    pub fn gpu_engine(&self) -> Option<&dyn Engine> {
        self.engines.gpu.as_deref()
    }
    /// The policy options in force (after the environment's overrides).
    pub fn options(&self) -> &LayerOptions {
        &self.engines.options
    }
    /// Tokens of a call from which the GPU engine runs it: `Some(0)` always, `None` never or
    /// not measured yet.
    pub fn crossover(&self) -> Option<usize> {
        match self.engines.crossover.load(Ordering::Relaxed) {
            NEVER | UNDECIDED => None,
            n => Some(n),
        }
    }
    /// Totals over this rank's forward calls so far.
    pub fn metrics(&self) -> LayerMetrics {
        self.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// This rank's experts' weights, in local order.
    pub fn local_experts(&self) -> &[ExpertWeights] {
        self.experts.weights()
    }
    /// Take the group back (to build another layer on it).
    pub fn into_group(self) -> G {
        self.group
    }

    /// Warm up: compile kernels, upload weights and fill pools on the GPU engine, measure the
    /// CPU/GPU crossover (with [`BackendChoice::Auto`]) and run one small forward call through
    /// the exchange. Collective. Idempotent: once done, a call returns the first report at once.
    pub fn warm_up(&self) -> Result<WarmUpReport> {
        let rank = self.group.rank();
        let _span = tracing::info_span!("warm_up", rank).entered();
        let done = self.engines.warm.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(mut r) = done {
            r.total_s = 0.0;
            return Ok(r);
        }
        let t0 = Instant::now();
        let cfg = &self.config;
        let max_rows = self.engines.options.crossover_max_tokens.max(1) * cfg.top_k;
        let local = (|| -> Result<WarmUpReport> {
            let mut report = WarmUpReport { rank, engines: vec![self.engines.base.name()], ..Default::default() };
            self.engines.base.warm_up(&self.experts, cfg.act_dtype, max_rows)?;
            if let Some(s) = &self.shared {
                self.engines.base.warm_up(&s.set, cfg.act_dtype, max_rows / cfg.top_k)?;
            }
            // A GPU that fails here (a shape its kernels do not take, a lost device) leaves the
            // CPU in charge under the fallback policy, with a warning and the reason reported.
            let fallback = self.engines.options.on_gpu_error == OnGpuError::Fallback;
            let gpu_failed = |report: &mut WarmUpReport, e: Error| -> Result<()> {
                if !(fallback && is_device_error(&e)) {
                    return Err(e);
                }
                tracing::warn!(rank, error = %e, "GPU warm-up failed; the CPU runs every call");
                self.engines.crossover.store(NEVER, Ordering::Relaxed);
                report.gpu_error = Some(e.to_string());
                Ok(())
            };
            if let Some(g) = &self.engines.gpu {
                report.engines.push(g.name());
                let shared = self.shared.as_ref().map(|s| &s.set);
                let warm = g
                    .warm_up(&self.experts, cfg.act_dtype, max_rows)
                    .and_then(|_| shared.map_or(Ok(()), |s| g.warm_up(s, cfg.act_dtype, max_rows / cfg.top_k)));
                if let Err(e) = warm {
                    gpu_failed(&mut report, e)?;
                }
            }
            report.engine_s = t0.elapsed().as_secs_f64();
            if let Err(e) = self.decide_crossover(&mut report) {
                gpu_failed(&mut report, e)?;
                report.crossover = None;
            }
            Ok(report)
        })()
        .map_err(|e| e.on_rank(rank));
        // The small exchange: every rank sends one token, whatever happened above, so that a
        // rank's failure reaches the others as an error rather than a hang.
        let t = Instant::now();
        let x = crate::compute::warmup::sample_rows(
            cfg.act_dtype,
            usize::from(local.is_ok()),
            cfg.hidden,
            0x3a7 + rank as u64,
        );
        let fwd = self.forward_with_stats(&x);
        let mut report = local?;
        fwd?;
        report.exchange_s = t.elapsed().as_secs_f64();
        report.total_s = t0.elapsed().as_secs_f64();
        *self.engines.warm.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// Settle the crossover if it is undecided (measuring it), and say where it came from.
    fn decide_crossover(&self, report: &mut WarmUpReport) -> Result<()> {
        let e = &self.engines;
        let source = match (&e.gpu, e.options.backend) {
            (None, _) => "no gpu",
            (_, BackendChoice::Auto) if self.config.deterministic => "deterministic",
            (Some(gpu), BackendChoice::Auto) => {
                if e.crossover.load(Ordering::Relaxed) == UNDECIDED {
                    let (n, points) = measure_crossover(
                        e.base.as_ref(),
                        gpu.as_ref(),
                        &self.experts,
                        &self.config,
                        e.options.crossover_max_tokens,
                        e.options.crossover_budget_s,
                    )?;
                    e.crossover.store(n.unwrap_or(NEVER), Ordering::Relaxed);
                    report.points = points;
                }
                "measured"
            }
            _ => "options",
        };
        report.crossover = self.crossover();
        report.crossover_source = source.into();
        Ok(())
    }

    /// Whether the GPU engine runs a call of `n` tokens; measures the crossover first if it
    /// is still undecided (a local measurement, no collective call). A failed measurement
    /// leaves the CPU in charge, with a warning.
    fn use_gpu(&self, n: usize) -> bool {
        if self.engines.gpu.is_none() {
            return false;
        }
        if self.engines.crossover.load(Ordering::Relaxed) == UNDECIDED {
            let mut r = WarmUpReport::default();
            if let Err(err) = self.decide_crossover(&mut r) {
                tracing::warn!(rank = self.group.rank(), error = %err, "crossover measurement failed; using the CPU");
                self.engines.crossover.store(NEVER, Ordering::Relaxed);
            }
        }
        n >= self.engines.crossover.load(Ordering::Relaxed)
    }

    /// `y = MoE(x)` for this rank's tokens `x` (`[N, D]` in the activation dtype; N may be 0
    /// and may differ per rank). Collective.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_stats(x).map(|(y, _)| y)
    }

    /// [`MoeLayer::forward`] with the call's statistics.
    pub fn forward_with_stats(&self, x: &Tensor) -> Result<(Tensor, ForwardStats)> {
        let (y, stats) = self.run(Input::Host(x), false)?;
        match y {
            Output::Host(t) => Ok((t, stats)),
            Output::Device(_) => Err(Error::invalid_on(self.group.rank(), "internal: a device output for a host call")),
        }
    }

    /// [`MoeLayer::forward_with_stats`] for activations that stay on the GPU: `x` is a tensor
    /// of the layer's GPU engine ([`Engine::to_device`]), and so is `y`. On that engine the
    /// host sees only the routing result and the exchange blocks; a call the policy gives to
    /// the CPU (below the crossover) brings `x` over and sends `y` back. Collective.
    pub fn forward_device(&self, x: &DeviceTensor) -> Result<(DeviceTensor, ForwardStats)> {
        let (y, stats) = self.run(Input::Device(x), true)?;
        match y {
            Output::Device(t) => Ok((t, stats)),
            Output::Host(_) => Err(Error::invalid_on(self.group.rank(), "internal: a host output for a device call")),
        }
    }

    /// One forward call: the engine by the policy, then [`crate::layer::forward`].
    fn run(&self, x: Input<'_>, device_out: bool) -> Result<(Output, ForwardStats)> {
        let rank = self.group.rank();
        let _span = tracing::debug_span!("moe_forward", rank, tokens = x.rows()).entered();
        let gpu_call = self.use_gpu(x.rows());
        let engine: &dyn Engine = match (&self.engines.gpu, gpu_call) {
            (Some(g), true) => g.as_ref(),
            _ => self.engines.base.as_ref(),
        };
        let fallback = match (&self.engines.gpu, gpu_call) {
            (Some(_), true) if self.engines.options.on_gpu_error == OnGpuError::Fallback => {
                Some(self.engines.base.as_ref())
            }
            _ => None,
        };
        let parts = Parts {
            group: &self.group,
            config: &self.config,
            placement: &self.placement,
            router: &self.router,
            experts: &self.experts,
            shared: self.shared.as_ref(),
            layer_id: self.id,
        };
        let device = self.engines.gpu.as_deref();
        let (y, stats) = forward::run(&parts, engine, fallback, device, x, device_out)?;
        self.metrics.lock().unwrap_or_else(|p| p.into_inner()).record(&stats, gpu_call);
        Ok((y, stats))
    }
}
