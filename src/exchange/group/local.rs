//! `LocalGroup`: N ranks as threads of one process, talking over channels.

use std::cell::{Cell, RefCell};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::{Group, check_len, check_sum, offsets};
use crate::error::{Error, Result};

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

enum Payload {
    Bytes(Vec<u8>),
    /// The sender gave up on this call and will send nothing else for it; `culprit` is the
    /// rank its error blames (itself for bad local input).
    Failed {
        culprit: usize,
    },
}

struct Envelope {
    op: Op,
    seq: u64,
    payload: Payload,
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
    to: Vec<Option<Sender<Envelope>>>,
    from: Vec<Option<Receiver<Envelope>>>,
    seq: Cell<u64>,
    poisoned: RefCell<Option<String>>,
}

impl LocalGroup {
    /// `size` connected ranks with the given per-call timeout. Errors when `size` is 0.
    pub fn world(size: usize, timeout: Duration) -> Result<Vec<LocalGroup>> {
        if size == 0 {
            return Err(Error::invalid("a group needs at least one rank"));
        }
        // chan[src][dst]
        let mut senders: Vec<Vec<Option<Sender<Envelope>>>> = (0..size).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Envelope>>>> =
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
                seq: Cell::new(0),
                poisoned: RefCell::new(None),
            })
            .collect())
    }

    /// Run `f` on `size` ranks, one thread each (named `rank-N`), and return each rank's
    /// outcome in rank order: `Err` holds the panic payload of a rank that panicked.
    pub fn run<T, F>(size: usize, timeout: Duration, f: F) -> Result<Vec<std::thread::Result<T>>>
    where
        T: Send,
        F: Fn(LocalGroup) -> T + Sync,
    {
        let groups = Self::world(size, timeout)?;
        let f = &f;
        Ok(std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| {
                    std::thread::Builder::new()
                        .name(format!("rank-{}", g.rank))
                        .spawn_scoped(s, move || f(g))
                        .expect("spawn rank thread")
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        }))
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
    fn finish<T>(&self, op: Op, seq: u64, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let culprit = e.peer().unwrap_or(self.rank);
            for tx in self.to.iter().flatten() {
                let _ = tx.send(Envelope { op, seq, payload: Payload::Failed { culprit } });
            }
            *self.poisoned.borrow_mut() = Some(e.to_string());
        }
        r
    }

    /// Queue a message for `peer`. A peer that is gone is not an error here: it cannot send
    /// either, so the receive from it reports the loss (after any message it left behind,
    /// which may name the rank that really failed).
    fn send(&self, peer: usize, op: Op, seq: u64, bytes: Vec<u8>) {
        let tx = self.to[peer].as_ref().expect("no channel to self");
        let _ = tx.send(Envelope { op, seq, payload: Payload::Bytes(bytes) });
    }

    /// Receive this call's message from `peer`, checking it is the same call and `want` bytes.
    fn recv(&self, peer: usize, op: Op, seq: u64, want: usize, deadline: Instant) -> Result<Vec<u8>> {
        let rx = self.from[peer].as_ref().expect("no channel from self");
        let wait = deadline.saturating_duration_since(Instant::now());
        let env = rx.recv_timeout(wait).map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::Timeout { rank: self.rank, op: op.name(), peer, timeout: self.timeout },
            RecvTimeoutError::Disconnected => Error::PeerLost { rank: self.rank, op: op.name(), peer },
        })?;
        // A failure notice ends this call whichever call it was sent for: the peer has given up.
        if let Payload::Failed { culprit } = env.payload {
            return Err(if culprit == peer {
                Error::PeerFailed { rank: self.rank, op: op.name(), peer }
            } else {
                Error::PeerReported { rank: self.rank, op: op.name(), peer: culprit, via: peer }
            });
        }
        if env.op != op || env.seq != seq {
            return Err(Error::Mismatch {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: format!(
                    "it called {} (call #{}) while this rank called {} (call #{seq})",
                    env.op.name(),
                    env.seq,
                    op.name()
                ),
            });
        }
        match env.payload {
            Payload::Failed { .. } => unreachable!("handled above"),
            Payload::Bytes(b) if b.len() != want => Err(Error::Mismatch {
                rank: self.rank,
                op: op.name(),
                peer,
                detail: format!("it sent {} bytes, this rank expects {want}", b.len()),
            }),
            Payload::Bytes(b) => Ok(b),
        }
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
        let deadline = Instant::now() + self.timeout;
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
            let b = self.recv(p, op, seq, recv_len[p], deadline)?;
            recv[recv_off[p]..recv_off[p] + recv_len[p]].copy_from_slice(&b);
        }
        Ok(())
    }

    fn equal_chunks(&self, op: Op, send_len: usize, recv_len: usize) -> Result<usize> {
        if send_len != recv_len || send_len % self.size != 0 {
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

    fn all_to_all_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let op = Op::AllToAll;
        let seq = self.begin()?;
        let r = self.equal_chunks(op, send.len(), recv.len()).and_then(|chunk| {
            let lens = vec![chunk; self.size];
            let offs = offsets(&lens);
            self.exchange(op, seq, send, Segments { off: &offs, len: &lens }, recv, Segments { off: &offs, len: &lens })
        });
        self.finish(op, seq, r)
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
        self.finish(op, seq, r)
    }

    fn all_gather_into(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let op = Op::AllGather;
        let seq = self.begin()?;
        let r = (|| {
            if recv.len() != send.len() * self.size {
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
        self.finish(op, seq, r)
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
        self.finish(op, seq, r)
    }

    fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let seq = self.begin()?;
        let zeros = vec![0; self.size];
        let none = Segments { off: &zeros, len: &zeros };
        let r = self.exchange(op, seq, &[], none, &mut [], none);
        self.finish(op, seq, r)
    }
}
