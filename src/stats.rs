//! Per-call statistics of dispatch, combine and the layer, serializable to JSON.

use serde::{Deserialize, Serialize};

/// Wall time of each stage of one call on one rank, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    pub route: f64,
    pub plan: f64,
    pub pack: f64,
    /// Counts round and payload of the dispatch exchange (includes waiting for peers).
    pub exchange: f64,
    pub scatter: f64,
    pub experts: f64,
    pub gather: f64,
    /// Payload of the combine exchange (includes waiting for peers).
    pub exchange_back: f64,
    pub combine: f64,
}

impl StageTimes {
    /// Stage names and values, in data-flow order.
    pub fn entries(&self) -> [(&'static str, f64); 9] {
        [
            ("route", self.route),
            ("plan", self.plan),
            ("pack", self.pack),
            ("exchange", self.exchange),
            ("scatter", self.scatter),
            ("experts", self.experts),
            ("gather", self.gather),
            ("exchange_back", self.exchange_back),
            ("combine", self.combine),
        ]
    }

    /// Sum of all stages.
    pub fn total(&self) -> f64 {
        self.entries().iter().map(|(_, v)| v).sum()
    }
}

/// What one rank did in one forward (or dispatch + combine) call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardStats {
    pub rank: usize,
    pub world: usize,
    /// Tokens of this rank.
    pub tokens: usize,
    /// Engine that ran the stages (`cpu`, `wgpu:...`).
    pub backend: String,
    /// Rows this rank sent to each rank (its own entry: rows that stayed local, never copied).
    pub rows_sent: Vec<usize>,
    /// Rows this rank's experts received from each rank (its own entry: its local rows).
    pub rows_received: Vec<usize>,
    /// Rows of this rank's tokens computed on this rank.
    pub local_rows: usize,
    /// Rows of this rank's tokens sent to other ranks.
    pub remote_rows_sent: usize,
    /// Rows of other ranks' tokens computed here.
    pub remote_rows_received: usize,
    /// Payload bytes sent and received in the dispatch exchange (the combine moves the same back).
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// Assignments dropped by capacity (0 when dropless).
    pub dropped: usize,
    /// Assignments of this rank's tokens to each expert, before drops, `[E]`.
    pub assignments_per_expert: Vec<usize>,
    /// Rows each local expert computed, `[local experts]`.
    pub rows_per_local_expert: Vec<usize>,
    pub times: StageTimes,
}
