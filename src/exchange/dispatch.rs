//! Dispatch (plan, counts round, pack, exchange, scatter) and combine (gather back, exchange
//! back, weighted sum), as steps on an engine [`Session`] that the layers chain, and as two
//! public functions on host tensors for callers who compute the experts themselves.
//!
//! ```text
//! let d = dispatch(&group, &CpuEngine, &placement, Capacity::Dropless, &x, &routing)?;
//! // rows d.expert_offsets[l]..d.expert_offsets[l+1] of d.batch belong to expert d.experts[l]
//! let out = my_experts(&d.batch, &d.expert_offsets);
//! let y = combine(&group, &CpuEngine, d.handle, &out)?;
//! ```
//!
//! Both are collective: every rank calls them, with its own tokens (possibly none). A rank whose
//! input is bad returns its own error and every other rank an [`Error::PeerFailed`] naming it;
//! a rank in another call (another layer, another dispatch's handle, another placement) makes
//! every rank fail with [`Error::Mismatch`].

use std::time::Instant;

use crate::compute::engine::Engine;
use crate::compute::session::{Buf, Session, Weights};
use crate::compute::workspace::Workspace;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::agree::{nonce, stable_hash};
use crate::exchange::group::Group;
use crate::exchange::layout::{DispatchLayout, STATUS_BYTES};
use crate::exchange::plan::RoutePlan;
use crate::model::config::Capacity;
use crate::model::placement::Placement;
use crate::model::router::Routing;
use crate::stats::ForwardStats;
use crate::tensor::Tensor;

/// Words before the per-expert counts in each chunk of the counts round: status (0 = ok), row
/// bytes, dtype code, local experts the sender believes the receiver has, placement hash,
/// the caller's id (a layer's, 0 for [`dispatch`]), the sender's nonce (rank 0's becomes the
/// call's handle id).
const HEADER: usize = 7;

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
    layout: DispatchLayout,
    weights: Vec<f32>,
    /// Statistics so far; combine completes them.
    pub stats: ForwardStats,
}

impl CombineHandle {
    /// Rows the expert outputs must have (those of [`Dispatched::batch`]).
    pub fn batch_rows(&self) -> usize {
        self.layout.batch_rows()
    }
    /// The id every rank agreed for this call (what combine checks its peers against).
    pub fn id(&self) -> u64 {
        self.layout.handle
    }
}

/// The identity of a placement, compared in the counts round.
pub(crate) fn placement_hash(placement: &Placement) -> u64 {
    let owners: Vec<u64> = placement.owners().iter().map(|&r| r as u64).collect();
    stable_hash(&[bytemuck::cast_slice(&owners)])
}

/// Plan `routing` of `x`'s rows under `placement` (local checks only). Errors name `rank`.
pub(crate) fn plan(
    rank: usize,
    world: usize,
    placement: &Placement,
    capacity: Capacity,
    x_rows: usize,
    routing: &Routing,
) -> Result<RoutePlan> {
    if placement.world() != world {
        return Err(Error::invalid_on(
            rank,
            format!("placement is for {} ranks but the group has {world}", placement.world()),
        ));
    }
    if routing.n != x_rows {
        return Err(Error::invalid_on(rank, format!("routing covers {} tokens but x has {x_rows} rows", routing.n)));
    }
    if x_rows.checked_mul(routing.k).is_none_or(|v| v >= crate::compute::engine::KEEP_ROW as usize) {
        return Err(Error::invalid_on(rank, "tokens x top-k exceed the 2^32 - 2 row indices this library supports"));
    }
    RoutePlan::new(rank, routing, placement, capacity).map_err(|e| e.on_rank(rank))
}

/// What the counts round settled: rows each rank sends this rank per local expert, the call's
/// handle id.
pub(crate) struct Counts {
    pub counts: Vec<Vec<usize>>,
    pub handle: u64,
}

