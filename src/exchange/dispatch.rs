//! Dispatch (plan, pack, exchange, scatter) and combine (gather, exchange back, weighted sum),
//! public on their own for callers who compute the experts themselves.
//!
//! ```text
//! let d = dispatch(&group, &CpuEngine, &placement, Capacity::Dropless, &x, &routing)?;
//! // rows d.expert_offsets[l]..d.expert_offsets[l+1] of d.batch belong to expert d.experts[l]
//! let out = my_experts(&d.batch, &d.expert_offsets);
//! let y = combine(&group, &CpuEngine, d.handle, &out)?;
//! ```
//!
//! Both are collective: every rank calls them, with its own tokens (possibly none). A rank whose
//! input is bad returns its own error and every other rank an [`Error::PeerFailed`] naming it.

use std::time::Instant;

use crate::compute::engine::{Engine, ZERO_ROW};
use crate::compute::workspace::Workspace;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::group::Group;
use crate::exchange::plan::{DROPPED, RoutePlan};
use crate::model::config::Capacity;
use crate::model::placement::Placement;
use crate::model::router::Routing;
use crate::segments::offsets;
use crate::stats::ForwardStats;
use crate::tensor::Tensor;

/// Words before the per-expert counts in each chunk of the counts round:
/// status (0 = ok), row bytes, dtype code, local experts the sender believes the receiver has.
const HEADER: usize = 4;

/// Rows received for this rank's experts, and the handle that brings their outputs back.
#[derive(Debug)]
pub struct Dispatched {
    /// Expert-major rows `[rows, D]`: local expert 0's rows first; within an expert, rows by
    /// (source rank, source token, slot).
    pub batch: Tensor,
    /// `expert_offsets[l]..expert_offsets[l+1]` are the rows of local expert `l`; length is
    /// local experts + 1.
    pub expert_offsets: Vec<usize>,
    /// Global id of each local expert.
    pub experts: Vec<usize>,
    /// Pass to [`combine`] with the expert outputs.
    pub handle: CombineHandle,
}

/// Everything combine needs to send outputs back and sum them; returned by [`dispatch`].
#[derive(Debug)]
pub struct CombineHandle {
    dtype: DType,
    cols: usize,
    k: usize,
    n: usize,
    batch_rows: usize,
    weights: Vec<f32>,
    /// Row of `cat(outputs, back_recv)` for each (token, slot); ZERO_ROW when dropped.
    combine_idx: Vec<u32>,
    /// Rows of the back-send buffer as rows of `outputs`; ZERO_ROW is a peer's status row.
    back_send_idx: Vec<u32>,
    back_send_rows: Vec<usize>,
    back_recv_rows: Vec<usize>,
    /// Row of each peer's status row in the back-receive buffer.
    back_status_rows: Vec<(usize, usize)>,
    /// Statistics so far; combine completes them.
    pub stats: ForwardStats,
}

impl CombineHandle {
    /// Rows the expert outputs must have (those of [`Dispatched::batch`]).
    pub fn batch_rows(&self) -> usize {
        self.batch_rows
    }
}

/// Byte counts of per-rank row counts.
fn byte_counts(rows: &[usize], row_bytes: usize) -> Vec<usize> {
    rows.iter().map(|&r| r * row_bytes).collect()
}

fn too_many_rows(rank: usize, rows: usize) -> Error {
    Error::invalid_on(rank, format!("{rows} rows exceed the 2^32 - 1 row indices this library supports"))
}

/// Dispatch this rank's tokens `x` (`[N, D]`) by `routing` (`N x k`) to the ranks that own
/// their experts under `placement`, and receive the rows for this rank's experts.
///
/// Errors: bad expert ids, `routing.n != N`, a placement for another world size, ranks that
/// disagree on D or dtype, and every group failure (timeout, lost peer), each naming the rank.
pub fn dispatch<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    placement: &Placement,
    capacity: Capacity,
    x: &Tensor,
    routing: &Routing,
) -> Result<Dispatched> {
    dispatch_or_fail(group, engine, &Workspace::new(), placement, capacity, x, Ok(routing))
}

/// [`dispatch`] with buffers taken from (and internal ones returned to) `ws`, so repeated calls
/// allocate nothing. Give the batch back with [`Workspace::recycle`] when done with it.
pub fn dispatch_in<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    placement: &Placement,
    capacity: Capacity,
    x: &Tensor,
    routing: &Routing,
) -> Result<Dispatched> {
    dispatch_or_fail(group, engine, ws, placement, capacity, x, Ok(routing))
}

