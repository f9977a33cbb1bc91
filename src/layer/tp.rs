//! Tensor parallelism over the same MoE layer, the baseline expert parallelism is measured
//! against.
//!
//! Every rank holds a slice of every expert's intermediate dimension (rows of `gate` and `up`,
//! the same columns of `down`; the shared expert likewise) and the whole router. A forward
//! call takes each rank's own tokens, as [`crate::MoeLayer::forward`] does, and:
//!
//! 1. all-gathers the tokens, so that every rank holds the whole batch;
//! 2. routes every token itself (the same bits on every rank);
//! 3. runs its slice of every expert on the rows routed to it, and the weighted sum per token
//!    (plus its slice of the shared expert): a partial output of every token;
//! 4. reduce-scatters the partial outputs: each rank receives every rank's partial of its own
//!    tokens and sums them in rank order, in f32, rounding once.
//!
//! The reduce-scatter is the half of an all-reduce each rank needs (its own tokens' rows), so
//! the comparison gives tensor parallelism its cheapest exchange. Partials are rounded to the
//! activation dtype before the exchange (as they travel in it).

use std::ops::Range;
use std::time::Instant;

use crate::compute::engine::Engine;
use crate::compute::session::{DeviceTensor, Extra, Matrix, RouterSet, Session, Weights};
use crate::error::{Error, Result};
use crate::exchange::agree::{Field, agree};
use crate::exchange::dispatch::with_extra_slot;
use crate::exchange::group::Group;
use crate::layer::forward::Shared;
use crate::layer::moe::replicated_fields;
use crate::model::config::{Capacity, MoeConfig};
use crate::model::router::Routing;
use crate::model::weights::{ExpertSet, ExpertWeights, LayerWeights, SharedExpert};
use crate::stats::ForwardStats;
use crate::tensor::Tensor;

/// Rank `rank`'s part of `f` intermediate columns over `world` ranks: contiguous blocks of
/// whole units, balanced (the first ranks one unit wider), where a unit is the largest of 64,
/// 8, 2 and 1 columns that divides `f` into at least `world` units. Whole units keep every
/// slice a size the GPU kernels take at full speed (pairs of 16-bit values, multiples of 8).
pub fn tp_slice(f: usize, world: usize, rank: usize) -> Range<usize> {
    let unit = [64, 8, 2, 1].into_iter().find(|&u| f.is_multiple_of(u) && f / u >= world).unwrap_or(1);
    let units = f / unit;
    let (base, extra) = (units / world, units % world);
    let start = rank * base + rank.min(extra);
    (start * unit)..(start + base + usize::from(rank < extra)) * unit
}

/// Columns `cols` of `t` (`[rows, cols.len()]`).
fn columns(t: &Tensor, cols: &Range<usize>) -> Tensor {
    let es = t.dtype().size();
    let (src_rb, dst_rb) = (t.cols() * es, cols.len() * es);
    let mut out = Tensor::zeros(t.dtype(), t.rows(), cols.len());
    let src = t.as_bytes();
    for (r, dst) in out.as_bytes_mut().chunks_mut(dst_rb.max(1)).enumerate().take(t.rows()) {
        dst.copy_from_slice(&src[r * src_rb + cols.start * es..r * src_rb + cols.end * es]);
    }
    out
}

/// Intermediate slice `range` of one expert: rows of `gate` and `up` (and their biases),
/// columns of `down`. The down projection's bias is added once in the sum over ranks: kept
/// where `down_bias` (one rank), zeros elsewhere. Errors for packed experts (a slice of
/// `down`'s inputs would cut its quantization groups): tensor parallelism takes dense ones.
pub fn slice_expert(w: &ExpertWeights, range: &Range<usize>, down_bias: bool) -> Result<ExpertWeights> {
    fn dense<'a>(m: &'a crate::model::weights::Weight, what: &str) -> Result<&'a Tensor> {
        m.dense_or_err(&format!("tensor-parallel {what}"))
    }
    let sliced = ExpertWeights::new(
        dense(&w.gate, "gate")?.slice_rows(range.start, range.end)?,
        dense(&w.up, "up")?.slice_rows(range.start, range.end)?,
        columns(dense(&w.down, "down")?, range),
    );
    Ok(match &w.bias {
        None => sliced,
        Some(b) => sliced.with_bias(crate::model::weights::ExpertBias {
            gate: b.gate[range.clone()].to_vec(),
            up: b.up[range.clone()].to_vec(),
            down: if down_bias { b.down.clone() } else { vec![0.0; b.down.len()] },
        }),
    })
}

