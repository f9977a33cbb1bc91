//! RoutePlan: where every (token, slot) of this rank goes, and in which order rows travel.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::Capacity;
use crate::model::placement::Placement;
use crate::model::router::Routing;
use crate::segments::offsets;

/// Marks a dropped (token, slot) in [`RoutePlan::dest`].
pub const DROPPED: u32 = u32::MAX;

/// The plan of one rank for one call: derived from its routing, the placement and the capacity.
///
/// The block for destination rank `d` holds this rank's rows for `d`, ordered by
/// (local expert on `d`, source token, slot). The same plan drives dispatch and combine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutePlan {
    /// This rank.
    pub rank: usize,
    /// Tokens on this rank.
    pub n: usize,
    /// Slots per token.
    pub k: usize,
    /// Destination rank of each (token, slot), `[N, k]`; [`DROPPED`] when capacity dropped it.
    pub dest: Vec<u32>,
    /// Row of each (token, slot) inside its destination block, `[N, k]`.
    pub row: Vec<u32>,
    /// `counts[d][l]`: rows sent to rank `d` for its local expert `l`.
    pub counts: Vec<Vec<usize>>,
    /// `block_tokens[d][r]`: the source token of row `r` of the block for rank `d`.
    pub block_tokens: Vec<Vec<u32>>,
    /// Assignments of this rank's tokens to each expert before any drop, `[E]`.
    pub assignments_per_expert: Vec<usize>,
    /// Assignments dropped by capacity, per expert, `[E]`.
    pub dropped_per_expert: Vec<usize>,
}

impl RoutePlan {
    /// Plan `routing` for `rank` under `placement` and `capacity`.
    ///
    /// Errors (naming `rank`) when `rank` is outside the placement's world, the routing's ids
    /// or weights are not `n * k`, there are 2^32 - 1 or more of them (rows travel as u32), or
    /// an expert id is out of range. Capacity drops are taken first-choice-first: every slot-0
    /// assignment is admitted before any slot-1, tokens in order.
    pub fn new(rank: usize, routing: &Routing, placement: &Placement, capacity: Capacity) -> Result<Self> {
        check(rank, routing, placement)?;
        let (n, k, e_total, world) = (routing.n, routing.k, placement.num_experts(), placement.world());
        let mut assignments_per_expert = vec![0usize; e_total];
        for &e in &routing.ids {
            assignments_per_expert[e as usize] += 1;
        }
        let (dest, dropped_per_expert) = admit(routing, placement, capacity);

        // Counts per (destination, local expert), then rows in (local expert, token, slot) order.
        let mut counts: Vec<Vec<usize>> = (0..world).map(|d| vec![0usize; placement.experts_of(d).len()]).collect();
        for (i, &d) in dest.iter().enumerate() {
            if d != DROPPED {
                counts[d as usize][placement.local_index_checked(routing.ids[i] as usize)] += 1;
            }
        }
        let mut cursor: Vec<Vec<usize>> = counts.iter().map(|c| offsets(c)).collect();
        let mut block_tokens: Vec<Vec<u32>> = counts.iter().map(|c| vec![0u32; c.iter().sum()]).collect();
        let mut row = vec![0u32; n * k];
        for (i, &d) in dest.iter().enumerate() {
            if d == DROPPED {
                row[i] = u32::MAX;
                continue;
            }
            let (d, l) = (d as usize, placement.local_index_checked(routing.ids[i] as usize));
            let r = cursor[d][l];
            cursor[d][l] += 1;
            row[i] = r as u32;
            block_tokens[d][r] = (i / k) as u32;
        }

        Ok(RoutePlan { rank, n, k, dest, row, counts, block_tokens, assignments_per_expert, dropped_per_expert })
    }

    /// Rows in the block for rank `d`; 0 for a rank outside the plan's world.
    pub fn rows_to(&self, d: usize) -> usize {
        self.block_tokens.get(d).map_or(0, Vec::len)
    }

    /// Total dropped assignments.
    pub fn dropped(&self) -> usize {
        self.dropped_per_expert.iter().sum()
    }

    /// Rows that stay on this rank.
    pub fn local_rows(&self) -> usize {
        self.rows_to(self.rank)
    }

    /// Rows sent to other ranks.
    pub fn remote_rows(&self) -> usize {
        (0..self.block_tokens.len()).filter(|&d| d != self.rank).map(|d| self.rows_to(d)).sum()
    }
}

/// The checks of [`RoutePlan::new`]: rank, lengths (and their product), expert ids.
fn check(rank: usize, routing: &Routing, placement: &Placement) -> Result<()> {
    let (n, k, e_total, world) = (routing.n, routing.k, placement.num_experts(), placement.world());
    if rank >= world {
        return Err(Error::invalid_on(rank, format!("rank {rank} outside a world of {world}")));
    }
    let Some(nk) = n.checked_mul(k).filter(|&nk| nk < u32::MAX as usize) else {
        return Err(Error::invalid_on(rank, format!("routing of {n} tokens x {k} slots exceeds 2^32 - 1 rows")));
    };
    if routing.ids.len() != nk || routing.weights.len() != nk {
        return Err(Error::invalid_on(
            rank,
            format!(
                "routing has {} ids and {} weights for {n} tokens x {k} slots",
                routing.ids.len(),
                routing.weights.len()
            ),
        ));
    }
    if let Some(i) = routing.ids.iter().position(|&e| e as usize >= e_total) {
        return Err(Error::invalid_on(
            rank,
            format!(
                "expert id {} at token {}, slot {} is out of range (the layer has {e_total} experts)",
                routing.ids[i],
                i / k,
                i % k
            ),
        ));
    }
    Ok(())
}

/// Admission, slot-major (first choice first): the destination rank of each (token, slot), or
/// [`DROPPED`], and the drops per expert. Ids and `n * k` were checked.
fn admit(routing: &Routing, placement: &Placement, capacity: Capacity) -> (Vec<u32>, Vec<usize>) {
    let (n, k, e_total) = (routing.n, routing.k, placement.num_experts());
    let mut dest = vec![0u32; n * k];
    let mut dropped_per_expert = vec![0usize; e_total];
    match capacity.limit(n, k, e_total) {
        None => {
            for (d, &e) in dest.iter_mut().zip(&routing.ids) {
                *d = placement.owner_of_checked(e as usize) as u32;
            }
        }
        Some(cap) => {
            let mut taken = vec![0usize; e_total];
            for j in 0..k {
                for t in 0..n {
                    let i = t * k + j;
                    let e = routing.ids[i] as usize;
                    if taken[e] < cap {
                        taken[e] += 1;
                        dest[i] = placement.owner_of_checked(e) as u32;
                    } else {
                        dropped_per_expert[e] += 1;
                        dest[i] = DROPPED;
                    }
                }
            }
        }
    }
    (dest, dropped_per_expert)
}
