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
    /// The shared expert on this rank's own tokens, and adding it to the output (0 without one).
    #[serde(default)]
    pub shared: f64,
}

impl StageTimes {
    /// Stage names and values, in data-flow order.
    pub fn entries(&self) -> [(&'static str, f64); 10] {
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
            ("shared", self.shared),
        ]
    }

    /// Sum of all stages.
    pub fn total(&self) -> f64 {
        self.entries().iter().map(|(_, v)| v).sum()
    }
}

/// GPU time of one call's kernels by kind, in seconds, from GPU timestamps (engines that
/// record them on request: `moe_ep_wgpu::ContextOptions::timestamps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuTimes {
    /// Router logits, top-k, and shared-expert gates.
    pub router: f64,
    /// Row gathers: pack, scatter, gather back (and source concatenations).
    pub gather: f64,
    /// Expert FFNs, routed and shared.
    pub ffn: f64,
    /// Weighted combines.
    pub combine: f64,
}

impl GpuTimes {
    /// Sum of every kind.
    pub fn total(&self) -> f64 {
        self.router + self.gather + self.ffn + self.combine
    }
}

/// What one rank did in one forward (or dispatch + combine) call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardStats {
    pub rank: usize,
    pub world: usize,
    /// Tokens of this rank.
    pub tokens: usize,
    /// Engine the policy chose for the call (`cpu`, `wgpu:...`).
    pub backend: String,
    /// GPU failures in this call after which the CPU finished it (0 or 1).
    pub fallbacks: usize,
    /// The first such failure, if any.
    pub fallback_error: Option<String>,
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
    /// Bytes of rows the engine uploaded from the host (the input, received exchange blocks);
    /// 0 on the CPU engine, whose rows never leave host memory.
    #[serde(default)]
    pub host_upload_bytes: u64,
    /// Bytes of plan indices, host weights and kernel parameters uploaded.
    #[serde(default)]
    pub host_index_bytes: u64,
    /// Bytes the engine read back to the host (routing ids and weights, exchange send blocks,
    /// the output).
    #[serde(default)]
    pub host_readback_bytes: u64,
    /// GPU command submissions and host waits for the GPU in the call.
    #[serde(default)]
    pub gpu_submits: u64,
    #[serde(default)]
    pub gpu_waits: u64,
    /// GPU time of the call's kernels, where the engine recorded timestamps.
    #[serde(default)]
    pub gpu_times: Option<GpuTimes>,
    pub times: StageTimes,
}

/// Totals over a layer's forward calls on one rank, serializable to JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub rank: usize,
    pub calls: u64,
    /// Calls the policy gave to the CPU and to the GPU engine.
    pub cpu_calls: u64,
    pub gpu_calls: u64,
    /// Calls that failed on the GPU and were finished on the CPU.
    pub fallbacks: u64,
    /// The most recent fallback's error.
    pub last_fallback_error: Option<String>,
    pub tokens: u64,
    pub local_rows: u64,
    pub remote_rows_sent: u64,
    pub remote_rows_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub dropped: u64,
    #[serde(default)]
    pub host_upload_bytes: u64,
    #[serde(default)]
    pub host_readback_bytes: u64,
    #[serde(default)]
    pub gpu_submits: u64,
    #[serde(default)]
    pub gpu_waits: u64,
    /// Sum of each stage's wall time over all calls, in seconds.
    pub times: StageTimes,
}

impl LayerMetrics {
    /// Add one call's statistics; `gpu` says which engine the policy chose.
    pub fn record(&mut self, s: &ForwardStats, gpu: bool) {
        self.rank = s.rank;
        self.calls += 1;
        if gpu {
            self.gpu_calls += 1;
        } else {
            self.cpu_calls += 1;
        }
        self.fallbacks += s.fallbacks as u64;
        if s.fallback_error.is_some() {
            self.last_fallback_error.clone_from(&s.fallback_error);
        }
        self.tokens += s.tokens as u64;
        self.local_rows += s.local_rows as u64;
        self.remote_rows_sent += s.remote_rows_sent as u64;
        self.remote_rows_received += s.remote_rows_received as u64;
        self.bytes_sent += s.bytes_sent as u64;
        self.bytes_received += s.bytes_received as u64;
        self.dropped += s.dropped as u64;
        self.host_upload_bytes += s.host_upload_bytes;
        self.host_readback_bytes += s.host_readback_bytes;
        self.gpu_submits += s.gpu_submits;
        self.gpu_waits += s.gpu_waits;
        let t = &mut self.times;
        let u = &s.times;
        t.route += u.route;
        t.plan += u.plan;
        t.pack += u.pack;
        t.exchange += u.exchange;
        t.scatter += u.scatter;
        t.experts += u.experts;
        t.gather += u.gather;
        t.exchange_back += u.exchange_back;
        t.combine += u.combine;
        t.shared += u.shared;
    }
}
