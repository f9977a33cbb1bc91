//! What travels between two ranks: on [`TAG_DATA`], per call and peer, a [`Header`] naming the
//! operation, the call's sequence number and the bytes that follow, then those bytes in
//! messages of at most `max_message`; on [`TAG_CTRL`], [`Ctrl`] messages (heartbeats, failure
//! notices) at any time, from the calling thread or the heartbeat thread.
//!
//! MPI keeps the messages of one sender, receiver and tag in order, so the header of a call is
//! always the first data message of that call from that peer.

use std::os::raw::c_int;

/// Headers and payload of the calls.
pub(crate) const TAG_DATA: c_int = 1;
/// Heartbeats and failure notices.
pub(crate) const TAG_CTRL: c_int = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    AllToAll = 1,
    ExchangeV = 2,
    AllGather = 3,
    AllReduce = 4,
    Barrier = 5,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::AllToAll => "all_to_all",
            Op::ExchangeV => "exchange_v",
            Op::AllGather => "all_gather",
            Op::AllReduce => "all_reduce_sum",
            Op::Barrier => "barrier",
        }
    }

    pub(crate) fn from_code(code: u64) -> Option<Op> {
        [Op::AllToAll, Op::ExchangeV, Op::AllGather, Op::AllReduce, Op::Barrier].into_iter().find(|o| *o as u64 == code)
    }
}

/// First data message of each call to each peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Header {
    pub op: u64,
    pub seq: u64,
    /// Payload bytes that follow.
    pub len: u64,
    /// [`MAGIC`]: a message of another program (or version) on this communicator shows.
    pub magic: u64,
}

pub(crate) const MAGIC: u64 = 0x6d6f_652d_6570_0001; // "moe-ep" v1

impl Header {
    pub(crate) fn new(op: Op, seq: u64, len: usize) -> Self {
        Header { op: op as u64, seq, len: len as u64, magic: MAGIC }
    }

    /// How this header (from a peer) differs from this rank's call, if it does.
    pub(crate) fn mismatch(&self, op: Op, seq: u64, want: usize) -> Option<String> {
        if self.magic != MAGIC {
            return Some(format!("it sent a message that is not a moe-ep header ({:#x})", self.magic));
        }
        if self.op != op as u64 || self.seq != seq {
            let theirs = Op::from_code(self.op).map_or("an unknown operation", Op::name);
            return Some(format!(
                "it called {theirs} (call #{}) while this rank called {} (call #{seq})",
                self.seq,
                op.name()
            ));
        }
        if self.len != want as u64 {
            return Some(format!("it sent {} bytes, this rank expects {want}", self.len));
        }
        None
    }
}

pub(crate) const HEARTBEAT: u64 = 1;
pub(crate) const FAILED: u64 = 2;

/// A control message: a heartbeat, or a failure notice naming the rank the sender blames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Ctrl {
    pub kind: u64,
    pub culprit: u64,
    pub op: u64,
    pub seq: u64,
}

/// What every heartbeat says (sent from this static, so the buffer outlives every send).
pub(crate) static BEAT: Ctrl = Ctrl { kind: HEARTBEAT, culprit: 0, op: 0, seq: 0 };
