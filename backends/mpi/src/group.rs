//! [`MpiGroup`]: the [`Group`] of one MPI process, with deadlines.
//!
//! Every operation is non-blocking point-to-point (`MPI_Isend` / `MPI_Irecv` on a private
//! duplicate of `MPI_COMM_WORLD`) polled with `MPI_Testsome` until it completes or a peer has
//! shown no sign of life for the group's timeout. That is what lets a stalled or dead peer end
//! in an [`Error`] naming it rather than a hang, and lets a transfer larger than MPI's `int`
//! counts be split into messages of at most [`MpiGroup::max_message`] bytes. The protocol
//! (headers with the operation and the call's sequence number, failure notices, heartbeats) is
//! that of the thread ranks, so both pass the same failure tests; see `wire.rs`.

use std::cell::{Cell, OnceCell, RefCell};
use std::mem::ManuallyDrop;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use moe_ep::exchange::group::{Heartbeat, Working};
use moe_ep::{Error, Group, Result};
use mpi::Threading;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::control::CtrlIn;
use crate::transfer::Scratch;
use crate::wire::Op;

/// Per-peer lists: no allocation up to 16 ranks (small exchanges are latency-bound).
pub(crate) type Peers<T> = smallvec::SmallVec<[T; 16]>;

/// Largest message MPI's `int` counts allow, in bytes; longer transfers are split.
pub const MAX_MESSAGE: usize = i32::MAX as usize;

/// One rank of an MPI job. Create it once per process with [`MpiGroup::init`] (it initialises
/// MPI and finalises it when dropped) and use it from the thread that created it, unless MPI
/// provides `MPI_THREAD_SERIALIZED` or better.
///
/// [`Group::working`] starts a heartbeat thread (with `MPI_THREAD_SERIALIZED` or better; every
/// MPI call of the group then holds one lock). Code that calls MPI itself on
/// [`MpiGroup::communicator`] must not do so while a `working` guard lives.
///
/// After a failed call the group refuses further calls ([`Error::Poisoned`]), makes no more MPI
/// calls, and, when dropped, does not call `MPI_Finalize`, which could wait forever on the
/// abandoned messages; the process should then exit, and mpirun ends the job.
pub struct MpiGroup {
    pub(crate) comm: ManuallyDrop<SimpleCommunicator>,
    universe: ManuallyDrop<Universe>,
    pub(crate) rank: usize,
    pub(crate) size: usize,
    pub(crate) timeout: Duration,
    owner: ThreadId,
    pub(crate) threading: Threading,
    pub(crate) max_message: usize,
    seq: Cell<u64>,
    poisoned: RefCell<Option<String>>,
    /// Set with `poisoned`, for the heartbeat thread.
    pub(crate) failed: Arc<AtomicBool>,
    /// Held around every MPI call, so the heartbeat thread's calls are serialized with the
    /// caller's.
    pub(crate) lock: Arc<Mutex<()>>,
    pub(crate) scratch: RefCell<Scratch>,
    pub(crate) ctrl: RefCell<CtrlIn>,
    heartbeat: OnceCell<Option<Heartbeat>>,
}

// SAFETY: MPI handles are plain integers or pointers owned by the MPI library. The group is
// not Sync, so it is used by one thread at a time; `check_usable` refuses calls from any
// thread but the creator's unless MPI provides at least MPI_THREAD_SERIALIZED, and the
// heartbeat thread calls MPI only under `lock` and only then.
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

/// MPI's own text for an error code that MPI returned (`MPI_Error_string`): at most
/// `MPI_MAX_ERROR_STRING` bytes, the MPI's own limit (256 in Open MPI, 1024 in MPICH). Not
/// public: MPI's default handler makes an unknown code a fatal error.
pub(crate) fn error_string(code: c_int) -> String {
    // One byte more for the terminating zero some implementations write past the limit.
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING characters and a zero, as the standard asks.
    unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr() as *mut _, &mut len) };
    buf.truncate((len.max(0) as usize).min(ffi::MPI_MAX_ERROR_STRING as usize));
    String::from_utf8_lossy(&buf).into_owned()
}

/// MPI's message for `code`, as an error on `rank`.
pub(crate) fn mpi_error(rank: usize, what: &str, code: c_int) -> Error {
    Error::Backend { rank: Some(rank), backend: "mpi", what: format!("{what}: {} (code {code})", error_string(code)) }
}

