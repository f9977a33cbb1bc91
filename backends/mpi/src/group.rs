//! [`MpiGroup`]: the [`Group`] of one MPI process, with deadlines.
//!
//! Every operation is non-blocking point-to-point (`MPI_Isend` / `MPI_Irecv` on a private
//! duplicate of `MPI_COMM_WORLD`, one tag per operation) polled with `MPI_Testsome` until it
//! completes or the group's timeout passes. That is what lets a stalled or dead peer end in an
//! [`Error`] naming it rather than a hang, and lets a transfer larger than MPI's `int` counts be
//! split into messages of at most [`MpiGroup::max_message`] bytes.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::os::raw::{c_int, c_void};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use moe_ep::{Error, Group, Result};
use mpi::Threading;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};

/// Per-peer lists: no allocation up to 16 ranks (small exchanges are latency-bound).
type Peers<T> = smallvec::SmallVec<[T; 16]>;

/// Largest message MPI's `int` counts allow, in bytes; longer transfers are split.
pub const MAX_MESSAGE: usize = i32::MAX as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllToAll = 1,
    ExchangeV = 2,
    AllGather = 3,
    AllReduce = 4,
    Barrier = 5,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllToAll => "all_to_all",
            Op::ExchangeV => "exchange_v",
            Op::AllGather => "all_gather",
            Op::AllReduce => "all_reduce_sum",
            Op::Barrier => "barrier",
        }
    }

    fn from_tag(tag: c_int) -> Option<Op> {
        [Op::AllToAll, Op::ExchangeV, Op::AllGather, Op::AllReduce, Op::Barrier]
            .into_iter()
            .find(|o| *o as c_int == tag)
    }
}

/// One rank of an MPI job. Create it once per process with [`MpiGroup::init`] (it initialises
/// MPI and finalises it when dropped) and use it from the thread that created it, unless MPI
/// provides `MPI_THREAD_SERIALIZED` or better.
///
/// After a failed call the group refuses further calls ([`Error::Poisoned`]) and, when dropped,
/// does not call `MPI_Finalize`, which could wait forever on the abandoned messages; the
/// process should then exit, and mpirun ends the job.
pub struct MpiGroup {
    comm: ManuallyDrop<SimpleCommunicator>,
    universe: ManuallyDrop<Universe>,
    rank: usize,
    size: usize,
    timeout: Duration,
    owner: ThreadId,
    threading: Threading,
    max_message: usize,
    poisoned: RefCell<Option<String>>,
    scratch: RefCell<Scratch>,
}

// SAFETY: MPI handles are plain integers or pointers owned by the MPI library. The group is
// not Sync, so it is used by one thread at a time; `check_thread` refuses calls from any
// thread but the creator's unless MPI provides at least MPI_THREAD_SERIALIZED.
unsafe impl Send for MpiGroup {}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .field("threading", &self.threading)
            .field("max_message", &self.max_message)
            .finish()
    }
}

fn mpi_error(rank: usize, what: &str, code: c_int) -> Error {
    let mut buf = vec![0u8; 512];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING (256 in Open MPI and MPICH) characters.
    unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr() as *mut _, &mut len) };
    buf.truncate(len.max(0) as usize);
    Error::Backend {
        rank: Some(rank),
        backend: "mpi",
        what: format!("{what}: {} (code {code})", String::from_utf8_lossy(&buf)),
    }
}

/// Per-call bookkeeping, kept between calls.
#[derive(Default)]
struct Scratch {
    requests: Vec<ffi::MPI_Request>,
    posted: Vec<Posted>,
    indices: Vec<c_int>,
    statuses: Vec<ffi::MPI_Status>,
}

/// One posted message: its peer and whether it is a receive of `len` bytes.
struct Posted {
    peer: usize,
    recv: bool,
    len: usize,
}

