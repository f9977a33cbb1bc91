//! `LocalGroup`: N ranks as threads of one process, talking over channels.

use std::cell::{Cell, OnceCell, RefCell};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::{Group, Heartbeat, Working, check_len, check_sum, deadline, heartbeat_period, offsets};
use crate::error::{Error, Result};

/// Most ranks of one [`LocalGroup`] (it holds a channel per pair of ranks).
pub const MAX_LOCAL_RANKS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllToAll,
    ExchangeV,
    AllGather,
    AllReduce,
    Barrier,
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
}

/// Where each rank's part lies in a buffer: `off[p]..off[p] + len[p]`.
#[derive(Clone, Copy)]
struct Segments<'a> {
    off: &'a [usize],
    len: &'a [usize],
}

/// What one rank sends another, in order on their channel.
enum Message {
    /// A part of a call.
    Part(Part),
    /// The sender is alive and working (it holds a [`Working`] guard).
    Heartbeat,
}

/// What a call receives from a peer.
enum Part {
    /// The peer's part of call `seq`, an `op`.
    Data { op: Op, seq: u64, bytes: Vec<u8> },
    /// The peer gave up on its current call and will send nothing else; `culprit` is the rank
    /// its error blames (itself for bad local input).
    Failed { culprit: usize },
}

