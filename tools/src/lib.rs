//! Shared pieces of the moe-ep tools: model presets, timing summaries, table printing.

pub mod plot;

use moe_ep::{DType, Group, MoeConfig, RouterConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A named layer shape after a real model.
#[derive(Debug, Clone, Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub num_experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// `softmax` (top-k over all experts) or `deepseek-v3` (sigmoid scores, selection bias,
    /// 8 groups scored by their top two, 4 kept, weights scaled by 2.5).
    pub routing: &'static str,
    /// Shared expert intermediate dimension (0: none) and whether it is gated (Qwen2-MoE).
    pub shared_intermediate: usize,
    pub shared_gated: bool,
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
        routing: "softmax",
        shared_intermediate: 2816,
        shared_gated: false,
        note: "routing greedy softmax (V2-Lite has no group limit); shared experts 2 x 1408",
    },
    Preset {
        name: "qwen3-30b-a3b",
        num_experts: 128,
        hidden: 2048,
        intermediate: 768,
        top_k: 8,
        norm_topk_prob: true,
        routing: "softmax",
        shared_intermediate: 0,
        shared_gated: false,
        note: "",
    },
    Preset {
        name: "mixtral-8x7b",
        num_experts: 8,
        hidden: 4096,
        intermediate: 14336,
        top_k: 2,
        norm_topk_prob: true,
        routing: "softmax",
        shared_intermediate: 0,
        shared_gated: false,
        note: "",
    },
    Preset {
        name: "deepseek-v3-scaled",
        num_experts: 32,
        hidden: 7168,
        intermediate: 2048,
        top_k: 8,
        norm_topk_prob: true,
        routing: "deepseek-v3",
        shared_intermediate: 2048,
        shared_gated: false,
        note: "256 experts scaled to 32 so bf16 weights fit in memory (2.8 GB routed + 88 MB shared); V3 routing with 8 groups of 4 experts, 4 kept",
    },
    Preset {
        name: "tiny",
        num_experts: 16,
        hidden: 256,
        intermediate: 512,
        top_k: 4,
        norm_topk_prob: true,
        routing: "softmax",
        shared_intermediate: 0,
        shared_gated: false,
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
        let mut c = MoeConfig::new(self.num_experts, self.hidden, self.intermediate, self.top_k)
            .with_norm_topk_prob(self.norm_topk_prob)
            .with_dtypes(act, weight);
        if self.routing == "deepseek-v3" {
            c = c.with_router(RouterConfig::deepseek_v3(8, 4, 2.5));
        }
        if self.shared_intermediate > 0 {
            c = c.with_shared_expert(self.shared_intermediate, self.shared_gated);
        }
        c
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
/// `RUST_LOG` filters (default `warn`); `MOE_EP_SPANS=1` also prints each span's busy and idle
/// time when it closes (a host-side profile of a call's stages).
pub fn init_tracing() {
    let spans = if std::env::var_os("MOE_EP_SPANS").is_some() {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_span_events(spans)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// The group of an MPI job (`mpirun -n W tool --group mpi`), when the tools are built with
/// `--features mpi`; without it, an error that says how to build them.
#[cfg(feature = "mpi")]
pub fn mpi_group(tool: &str) -> Result<moe_ep_mpi::MpiGroup, String> {
    moe_ep_mpi::MpiGroup::init(std::time::Duration::from_secs(600)).map_err(|e| format!("{tool}: {e}"))
}

/// See the `mpi` feature's version: this build has no MPI.
#[cfg(not(feature = "mpi"))]
pub fn mpi_group(tool: &str) -> Result<moe_ep::LocalGroup, String> {
    Err(format!("this {tool} was built without MPI: cargo build --release -p moe-ep-tools --features mpi"))
}

/// Every rank's `mine` on every rank, in rank order (JSON over the group: sizes, then the
/// bytes padded to the largest).
pub fn gather_json<G: Group, T: Serialize + DeserializeOwned>(g: &G, mine: &T) -> Result<Vec<T>, String> {
    let bytes = serde_json::to_vec(mine).map_err(|e| e.to_string())?;
    let lens = g.all_gather_u64(&[bytes.len() as u64]).map_err(|e| e.to_string())?;
    let max = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut padded = bytes;
    padded.resize(max, b' ');
    let all = g.all_gather(&padded).map_err(|e| e.to_string())?;
    all.chunks(max.max(1))
        .zip(&lens)
        .map(|(c, &l)| serde_json::from_slice(&c[..l as usize]).map_err(|e| e.to_string()))
        .collect()
}

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`; `None` where
/// that file does not exist).
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Human bytes: `812.0 kB`, `3.4 MB`, `1.20 GB`.
pub fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.1} kB", b as f64 / 1e3),
    }
}

/// What `--weights` asks for: dense weights of a dtype, or a packed format (`q4`, `q8`: MLX
/// affine 4 or 8 bits in groups of 64 with bf16 scales, mlx-lm's default group; `q4g32`,
/// `q8g128`, ...: another group; `mxfp4`; `fp8`: E4M3 with 128 x 128 block scales).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightsSpec {
    Dense(DType),
    Packed(moe_ep::QuantFormat),
}

impl std::str::FromStr for WeightsSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use moe_ep::QuantFormat;
        if let Ok(d) = s.parse::<DType>() {
            return Ok(WeightsSpec::Dense(d));
        }
        let bad = || {
            format!("--weights {s:?}: expected f32, f16, bf16, q4, q8, q4g32 (q{{4,8}}g{{32,64,128}}), mxfp4 or fp8")
        };
        let f = match s {
            "mxfp4" => QuantFormat::Mxfp4,
            "fp8" => QuantFormat::fp8((128, 128)).map_err(|e| e.to_string())?,
            _ => {
                let rest = s.strip_prefix('q').ok_or_else(bad)?;
                let (bits, group) = rest.split_once('g').unwrap_or((rest, "64"));
                let (bits, group) = (bits.parse().map_err(|_| bad())?, group.parse().map_err(|_| bad())?);
                QuantFormat::affine(bits, group, DType::BF16).map_err(|e| e.to_string())?
            }
        };
        Ok(WeightsSpec::Packed(f))
    }
}

impl std::fmt::Display for WeightsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsSpec::Dense(d) => write!(f, "{d}"),
            WeightsSpec::Packed(q) => write!(f, "{q}"),
        }
    }
}

impl WeightsSpec {
    /// The dtype of the dense weights beside the experts (router, shared expert): bf16 for
    /// packed experts.
    pub fn dense_dtype(&self) -> DType {
        match self {
            WeightsSpec::Dense(d) => *d,
            WeightsSpec::Packed(_) => DType::BF16,
        }
    }

    /// Bytes one expert's three matrices of `d x f` hold (packed: values and scales), what a
    /// call streams per active expert.
    pub fn expert_bytes(&self, d: usize, f: usize) -> usize {
        match self {
            WeightsSpec::Dense(dt) => 3 * d * f * dt.size(),
            WeightsSpec::Packed(q) => 2 * q.bytes(f, d) + q.bytes(d, f),
        }
    }

    /// Random experts `ids` of `cfg` in this kind (packed: [`moe_ep::testing::random::packed_experts`]).
    pub fn experts(&self, cfg: &MoeConfig, seed: u64, ids: &[usize]) -> Vec<moe_ep::ExpertWeights> {
        match self {
            WeightsSpec::Dense(_) => moe_ep::testing::random::experts(cfg, seed, ids),
            WeightsSpec::Packed(q) => moe_ep::testing::random::packed_experts(cfg, *q, seed, ids),
        }
    }
}