/// [`dispatch`], or take part in its counts round as a failed rank and return `routing`'s error.
pub(crate) fn dispatch_or_fail<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    placement: &Placement,
    capacity: Capacity,
    x: &Tensor,
    routing: Result<&Routing>,
) -> Result<Dispatched> {
    let (rank, world) = (group.rank(), group.size());
    let _span = tracing::debug_span!("dispatch", rank, world, tokens = x.rows()).entered();
    let mut stats = ForwardStats { rank, world, tokens: x.rows(), backend: engine.name(), ..Default::default() };

    // 1. Plan (local checks first, so a bad rank still joins the counts round).
    let t = Instant::now();
    let stage = tracing::debug_span!("plan", rank).entered();
    let planned = routing
        .and_then(|r| {
            if placement.world() != world {
                return Err(Error::invalid(format!(
                    "placement is for {} ranks but the group has {world}",
                    placement.world()
                )));
            }
            if r.n != x.rows() {
                return Err(Error::invalid(format!("routing covers {} tokens but x has {} rows", r.n, x.rows())));
            }
            if x.rows().checked_mul(r.k).is_none_or(|v| v >= ZERO_ROW as usize) {
                return Err(too_many_rows(rank, x.rows().saturating_mul(r.k)));
            }
            Ok((RoutePlan::new(rank, r, placement, capacity)?, r))
        })
        .map_err(|e| e.on_rank(rank));
    drop(stage);
    stats.times.plan = t.elapsed().as_secs_f64();

    // 2. Counts round: status, row format and rows per (destination, local expert).
    let t = Instant::now();
    let stage = tracing::debug_span!("exchange_counts", rank).entered();
    let max_local = placement.max_local_experts();
    let chunk = HEADER + max_local;
    let mut send = vec![0u64; world * chunk];
    for d in 0..world {
        let c = &mut send[d * chunk..(d + 1) * chunk];
        match &planned {
            Ok((plan, _)) => {
                c[0] = 0;
                c[1] = x.row_bytes() as u64;
                c[2] = x.dtype().code();
                c[3] = plan.counts[d].len() as u64;
                for (dst, &n) in c[HEADER..].iter_mut().zip(&plan.counts[d]) {
                    *dst = n as u64;
                }
            }
            Err(_) => c[0] = 1,
        }
    }
    let mut recv = vec![0u64; world * chunk];
    group.all_to_all_into(bytemuck::cast_slice(&send), bytemuck::cast_slice_mut(&mut recv))?;
    let (plan, routing) = planned?;
    let my_experts = placement.experts_of(rank);
    let nl = my_experts.len();
    let mut cnt: Vec<Vec<usize>> = Vec::with_capacity(world);
    for src in 0..world {
        let c = &recv[src * chunk..(src + 1) * chunk];
        if c[0] != 0 {
            return Err(Error::PeerFailed { rank, op: "dispatch", peer: src });
        }
        if c[1] != x.row_bytes() as u64 || c[2] != x.dtype().code() {
            return Err(Error::Mismatch {
                rank,
                op: "dispatch",
                peer: src,
                detail: format!(
                    "it sends rows of {} bytes (dtype code {}), this rank has rows of {} bytes of {}",
                    c[1],
                    c[2],
                    x.row_bytes(),
                    x.dtype()
                ),
            });
        }
        if c[3] != nl as u64 {
            return Err(Error::Mismatch {
                rank,
                op: "dispatch",
                peer: src,
                detail: format!("its placement gives this rank {} experts, this rank's gives {nl}", c[3]),
            });
        }
        cnt.push(if src == rank {
            plan.counts[rank].clone()
        } else {
            c[HEADER..HEADER + nl].iter().map(|&v| v as usize).collect()
        });
    }
    drop(stage);
    let counts_time = t.elapsed().as_secs_f64();

    // 3. Pack rows for other ranks, blocks in rank order, each by (local expert, token, slot).
    let t = Instant::now();
    let stage = tracing::debug_span!("pack", rank).entered();
    let rb = x.row_bytes();
    let (dtype, cols) = (x.dtype(), x.cols());
    let send_rows: Vec<usize> = (0..world).map(|d| if d == rank { 0 } else { plan.rows_to(d) }).collect();
    let pack_idx: Vec<u32> =
        (0..world).filter(|&d| d != rank).flat_map(|d| plan.block_tokens[d].iter().copied()).collect();
    let mut send_buf = ws.take(dtype, pack_idx.len(), cols);
    engine.gather_rows(&[x], &pack_idx, &mut send_buf).map_err(|e| e.on_rank(rank))?;
    drop(stage);
    stats.times.pack = t.elapsed().as_secs_f64();

    // 4. Exchange the payload.
    let t = Instant::now();
    let stage = tracing::debug_span!("exchange", rank).entered();
    let recv_rows: Vec<usize> = (0..world).map(|s| if s == rank { 0 } else { cnt[s].iter().sum() }).collect();
    let r_total: usize = recv_rows.iter().sum();
    let mut recv_buf = ws.take(dtype, r_total, cols);
    group.exchange_v_known_into(
        send_buf.as_bytes(),
        &byte_counts(&send_rows, rb),
        recv_buf.as_bytes_mut(),
        &byte_counts(&recv_rows, rb),
    )?;
    drop(stage);
    stats.times.exchange = counts_time + t.elapsed().as_secs_f64();
    ws.recycle(send_buf);

    // 5. Scatter into the expert-major batch: expert, then source rank, then arrival order.
    let t = Instant::now();
    let stage = tracing::debug_span!("scatter", rank).entered();
    let rows_per_expert: Vec<usize> = (0..nl).map(|l| (0..world).map(|s| cnt[s][l]).sum()).collect();
    let expert_offsets = crate::compute::engine::ffn_offsets(&rows_per_expert);
    let b_total = expert_offsets[nl];
    if r_total + x.rows() >= ZERO_ROW as usize || b_total >= ZERO_ROW as usize {
        return Err(too_many_rows(rank, r_total + b_total));
    }
    let rstart = offsets(&recv_rows);
    let mut cursor: Vec<usize> = rstart.clone();
    let local_start = offsets(&plan.counts[rank]);
    let mut batch_from = Vec::with_capacity(b_total);
    let mut recv_to_batch = vec![0u32; r_total];
    let mut local_to_batch = vec![0u32; plan.local_rows()];
    for l in 0..nl {
        for src in 0..world {
            for i in 0..cnt[src][l] {
                let b = batch_from.len() as u32;
                if src == rank {
                    let r = local_start[l] + i;
                    batch_from.push((r_total + plan.block_tokens[rank][r] as usize) as u32);
                    local_to_batch[r] = b;
                } else {
                    let q = cursor[src];
                    cursor[src] += 1;
                    batch_from.push(q as u32);
                    recv_to_batch[q] = b;
                }
            }
        }
    }
    let mut batch = ws.take(dtype, b_total, cols);
    engine.gather_rows(&[&recv_buf, x], &batch_from, &mut batch).map_err(|e| e.on_rank(rank))?;
    ws.recycle(recv_buf);
    drop(stage);
    stats.times.scatter = t.elapsed().as_secs_f64();

    // The way back: per peer its rows in arrival order plus one status row; combine reads
    // local outputs in place and remote ones from the back-receive buffer.
    let mut back_send_idx = Vec::with_capacity(r_total + world);
    let mut back_send_rows = vec![0usize; world];
    for src in (0..world).filter(|&s| s != rank) {
        back_send_idx.extend(recv_to_batch[rstart[src]..rstart[src] + recv_rows[src]].iter().copied());
        back_send_idx.push(ZERO_ROW);
        back_send_rows[src] = recv_rows[src] + 1;
    }
    let back_recv_rows: Vec<usize> = (0..world).map(|d| if d == rank { 0 } else { plan.rows_to(d) + 1 }).collect();
    let brstart = offsets(&back_recv_rows);
    let back_status_rows: Vec<(usize, usize)> =
        (0..world).filter(|&d| d != rank).map(|d| (d, brstart[d] + plan.rows_to(d))).collect();
    let combine_idx: Vec<u32> = plan
        .dest
        .iter()
        .zip(&plan.row)
        .map(|(&d, &r)| match d {
            DROPPED => ZERO_ROW,
            d if d as usize == rank => local_to_batch[r as usize],
            d => (b_total + brstart[d as usize] + r as usize) as u32,
        })
        .collect();

    stats.rows_sent = (0..world).map(|d| plan.rows_to(d)).collect();
    stats.rows_received = (0..world).map(|s| cnt[s].iter().sum()).collect();
    stats.local_rows = plan.local_rows();
    stats.remote_rows_sent = plan.remote_rows();
    stats.remote_rows_received = r_total;
    stats.bytes_sent = plan.remote_rows() * rb;
    stats.bytes_received = r_total * rb;
    stats.dropped = plan.dropped();
    stats.rows_per_local_expert = rows_per_expert;
    stats.assignments_per_expert = plan.assignments_per_expert.clone();

    Ok(Dispatched {
        batch,
        expert_offsets,
        experts: my_experts.to_vec(),
        handle: CombineHandle {
            dtype,
            cols,
            k: routing.k,
            n: x.rows(),
            batch_rows: b_total,
            weights: routing.weights.clone(),
            combine_idx,
            back_send_idx,
            back_send_rows,
            back_recv_rows,
            back_status_rows,
            stats,
        },
    })
}