/// Rank `rank`'s tensor-parallel weights from the whole layer's (`full.experts` holding all
/// `E` experts): the router and bias whole, every expert and the shared expert sliced by
/// [`tp_slice`]. Errors when `full` does not hold `E` experts of `cfg`'s shape.
pub fn tp_weights(full: &LayerWeights, cfg: &MoeConfig, rank: usize, world: usize) -> Result<LayerWeights> {
    if full.experts.len() != cfg.num_experts || world == 0 || rank >= world {
        return Err(Error::invalid(format!(
            "tensor-parallel slices need all {} experts and rank < world (got {} experts, rank {rank} of {world})",
            cfg.num_experts,
            full.experts.len()
        )));
    }
    let range = tp_slice(cfg.intermediate, world, rank);
    let experts = full.experts.iter().map(|w| slice_expert(w, &range, rank == 0)).collect::<Result<Vec<_>>>()?;
    let shared = match (&full.shared, cfg.shared_expert) {
        (Some(s), Some(sc)) => Some(SharedExpert {
            weights: slice_expert(&s.weights, &tp_slice(sc.intermediate, world, rank), rank == 0)?,
            gate: s.gate.clone(),
        }),
        _ => None,
    };
    Ok(LayerWeights { router: full.router.clone(), selection_bias: full.selection_bias.clone(), experts, shared })
}

/// One rank's part of a tensor-parallel MoE layer. See the module documentation.
pub struct TpLayer<G: Group> {
    group: G,
    config: MoeConfig,
    held: Held,
}

/// The engine and the weight sets it may keep copies of, released on drop.
struct Held {
    engine: Box<dyn Engine>,
    router: RouterSet,
    experts: ExpertSet,
    /// The shared expert's slice and its (whole) gate.
    shared: Option<Shared>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.engine.release(self.experts.id());
        self.engine.release(self.router.gate.id());
        for id in self.shared.iter().flat_map(Shared::ids) {
            self.engine.release(id);
        }
    }
}

impl<G: Group> std::fmt::Debug for TpLayer<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpLayer")
            .field("rank", &self.group.rank())
            .field("world", &self.group.size())
            .field("config", &self.config)
            .field("engine", &self.held.engine.name())
            .finish()
    }
}

