//! One call's messages: headers, payload and the poll loop that waits for them.
//!
//! Each rank posts a header receive for every peer, then sends every peer its header and
//! payload. A peer's payload receives are posted only once its header has arrived and matches
//! this rank's call (operation, sequence number, byte count), so a peer in another call or with
//! another size is a [`Error::Mismatch`] before any byte lands, never a truncated message.
//! The loop polls with `MPI_Testsome` (each test also drives MPI's progress), checks the
//! control messages between polls, and gives up on a peer only once it has shown no sign of
//! life (a completed message, a heartbeat) for the group's timeout.

use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

use moe_ep::exchange::group::deadline;
use moe_ep::{Error, Result};
use mpi::ffi;
use mpi::raw::AsRaw;

use crate::group::{MpiGroup, Peers, mpi_error};
use crate::wire::{Header, Op, TAG_DATA};

/// What a posted request is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The header receive from the peer.
    Header,
    /// A payload receive of this many bytes.
    Chunk(usize),
    /// A header or payload send.
    Send,
}

/// One posted request: its peer and kind.
#[derive(Clone, Copy, Debug)]
struct Posted {
    peer: usize,
    kind: Kind,
}

/// Per-call bookkeeping, kept between calls so small calls allocate nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    requests: Vec<ffi::MPI_Request>,
    posted: Vec<Posted>,
    indices: Vec<c_int>,
    statuses: Vec<ffi::MPI_Status>,
    hdr_in: Vec<Header>,
    hdr_out: Vec<Header>,
    /// Requests not yet complete.
    left: usize,
}

/// How the poll loop waits when nothing happened: spin (small messages land within
/// microseconds), then yield the core, then, after 10 ms of nothing, sleep a little so that a
/// long wait leaves the cores to ranks that compute.
struct Backoff {
    misses: u32,
    since: Instant,
}

impl Backoff {
    fn new() -> Self {
        Backoff { misses: 0, since: Instant::now() }
    }

    fn reset(&mut self) {
        self.misses = 0;
        self.since = Instant::now();
    }