/// The counts round (collective): status, row format, identity and rows per (destination,
/// local expert). A rank whose `planned` is an error takes part as failed and returns it.
pub(crate) fn counts_round<G: Group + ?Sized>(
    group: &G,
    placement: &Placement,
    planned: &Result<RoutePlan>,
    row: (usize, DType),
    caller: u64,
) -> Result<Counts> {
    let (rank, world) = (group.rank(), group.size());
    let chunk = HEADER + placement.max_local_experts();
    let mut send = vec![0u64; world * chunk];
    let me = [0, row.0 as u64, row.1.code(), 0, placement_hash(placement), caller, nonce()];
    for d in 0..world {
        let c = &mut send[d * chunk..(d + 1) * chunk];
        match planned {
            Ok(plan) => {
                c[..HEADER].copy_from_slice(&me);
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
    let plan = planned.as_ref().map_err(Clone::clone)?;
    let nl = placement.experts_of(rank).len();
    let mut counts = Vec::with_capacity(world);
    for src in 0..world {
        let c = &recv[src * chunk..(src + 1) * chunk];
        check_header(rank, src, c, &me, nl)?;
        counts.push(if src == rank {
            plan.counts[rank].clone()
        } else {
            c[HEADER..HEADER + nl].iter().map(|&v| v as usize).collect()
        });
    }
    Ok(Counts { counts, handle: recv[6] })
}

/// Check one peer's counts header against this rank's.
fn check_header(rank: usize, src: usize, c: &[u64], me: &[u64; HEADER], nl: usize) -> Result<()> {
    let mismatch = |detail: String| Error::Mismatch { rank, op: "dispatch", peer: src, detail };
    if c[0] != 0 {
        return Err(Error::PeerFailed { rank, op: "dispatch", peer: src });
    }
    if c[5] != me[5] {
        return Err(mismatch(format!(
            "it dispatches for another caller (layer id {:#x}, this rank's {:#x})",
            c[5], me[5]
        )));
    }
    if c[1] != me[1] || c[2] != me[2] {
        return Err(mismatch(format!(
            "it sends rows of {} bytes (dtype code {}), this rank has rows of {} bytes (dtype code {})",
            c[1], c[2], me[1], me[2]
        )));
    }
    if c[4] != me[4] {
        return Err(mismatch("its placement of the experts differs from this rank's".into()));
    }
    if c[3] != nl as u64 {
        return Err(mismatch(format!("its placement gives this rank {} experts, this rank's gives {nl}", c[3])));
    }
    Ok(())
}

/// The bytes of a status block: the handle id and the status, zero-padded to whole rows.
fn status_block(l: &DispatchLayout, failed: bool) -> Vec<u8> {
    let mut b = vec![0u8; l.status_rows * l.row_bytes()];
    b[..8].copy_from_slice(&l.handle.to_le_bytes());
    b[8..16].copy_from_slice(&u64::from(failed).to_le_bytes());
    b
}

/// Check every peer's status block in `recv` (the bytes of a receive buffer).
fn check_status(l: &DispatchLayout, recv: &[u8], at: &[(usize, usize)], op: &'static str) -> Result<()> {
    let rb = l.row_bytes();
    for &(peer, row) in at {
        let b = &recv[row * rb..row * rb + STATUS_BYTES];
        let (handle, status) = (u64::from_le_bytes(b[..8].try_into().unwrap_or_default()), &b[8..16]);
        if status != [0; 8] {
            return Err(Error::PeerFailed { rank: l.rank, op, peer });
        }
        if handle != l.handle {
            return Err(Error::Mismatch {
                rank: l.rank,
                op,
                peer,
                detail: format!("it sent rows of call {handle:#x}, this rank expects call {:#x}", l.handle),
            });
        }
    }
    Ok(())
}

fn byte_counts(rows: &[usize], rb: usize) -> Vec<usize> {
    rows.iter().map(|&r| r * rb).collect()
}

/// Step 3, pack: this rank's rows for every peer into one send buffer, block after block,
/// each with its status block (ok).
pub(crate) fn pack(s: &mut dyn Session<'_>, l: &DispatchLayout, x: Buf) -> Result<Buf> {
    let send = s.alloc_send(l.dtype, l.pack_idx.len(), l.cols)?;
    s.gather_rows(&[x], &l.pack_idx, send)?;
    let block = status_block(l, false);
    for &(_, row) in &l.send_status {
        s.write_rows(send, row, &block)?;
    }
    Ok(send)
}

/// Step 4, the payload exchange (collective; `send` as of the last sync): returns the receive
/// buffer, its status blocks checked.
pub(crate) fn exchange_out<G: Group + ?Sized>(
    group: &G,
    s: &mut dyn Session<'_>,
    l: &DispatchLayout,
    send: Buf,
) -> Result<Buf> {
    let rb = l.row_bytes();
    let recv = s.alloc_recv(l.dtype, l.recv_rows.iter().sum(), l.cols)?;
    let (sc, rc) = (byte_counts(&l.send_rows, rb), byte_counts(&l.recv_rows, rb));
    s.exchange(send, recv, &mut |sb, rbuf| {
        group.exchange_v_known_into(sb, &sc, rbuf, &rc)?;
        check_status(l, rbuf, &l.recv_status, "dispatch")
    })?;
    Ok(recv)
}

/// Step 5, scatter: received and local rows into the expert-major batch, in one gather.
pub(crate) fn scatter(s: &mut dyn Session<'_>, l: &DispatchLayout, recv: Buf, x: Buf) -> Result<Buf> {
    let batch = s.alloc(l.dtype, l.batch_rows(), l.cols)?;
    s.gather_rows(&[recv, x], &l.batch_from, batch)?;
    Ok(batch)
}

/// Step 7, gather back: the expert outputs into one block per source rank, in the order the
/// rows arrived, each with its status block (ok).
pub(crate) fn gather_back(s: &mut dyn Session<'_>, l: &DispatchLayout, outputs: Buf) -> Result<Buf> {
    let back = s.alloc_send(l.dtype, l.back_send_idx.len(), l.cols)?;
    s.gather_rows(&[outputs], &l.back_send_idx, back)?;
    let block = status_block(l, false);
    for &(_, row) in &l.back_send_status {
        s.write_rows(back, row, &block)?;
    }
    Ok(back)
}

/// Step 8, the exchange back (collective; counts known from the layout): returns the rows
/// received back, status blocks checked.
pub(crate) fn exchange_back<G: Group + ?Sized>(
    group: &G,
    s: &mut dyn Session<'_>,
    l: &DispatchLayout,
    back: Buf,
) -> Result<Buf> {
    let rb = l.row_bytes();
    let recv = s.alloc_recv(l.dtype, l.back_recv_rows.iter().sum(), l.cols)?;
    let (sc, rc) = (byte_counts(&l.back_send_rows, rb), byte_counts(&l.back_recv_rows, rb));
    s.exchange(back, recv, &mut |sb, rbuf| {
        group.exchange_v_known_into(sb, &sc, rbuf, &rc)?;
        check_status(l, rbuf, &l.back_recv_status, "combine")
    })?;
    Ok(recv)
}

/// Step 9, the weighted sum: `y[t] = sum_j w[t, j] * cat(outputs, back)[idx[t, j]]`, then the
/// extra slot (`extra` rows, one per token: the shared expert's) when `weights` has one.
pub(crate) fn weighted_sum(
    s: &mut dyn Session<'_>,
    l: &DispatchLayout,
    outputs: Buf,
    back: Buf,
    extra: Option<Buf>,
    weights: Weights<'_>,
) -> Result<Buf> {
    let y = s.alloc(l.dtype, l.n, l.cols)?;
    match extra {
        None => s.weighted_sum(&[outputs, back], &l.combine_idx, weights, l.k, y)?,
        Some(e) => {
            let base = u32::try_from(outputs.rows() + back.rows())
                .map_err(|_| Error::invalid_on(l.rank, "combine sources exceed 32-bit row indices"))?;
            let idx = with_extra_slot(&l.combine_idx, l.k, base, l.n);
            s.weighted_sum(&[outputs, back, e], &idx, weights, l.k + 1, y)?;
        }
    }
    Ok(y)
}

/// The exchanges of a rank that failed after the counts round, from host memory: the sizes the
/// layout promised, status blocks that say "failed", the peers' rows received and dropped.
/// `back_too` also takes part in the exchange back. Returns the first group error, if any.
pub(crate) fn exchange_as_failed<G: Group + ?Sized>(group: &G, l: &DispatchLayout, out_too: bool) -> Result<()> {
    let rb = l.row_bytes();
    let block = status_block(l, true);
    let run = |send_rows: &[usize], recv_rows: &[usize], status: &[(usize, usize)]| -> Result<()> {
        let mut send = vec![0u8; send_rows.iter().sum::<usize>() * rb];
        for &(_, row) in status {
            send[row * rb..row * rb + block.len()].copy_from_slice(&block);
        }
        let mut recv = vec![0u8; recv_rows.iter().sum::<usize>() * rb];
        group.exchange_v_known_into(&send, &byte_counts(send_rows, rb), &mut recv, &byte_counts(recv_rows, rb))
    };
    if out_too {
        run(&l.send_rows, &l.recv_rows, &l.send_status)?;
    }
    run(&l.back_send_rows, &l.back_recv_rows, &l.back_send_status)
}

/// Combine indices of `k` slots per token widened to `k + 1`: each token's last slot reads
/// row `base + t`.
pub(crate) fn with_extra_slot(idx: &[u32], k: usize, base: u32, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n * (k + 1));
    for t in 0..n {
        out.extend_from_slice(&idx[t * k..(t + 1) * k]);
        out.push(base + t as u32);
    }
    out
}

/// Dispatch this rank's tokens `x` (`[N, D]`) by `routing` (`N x k`) to the ranks that own
/// their experts under `placement`, and receive the rows for this rank's experts.
///
/// Errors: bad expert ids, `routing.n != N`, a placement for another world size or that
/// differs between ranks, ranks that disagree on D or dtype, and every group failure
/// (timeout, lost peer), each naming the rank.
pub fn dispatch<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    placement: &Placement,
    capacity: Capacity,
    x: &Tensor,
    routing: &Routing,
) -> Result<Dispatched> {
    dispatch_in(group, engine, &Workspace::new(), placement, capacity, x, routing)
}

/// [`dispatch`] with host buffers from `ws` (kept for compatibility: engines pool their own
/// buffers now). Give the batch back with [`Workspace::recycle`] when done with it.
pub fn dispatch_in<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    placement: &Placement,
    capacity: Capacity,
    x: &Tensor,
    routing: &Routing,
) -> Result<Dispatched> {
    let _ = ws;
    let (rank, world) = (group.rank(), group.size());
    let _span = tracing::debug_span!("dispatch", rank, world, tokens = x.rows()).entered();
    let mut stats = ForwardStats { rank, world, tokens: x.rows(), backend: engine.name(), ..Default::default() };
    let t = Instant::now();
    let planned = plan(rank, world, placement, capacity, x.rows(), routing);
    stats.times.plan = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let counts = counts_round(group, placement, &planned, (x.row_bytes(), x.dtype()), 0)?;
    let plan = planned?;
    let layout = DispatchLayout::new(&plan, &counts.counts, (x.dtype(), x.cols()), counts.handle, false)?;
    layout.fill_stats(&plan, &counts.counts, &mut stats);
    let mut s = engine.session().map_err(|e| e.on_rank(rank))?;
    let packed = (|| {
        let xb = s.upload(x)?;
        let send = pack(s.as_mut(), &layout, xb)?;
        s.sync()?;
        Ok((xb, send))
    })()
    .map_err(|e: Error| e.on_rank(rank));
    let (xb, send) = match packed {
        Ok(v) => v,
        Err(e) => {
            exchange_as_failed(group, &layout, true)?;
            return Err(e);
        }
    };
    let recv = exchange_out(group, s.as_mut(), &layout, send)?;
    stats.times.exchange = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let batch = scatter(s.as_mut(), &layout, recv, xb).and_then(|b| s.download(b)).map_err(|e| e.on_rank(rank));
    stats.times.scatter = t.elapsed().as_secs_f64();
    let batch = match batch {
        Ok(b) => b,
        Err(e) => {
            exchange_as_failed(group, &layout, false)?;
            return Err(e);
        }
    };
    add_traffic(&mut stats, s.traffic());
    Ok(Dispatched {
        batch,
        expert_offsets: layout.expert_offsets.clone(),
        experts: placement.experts_of(rank).to_vec(),
        handle: CombineHandle { layout, weights: routing.weights.clone(), stats },
    })
}

