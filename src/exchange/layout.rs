//! The dispatch layout of one call: every row index the data movement of dispatch and combine
//! uses, derived once from this rank's plan and the counts every peer sent (as DeepEP computes
//! its layout apart from dispatching). A layout is plain data; the steps that move rows with it
//! live in [`crate::exchange::dispatch`].

use crate::compute::engine::{KEEP_ROW, ZERO_ROW};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::plan::{DROPPED, RoutePlan};
use crate::segments::offsets;
use crate::stats::ForwardStats;

/// Bytes of the status block each rank appends to every block it sends back: the handle id
/// (u64, little-endian) and the status (u64: 0 ok, 1 failed).
pub(crate) const STATUS_BYTES: usize = 16;

/// Where every row of one call goes, on this rank. Every block a rank sends a peer (both ways)
/// ends with a status block of `DispatchLayout::status_rows` rows: the handle id and the
/// sender's status, written by the host, so that a failed rank, or one that dispatched or
/// combined another call, is named by every peer in the same call.
#[derive(Debug, Clone)]
pub struct DispatchLayout {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// Tokens of this rank and slots per token.
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) dtype: DType,
    pub(crate) cols: usize,
    /// The id of the call, agreed by every rank in the counts round (rank 0's nonce).
    pub(crate) handle: u64,
    /// Rows of a status block (enough whole rows for [`STATUS_BYTES`]).
    pub(crate) status_rows: usize,
    /// The way out: rows (data, then status) this rank sends each peer (0 for itself), as
    /// rows of `x` ([`KEEP_ROW`] for the status blocks).
    pub(crate) send_rows: Vec<usize>,
    pub(crate) pack_idx: Vec<u32>,
    /// Rows (data, then status) each peer sends this rank (0 for itself).
    pub(crate) recv_rows: Vec<usize>,
    /// Rows of the expert-major batch as rows of `cat(received, x)`.
    pub(crate) batch_from: Vec<u32>,
    /// `expert_offsets[l]..expert_offsets[l+1]`: the batch rows of local expert `l`.
    pub(crate) expert_offsets: Vec<usize>,
    /// The way back: per peer its rows in arrival order, then a status block.
    pub(crate) back_send_idx: Vec<u32>,
    pub(crate) back_send_rows: Vec<usize>,
    pub(crate) back_recv_rows: Vec<usize>,
    /// (peer, first row of its status block) in the send and receive buffers of both ways.
    pub(crate) send_status: Vec<(usize, usize)>,
    pub(crate) recv_status: Vec<(usize, usize)>,
    pub(crate) back_send_status: Vec<(usize, usize)>,
    pub(crate) back_recv_status: Vec<(usize, usize)>,
    /// Row of `cat(outputs, received back)` for each (token, slot); [`ZERO_ROW`] when dropped.
    pub(crate) combine_idx: Vec<u32>,
}

fn too_many_rows(rank: usize, rows: usize) -> Error {
    Error::invalid_on(rank, format!("{rows} rows exceed the 2^32 - 2 row indices this library supports"))
}

/// A row count as a row index, or an error naming the rank.
fn index(rank: usize, v: usize) -> Result<u32> {
    u32::try_from(v).ok().filter(|&i| i < KEEP_ROW).ok_or_else(|| too_many_rows(rank, v))
}

/// Blocks per peer of `data[p]` rows each, each followed by a status block of `status` rows;
/// none for `me`. Returns the block sizes and (peer, first status row).
fn blocks(data: &[usize], me: usize, status: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let sizes: Vec<usize> = data.iter().enumerate().map(|(p, &n)| if p == me { 0 } else { n + status }).collect();
    let starts = offsets(&sizes);
    let at = (0..data.len()).filter(|&p| p != me).map(|p| (p, starts[p] + data[p])).collect();
    (sizes, at)
}

