//! The one error type of the library.
//!
//! Every variant that can happen inside a multi-rank operation names the rank that observed it
//! and, where another rank is to blame, that peer as well.

use std::time::Duration;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and on which rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The caller passed something that cannot work: a shape, dtype or id out of range.
    #[error("{}invalid input: {what}", rank_prefix(*rank))]
    InvalidInput { rank: Option<usize>, what: String },

    /// A configuration that must be identical on every rank is not.
    #[error("rank {rank}: configuration differs between ranks: {detail}")]
    ConfigMismatch { rank: usize, detail: String },

    /// A peer did not take part in a collective before the deadline.
    #[error("rank {rank}: {op} timed out after {timeout:?} waiting for rank {peer}")]
    Timeout { rank: usize, op: &'static str, peer: usize, timeout: Duration },

    /// A peer disappeared (its thread panicked or returned, its process died, its group was dropped).
    #[error("rank {rank}: {op}: rank {peer} is gone (it panicked, exited or dropped its group)")]
    PeerLost { rank: usize, op: &'static str, peer: usize },

    /// Ranks called different collectives, or the same one with sizes that do not fit together.
    #[error("rank {rank}: {op}: ranks disagree with rank {peer}: {detail}")]
    Mismatch { rank: usize, op: &'static str, peer: usize, detail: String },

    /// A peer reported that it failed locally (bad input on that rank) during a collective step.
    #[error("rank {rank}: {op}: rank {peer} failed on its side (its own error says why)")]
    PeerFailed { rank: usize, op: &'static str, peer: usize },

    /// A peer gave up on this collective because of another rank, which it names. When that
    /// rank is this one (`peer == rank`), this rank is the one that stalled (or failed) in the
    /// peer's eyes: it arrived after the peer's timeout.
    #[error("rank {rank}: {op}: {}", reported(*rank, *peer, *via))]
    PeerReported { rank: usize, op: &'static str, peer: usize, via: usize },

    /// An earlier collective failed, so the group's message streams can no longer be trusted.
    #[error("rank {rank}: group is unusable after an earlier failure: {first}")]
    Poisoned { rank: usize, first: String },

    /// A compute backend (GPU device, driver) failed.
    #[error("{}backend {backend}: {what}", rank_prefix(*rank))]
    Backend { rank: Option<usize>, backend: &'static str, what: String },
}

fn reported(rank: usize, peer: usize, via: usize) -> String {
    if peer == rank {
        format!("rank {via} gave up on this rank: this rank stalled past the group's timeout (or failed) in its eyes")
    } else {
        format!("rank {via} reports that rank {peer} failed, stalled or is gone")
    }
}

fn rank_prefix(rank: Option<usize>) -> String {
    rank.map(|r| format!("rank {r}: ")).unwrap_or_default()
}

impl Error {
    /// Invalid input seen outside any rank context (tensor construction, config building).
    pub fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidInput { rank: None, what: what.into() }
    }

    /// Invalid input seen on `rank`.
    pub fn invalid_on(rank: usize, what: impl Into<String>) -> Self {
        Error::InvalidInput { rank: Some(rank), what: what.into() }
    }

    /// The other rank this error blames, if any (the root cause for [`Error::PeerReported`]).
    pub fn peer(&self) -> Option<usize> {
        match self {
            Error::Timeout { peer, .. }
            | Error::PeerLost { peer, .. }
            | Error::Mismatch { peer, .. }
            | Error::PeerFailed { peer, .. }
            | Error::PeerReported { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// Attach `rank` to an error that was created without one.
    pub fn on_rank(self, r: usize) -> Self {
        match self {
            Error::InvalidInput { rank: None, what } => Error::InvalidInput { rank: Some(r), what },
            Error::Backend { rank: None, backend, what } => Error::Backend { rank: Some(r), backend, what },
            other => other,
        }
    }
}