/// Send the expert outputs (`[batch rows, D]`, same dtype as the batch) back to the ranks the
/// rows came from and combine: `y[t] = sum_j w[t,j] * out[t,j]`, slots in order, f32
/// accumulation, one cast. Returns `y` (`[N, D]`) and the call's statistics. A rank that
/// passes another dispatch's handle makes every rank fail with [`Error::Mismatch`].
pub fn combine<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    handle: CombineHandle,
    outputs: &Tensor,
) -> Result<(Tensor, ForwardStats)> {
    combine_in(group, engine, &Workspace::new(), handle, outputs)
}

/// [`combine`] with host buffers from `ws` (kept for compatibility).
pub fn combine_in<G: Group + ?Sized>(
    group: &G,
    engine: &dyn Engine,
    ws: &Workspace,
    handle: CombineHandle,
    outputs: &Tensor,
) -> Result<(Tensor, ForwardStats)> {
    let _ = ws;
    let rank = group.rank();
    let _span = tracing::debug_span!("combine", rank).entered();
    let CombineHandle { layout: l, weights, mut stats } = handle;
    let t = Instant::now();
    let mut s = engine.session().map_err(|e| e.on_rank(rank))?;
    let gathered = (|| {
        outputs.expect("expert outputs", l.dtype, Some(l.batch_rows()), l.cols)?;
        let out = s.upload(outputs)?;
        let back = gather_back(s.as_mut(), &l, out)?;
        s.sync()?;
        Ok((out, back))
    })()
    .map_err(|e: Error| e.on_rank(rank));
    stats.times.gather = t.elapsed().as_secs_f64();
    let (out, back) = match gathered {
        Ok(v) => v,
        Err(e) => {
            exchange_as_failed(group, &l, false)?;
            return Err(e);
        }
    };
    let t = Instant::now();
    let back_recv = exchange_back(group, s.as_mut(), &l, back)?;
    stats.times.exchange_back = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let y = weighted_sum(s.as_mut(), &l, out, back_recv, None, Weights::Host(&weights))
        .and_then(|y| s.download(y))
        .map_err(|e| e.on_rank(rank))?;
    stats.times.combine = t.elapsed().as_secs_f64();
    add_traffic(&mut stats, s.traffic());
    Ok((y, stats))
}

/// Add a session's host traffic to `stats`.
pub(crate) fn add_traffic(stats: &mut ForwardStats, t: crate::compute::session::HostTraffic) {
    stats.host_upload_bytes += t.upload_bytes;
    stats.host_index_bytes += t.index_bytes;
    stats.host_readback_bytes += t.readback_bytes;
    stats.gpu_submits += t.submits;
    stats.gpu_waits += t.waits;
}