impl<G: Group> TpLayer<G> {
    /// Build this rank's layer. Collective. `weights` is this rank's slice ([`tp_weights`]):
    /// the router (and bias) whole, all `E` experts and the shared expert cut to
    /// [`tp_slice`]`(F, world, rank)`. Every call runs on `engine`. Errors on every rank when a
    /// shape is wrong on some rank, when the config or the replicated weights differ between
    /// ranks, or when the config asks for a capacity limit (tensor parallelism drops nothing).
    pub fn new(group: G, config: MoeConfig, weights: LayerWeights, engine: Box<dyn Engine>) -> Result<Self> {
        let (rank, world) = (group.rank(), group.size());
        let _span = tracing::debug_span!("tp_layer_new", rank).entered();
        let local = (|| {
            config.validate()?;
            if config.capacity != Capacity::Dropless {
                return Err(Error::invalid("tensor parallelism computes every assignment: use Capacity::Dropless"));
            }
            if config.intermediate < world {
                return Err(Error::invalid(format!(
                    "an intermediate dimension of {} cannot be sliced over {world} ranks",
                    config.intermediate
                )));
            }
            weights.validate_router_and_bias(&config)?;
            match (&weights.shared, config.shared_expert) {
                (None, None) => {}
                (Some(s), Some(sc)) => match (&s.gate, sc.gated) {
                    (Some(g), true) => g.expect("shared expert gate", config.weight_dtype, Some(1), config.hidden)?,
                    (None, false) => {}
                    _ => return Err(Error::invalid("the shared expert's gate does not match the config's gating")),
                },
                _ => return Err(Error::invalid("a shared expert is given exactly when the config has one")),
            }
            if weights.experts.len() != config.num_experts {
                return Err(Error::invalid(format!(
                    "tensor parallelism holds a slice of all {} experts; {} given",
                    config.num_experts,
                    weights.experts.len()
                )));
            }
            let f = tp_slice(config.intermediate, world, rank).len();
            let (d, dt) = (config.hidden, config.weight_dtype);
            for (e, w) in weights.experts.iter().enumerate() {
                w.validate_shape(d, f, dt, &format!("expert {e} (slice of {f})"))?;
                if w.bias.is_some() != config.expert_bias {
                    return Err(Error::invalid(format!(
                        "expert {e}: biases given: {}, but the config's expert_bias is {}",
                        w.bias.is_some(),
                        config.expert_bias
                    )));
                }
            }
            if let (Some(s), Some(sc)) = (&weights.shared, config.shared_expert) {
                let fs = tp_slice(sc.intermediate, world, rank).len();
                s.weights.validate_shape(d, fs, dt, &format!("shared expert (slice of {fs})"))?;
            }
            Ok(())
        })()
        .map_err(|e| e.on_rank(rank));
        let mut fields: Vec<Field> =
            config.fingerprint_fields().into_iter().map(|(n, v)| Field::number(n, v)).collect();
        let shared_gate = weights.shared.as_ref().and_then(|s| s.gate.as_ref()).map_or(&[][..], |g| g.as_bytes());
        fields.extend(replicated_fields(&weights.router, weights.selection_bias.as_deref(), None));
        fields.push(Field::hash("shared expert gate", &[shared_gate]));
        agree(&group, "TpLayer::new", local.is_err(), &fields)?;
        local?;
        let LayerWeights { router, selection_bias, experts, shared } = weights;
        let activation = config.activation;
        Ok(TpLayer {
            group,
            config,
            held: Held {
                engine,
                router: RouterSet { gate: Matrix::new(router), selection_bias },
                experts: ExpertSet::with_activation(experts, activation),
                shared: shared.map(|s| Shared::new(s, activation)),
            },
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    pub fn group(&self) -> &G {
        &self.group
    }

    pub fn engine(&self) -> &dyn Engine {
        self.held.engine.as_ref()
    }

    /// Take the group back.
    pub fn into_group(self) -> G {
        self.group
    }

    /// Upload the slices, compile the kernels for calls of up to `max_tokens` tokens over the
    /// whole group. Local (no collective call).
    pub fn warm_up(&self, max_tokens: usize) -> Result<()> {
        let act = self.config.act_dtype;
        self.held.engine.warm_up(&self.held.experts, act, max_tokens * self.config.top_k)?;
        if let Some(s) = &self.held.shared {
            self.held.engine.warm_up(&s.set, act, max_tokens)?;
        }
        Ok(())
    }

    /// `y = MoE(x)` for this rank's tokens (`[N, D]`, N may differ per rank); the same result
    /// as [`crate::MoeLayer::forward`] up to rounding. Collective.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_stats(x).map(|(y, _)| y)
    }

    /// [`TpLayer::forward`] with the call's statistics, mapped onto the EP stages: `exchange`
    /// is the all-gather of the tokens, `route` the routing of all of them, `scatter` the
    /// expert-major gather of their rows, `experts` the sliced FFN (and shared expert) and the
    /// weighted sum of the partials, `exchange_back` the reduce-scatter, `combine` the final
    /// sum over ranks; `plan`, `pack` and `gather` stay 0. `bytes_sent` / `bytes_received`
    /// count both exchanges.
    pub fn forward_with_stats(&self, x: &Tensor) -> Result<(Tensor, ForwardStats)> {
        match self.run(TpInput::Host(x), false)? {
            (TpOutput::Host(y), s) => Ok((y, s)),
            _ => Err(Error::invalid_on(self.group.rank(), "internal: a device output for a host call")),
        }
    }

    /// [`TpLayer::forward_with_stats`] with activations held by the layer's engine
    /// ([`Engine::to_device`]): the same path as [`crate::MoeLayer::forward_device`], so that
    /// the two layers compare like with like. Collective.
    pub fn forward_device(&self, x: &DeviceTensor) -> Result<(DeviceTensor, ForwardStats)> {
        match self.run(TpInput::Device(x), true)? {
            (TpOutput::Device(y), s) => Ok((y, s)),
            _ => Err(Error::invalid_on(self.group.rank(), "internal: a host output for a device call")),
        }
    }

    fn run(&self, x: TpInput<'_>, device_out: bool) -> Result<(TpOutput, ForwardStats)> {
        let (rank, world) = (self.group.rank(), self.group.size());
        let cfg = &self.config;
        let engine = self.held.engine.as_ref();
        let _span = tracing::debug_span!("tp_forward", rank).entered();
        let mut stats = ForwardStats { rank, world, backend: engine.name(), ..Default::default() };
        let rb = cfg.hidden * cfg.act_dtype.size();

        // 1. All-gather the tokens: sizes and status first, then rows padded to the largest.
        let t = Instant::now();
        let local = self.host_input(x, &mut stats).map_err(|e| e.on_rank(rank));
        let n = local.as_ref().map_or(0, |x| x.rows());
        let sizes = self.group.all_gather_u64(&[local.is_err() as u64, n as u64])?;
        let x = local?;
        if let Some(peer) = (0..world).find(|&p| sizes[2 * p] != 0) {
            return Err(Error::PeerFailed { rank, op: "TpLayer::forward", peer });
        }
        let counts: Vec<usize> = (0..world).map(|p| sizes[2 * p + 1] as usize).collect();
        let x_all = self.all_gather_rows(&x, &counts)?;
        stats.times.exchange = t.elapsed().as_secs_f64();
        stats.tokens = n;
        let total: usize = counts.iter().sum();
        stats.bytes_sent = n * rb * (world - 1) + (total - n) * rb;
        stats.bytes_received = stats.bytes_sent;

        // 2.-3. Route, compute the partials, then the reduce-scatter (a failure here travels
        // through the status round before it, so no rank waits on a failed one).
        let mut s = engine.session().map_err(|e| e.on_rank(rank))?;
        let busy = self.group.working(); // heartbeats while the peers wait on this compute
        let partial = self.partial(s.as_mut(), x_all, &mut stats).map_err(|e| e.on_rank(rank));
        drop(busy);
        let status = self.group.all_gather_u64(&[partial.is_err() as u64])?;
        let partial = partial?;
        if let Some(peer) = (0..world).find(|&p| status[p] != 0) {
            return Err(Error::PeerFailed { rank, op: "TpLayer::forward", peer });
        }

        // 4. Reduce-scatter: rank p's tokens' rows of every partial go to p, summed in rank order.
        let t = Instant::now();
        let send_counts: Vec<usize> = counts.iter().map(|&c| c * rb).collect();
        let mut recv = Tensor::zeros(cfg.act_dtype, world * n, cfg.hidden);
        self.group.exchange_v_known_into(
            partial.as_bytes(),
            &send_counts,
            recv.as_bytes_mut(),
            &vec![n * rb; world],
        )?;
        stats.times.exchange_back = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let busy = self.group.working();
        let y = self.sum_over_ranks(s.as_mut(), recv, n, device_out).map_err(|e| e.on_rank(rank));
        drop(busy);
        let y = y?;
        stats.times.combine = t.elapsed().as_secs_f64();
        crate::exchange::dispatch::add_traffic(&mut stats, s.traffic());
        Ok((y, stats))
    }

    /// This rank's tokens on the host (a device input is read back, and counted).
    fn host_input<'x>(&self, x: TpInput<'x>, stats: &mut ForwardStats) -> Result<std::borrow::Cow<'x, Tensor>> {
        let cfg = &self.config;
        match x {
            TpInput::Host(t) => {
                t.expect("input x", cfg.act_dtype, None, cfg.hidden)?;
                Ok(std::borrow::Cow::Borrowed(t))
            }
            TpInput::Device(d) => {
                d.expect("input x", cfg.act_dtype, cfg.hidden)?;
                let t = self.held.engine.to_host(d)?;
                if self.held.engine.is_accelerator() {
                    stats.host_readback_bytes += t.as_bytes().len() as u64;
                }
                Ok(std::borrow::Cow::Owned(t))
            }
        }
    }

