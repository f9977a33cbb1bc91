//! The shape and semantics of one MoE layer, identical on every rank.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest top-k the router supports.
pub const MAX_TOP_K: usize = 16;

/// How many assignments an expert accepts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// Every (token, slot) is computed. The default.
    #[default]
    Dropless,
    /// Each expert takes at most this many rows from each source rank.
    PerExpert(usize),
    /// Each expert takes at most `ceil(factor * N * k / E)` rows from each source rank, where
    /// `N` is that rank's token count for the call (GShard's per-group capacity).
    Factor(f32),
}

impl Capacity {
    /// Rows each expert accepts from a source rank holding `n_tokens` tokens; `None` means no limit.
    pub fn limit(&self, n_tokens: usize, top_k: usize, num_experts: usize) -> Option<usize> {
        match *self {
            Capacity::Dropless => None,
            Capacity::PerExpert(c) => Some(c),
            Capacity::Factor(f) => Some(((f as f64) * (n_tokens * top_k) as f64 / num_experts as f64).ceil() as usize),
        }
    }
}

/// Shapes and options of an MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Number of routed experts, `E`.
    pub num_experts: usize,
    /// Model (hidden) dimension, `D`.
    pub hidden: usize,
    /// Expert intermediate dimension, `F`.
    pub intermediate: usize,
    /// Experts per token, `k` (1..=16).
    pub top_k: usize,
    /// Renormalise the k selected weights to sum to one (Mixtral; Qwen `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Dtype of activations (input, exchanged rows, output).
    pub act_dtype: DType,
    /// Dtype of expert and router weights.
    pub weight_dtype: DType,
    /// Dropless (default) or a capacity limit.
    pub capacity: Capacity,
    /// Batch-invariant results: a token's output is bitwise the same whatever other tokens
    /// share its batch and whatever the world size. The layer then runs every call on one
    /// backend (never switching between CPU and GPU by batch size) and engines use kernels
    /// with one fixed reduction order. Off by default.
    #[serde(default)]
    pub deterministic: bool,
}

impl MoeConfig {
    /// A dropless config with f32 activations and weights and renormalised top-k weights.
    pub fn new(num_experts: usize, hidden: usize, intermediate: usize, top_k: usize) -> Self {
        MoeConfig {
            num_experts,
            hidden,
            intermediate,
            top_k,
            norm_topk_prob: true,
            act_dtype: DType::F32,
            weight_dtype: DType::F32,
            capacity: Capacity::Dropless,
            deterministic: false,
        }
    }

    pub fn with_dtypes(mut self, act: DType, weight: DType) -> Self {
        self.act_dtype = act;
        self.weight_dtype = weight;
        self
    }

    pub fn with_capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = capacity;
        self
    }

    pub fn with_deterministic(mut self, on: bool) -> Self {
        self.deterministic = on;
        self
    }

    pub fn with_norm_topk_prob(mut self, norm: bool) -> Self {
        self.norm_topk_prob = norm;
        self
    }

    /// Check that the numbers describe a layer that can run.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 || self.hidden == 0 || self.intermediate == 0 {
            return Err(Error::invalid(format!(
                "num_experts, hidden and intermediate must be positive (got E={}, D={}, F={})",
                self.num_experts, self.hidden, self.intermediate
            )));
        }
        if self.num_experts > u32::MAX as usize {
            return Err(Error::invalid("num_experts does not fit in u32"));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K || self.top_k > self.num_experts {
            return Err(Error::invalid(format!(
                "top_k = {} must be in 1..={} and at most num_experts = {}",
                self.top_k,
                MAX_TOP_K.min(self.num_experts),
                self.num_experts
            )));
        }
        if let Capacity::Factor(f) = self.capacity
            && !(f.is_finite() && f > 0.0)
        {
            return Err(Error::invalid(format!("capacity factor {f} must be finite and positive")));
        }
        Ok(())
    }

    /// The fields that must agree across ranks, as named integers (used by the agreement check).
    pub(crate) fn fingerprint_fields(&self) -> Vec<(&'static str, u64)> {
        let (cap_kind, cap_val) = match self.capacity {
            Capacity::Dropless => (0, 0),
            Capacity::PerExpert(c) => (1, c as u64),
            Capacity::Factor(f) => (2, f.to_bits() as u64),
        };
        vec![
            ("num_experts", self.num_experts as u64),
            ("hidden", self.hidden as u64),
            ("intermediate", self.intermediate as u64),
            ("top_k", self.top_k as u64),
            ("norm_topk_prob", self.norm_topk_prob as u64),
            ("act_dtype", self.act_dtype.code()),
            ("weight_dtype", self.weight_dtype.code()),
            ("capacity kind", cap_kind),
            ("capacity value", cap_val),
            ("deterministic", self.deterministic as u64),
        ]
    }
}
