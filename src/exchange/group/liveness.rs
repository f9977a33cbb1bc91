//! Liveness apart from deadlines: a rank that computes between collectives holds a [`Working`]
//! guard, and a [`Heartbeat`] thread tells its peers it is alive, so that a group's timeout
//! means "no sign of life for that long", not "slower than that".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Held while this rank computes between two collectives (from [`super::Group::working`]):
/// while any such guard of a group lives, the group's peers keep hearing from this rank and
/// do not time out on it. Dropping the guard ends that.
#[must_use = "the peers hear from this rank only while the guard lives"]
#[derive(Debug)]
pub struct Working<'a> {
    busy: Option<&'a AtomicUsize>,
}

impl<'a> Working<'a> {
    /// A guard that tells nobody anything: the default of groups without heartbeats.
    pub fn idle() -> Self {
        Working { busy: None }
    }

    /// A guard that counts itself in `busy` while it lives (a [`Heartbeat`] reads it).
    pub fn counting(busy: &'a AtomicUsize) -> Self {
        busy.fetch_add(1, Ordering::SeqCst);
        Working { busy: Some(busy) }
    }

    /// Whether this guard keeps a heartbeat going (false for [`Working::idle`]).
    pub fn is_beating(&self) -> bool {
        self.busy.is_some()
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.busy {
            b.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A thread that calls `beat` every `period` while at least one [`Working`] guard it handed
/// out is alive. Dropping it stops and joins the thread (so whatever `beat` captured, such as
/// channel ends, is dropped with it).
pub struct Heartbeat {
    busy: Arc<AtomicUsize>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat").field("busy", &self.busy.load(Ordering::Relaxed)).finish()
    }
}

impl Heartbeat {
    /// Start the thread (named `name`). Errors when the system cannot spawn it.
    pub fn start(name: String, period: Duration, mut beat: impl FnMut() + Send + 'static) -> Result<Self> {
        let busy = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = mpsc::channel::<()>();
        let seen = Arc::clone(&busy);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Until the owner drops `stop`: a beat each period while someone is working.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    if seen.load(Ordering::SeqCst) > 0 {
                        beat();
                    }
                }
            })
            .map_err(|e| Error::Backend { rank: None, backend: "heartbeat", what: format!("cannot start: {e}") })?;
        Ok(Heartbeat { busy, stop: Some(stop), thread: Some(thread) })
    }

    /// A guard that keeps the beats going while it lives.
    pub fn working(&self) -> Working<'_> {
        Working::counting(&self.busy)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // A panic inside `beat` has already been reported by the thread itself.
            let _ = t.join();
        }
    }
}

/// How often a rank that works tells its peers so, for a group `timeout`: four times per
/// timeout (at least every millisecond's worth), so a beat delayed by a busy machine still
/// arrives in time. `None` when the timeout never expires (see [`deadline`]).
pub fn heartbeat_period(timeout: Duration) -> Option<Duration> {
    deadline(Instant::now(), timeout).map(|_| (timeout / 4).max(Duration::from_millis(1)))
}

/// `start + timeout`, or `None` ("never") when that is past what an `Instant` can hold, as
/// for `Duration::MAX`.
pub fn deadline(start: Instant, timeout: Duration) -> Option<Instant> {
    start.checked_add(timeout)
}