/// One rank of a group of threads. Create all ranks at once with [`LocalGroup::world`] and move
/// each into its own thread, or let [`LocalGroup::run`] do both.
///
/// Dropping a rank (also by a panic unwinding through its thread) makes every peer that waits
/// on it fail with [`Error::PeerLost`] naming it.
pub struct LocalGroup {
    rank: usize,
    size: usize,
    timeout: Duration,
    to: Vec<Option<Sender<Message>>>,
    from: Vec<Option<Receiver<Message>>>,
    /// Per peer, a message read ahead of its call (by the check for failure notices that
    /// ends each call): the next receive from that peer takes it first.
    early: RefCell<Vec<Option<Part>>>,
    seq: Cell<u64>,
    poisoned: RefCell<Option<String>>,
    /// Started by the first [`Group::working`]; `None` when the timeout never expires.
    heartbeat: OnceCell<Option<Heartbeat>>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl LocalGroup {
    /// `size` connected ranks with the given timeout (`Duration::MAX`: none). Errors when
    /// `size` is 0 or over [`MAX_LOCAL_RANKS`].
    pub fn world(size: usize, timeout: Duration) -> Result<Vec<LocalGroup>> {
        if size == 0 || size > MAX_LOCAL_RANKS {
            return Err(Error::invalid(format!("a LocalGroup has 1 to {MAX_LOCAL_RANKS} ranks, not {size}")));
        }
        // chan[src][dst]
        let mut senders: Vec<Vec<Option<Sender<Message>>>> = (0..size).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Message>>>> =
            (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        for (src, row) in senders.iter_mut().enumerate() {
            for (dst, recv_row) in receivers.iter_mut().enumerate() {
                if src == dst {
                    row.push(None);
                } else {
                    let (tx, rx) = mpsc::channel();
                    row.push(Some(tx));
                    recv_row[src] = Some(rx);
                }
            }
        }
        Ok(senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LocalGroup {
                rank,
                size,
                timeout,
                to,
                from,
                early: RefCell::new((0..size).map(|_| None).collect()),
                seq: Cell::new(0),
                poisoned: RefCell::new(None),
                heartbeat: OnceCell::new(),
            })
            .collect())
    }

    /// Run `f` on `size` ranks, one thread each (named `rank-N`), and return each rank's
    /// outcome in rank order: `Err` holds the panic payload of a rank that panicked. Errors
    /// as [`LocalGroup::world`] does, or when a thread cannot be spawned.
    pub fn run<T, F>(size: usize, timeout: Duration, f: F) -> Result<Vec<std::thread::Result<T>>>
    where
        T: Send,
        F: Fn(LocalGroup) -> T + Sync,
    {
        let groups = Self::world(size, timeout)?;
        let f = &f;
        std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(size);
            for g in groups {
                let name = format!("rank-{}", g.rank);
                let h = std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(s, move || f(g))
                    .map_err(|e| Error::invalid(format!("cannot start a rank thread: {e}")))?;
                handles.push(h);
            }
            Ok(handles.into_iter().map(|h| h.join()).collect())
        })
    }

    /// Start a call: check the group is usable and take the next sequence number.
    fn begin(&self) -> Result<u64> {
        if let Some(first) = self.poisoned.borrow().as_ref() {
            return Err(Error::Poisoned { rank: self.rank, first: first.clone() });
        }
        let s = self.seq.get();
        self.seq.set(s + 1);
        Ok(s)
    }

    /// Finish a call: on failure tell every peer (so none waits for the full timeout) and
    /// refuse later calls.
    fn finish<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let culprit = e.peer().unwrap_or(self.rank);
            for tx in self.to.iter().flatten() {
                let _ = tx.send(Message::Part(Part::Failed { culprit }));
            }
            *self.poisoned.borrow_mut() = Some(e.to_string());
        }
        r
    }

    /// Queue a message for `peer`. A peer that is gone is not an error here: it cannot send
    /// either, so the receive from it reports the loss (after any message it left behind,
    /// which may name the rank that really failed).
    fn send(&self, peer: usize, op: Op, seq: u64, bytes: Vec<u8>) {
        if let Some(tx) = &self.to[peer] {
            let _ = tx.send(Message::Part(Part::Data { op, seq, bytes }));
        }
    }

    /// The error for a failure notice from `via` that blames `culprit`.
    fn reported(&self, op: Op, via: usize, culprit: usize) -> Error {
        if culprit == via {
            Error::PeerFailed { rank: self.rank, op: op.name(), peer: via }
        } else {
            Error::PeerReported { rank: self.rank, op: op.name(), peer: culprit, via }
        }
    }

    /// The next message from `peer`, waiting until `peer` has shown no sign of life for the
    /// timeout; heartbeats restart the wait and are not returned.
    fn next_from(&self, peer: usize, op: Op, start: Instant) -> Result<Part> {
        if let Some(m) = self.early.borrow_mut()[peer].take() {
            return Ok(m);
        }
        let Some(rx) = &self.from[peer] else {
            return Err(Error::invalid_on(self.rank, format!("{}: no channel from rank {peer}", op.name())));
        };
        let lost = || Error::PeerLost { rank: self.rank, op: op.name(), peer };
        let mut alive = start;
        loop {
            let got = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Disconnected) => return Err(lost()),
                Err(TryRecvError::Empty) => match deadline(alive, self.timeout) {
                    None => rx.recv().map_err(|_| lost()),
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())).map_err(|e| match e {
                        RecvTimeoutError::Timeout => {
                            Error::Timeout { rank: self.rank, op: op.name(), peer, timeout: self.timeout }
                        }
                        RecvTimeoutError::Disconnected => lost(),
                    }),
                },
            };
            match got? {
                Message::Heartbeat => alive = Instant::now(),
                Message::Part(p) => return Ok(p),
            }
        }
    }

    /// Receive this call's message from `peer`, checking it is the same call and `want` bytes.
    fn recv(&self, peer: usize, op: Op, seq: u64, want: usize, start: Instant) -> Result<Vec<u8>> {
        match self.next_from(peer, op, start)? {
            // A failure notice ends this call whichever call it was sent for: the peer has given up.
            Part::Failed { culprit } => Err(self.reported(op, peer, culprit)),
            Part::Data { op: o, seq: s, .. } if o != op || s != seq => Err(Error::Mismatch {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: format!(
                    "it called {} (call #{s}) while this rank called {} (call #{seq})",
                    o.name(),
                    op.name()
                ),
            }),
            Part::Data { bytes, .. } if bytes.len() != want => Err(Error::Mismatch {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: format!("it sent {} bytes, this rank expects {want}", bytes.len()),
            }),
            Part::Data { bytes, .. } => Ok(bytes),
        }
    }

    /// After this call's receives: a peer that already gave up on the call (it timed out on
    /// this rank or on another, after it had sent its part) has queued its failure notice
    /// behind that part. Look one message ahead per peer, so this rank fails in the same call.
    fn lookahead(&self, op: Op) -> Result<()> {
        let mut early = self.early.borrow_mut();
        for (p, rx) in self.from.iter().enumerate() {
            let Some(rx) = rx else { continue };
            while early[p].is_none() {
                match rx.try_recv() {
                    Ok(Message::Heartbeat) => continue,
                    Ok(Message::Part(Part::Failed { culprit })) => return Err(self.reported(op, p, culprit)),
                    Ok(Message::Part(data)) => early[p] = Some(data),
                    // Nothing queued, or the peer finished and left: nothing to learn.
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }

    /// Send segment `p` of `send` to each peer `p` and receive segment `p` of `recv` from it.
    fn exchange(
        &self,
        op: Op,
        seq: u64,
        send: &[u8],
        ss: Segments<'_>,
        recv: &mut [u8],
        rs: Segments<'_>,
    ) -> Result<()> {
        let (send_off, send_len, recv_off, recv_len) = (ss.off, ss.len, rs.off, rs.len);
        let start = Instant::now();
        let me = self.rank;
        for p in (0..self.size).filter(|&p| p != me) {
            self.send(p, op, seq, send[send_off[p]..send_off[p] + send_len[p]].to_vec());
        }
        if send_len[me] != recv_len[me] {
            return Err(Error::invalid_on(
                me,
                format!("{}: this rank sends itself {} bytes but expects {}", op.name(), send_len[me], recv_len[me]),
            ));
        }
        recv[recv_off[me]..recv_off[me] + recv_len[me]]
            .copy_from_slice(&send[send_off[me]..send_off[me] + send_len[me]]);
        for p in (0..self.size).filter(|&p| p != me) {
            let b = self.recv(p, op, seq, recv_len[p], start)?;
            recv[recv_off[p]..recv_off[p] + recv_len[p]].copy_from_slice(&b);
        }
        self.lookahead(op)
    }

    fn equal_chunks(&self, op: Op, send_len: usize, recv_len: usize) -> Result<usize> {
        if send_len != recv_len || !send_len.is_multiple_of(self.size) {
            return Err(Error::invalid_on(
                self.rank,
                format!(
                    "{}: send ({send_len} bytes) and recv ({recv_len} bytes) must be equal multiples of the group size {}",
                    op.name(),
                    self.size
                ),
            ));
        }
        Ok(send_len / self.size)
    }

    /// The beats of [`Group::working`]: a heartbeat to every peer.
    fn start_heartbeat(&self) -> Option<Heartbeat> {
        let period = heartbeat_period(self.timeout)?;
        let peers: Vec<Sender<Message>> = self.to.iter().flatten().cloned().collect();
        let beat = move || {
            for tx in &peers {
                let _ = tx.send(Message::Heartbeat);
            }
        };
        match Heartbeat::start(format!("rank-{}-heartbeat", self.rank), period, beat) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(rank = self.rank, error = %e, "no heartbeats: peers may time out on long work");
                None
            }
        }
    }
}