/// Send the expert outputs (`[batch rows, D]`, same dtype as the batch) back to the ranks the
/// rows came from and combine: `y[t] = sum_j w[t,j] * out[t,j]`, slots in order, f32
/// accumulation, one cast. Returns `y` (`[N, D]`) and the call's statistics.
pub fn combine<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    handle: CombineHandle,
    outputs: &Tensor,
) -> Result<(Tensor, ForwardStats)> {
    combine_or_fail(group, engine, &Workspace::new(), handle, Ok(outputs), None)
}

/// [`combine`] with buffers from `ws` (the output is taken from it too).
pub fn combine_in<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    handle: CombineHandle,
    outputs: &Tensor,
) -> Result<(Tensor, ForwardStats)> {
    combine_or_fail(group, engine, ws, handle, Ok(outputs), None)
}

/// One more term per token for the combine: `rows` (`[N, D]`, the call's dtype) scaled by
/// `weights` (`[N]`), summed after the k routed slots (the shared expert's output).
pub(crate) type ExtraTerm<'a> = (&'a Tensor, &'a [f32]);

/// [`combine`], or take part in its exchange as a failed rank and return `outputs`' error;
/// with `extra`, each token's sum ends with that term (in the same f32 sum, one rounding).
pub(crate) fn combine_or_fail<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    handle: CombineHandle,
    outputs: Result<&Tensor>,
    extra: Option<ExtraTerm<'_>>,
) -> Result<(Tensor, ForwardStats)> {
    let (rank, world) = (group.rank(), group.size());
    let _span = tracing::debug_span!("combine", rank, world).entered();
    let h = handle;
    let mut stats = h.stats;

    // 7. Gather outputs back into per-peer blocks in arrival order (+ a zero status row each).
    let t = Instant::now();
    let stage = tracing::debug_span!("gather", rank).entered();
    let mut back_send = ws.take(h.dtype, h.back_send_idx.len(), h.cols);
    let local = outputs
        .and_then(|o| {
            o.expect("expert outputs", h.dtype, Some(h.batch_rows), h.cols)?;
            engine.gather_rows(&[o], &h.back_send_idx, &mut back_send)?;
            Ok(o)
        })
        .map_err(|e| e.on_rank(rank));
    if local.is_err() {
        // Non-zero status rows tell every peer that this rank failed.
        back_send.as_bytes_mut().fill(0xFF);
    }
    drop(stage);
    stats.times.gather = t.elapsed().as_secs_f64();

    // 8. Exchange back; the counts are known from dispatch.
    let t = Instant::now();
    let stage = tracing::debug_span!("exchange_back", rank).entered();
    let rb = h.cols * h.dtype.size();
    let mut back_recv = ws.take(h.dtype, h.back_recv_rows.iter().sum(), h.cols);
    group.exchange_v_known_into(
        back_send.as_bytes(),
        &byte_counts(&h.back_send_rows, rb),
        back_recv.as_bytes_mut(),
        &byte_counts(&h.back_recv_rows, rb),
    )?;
    drop(stage);
    stats.times.exchange_back = t.elapsed().as_secs_f64();
    ws.recycle(back_send);
    let outputs = local?;
    let recv_bytes = back_recv.as_bytes();
    for &(peer, row) in &h.back_status_rows {
        if recv_bytes[row * rb..(row + 1) * rb].iter().any(|&b| b != 0) {
            return Err(Error::PeerFailed { rank, op: "combine", peer });
        }
    }

    // 9. Weighted sum, local rows read in place.
    let t = Instant::now();
    let stage = tracing::debug_span!("combine_sum", rank).entered();
    let mut y = ws.take(h.dtype, h.n, h.cols);
    let combined = match extra {
        None => engine.combine(&[outputs, &back_recv], &h.combine_idx, &h.weights, h.k, &mut y),
        Some((rows, w)) => {
            let base = (outputs.rows() + back_recv.rows()) as u32;
            let (idx, weights) = with_extra_slot(&h.combine_idx, &h.weights, h.k, base, w);
            engine.combine(&[outputs, &back_recv, rows], &idx, &weights, h.k + 1, &mut y)
        }
    };
    combined.map_err(|e| e.on_rank(rank))?;
    ws.recycle(back_recv);
    drop(stage);
    stats.times.combine = t.elapsed().as_secs_f64();
    Ok((y, stats))
}

/// Combine indices and weights of `k` slots per token widened to `k + 1`: each token's last
/// slot reads row `base + t` with weight `extra[t]`.
pub(crate) fn with_extra_slot(
    idx: &[u32],
    weights: &[f32],
    k: usize,
    base: u32,
    extra: &[f32],
) -> (Vec<u32>, Vec<f32>) {
    let n = extra.len();
    let mut i2 = Vec::with_capacity(n * (k + 1));
    let mut w2 = Vec::with_capacity(n * (k + 1));
    for t in 0..n {
        i2.extend_from_slice(&idx[t * k..(t + 1) * k]);
        i2.push(base + t as u32);
        w2.extend_from_slice(&weights[t * k..(t + 1) * k]);
        w2.push(extra[t]);
    }
    (i2, w2)
}