impl MpiGroup {
    /// Initialise MPI (asking for `MPI_THREAD_SERIALIZED`) and return this process's rank of
    /// `MPI_COMM_WORLD` with the given timeout (`Duration::MAX`: none). Errors when MPI is
    /// already initialised or cannot be.
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized).ok_or_else(|| {
            Error::Backend { rank: None, backend: "mpi", what: "MPI is already initialised in this process".into() }
        })?;
        let comm = universe.world().duplicate();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        // SAFETY: comm is a valid communicator; MPI_ERRORS_RETURN makes MPI report errors
        // as codes on it instead of aborting the job, so they become `Error`s here.
        let rc = unsafe { ffi::MPI_Comm_set_errhandler(comm.as_raw(), ffi::RSMPI_ERRORS_RETURN) };
        if rc != 0 {
            return Err(mpi_error(rank, "MPI_Comm_set_errhandler", rc));
        }
        tracing::debug!(rank, size, ?threading, "MPI initialised");
        let g = MpiGroup {
            rank,
            size,
            comm: ManuallyDrop::new(comm),
            universe: ManuallyDrop::new(universe),
            timeout,
            owner: std::thread::current().id(),
            threading,
            max_message: MAX_MESSAGE,
            seq: Cell::new(0),
            poisoned: RefCell::new(None),
            failed: Arc::new(AtomicBool::new(false)),
            lock: Arc::new(Mutex::new(())),
            scratch: RefCell::default(),
            ctrl: RefCell::new(CtrlIn::new(size)),
            heartbeat: OnceCell::new(),
        };
        {
            let mut c = g.ctrl.borrow_mut();
            for p in (0..size).filter(|&p| p != rank) {
                g.post_ctrl(&mut c, p)?;
            }
        }
        Ok(g)
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

    /// Change the timeout (`Duration::MAX`: none). Restarts the heartbeat at the new pace.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        drop(self.heartbeat.take());
    }

    /// The underlying communicator (a duplicate of `MPI_COMM_WORLD`), e.g. for benchmarks
    /// against MPI's own collectives.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// The lock every MPI call of this group holds.
    pub(crate) fn mpi(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a call: check the group is usable and take the call's sequence number.
    fn begin(&self, op: Op) -> Result<u64> {
        if let Some(first) = self.poisoned.borrow().as_ref() {
            return Err(Error::Poisoned { rank: self.rank, first: first.clone() });
        }
        if self.threading < Threading::Serialized && std::thread::current().id() != self.owner {
            // Not a collective failure: no message was sent, the group stays usable.
            return Err(Error::invalid_on(
                self.rank,
                format!(
                    "{}: MPI provides only {:?} thread support, so the group must be used from the thread that created it",
                    op.name(),
                    self.threading
                ),
            ));
        }
        let s = self.seq.get();
        self.seq.set(s + 1);
        Ok(s)
    }

    /// Finish a call: on failure tell every peer (so that it fails in this call too) and
    /// refuse later calls.
    fn finish<T>(&self, op: Op, seq: u64, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.send_notices(op, seq, e.peer().unwrap_or(self.rank));
            self.poisoned.borrow_mut().get_or_insert_with(|| e.to_string());
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    /// One call: `body` between [`MpiGroup::begin`] and [`MpiGroup::finish`].
    fn call(&self, op: Op, body: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let seq = self.begin(op)?;
        let r = body(seq);
        self.finish(op, seq, r)
    }

    fn check_lengths(&self, op: Op, what: &str, counts: &[usize], len: usize) -> Result<()> {
        if counts.len() != self.size {
            return Err(Error::invalid_on(
                self.rank,
                format!("{}: {what} has {} entries, the group has {} ranks", op.name(), counts.len(), self.size),
            ));
        }
        match counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)) {
            Some(sum) if sum == len => Ok(()),
            sum => Err(Error::invalid_on(
                self.rank,
                format!(
                    "{}: {what} add up to {} bytes but the buffer has {len}",
                    op.name(),
                    sum.map_or("more than usize can count".into(), |s| s.to_string())
                ),
            )),
        }
    }

    /// Segment `p` of `send` to each peer `p`, segment `p` of `recv` from it.
    fn exchange(&self, op: Op, seq: u64, send: &[u8], sc: &[usize], recv: &mut [u8], rc: &[usize]) -> Result<()> {
        self.check_lengths(op, "send_counts", sc, send.len())?;
        self.check_lengths(op, "recv_counts", rc, recv.len())?;
        let me = self.rank;
        if sc[me] != rc[me] {
            return Err(Error::invalid_on(
                me,
                format!("{}: {} bytes to itself but {} expected from itself", op.name(), sc[me], rc[me]),
            ));
        }
        let sends = split(send, sc);
        let mut recvs = split_mut(recv, rc);
        recvs[me].copy_from_slice(sends[me]);
        self.transfer(op, seq, &sends, &mut recvs)
    }

    /// Every rank's `send` into its segment of `recv`.
    fn gather(&self, op: Op, seq: u64, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        if send.len().checked_mul(n) != Some(recv.len()) {
            return Err(Error::invalid_on(
                me,
                format!("{}: recv has {} bytes for {n} ranks of {}", op.name(), recv.len(), send.len()),
            ));
        }
        let sends: Peers<&[u8]> = smallvec::smallvec![send; n];
        let counts: Peers<usize> = smallvec::smallvec![send.len(); n];
        let mut recvs = split_mut(recv, &counts);
        recvs[me].copy_from_slice(send);
        self.transfer(op, seq, &sends, &mut recvs)
    }
}