impl Group for LocalGroup {
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
        match self.heartbeat.get_or_init(|| self.start_heartbeat()) {
            Some(h) => h.working(),
            None => Working::idle(),
        }
    }

    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let op = Op::AllToAll;
        let seq = self.begin()?;
        let r = self.equal_chunks(op, send.len(), recv.len()).and_then(|chunk| {
            let lens = vec![chunk; self.size];
            let offs = offsets(&lens);
            self.exchange(op, seq, send, Segments { off: &offs, len: &lens }, recv, Segments { off: &offs, len: &lens })
        });
        self.finish(r)
    }

    fn exchange_v_known_into(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        let op = Op::ExchangeV;
        let seq = self.begin()?;
        let r = (|| {
            check_len(self.rank, op.name(), "send_counts", send_counts.len(), self.size)?;
            check_len(self.rank, op.name(), "recv_counts", recv_counts.len(), self.size)?;
            check_sum(self.rank, op.name(), "send_counts", send_counts, send.len())?;
            check_sum(self.rank, op.name(), "recv_counts", recv_counts, recv.len())?;
            let (so, ro) = (offsets(send_counts), offsets(recv_counts));
            self.exchange(
                op,
                seq,
                send,
                Segments { off: &so, len: send_counts },
                recv,
                Segments { off: &ro, len: recv_counts },
            )
        })();
        self.finish(r)
    }

    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let op = Op::AllGather;
        let seq = self.begin()?;
        let r = (|| {
            if send.len().checked_mul(self.size) != Some(recv.len()) {
                return Err(Error::invalid_on(
                    self.rank,
                    format!("all_gather: recv has {} bytes, needs {} x {} ranks", recv.len(), send.len(), self.size),
                ));
            }
            let lens = vec![send.len(); self.size];
            let so = vec![0; self.size];
            let ro = offsets(&lens);
            self.exchange(op, seq, send, Segments { off: &so, len: &lens }, recv, Segments { off: &ro, len: &lens })
        })();
        self.finish(r)
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        let op = Op::AllReduce;
        let seq = self.begin()?;
        let r = (|| {
            let n = data.len();
            let mut all = vec![0f32; n * self.size];
            let bytes = std::mem::size_of_val(data);
            let lens = vec![bytes; self.size];
            let so = vec![0; self.size];
            let ro = offsets(&lens);
            self.exchange(
                op,
                seq,
                bytemuck::cast_slice(data),
                Segments { off: &so, len: &lens },
                bytemuck::cast_slice_mut(&mut all),
                Segments { off: &ro, len: &lens },
            )?;
            for (i, out) in data.iter_mut().enumerate() {
                let mut acc = all[i];
                for p in 1..self.size {
                    acc += all[p * n + i];
                }
                *out = acc;
            }
            Ok(())
        })();
        self.finish(r)
    }

    fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let seq = self.begin()?;
        let zeros = vec![0; self.size];
        let none = Segments { off: &zeros, len: &zeros };
        let r = self.exchange(op, seq, &[], none, &mut [], none);
        self.finish(r)
    }
}