    fn wait(&mut self) {
        self.misses += 1;
        if self.misses < 2000 {
            std::hint::spin_loop();
        } else if self.since.elapsed() < Duration::from_millis(10) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl MpiGroup {
    /// Send `sends[p]` to each peer `p` and receive `recvs[p]` from it (both may be empty; the
    /// entries of this rank are ignored), within the timeout, then look for a failure notice
    /// that a peer queued behind its part.
    pub(crate) fn transfer(&self, op: Op, seq: u64, sends: &[&[u8]], recvs: &mut [&mut [u8]]) -> Result<()> {
        let _span = tracing::trace_span!("mpi", op = op.name(), rank = self.rank, seq).entered();
        let mut s = self.scratch.take();
        s.requests.clear();
        s.posted.clear();
        s.left = 0;
        s.hdr_in.clear();
        s.hdr_in.resize(self.size, Header::default());
        s.hdr_out.clear();
        s.hdr_out.extend(sends.iter().map(|b| Header::new(op, seq, b.len())));
        let r = self.post(sends, &mut s).and_then(|_| self.wait_all(op, seq, recvs, &mut s));
        if r.is_err() {
            self.abandon(&mut s);
        }
        self.scratch.replace(s);
        r
    }

    fn peers(&self) -> impl Iterator<Item = usize> + use<> {
        let me = self.rank;
        (0..self.size).filter(move |&p| p != me)
    }

    /// Post one non-blocking send or receive of `len` bytes at `ptr` with `peer`.
    fn start(&self, s: &mut Scratch, peer: usize, kind: Kind, ptr: *mut c_void, len: usize) -> Result<()> {
        let comm = self.comm.as_raw();
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        let count = len as c_int; // len <= max_message <= i32::MAX
        let (p, tag) = (peer as c_int, TAG_DATA);
        // SAFETY: the buffer outlives the request: every request is completed, or cancelled and
        // freed, before `transfer` returns, and the header buffers do not move meanwhile.
        let (rc, what) = unsafe {
            match kind {
                Kind::Send => (ffi::MPI_Isend(ptr, count, ffi::RSMPI_UINT8_T, p, tag, comm, &mut req), "MPI_Isend"),
                _ => (ffi::MPI_Irecv(ptr, count, ffi::RSMPI_UINT8_T, p, tag, comm, &mut req), "MPI_Irecv"),
            }
        };
        if rc != 0 {
            return Err(mpi_error(self.rank, what, rc));
        }
        s.requests.push(req);
        s.posted.push(Posted { peer, kind });
        s.left += 1;
        Ok(())
    }

    /// Header receives from every peer, then headers and payload to every peer.
    fn post(&self, sends: &[&[u8]], s: &mut Scratch) -> Result<()> {
        let _mpi = self.mpi();
        let hsize = std::mem::size_of::<Header>();
        for p in self.peers() {
            let ptr = (&mut s.hdr_in[p]) as *mut Header as *mut c_void;
            self.start(s, p, Kind::Header, ptr, hsize)?;
        }
        for p in self.peers() {
            let ptr = (&s.hdr_out[p]) as *const Header as *mut c_void;
            self.start(s, p, Kind::Send, ptr, hsize)?;
            for c in sends[p].chunks(self.max_message) {
                self.start(s, p, Kind::Send, c.as_ptr() as *mut c_void, c.len())?;
            }
        }
        Ok(())
    }

    /// Once `peer`'s header matched: its payload receives, in order.
    fn post_payload(&self, s: &mut Scratch, peer: usize, buf: &mut [u8]) -> Result<()> {
        for c in buf.chunks_mut(self.max_message) {
            self.start(s, peer, Kind::Chunk(c.len()), c.as_mut_ptr() as *mut c_void, c.len())?;
        }
        Ok(())
    }

    /// Poll until every request completed; then the look-ahead for failure notices.
    fn wait_all(&self, op: Op, seq: u64, recvs: &mut [&mut [u8]], s: &mut Scratch) -> Result<()> {
        let mut alive: Peers<Instant> = smallvec::smallvec![Instant::now(); self.size];
        let mut idle = Backoff::new();
        while s.left > 0 {
            let progress = {
                let _mpi = self.mpi();
                let data = self.test_data(op, seq, recvs, s, &mut alive)?;
                match self.poll_ctrl(op, &mut alive) {
                    Ok(beat) => beat || data,
                    // What this rank sees itself comes before what it hears: the progress that
                    // brought the notice may have brought a peer's mismatching header too.
                    Err(notice) => {
                        self.test_data(op, seq, recvs, s, &mut alive)?;
                        return Err(notice);
                    }
                }
            };
            if progress {
                idle.reset();
                continue;
            }
            if let Some(peer) = self.expired(s, &alive) {
                return Err(Error::Timeout { rank: self.rank, op: op.name(), peer, timeout: self.timeout });
            }
            idle.wait();
        }
        // A peer that gave up on this call after sending its part has queued a notice.
        let _mpi = self.mpi();
        self.poll_ctrl(op, &mut alive).map(|_| ())
    }

    /// One `MPI_Testsome` over the call's requests: checks what completed and posts the payload
    /// receives of peers whose header arrived. Returns whether anything completed.
    fn test_data(
        &self,
        op: Op,
        seq: u64,
        recvs: &mut [&mut [u8]],
        s: &mut Scratch,
        alive: &mut [Instant],
    ) -> Result<bool> {
        let n = s.requests.len();
        s.indices.resize(n, 0);
        // SAFETY: MPI_Status is plain data, filled by MPI.
        s.statuses.resize(n, unsafe { std::mem::zeroed() });
        let mut outcount: c_int = 0;
        // SAFETY: the arrays have one slot per request.
        let rc = unsafe {
            ffi::MPI_Testsome(
                n as c_int,
                s.requests.as_mut_ptr(),
                &mut outcount,
                s.indices.as_mut_ptr(),
                s.statuses.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(self.status_error(op, rc, outcount, &s.indices, &s.statuses, |i| s.posted[i].peer));
        }
        if outcount <= 0 {
            return Ok(false); // 0, or MPI_UNDEFINED: nothing active
        }
        let now = Instant::now();
        for i in 0..outcount as usize {
            let (Posted { peer, kind }, status) = (s.posted[s.indices[i] as usize], s.statuses[i]);
            s.left -= 1;
            alive[peer] = now;
            match kind {
                Kind::Header => {
                    if let Some(detail) = s.hdr_in[peer].mismatch(op, seq, recvs[peer].len()) {
                        return Err(Error::Mismatch { rank: self.rank, op: op.name(), peer, detail });
                    }
                    self.post_payload(s, peer, recvs[peer])?;
                }
                Kind::Chunk(len) => {
                    let mut count: c_int = 0;
                    // SAFETY: a completed receive's status.
                    unsafe { ffi::MPI_Get_count(&status, ffi::RSMPI_UINT8_T, &mut count) };
                    if count as usize != len {
                        let detail = format!("it sent a message of {count} bytes where {len} were expected");
                        return Err(Error::Mismatch { rank: self.rank, op: op.name(), peer, detail });
                    }
                }
                Kind::Send => {}
            }
        }
        Ok(true)
    }

    /// The error of a failed test: a peer whose message failed (its status says which), else
    /// MPI's own error. A truncated message is a peer that sent more than agreed.
    pub(crate) fn status_error(
        &self,
        op: Op,
        rc: c_int,
        outcount: c_int,
        indices: &[c_int],
        statuses: &[ffi::MPI_Status],
        peer_of: impl Fn(usize) -> usize,
    ) -> Error {
        let bad = (0..outcount.max(0) as usize).find(|&i| statuses[i].MPI_ERROR != 0);
        let Some(i) = bad else { return mpi_error(self.rank, "MPI_Testsome", rc) };
        let (peer, code) = (peer_of(indices[i] as usize), statuses[i].MPI_ERROR);
        let mut class: c_int = 0;
        // SAFETY: plain query of an error code.
        unsafe { ffi::MPI_Error_class(code, &mut class) };
        tracing::debug!(peer, code, class, "MPI message failed");
        if class == ffi::MPI_ERR_TRUNCATE as c_int {
            let detail = "it sent a longer message than agreed".to_string();
            return Error::Mismatch { rank: self.rank, op: op.name(), peer, detail };
        }
        Error::PeerLost { rank: self.rank, op: op.name(), peer }
    }

    /// A peer that still owes this call a message and has shown no sign of life for the
    /// timeout: one whose receive is pending first, then one whose send is.
    fn expired(&self, s: &Scratch, alive: &[Instant]) -> Option<usize> {
        let now = Instant::now();
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        let late = |p: usize| deadline(alive[p], self.timeout).is_some_and(|d| now >= d);
        let pending = s.requests.iter().zip(&s.posted).filter(|(r, _)| **r != null).map(|(_, p)| *p);
        let mut sends = None;
        for Posted { peer, kind } in pending.filter(|p| late(p.peer)) {
            match kind {
                Kind::Send => sends = sends.or(Some(peer)),
                _ => return Some(peer),
            }
        }
        sends
    }

    /// Cancel every request still pending after a failure. A cancelled receive is waited for
    /// (the standard makes that wait local), so MPI writes into no buffer after this returns.
    /// A send is freed: MPI may still read its buffer while it completes, but a failed group
    /// makes no more MPI calls in this process (it is poisoned, its heartbeat stops and its
    /// drop skips MPI), and MPI here progresses only inside calls.
    fn abandon(&self, s: &mut Scratch) {
        let _mpi = self.mpi();
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        for (r, p) in s.requests.iter_mut().zip(&s.posted).filter(|(r, _)| **r != null) {
            // SAFETY: r is an active request of this process.
            unsafe {
                ffi::MPI_Cancel(r);
                match p.kind {
                    Kind::Send => ffi::MPI_Request_free(r),
                    _ => ffi::MPI_Wait(r, ffi::RSMPI_STATUS_IGNORE),
                };
            }
        }
    }
}
