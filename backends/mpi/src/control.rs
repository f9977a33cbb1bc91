//! The control messages: one receive per peer always posted on [`TAG_CTRL`], tested during
//! every call; failure notices sent when a call fails; heartbeats sent by a helper thread while
//! a [`moe_ep::exchange::group::Working`] guard lives.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_ep::exchange::group::{Heartbeat, heartbeat_period};
use moe_ep::{Error, Result};
use mpi::Threading;
use mpi::ffi;
use mpi::raw::AsRaw;

use crate::group::{MpiGroup, mpi_error};
use crate::wire::{BEAT, Ctrl, FAILED, HEARTBEAT, Op, TAG_CTRL};

/// The posted control receives: `reqs[p]` into `bufs[p]` (null for this rank).
pub(crate) struct CtrlIn {
    reqs: Vec<ffi::MPI_Request>,
    bufs: Box<[Ctrl]>,
    indices: Vec<c_int>,
    statuses: Vec<ffi::MPI_Status>,
}

/// An MPI communicator handle that the heartbeat thread may use (under the group's lock).
struct RawComm(ffi::MPI_Comm);
// SAFETY: the handle is a plain value owned by MPI; every use holds the group's MPI lock, and
// the thread is joined before the communicator is freed.
unsafe impl Send for RawComm {}

impl CtrlIn {
    pub(crate) fn new(size: usize) -> Self {
        CtrlIn {
            reqs: vec![unsafe { ffi::RSMPI_REQUEST_NULL }; size],
            bufs: vec![Ctrl::default(); size].into_boxed_slice(),
            indices: vec![0; size],
            // SAFETY: MPI_Status is plain data.
            statuses: vec![unsafe { std::mem::zeroed() }; size],
        }
    }
}

impl MpiGroup {
    /// Post the control receive from `peer` (again). Caller holds the MPI lock.
    pub(crate) fn post_ctrl(&self, c: &mut CtrlIn, peer: usize) -> Result<()> {
        let ptr = (&mut c.bufs[peer]) as *mut Ctrl as *mut c_void;
        let len = std::mem::size_of::<Ctrl>() as c_int;
        // SAFETY: `bufs` is boxed and lives as long as the group, which cancels and completes
        // the request before dropping it.
        let rc = unsafe {
            ffi::MPI_Irecv(ptr, len, ffi::RSMPI_UINT8_T, peer as c_int, TAG_CTRL, self.comm.as_raw(), &mut c.reqs[peer])
        };
        if rc != 0 {
            return Err(mpi_error(self.rank, "MPI_Irecv", rc));
        }
        Ok(())
    }