/// Split `buf` into per-rank segments of `counts` (which add up to its length).
fn split<'a>(mut buf: &'a [u8], counts: &[usize]) -> Peers<&'a [u8]> {
    counts
        .iter()
        .map(|&c| {
            let (head, tail) = buf.split_at(c);
            buf = tail;
            head
        })
        .collect()
}

/// Split `buf` into per-rank segments of `counts` (which add up to its length).
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

    fn working(&self) -> Working<'_> {
        if self.poisoned.borrow().is_some() {
            return Working::idle();
        }
        match self.heartbeat.get_or_init(|| self.start_heartbeat()) {
            Some(h) => h.working(),
            None => Working::idle(),
        }
    }

    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.call(Op::AllToAll, |seq| {
            let n = self.size;
            if send.len() != recv.len() || !send.len().is_multiple_of(n) {
                return Err(Error::invalid_on(
                    self.rank,
                    format!(
                        "all_to_all: send has {} bytes and recv {}; both must be {n} equal chunks",
                        send.len(),
                        recv.len()
                    ),
                ));
            }
            let counts: Peers<usize> = smallvec::smallvec![send.len() / n; n];
            self.exchange(Op::AllToAll, seq, send, &counts, recv, &counts)
        })
    }

    fn exchange_v_known_into(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.call(Op::ExchangeV, |seq| self.exchange(Op::ExchangeV, seq, send, send_counts, recv, recv_counts))
    }

    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.call(Op::AllGather, |seq| self.gather(Op::AllGather, seq, send, recv))
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        // Everyone gathers every rank's values and sums in rank order: the same bits everywhere.
        self.call(Op::AllReduce, |seq| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            let mut all = vec![0u8; bytes.len() * self.size];
            self.gather(Op::AllReduce, seq, bytes, &mut all)?;
            let all: &[f32] = bytemuck::cast_slice(&all);
            let n = data.len();
            for (i, v) in data.iter_mut().enumerate() {
                *v = (0..self.size).fold(0.0f32, |acc, p| acc + all[p * n + i]);
            }
            Ok(())
        })
    }

    fn barrier(&self) -> Result<()> {
        self.call(Op::Barrier, |seq| self.gather(Op::Barrier, seq, &[], &mut []))
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        // The heartbeat thread first: it uses the communicator.
        drop(self.heartbeat.take());
        if self.poisoned.borrow().is_some() {
            // Abandoned messages could make MPI_Comm_free or MPI_Finalize wait forever: leave
            // both to the process exit (mpirun then reports the missing finalize and ends the job).
            return;
        }
        {
            let _mpi = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cancel_ctrl();
        }
        // SAFETY: each field is dropped exactly once, the communicator before the universe.
        unsafe {
            ManuallyDrop::drop(&mut self.comm);
            ManuallyDrop::drop(&mut self.universe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MPI's error strings (MPICH's are up to 1024 bytes) fit the buffer, for every standard
    /// error class. A singleton MPI process (no mpirun).
    #[test]
    fn error_strings_fit_the_buffer_mpi_asks_for() {
        let g = MpiGroup::init(Duration::from_secs(10)).expect("MPI init");
        let classes = [
            ffi::MPI_ERR_BUFFER,
            ffi::MPI_ERR_COUNT,
            ffi::MPI_ERR_TYPE,
            ffi::MPI_ERR_TAG,
            ffi::MPI_ERR_COMM,
            ffi::MPI_ERR_RANK,
            ffi::MPI_ERR_REQUEST,
            ffi::MPI_ERR_TRUNCATE,
            ffi::MPI_ERR_OTHER,
            ffi::MPI_ERR_INTERN,
            ffi::MPI_ERR_IN_STATUS,
        ];
        for c in classes {
            let s = error_string(c as c_int);
            assert!(!s.is_empty() && s.len() <= ffi::MPI_MAX_ERROR_STRING as usize, "class {c}: {s:?}");
        }
        let e = mpi_error(0, "MPI_Irecv", ffi::MPI_ERR_TRUNCATE as c_int).to_string();
        assert!(e.to_lowercase().contains("truncated"), "{e}");
        drop(g);
    }
}
