//! Collective communication between ranks: the [`Group`] trait and its thread engine.
//!
//! Operations move bytes; the typed helpers sit on top. Every message carries the operation and
//! the call's sequence number, so ranks in different calls get [`Error::Mismatch`]. A blocking
//! call ends once a peer it waits on has shown no sign of life for the group's timeout (a
//! message, or a heartbeat while that peer holds a [`Working`] guard), with an error naming the
//! operation and that peer. A rank that fails tells its peers, so that they fail in the same call;
//! after a failed collective a group refuses further calls ([`crate::Error::Poisoned`]), because
//! its message streams may be out of step.

mod liveness;
mod local;

pub use liveness::{Heartbeat, Working, deadline, heartbeat_period};
pub use local::{LocalGroup, MAX_LOCAL_RANKS};

use std::time::Duration;

use crate::error::{Error, Result};
pub(crate) use crate::segments::offsets;

/// Default timeout of a collective call: how long a peer may show no sign of life.
/// `Duration::MAX` (or any timeout too large for an `Instant`) means no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A set of ranks that take part in collectives together. Implementations: [`LocalGroup`]
/// (threads of one process) and `moe_ep_mpi::MpiGroup` (processes over MPI).
///
/// Every rank must call the same operations in the same order with sizes that fit together;
/// a rank that does not is reported as an error on its peers, never as a hang. A call that fails
/// on one rank (bad arguments, a lost or stalled peer) fails on every rank, and a rank whose
/// peers gave up on a call returns that error from the same call. (One window remains: a
/// rank whose receives complete in the instant before a peer's deadline fires may return `Ok`
/// and fail on its next call.)
pub trait Group {
    /// This rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// How long a blocking call waits for a peer that shows no sign of life (neither a message
    /// nor a heartbeat). `Duration::MAX`: no timeout.
    fn timeout(&self) -> Duration;

    /// Hold the returned guard while this rank computes between collectives for long (a
    /// prefill's experts): while it lives, the peers keep hearing from this rank (a heartbeat
    /// every `timeout() / 4`) and do not time out on it, however long the work takes. A rank
    /// that stalls outside such a guard for longer than the timeout is reported by its peers,
    /// and is itself told that it was the one that stalled.
    ///
    /// The default does nothing (a group without heartbeats); [`LocalGroup`] and `MpiGroup`
    /// implement it.
    fn working(&self) -> Working<'_> {
        Working::idle()
    }

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
    /// Returns what each peer will send to this rank (a count past `usize::MAX` reads as
    /// `usize::MAX`). A `send_counts` without one entry per rank fails on every rank.
    fn exchange_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>> {
        let send: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let mut recv = vec![0u64; self.size()];
        // With a wrong number of counts the all-to-all itself fails on this rank's argument
        // error, which tells the peers; this rank reports the counts instead.
        let r = self.all_to_all_into(bytemuck::cast_slice(&send), bytemuck::cast_slice_mut(&mut recv));
        check_len(self.rank(), "exchange_counts", "send_counts", send_counts.len(), self.size())?;
        r?;
        Ok(recv.into_iter().map(|c| usize::try_from(c).unwrap_or(usize::MAX)).collect())
    }

    /// Variable all-to-all: a counts round, then the payload. Returns the received bytes
    /// (segments in rank order) and the count from each rank. Counts from the peers that add
    /// up to more than this rank can allocate fail on every rank.
    fn exchange_v(&self, send: &[u8], send_counts: &[usize]) -> Result<(Vec<u8>, Vec<usize>)> {
        let recv_counts = self.exchange_counts(send_counts)?;
        let total = recv_counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        match total.map(try_buffer) {
            Some(Ok(mut recv)) => {
                self.exchange_v_known_into(send, send_counts, &mut recv, &recv_counts)?;
                Ok((recv, recv_counts))
            }
            failed => {
                // Take part with a buffer that does not match the counts: the call fails here
                // with an argument error that tells the peers; report the real reason.
                let _ = self.exchange_v_known_into(send, send_counts, &mut [], &recv_counts);
                let why = match failed {
                    Some(Err(e)) => e.to_string(),
                    _ => "they overflow usize".into(),
                };
                Err(Error::invalid_on(
                    self.rank(),
                    format!("exchange_v: the peers' counts {recv_counts:?} cannot be received: {why}"),
                ))
            }
        }
    }

    /// Equal-chunk all-to-all into a new buffer.
    fn all_to_all(&self, send: &[u8]) -> Result<Vec<u8>> {
        let mut recv = vec![0u8; send.len()];
        self.all_to_all_into(send, &mut recv)?;
        Ok(recv)
    }

    /// All-gather into a new buffer of `size() * send.len()` bytes.
    fn all_gather(&self, send: &[u8]) -> Result<Vec<u8>> {
        match send.len().checked_mul(self.size()).map(try_buffer) {
            Some(Ok(mut recv)) => {
                self.all_gather_into(send, &mut recv)?;
                Ok(recv)
            }
            // Too large to hold here: the call fails on its size check, on every rank.
            _ => self.all_gather_into(send, &mut []).map(|_| Vec::new()),
        }
    }

    /// All-gather of u64 values: `result[p * v.len() + i]` is rank `p`'s `v[i]`.
    fn all_gather_u64(&self, v: &[u64]) -> Result<Vec<u64>> {
        let Some(n) = v.len().checked_mul(self.size()) else {
            return self.all_gather_into(bytemuck::cast_slice(v), &mut []).map(|_| Vec::new());
        };
        let mut recv = vec![0u64; n];
        self.all_gather_into(bytemuck::cast_slice(v), bytemuck::cast_slice_mut(&mut recv))?;
        Ok(recv)
    }
}

/// A zeroed buffer of `len` bytes, or an error when it cannot be allocated.
fn try_buffer(len: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| Error::invalid(format!("cannot allocate {len} bytes: {e}")))?;
    v.resize(len, 0);
    Ok(v)
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
    fn working(&self) -> Working<'_> {
        (**self).working()
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
    match counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)) {
        Some(sum) if sum == len => Ok(()),
        Some(sum) => {
            Err(Error::invalid_on(rank, format!("{op}: {what} add up to {sum} bytes but the buffer has {len}")))
        }
        None => Err(Error::invalid_on(rank, format!("{op}: {what} add up to more than usize can count"))),
    }
}