    /// Every rank's tokens (`counts[p]` rows from rank `p`), concatenated in rank order.
    fn all_gather_rows(&self, x: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let cfg = &self.config;
        let (world, rb) = (counts.len(), x.row_bytes());
        let max_n = counts.iter().copied().max().unwrap_or(0);
        let total: usize = counts.iter().sum();
        let mut padded = vec![0u8; max_n * rb];
        padded[..x.as_bytes().len()].copy_from_slice(x.as_bytes());
        let mut all = Tensor::zeros(cfg.act_dtype, max_n * world, cfg.hidden);
        self.group.all_gather_into(&padded, all.as_bytes_mut())?;
        if max_n * world == total {
            return Ok(all);
        }
        let mut packed = Tensor::zeros(cfg.act_dtype, total, cfg.hidden);
        let mut at = 0;
        for (p, &n) in counts.iter().enumerate() {
            let src = &all.as_bytes()[p * max_n * rb..(p * max_n + n) * rb];
            packed.as_bytes_mut()[at * rb..(at + n) * rb].copy_from_slice(src);
            at += n;
        }
        Ok(packed)
    }

    /// This rank's partial output of every token of `x_all` (`[M, D]`), on the host.
    fn partial(&self, s: &mut dyn Session<'_>, x_all: Tensor, stats: &mut ForwardStats) -> Result<Tensor> {
        let cfg = &self.config;
        let (m, k) = (x_all.rows(), cfg.top_k);
        let t = Instant::now();
        let xa = s.upload_owned(x_all)?;
        let routed = s.route(xa, &self.held.router, cfg)?;
        s.sync()?;
        let routing = s.routing(routed)?;
        stats.times.route = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let order = ExpertMajor::new(&routing, cfg.num_experts);
        let batch = s.alloc(cfg.act_dtype, m * k, cfg.hidden)?;
        // With the weights on the expert input (Llama 4) the batch rows are the scaled rows.
        let on_input = cfg.router.weights_on_input;
        match on_input {
            false => s.gather_rows(&[xa], &order.rows, batch)?,
            true => {
                let scaled = s.scale_rows(xa, routed)?;
                s.gather_rows(&[scaled], &order.slots, batch)?;
            }
        }
        stats.times.scatter = t.elapsed().as_secs_f64();
        stats.local_rows = m * k;

        let t = Instant::now();
        let out = s.alloc(cfg.act_dtype, m * k, cfg.hidden)?;
        s.ffn(batch, &order.offsets, &self.held.experts, cfg.deterministic, out)?;
        stats.assignments_per_expert = order.per_expert;
        let y = s.alloc(cfg.act_dtype, m, cfg.hidden)?;
        match &self.held.shared {
            Some(sh) if m > 0 => {
                let so = s.alloc(cfg.act_dtype, m, cfg.hidden)?;
                s.ffn(xa, &[0, m], &sh.set, cfg.deterministic, so)?;
                let extra = match &sh.gate {
                    Some(g) => Extra::Scale(s.gate_scale(xa, g)?),
                    None => Extra::One,
                };
                let idx = with_extra_slot(&order.slot_row, k, (m * k) as u32, m);
                let w = match (on_input, extra) {
                    (false, _) => Weights::Routed { routed, extra },
                    (true, Extra::Scale(_)) => {
                        let ones = Routing { weights: vec![1.0; routing.weights.len()], ..routing.clone() };
                        Weights::Routed { routed: s.adopt_routing(ones)?, extra }
                    }
                    (true, _) => Weights::Ones,
                };
                s.weighted_sum(&[out, so], &idx, w, k + 1, y)?;
            }
            _ if on_input => s.weighted_sum(&[out], &order.slot_row, Weights::Ones, k, y)?,
            _ => s.weighted_sum(&[out], &order.slot_row, Weights::Routed { routed, extra: Extra::None }, k, y)?,
        }
        let partial = s.download(y)?;
        stats.times.experts = t.elapsed().as_secs_f64();
        Ok(partial)
    }

