//! Shared pieces of the moe-ep tools: model presets, timing summaries, table printing.

use moe_ep::{DType, MoeConfig};
use serde::Serialize;

/// A named layer shape after a real model.
#[derive(Debug, Clone, Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// What differs from the real model, if anything.
    pub note: &'static str,
}

/// Presets after public model configs (config.json of each family).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "deepseek-v2-lite",
        num_experts: 64,
        hidden: 2048,
        intermediate: 1408,
        top_k: 6,
        norm_topk_prob: false,
        note: "routed experts only; softmax routing without group limit",
    },
    Preset {
        name: "qwen3-30b-a3b",
        num_experts: 128,
        hidden: 2048,
        intermediate: 768,
        top_k: 8,
        norm_topk_prob: true,
        note: "",
    },
    Preset {
        name: "mixtral-8x7b",
        num_experts: 8,
        hidden: 4096,
        intermediate: 14336,
        top_k: 2,
        norm_topk_prob: true,
        note: "",
    },
    Preset {
        name: "deepseek-v3-scaled",
        num_experts: 32,
        hidden: 7168,
        intermediate: 2048,
        top_k: 8,
        norm_topk_prob: true,
        note: "256 experts scaled to 32 so bf16 weights fit in memory (2.8 GB); softmax instead of sigmoid routing",
    },
    Preset {
        name: "tiny",
        num_experts: 16,
        hidden: 256,
        intermediate: 512,
        top_k: 4,
        norm_topk_prob: true,
        note: "for smoke runs",
    },
];

/// Find a preset by name; the error lists the known names.
pub fn preset(name: &str) -> Result<&'static Preset, String> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        format!("unknown config {name:?}; known: {}", PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))
    })
}

impl Preset {
    pub fn config(&self, act: DType, weight: DType) -> MoeConfig {
        MoeConfig::new(self.num_experts, self.hidden, self.intermediate, self.top_k)
            .with_norm_topk_prob(self.norm_topk_prob)
            .with_dtypes(act, weight)
    }
}

/// Median of a non-empty sample (the mean of the two middle values for even sizes).
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { 0.5 * (s[m - 1] + s[m]) }
}

/// Human time: `812 us`, `3.41 ms`, `1.20 s`.
pub fn fmt_time(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.0} us", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// Install a `tracing` subscriber that honours `RUST_LOG` (off by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
}