impl DispatchLayout {
    /// The layout for `plan` (this rank's) given `counts[src][l]`, the rows each rank sends for
    /// this rank's local expert `l`, with rows of `cols` values of `dtype`. The rows sent are
    /// rows of `x` (`[N, D]`, a token's row for each of its slots), or with `by_slot` rows of
    /// a `[N * k, D]` source with one row per (token, slot) (inputs scaled by their weight).
    /// Errors when rows are empty or the row indices would not fit in 32 bits.
    pub(crate) fn new(
        plan: &RoutePlan,
        counts: &[Vec<usize>],
        (dtype, cols): (DType, usize),
        handle: u64,
        by_slot: bool,
    ) -> Result<Self> {
        let (rank, world) = (plan.rank, counts.len());
        let rb = cols * dtype.size();
        if rb == 0 {
            return Err(Error::invalid_on(rank, "rows of zero bytes cannot be dispatched"));
        }
        let status_rows = STATUS_BYTES.div_ceil(rb);
        let nl = counts.get(rank).map_or(0, Vec::len);
        let to: Vec<usize> = (0..world).map(|d| plan.rows_to(d)).collect();
        let from: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        let (send_rows, send_status) = blocks(&to, rank, status_rows);
        let (recv_rows, recv_status) = blocks(&from, rank, status_rows);
        let (back_send_rows, back_send_status) = blocks(&from, rank, status_rows);
        let (back_recv_rows, back_recv_status) = blocks(&to, rank, status_rows);
        let r_total: usize = recv_rows.iter().sum();
        let rows_per_expert: Vec<usize> = (0..nl).map(|l| counts.iter().map(|c| c[l]).sum()).collect();
        let expert_offsets = crate::compute::engine::ffn_offsets(&rows_per_expert);
        let b_total = expert_offsets[nl];
        index(rank, r_total + plan.n * plan.k)?;
        index(rank, b_total + back_recv_rows.iter().sum::<usize>())?;
        let sources = if by_slot { block_slots(plan) } else { plan.block_tokens.clone() };
        let mut pack_idx = Vec::with_capacity(send_rows.iter().sum());
        for d in (0..world).filter(|&d| d != rank) {
            pack_idx.extend_from_slice(&sources[d]);
            pack_idx.extend(std::iter::repeat_n(KEEP_ROW, status_rows));
        }
        let scatter = Scatter::new(plan, &sources[rank], counts, &recv_rows, (r_total, b_total));
        let rstart = offsets(&recv_rows);
        let mut back_send_idx = Vec::with_capacity(back_send_rows.iter().sum());
        for src in (0..world).filter(|&s| s != rank) {
            back_send_idx.extend_from_slice(&scatter.recv_to_batch[rstart[src]..rstart[src] + from[src]]);
            back_send_idx.extend(std::iter::repeat_n(KEEP_ROW, status_rows));
        }
        let brstart = offsets(&back_recv_rows);
        let combine_idx: Vec<u32> = plan
            .dest
            .iter()
            .zip(&plan.row)
            .map(|(&d, &r)| match d {
                DROPPED => ZERO_ROW,
                d if d as usize == rank => scatter.local_to_batch[r as usize],
                d => (b_total + brstart[d as usize] + r as usize) as u32,
            })
            .collect();
        Ok(DispatchLayout {
            rank,
            world,
            n: plan.n,
            k: plan.k,
            dtype,
            cols,
            handle,
            status_rows,
            send_rows,
            pack_idx,
            recv_rows,
            batch_from: scatter.batch_from,
            expert_offsets,
            back_send_idx,
            back_send_rows,
            back_recv_rows,
            send_status,
            recv_status,
            back_send_status,
            back_recv_status,
            combine_idx,
        })
    }

    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }

    /// Rows of the expert-major batch.
    pub fn batch_rows(&self) -> usize {
        self.batch_from.len()
    }

    /// Data rows received from peers (status blocks not counted).
    pub fn received_rows(&self) -> usize {
        self.recv_rows.iter().sum::<usize>() - self.recv_status.len() * self.status_rows
    }

    /// The statistics a layout knows: rows and bytes per peer, drops, per-expert rows.
    pub(crate) fn fill_stats(&self, plan: &RoutePlan, counts: &[Vec<usize>], stats: &mut ForwardStats) {
        let rb = self.row_bytes();
        stats.rows_sent = (0..self.world).map(|d| plan.rows_to(d)).collect();
        stats.rows_received = counts.iter().map(|c| c.iter().sum()).collect();
        stats.local_rows = plan.local_rows();
        stats.remote_rows_sent = plan.remote_rows();
        stats.remote_rows_received = self.received_rows();
        stats.bytes_sent = plan.remote_rows() * rb;
        stats.bytes_received = self.received_rows() * rb;
        stats.dropped = plan.dropped();
        stats.rows_per_local_expert = self.expert_offsets.windows(2).map(|w| w[1] - w[0]).collect();
        stats.assignments_per_expert = plan.assignments_per_expert.clone();
    }
}

/// `block_slots[d][r]`: the (token, slot) index `t * k + j` of row `r` of the block for rank
/// `d` (where [`RoutePlan::block_tokens`] has the token).
fn block_slots(plan: &RoutePlan) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = plan.block_tokens.iter().map(|b| vec![0u32; b.len()]).collect();
    for (i, (&d, &r)) in plan.dest.iter().zip(&plan.row).enumerate() {
        if d != DROPPED {
            out[d as usize][r as usize] = i as u32;
        }
    }
    out
}

/// The scatter into the expert-major batch: expert, then source rank, then arrival order.
/// Received rows are numbered as in the receive buffer (status blocks included).
struct Scatter {
    batch_from: Vec<u32>,
    recv_to_batch: Vec<u32>,
    local_to_batch: Vec<u32>,
}

impl Scatter {
    /// `local[r]`: the source row (of `x`, or of the scaled rows) of this rank's own block row
    /// `r`; `totals`: received rows (status included) and batch rows.
    fn new(
        plan: &RoutePlan,
        local: &[u32],
        counts: &[Vec<usize>],
        recv_rows: &[usize],
        (r_total, b_total): (usize, usize),
    ) -> Self {
        let rank = plan.rank;
        let nl = counts.get(rank).map_or(0, Vec::len);
        let mut cursor = offsets(recv_rows);
        let local_start = offsets(&plan.counts[rank]);
        let mut batch_from = Vec::with_capacity(b_total);
        let mut recv_to_batch = vec![0u32; r_total];
        let mut local_to_batch = vec![0u32; plan.local_rows()];
        for l in 0..nl {
            for (src, c) in counts.iter().enumerate() {
                for i in 0..c[l] {
                    let b = batch_from.len() as u32;
                    if src == rank {
                        let r = local_start[l] + i;
                        batch_from.push((r_total + local[r] as usize) as u32);
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
        Scatter { batch_from, recv_to_batch, local_to_batch }
    }
}