    /// Test the control receives once: heartbeats mark their peer alive and are received
    /// again; a failure notice is this call's error. Returns whether a heartbeat came.
    /// Caller holds the MPI lock.
    pub(crate) fn poll_ctrl(&self, op: Op, alive: &mut [Instant]) -> Result<bool> {
        let mut c = self.ctrl.borrow_mut();
        let c = &mut *c;
        let mut outcount: c_int = 0;
        // SAFETY: one slot per request in each array.
        let rc = unsafe {
            ffi::MPI_Testsome(
                c.reqs.len() as c_int,
                c.reqs.as_mut_ptr(),
                &mut outcount,
                c.indices.as_mut_ptr(),
                c.statuses.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(self.status_error(op, rc, outcount, &c.indices, &c.statuses, |i| i));
        }
        let mut beat = false;
        for i in 0..outcount.max(0) as usize {
            let peer = c.indices[i] as usize;
            let msg = c.bufs[peer];
            match msg.kind {
                HEARTBEAT => {
                    alive[peer] = Instant::now();
                    beat = true;
                    self.post_ctrl(c, peer)?;
                }
                FAILED => return Err(self.reported(op, peer, msg.culprit as usize)),
                other => {
                    let detail = format!("it sent a control message of unknown kind {other}");
                    return Err(Error::Mismatch { rank: self.rank, op: op.name(), peer, detail });
                }
            }
        }
        Ok(beat)
    }

    /// The error for a failure notice from `via` that blames `culprit`.
    fn reported(&self, op: Op, via: usize, culprit: usize) -> Error {
        if culprit == via || culprit >= self.size {
            Error::PeerFailed { rank: self.rank, op: op.name(), peer: via }
        } else {
            Error::PeerReported { rank: self.rank, op: op.name(), peer: culprit, via }
        }
    }

    /// Tell every peer that this rank gave up on call `seq`, blaming `culprit`. The notice's
    /// buffer is leaked (32 bytes, once per failed group) so that it outlives every send; the
    /// sends are small, so MPI completes them at once, and is given half a second to.
    pub(crate) fn send_notices(&self, op: Op, seq: u64, culprit: usize) {
        let msg: &'static Ctrl =
            Box::leak(Box::new(Ctrl { kind: FAILED, culprit: culprit as u64, op: op as u64, seq }));
        let _mpi = self.mpi();
        let mut reqs = Vec::with_capacity(self.size);
        for p in (0..self.size).filter(|&p| p != self.rank) {
            let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
            let ptr = msg as *const Ctrl as *mut c_void;
            let len = std::mem::size_of::<Ctrl>() as c_int;
            // SAFETY: MPI only reads the static buffer.
            let rc = unsafe {
                ffi::MPI_Isend(ptr, len, ffi::RSMPI_UINT8_T, p as c_int, TAG_CTRL, self.comm.as_raw(), &mut req)
            };
            if rc == 0 {
                reqs.push(req);
            }
        }
        let until = Instant::now() + Duration::from_millis(500);
        loop {
            let mut done: c_int = 0;
            // SAFETY: one request per slot; statuses ignored.
            unsafe { ffi::MPI_Testall(reqs.len() as c_int, reqs.as_mut_ptr(), &mut done, ffi::RSMPI_STATUSES_IGNORE) };
            if done != 0 || Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        for r in reqs.iter_mut().filter(|r| **r != null) {
            // SAFETY: an active send of the leaked buffer; MPI completes it on its own.
            unsafe { ffi::MPI_Request_free(r) };
        }
    }

    /// Cancel the control receives and wait for the cancellations (before the communicator is
    /// freed). Caller holds the MPI lock.
    pub(crate) fn cancel_ctrl(&self) {
        let mut c = self.ctrl.borrow_mut();
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        for r in c.reqs.iter_mut().filter(|r| **r != null) {
            // SAFETY: an active receive of this group; waiting for a cancelled receive is local.
            unsafe {
                ffi::MPI_Cancel(r);
                ffi::MPI_Wait(r, ffi::RSMPI_STATUS_IGNORE);
            }
        }
    }

    /// The heartbeat thread of [`moe_ep::Group::working`]: every `timeout / 4` while a guard
    /// lives, one control message to every peer, under the MPI lock. None when MPI's thread
    /// support is below `MPI_THREAD_SERIALIZED` (no other thread may call MPI), when the timeout
    /// never expires, or when the thread cannot start.
    pub(crate) fn start_heartbeat(&self) -> Option<Heartbeat> {
        if self.threading < Threading::Serialized {
            tracing::warn!(
                rank = self.rank,
                threading = ?self.threading,
                "MPI thread support below SERIALIZED: no heartbeats, so peers may time out on long work"
            );
            return None;
        }
        let period = heartbeat_period(self.timeout)?;
        let (me, n) = (self.rank, self.size);
        let comm = RawComm(self.comm.as_raw());
        let lock: Arc<Mutex<()>> = Arc::clone(&self.lock);
        let stopped: Arc<AtomicBool> = Arc::clone(&self.failed);
        let beat = move || {
            let _mpi = lock.lock().unwrap_or_else(|p| p.into_inner());
            if stopped.load(Ordering::SeqCst) {
                return; // a failed group makes no more MPI calls
            }
            let comm = &comm;
            for p in (0..n).filter(|&p| p != me) {
                let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
                let ptr = &BEAT as *const Ctrl as *mut c_void;
                let len = std::mem::size_of::<Ctrl>() as c_int;
                // SAFETY: MPI only reads the static; the request is freed at once and MPI
                // completes the (small) send on its own.
                unsafe {
                    if ffi::MPI_Isend(ptr, len, ffi::RSMPI_UINT8_T, p as c_int, TAG_CTRL, comm.0, &mut req) == 0 {
                        ffi::MPI_Request_free(&mut req);
                    }
                }
            }
        };
        match Heartbeat::start(format!("mpi-rank-{me}-heartbeat"), period, beat) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(rank = me, error = %e, "no heartbeats: peers may time out on long work");
                None
            }
        }
    }
}
