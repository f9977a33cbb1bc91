//! Collective communication between ranks: the [`Group`] trait and its thread engine.
//!
//! Operations move bytes; the typed helpers sit on top. Every blocking call ends within the
//! group's timeout, with an error naming the operation and the peer that did not answer.
//! After a failed collective a group refuses further calls ([`crate::Error::Poisoned`]),
//! because its message streams may be out of step.

mod local;

pub use local::LocalGroup;

use std::time::Duration;

use crate::error::{Error, Result};
pub(crate) use crate::segments::offsets;

/// Default deadline of one collective call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A set of ranks that take part in collectives together. Implementations: [`LocalGroup`]
/// (threads of one process) and `moe_ep_mpi::MpiGroup` (processes over MPI).
///
/// Every rank must call the same operations in the same order with sizes that fit together;
/// a rank that does not is reported as an error on its peers, never as a hang.
pub trait Group {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Deadline of one blocking call.
    fn timeout(&self) -> Duration;

    /// All-to-all with equal chunks: `send` and `recv` are `size() * chunk` bytes; chunk `p`
    /// of `send` goes to rank `p`, chunk `p` of `recv` comes from rank `p`.
    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;

    /// Variable all-to-all with counts known on both sides: `send_counts[p]` bytes from
    /// consecutive segments of `send` go to rank `p`; `recv_counts[p]` bytes from rank `p`
    /// land in consecutive segments of `recv`. A peer that sends another amount is an error.
    fn exchange_v_known_into(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()>;

    /// Every rank's `send` (all the same length), concatenated in rank order into `recv`.
    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;

    /// Element-wise sum over ranks, in rank order, so every rank gets bitwise the same result.
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// The counts round of a variable exchange: an all-to-all of one u64 per peer.
    /// Returns what each peer will send to this rank.
    fn exchange_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>> {
        check_len(self.rank(), "exchange_counts", "send_counts", send_counts.len(), self.size())?;
        let send: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let mut recv = vec![0u64; self.size()];
        self.all_to_all_into(bytemuck::cast_slice(&send), bytemuck::cast_slice_mut(&mut recv))?;
        Ok(recv.into_iter().map(|c| c as usize).collect())
    }

    /// Variable all-to-all: a counts round, then the payload. Returns the received bytes
    /// (segments in rank order) and the count from each rank.
    fn exchange_v(&self, send: &[u8], send_counts: &[usize]) -> Result<(Vec<u8>, Vec<usize>)> {
        let recv_counts = self.exchange_counts(send_counts)?;
        let mut recv = vec![0u8; recv_counts.iter().sum()];
        self.exchange_v_known_into(send, send_counts, &mut recv, &recv_counts)?;
        Ok((recv, recv_counts))
    }

    /// Equal-chunk all-to-all into a new buffer.
    fn all_to_all(&self, send: &[u8]) -> Result<Vec<u8>> {
        let mut recv = vec![0u8; send.len()];
        self.all_to_all_into(send, &mut recv)?;
        Ok(recv)
    }

    /// All-gather into a new buffer of `size() * send.len()` bytes.
    fn all_gather(&self, send: &[u8]) -> Result<Vec<u8>> {
        let mut recv = vec![0u8; send.len() * self.size()];
        self.all_gather_into(send, &mut recv)?;
        Ok(recv)
    }

    /// All-gather of u64 values: `result[p * v.len() + i]` is rank `p`'s `v[i]`.
    fn all_gather_u64(&self, v: &[u64]) -> Result<Vec<u64>> {
        let mut recv = vec![0u64; v.len() * self.size()];
        self.all_gather_into(bytemuck::cast_slice(v), bytemuck::cast_slice_mut(&mut recv))?;
        Ok(recv)
    }
}

/// A shared reference to a group is the same group, so that several layers (an EP and a TP
/// layer in ep-vs-tp, the layers of a model) can take turns on one set of ranks. Their calls
/// must still come in the same order on every rank.
impl<G: Group + ?Sized> Group for &G {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn timeout(&self) -> Duration {
        (**self).timeout()
    }
    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        (**self).all_to_all_into(send, recv)
    }
    fn exchange_v_known_into(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        (**self).exchange_v_known_into(send, send_counts, recv, recv_counts)
    }
    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        (**self).all_gather_into(send, recv)
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum_f32(data)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
}

/// Argument check shared by the engines: a per-rank array must have one entry per rank.
pub(crate) fn check_len(rank: usize, op: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid_on(rank, format!("{op}: {what} has {got} entries, the group has {want} ranks")));
    }
    Ok(())
}

/// Argument check shared by the engines: counts must add up to the buffer they describe.
pub(crate) fn check_sum(rank: usize, op: &str, what: &str, counts: &[usize], len: usize) -> Result<()> {
    let sum: usize = counts.iter().sum();
    if sum != len {
        return Err(Error::invalid_on(rank, format!("{op}: {what} add up to {sum} bytes but the buffer has {len}")));
    }
    Ok(())
}