impl MpiGroup {
    /// Initialise MPI (asking for `MPI_THREAD_SERIALIZED`) and return this process's rank of
    /// `MPI_COMM_WORLD` with the given per-call timeout. Errors when MPI is already
    /// initialised or cannot be.
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
            Error::Backend { rank: None, backend: "mpi", what: "MPI is already initialised in this process".into() }
        })?;
        let comm = universe.world().duplicate();
        let rank = comm.rank() as usize;
        // SAFETY: comm is a valid communicator; MPI_ERRORS_RETURN makes MPI report errors
        // as codes on it instead of aborting the job, so they become `Error`s here.
        let rc = unsafe { ffi::MPI_Comm_set_errhandler(comm.as_raw(), ffi::RSMPI_ERRORS_RETURN) };
        if rc != 0 {
            return Err(mpi_error(rank, "MPI_Comm_set_errhandler", rc));
        }
        tracing::debug!(rank, size = comm.size(), ?threading, "MPI initialised");
        Ok(MpiGroup {
            rank,
            size: comm.size() as usize,
            comm: ManuallyDrop::new(comm),
            universe: ManuallyDrop::new(universe),
            timeout,
            owner: std::thread::current().id(),
            threading,
            max_message: MAX_MESSAGE,
            poisoned: RefCell::new(None),
            scratch: RefCell::default(),
        })
    }

    /// The thread support MPI provides (asked: `Serialized`).
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// Bytes per MPI message; transfers are split at this size.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Split messages at `bytes` (at most [`MAX_MESSAGE`]; tests use small values to exercise
    /// the splitting). Every rank must use the same value.
    pub fn set_max_message(&mut self, bytes: usize) {
        self.max_message = bytes.clamp(1, MAX_MESSAGE);
    }

    /// Change the per-call timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The underlying communicator (a duplicate of `MPI_COMM_WORLD`), e.g. for benchmarks
    /// against MPI's own collectives.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    fn check_usable(&self, op: Op) -> Result<()> {
        if let Some(first) = self.poisoned.borrow().as_ref() {
            return Err(Error::Poisoned { rank: self.rank, first: first.clone() });
        }
        if self.threading < Threading::Serialized && std::thread::current().id() != self.owner {
            return Err(Error::invalid_on(
                self.rank,
                format!(
                    "{}: MPI provides only {:?} thread support, so the group must be used from the thread that created it",
                    op.name(),
                    self.threading
                ),
            ));
        }
        Ok(())
    }

    fn fail(&self, e: Error) -> Error {
        self.poisoned.borrow_mut().get_or_insert_with(|| e.to_string());
        e
    }

    /// Send `sends[p]` to each peer `p` and receive `recvs[p]` from it (both may be empty),
    /// all at once, split into messages of at most `max_message` bytes, within the timeout.
    fn transfer(&self, op: Op, sends: &[(usize, &[u8])], recvs: &mut [(usize, &mut [u8])]) -> Result<()> {
        self.check_usable(op)?;
        let _span = tracing::trace_span!("mpi", op = op.name(), rank = self.rank).entered();
        let tag = op as c_int;
        let comm = self.comm.as_raw();
        // Bookkeeping reused across calls: small exchanges allocate nothing here.
        let mut scratch = self.scratch.take();
        let Scratch { requests, posted, indices, statuses } = &mut scratch;
        requests.clear();
        posted.clear();
        // Receives first, so that sends find them posted.
        let recv_chunks = recvs.iter_mut().flat_map(|(peer, buf)| {
            let peer = *peer;
            buf.chunks_mut(self.max_message).map(move |c| (peer, true, c.as_mut_ptr() as *mut c_void, c.len()))
        });
        let send_chunks = sends.iter().flat_map(|&(peer, buf)| {
            buf.chunks(self.max_message).map(move |c| (peer, false, c.as_ptr() as *mut c_void, c.len()))
        });
        let mut result = Ok(());
        for (peer, recv, ptr, len) in recv_chunks.chain(send_chunks) {
            let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: each chunk outlives its request: every request is completed or cancelled
            // and freed before this function returns; MPI only reads a send chunk.
            let (rc, what) = unsafe {
                if recv {
                    let rc = ffi::MPI_Irecv(ptr, len as c_int, ffi::RSMPI_UINT8_T, peer as c_int, tag, comm, &mut req);
                    (rc, "MPI_Irecv")
                } else {
                    let rc = ffi::MPI_Isend(ptr, len as c_int, ffi::RSMPI_UINT8_T, peer as c_int, tag, comm, &mut req);
                    (rc, "MPI_Isend")
                }
            };
            if rc != 0 {
                result = Err(mpi_error(self.rank, what, rc));
                break;
            }
            requests.push(req);
            posted.push(Posted { peer, recv, len });
        }
        if result.is_ok() {
            result = self.complete(op, requests, posted, indices, statuses);
        }
        if result.is_err() {
            self.abandon(requests);
        }
        self.scratch.replace(scratch);
        result.map_err(|e| self.fail(e))
    }

    /// Poll until every request completes, checking received sizes; on the deadline, the error
    /// names the first peer still owing a message.
    fn complete(
        &self,
        op: Op,
        requests: &mut [ffi::MPI_Request],
        posted: &[Posted],
        indices: &mut Vec<c_int>,
        statuses: &mut Vec<ffi::MPI_Status>,
    ) -> Result<()> {
        let n = requests.len();
        let deadline = Instant::now() + self.timeout;
        let mut left = n;
        indices.resize(n, 0);
        // SAFETY: MPI_Status is plain data, filled by MPI.
        statuses.resize(n, unsafe { std::mem::zeroed() });
        let mut spins = 0u32;
        while left > 0 {
            let mut outcount: c_int = 0;
            // SAFETY: the arrays have one slot per request.
            let rc = unsafe {
                ffi::MPI_Testsome(
                    n as c_int,
                    requests.as_mut_ptr(),
                    &mut outcount,
                    indices.as_mut_ptr(),
                    statuses.as_mut_ptr(),
                )
            };
            if rc != 0 {
                // MPI_ERR_IN_STATUS: look for the failed message's peer.
                let bad = (0..outcount.max(0) as usize).find(|&i| statuses[i].MPI_ERROR != 0);
                return Err(match bad {
                    Some(i) => {
                        let p = &posted[indices[i] as usize];
                        tracing::debug!(peer = p.peer, code = statuses[i].MPI_ERROR, "MPI message failed");
                        Error::PeerLost { rank: self.rank, op: op.name(), peer: p.peer }
                    }
                    None => mpi_error(self.rank, "MPI_Testsome", rc),
                });
            }
            // SAFETY: reading an MPI constant.
            if outcount == unsafe { ffi::RSMPI_UNDEFINED } || outcount == 0 {
                if outcount == 0 && Instant::now() >= deadline {
                    return Err(self.timeout_error(op, requests, posted));
                }
                // Each test call also drives MPI's progress (rendezvous handshakes): poll
                // without sleeping; spin first (small messages land within microseconds),
                // then yield the core to other threads on every miss.
                spins += 1;
                if spins < 2000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            for i in 0..outcount as usize {
                let p = &posted[indices[i] as usize];
                left -= 1;
                if p.recv {
                    let mut count: c_int = 0;
                    // SAFETY: a completed receive's status.
                    unsafe { ffi::MPI_Get_count(&statuses[i], ffi::RSMPI_UINT8_T, &mut count) };
                    if count as usize != p.len {
                        return Err(Error::Mismatch {
                            rank: self.rank,
                            op: op.name(),
                            peer: p.peer,
                            detail: format!("it sent a message of {count} bytes where {} were expected", p.len),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The error for a deadline: the first peer whose message has not arrived (or not been
    /// taken), and, where that peer sent a message of another operation, a mismatch.
    fn timeout_error(&self, op: Op, requests: &[ffi::MPI_Request], posted: &[Posted]) -> Error {
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let pending =
            |recv: bool| requests.iter().zip(posted).find(|(r, p)| **r != null && p.recv == recv).map(|(_, p)| p.peer);
        let peer = pending(true).or_else(|| pending(false)).unwrap_or(self.rank);
        let mut flag: c_int = 0;
        // SAFETY: MPI_Status is plain data.
        let mut status: ffi::MPI_Status = unsafe { std::mem::zeroed() };
        let rc =
            unsafe { ffi::MPI_Iprobe(peer as c_int, ffi::RSMPI_ANY_TAG, self.comm.as_raw(), &mut flag, &mut status) };
        if rc == 0 && flag != 0 && status.MPI_TAG != op as c_int {
            let other = Op::from_tag(status.MPI_TAG).map_or("another operation", |o| o.name());
            return Error::Mismatch {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: format!("it called {other} while this rank called {}", op.name()),
            };
        }
        Error::Timeout { rank: self.rank, op: op.name(), peer, timeout: self.timeout }
    }

    /// Cancel and free every request still pending after a failure.
    fn abandon(&self, requests: &mut [ffi::MPI_Request]) {
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        for r in requests.iter_mut().filter(|r| **r != null) {
            // SAFETY: r is an active request of this process. Freeing it leaves MPI to finish or
            // drop the message; the group is poisoned and the process is expected to exit.
            unsafe {
                ffi::MPI_Cancel(r);
                ffi::MPI_Request_free(r);
            }
        }
    }

    fn check_lengths(&self, op: Op, what: &str, counts: &[usize], len: usize) -> Result<()> {
        if counts.len() != self.size {
            return Err(Error::invalid_on(
                self.rank,
                format!("{}: {what} has {} entries, the group has {} ranks", op.name(), counts.len(), self.size),
            ));
        }
        let sum: usize = counts.iter().sum();
        if sum != len {
            return Err(Error::invalid_on(
                self.rank,
                format!("{}: {what} add up to {sum} bytes but the buffer has {len}", op.name()),
            ));
        }
        Ok(())
    }
}

/// `off[p]..off[p] + counts[p]` for each rank.
fn segments(counts: &[usize]) -> Peers<usize> {
    counts
        .iter()
        .scan(0, |s, &c| {
            *s += c;
            Some(*s - c)
        })
        .collect()
}

/// Split `buf` into per-rank segments of `counts`.
fn split_mut<'a>(mut buf: &'a mut [u8], counts: &[usize]) -> Peers<&'a mut [u8]> {
    let mut out = Peers::with_capacity(counts.len());
    for &c in counts {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(c);
        out.push(head);
        buf = tail;
    }
    out
}

impl Group for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let n = self.size;
        if send.len() != recv.len() || send.len() % n != 0 {
            return Err(Error::invalid_on(
                self.rank,
                format!(
                    "all_to_all: send has {} bytes and recv {}; both must be {n} equal chunks",
                    send.len(),
                    recv.len()
                ),
            ));
        }
        let c = send.len() / n;
        let counts: Peers<usize> = smallvec::smallvec![c; n];
        self.exchange(Op::AllToAll, send, &counts, recv, &counts)
    }

    fn exchange_v_known_into(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.exchange(Op::ExchangeV, send, send_counts, recv, recv_counts)
    }

    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.gather(Op::AllGather, send, recv)
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        // Everyone gathers every rank's values and sums in rank order: the same bits everywhere.
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut all = vec![0u8; bytes.len() * self.size];
        self.gather(Op::AllReduce, bytes, &mut all)?;
        let all: &[f32] = bytemuck::cast_slice(&all);
        let n = data.len();
        for (i, v) in data.iter_mut().enumerate() {
            *v = (0..self.size).fold(0.0f32, |acc, p| acc + all[p * n + i]);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut recv = vec![0u8; self.size];
        self.gather(Op::Barrier, &[1u8], &mut recv)
    }
}

impl MpiGroup {
    fn exchange(
        &self,
        op: Op,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.check_usable(op)?;
        self.check_lengths(op, "send_counts", send_counts, send.len())?;
        self.check_lengths(op, "recv_counts", recv_counts, recv.len())?;
        let me = self.rank;
        if send_counts[me] != recv_counts[me] {
            return Err(Error::invalid_on(
                me,
                format!("exchange_v: {} bytes to itself but {} expected from itself", send_counts[me], recv_counts[me]),
            ));
        }
        let soff = segments(send_counts);
        let sends: Peers<(usize, &[u8])> = (0..self.size)
            .filter(|&p| p != me && send_counts[p] > 0)
            .map(|p| (p, &send[soff[p]..soff[p] + send_counts[p]]))
            .collect();
        let mut parts = split_mut(recv, recv_counts);
        parts[me].copy_from_slice(&send[soff[me]..soff[me] + send_counts[me]]);
        let mut recvs: Peers<(usize, &mut [u8])> =
            parts.into_iter().enumerate().filter(|(p, b)| *p != me && !b.is_empty()).collect();
        self.transfer(op, &sends, &mut recvs)
    }

    fn gather(&self, op: Op, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.check_usable(op)?;
        let (n, me) = (self.size, self.rank);
        if recv.len() != send.len() * n {
            return Err(Error::invalid_on(
                me,
                format!("{}: recv has {} bytes for {n} ranks of {}", op.name(), recv.len(), send.len()),
            ));
        }
        let sends: Peers<(usize, &[u8])> =
            if send.is_empty() { Peers::new() } else { (0..n).filter(|&p| p != me).map(|p| (p, send)).collect() };
        let counts: Peers<usize> = smallvec::smallvec![send.len(); n];
        let mut parts = split_mut(recv, &counts);
        parts[me].copy_from_slice(send);
        let mut recvs: Peers<(usize, &mut [u8])> =
            parts.into_iter().enumerate().filter(|(p, b)| *p != me && !b.is_empty()).collect();
        self.transfer(op, &sends, &mut recvs)
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        // SAFETY: each field is dropped exactly once, the communicator before the universe.
        if self.poisoned.borrow().is_some() {
            // Abandoned messages could make MPI_Comm_free or MPI_Finalize wait forever: leave
            // both to the process exit (mpirun then reports the missing finalize and ends the job).
            return;
        }
        unsafe {
            ManuallyDrop::drop(&mut self.comm);
            ManuallyDrop::drop(&mut self.universe);
        }
    }
}