    /// `y[t] = sum_p recv[p * n + t]` in rank order (f32, one rounding), where the caller wants it.
    fn sum_over_ranks(&self, s: &mut dyn Session<'_>, recv: Tensor, n: usize, device_out: bool) -> Result<TpOutput> {
        let (cfg, world) = (&self.config, self.group.size());
        let idx: Vec<u32> = (0..n).flat_map(|t| (0..world).map(move |p| (p * n + t) as u32)).collect();
        let r = s.upload_owned(recv)?;
        let y = s.alloc(cfg.act_dtype, n, cfg.hidden)?;
        s.weighted_sum(&[r], &idx, Weights::Ones, world, y)?;
        Ok(if device_out { TpOutput::Device(s.export(y)?) } else { TpOutput::Host(s.download(y)?) })
    }
}

enum TpInput<'a> {
    Host(&'a Tensor),
    Device(&'a DeviceTensor),
}

enum TpOutput {
    Host(Tensor),
    Device(DeviceTensor),
}

/// The (token, slot) pairs of a routing in expert-major order, tokens ascending within an
/// expert: `rows[i]` is the token of batch row `i`, `slot_row[t * k + j]` the batch row of
/// (token t, slot j).
struct ExpertMajor {
    rows: Vec<u32>,
    /// The (token, slot) index of each batch row.
    slots: Vec<u32>,
    slot_row: Vec<u32>,
    offsets: Vec<usize>,
    per_expert: Vec<usize>,
}

impl ExpertMajor {
    fn new(routing: &Routing, num_experts: usize) -> Self {
        let k = routing.k;
        let mut per_expert = vec![0usize; num_experts];
        for &id in &routing.ids {
            per_expert[id as usize] += 1;
        }
        let offsets = crate::compute::engine::ffn_offsets(&per_expert);
        let mut next = offsets.clone();
        let mut rows = vec![0u32; routing.ids.len()];
        let mut slots = vec![0u32; routing.ids.len()];
        let mut slot_row = vec![0u32; routing.ids.len()];
        for (i, &id) in routing.ids.iter().enumerate() {
            let at = next[id as usize];
            next[id as usize] += 1;
            rows[at] = (i / k) as u32;
            slots[at] = i as u32;
            slot_row[i] = at as u32;
        }
        ExpertMajor { rows, slots, slot_row, offsets, per_expert }
    }
}
