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

/// How router logits become expert scores (see [`RouterConfig`] for the whole order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// `s = exp(l - max l) / sum exp(l - max l)` over all `E` experts (Mixtral, Qwen,
    /// DeepSeek-V2, OLMoE, ERNIE, DBRX). The default.
    #[default]
    Softmax,
    /// `s = 1 / (1 + exp(-l))` of each logit on its own (DeepSeek-V3, GLM-4.5, MiniMax-M2,
    /// Llama 4).
    Sigmoid,
    /// Selection on the logits themselves; the `k` chosen logits' softmax gives the weights,
    /// `w_j = exp(l_j - max) / sum_k exp(l_k - max)` (gpt-oss). No score exists for the
    /// experts left out.
    SoftmaxTopK,
}

/// How group-limited routing scores a group of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The group's largest selection key (DeepSeek-V2 `group_limited_greedy`). The default.
    #[default]
    Max,
    /// The sum of the group's two largest selection keys (DeepSeek-V3 `noaux_tc`, GLM-4.5).
    TopTwoSum,
}

/// Routing rules beyond top-k, identical on every rank. The default is plain softmax top-k.
///
/// For one token `x` (`[D]`) with router weight `W` (`[E, D]`) and, when the rules use one,
/// the router's per-expert bias vector `b` (`[E]`, [`crate::LayerWeights::selection_bias`]),
/// in this exact order, every step in f32 (the CPU router, [`crate::model::router::top_k`],
/// computes exactly this; a GPU router must reproduce its ids):
///
/// 1. **logits** `l[e] = sum_c x[c] * W[e, c]` accumulated in f32 (inputs widened to f32),
///    then `l[e] += b[e]` when `logit_bias` (gpt-oss's `router.bias`).
/// 2. **scores** `s[e]` from the logits by [`Scoring`]: softmax over all `E` (max subtracted),
///    sigmoid, or none yet (`SoftmaxTopK`).
/// 3. **selection keys** `key[e] = s[e] + b[e]` when `selection_bias` (DeepSeek-V3's
///    `e_score_correction_bias`: used for choosing only, never in a weight); otherwise
///    `key[e] = l[e]` when there are no groups or groups are scored by `Max` (softmax and
///    sigmoid are monotonic, so the logits rank exactly as the scores would, without the ties
///    that rounding the scores creates) and always for `SoftmaxTopK`; otherwise (`TopTwoSum`
///    groups without a bias) `key[e] = s[e]`.
/// 4. **groups** (`n_group > 1`): experts form `n_group` equal groups of consecutive ids;
///    a group's score is its largest key (`Max`) or the sum of its two largest (`TopTwoSum`,
///    computed as `a + b` with `a >= b` the two largest); the `topk_group` groups with the
///    highest score are kept (ties to the lower group id), every key outside them becomes
///    `-inf`.
/// 5. **top-k** by key, largest first, ties to the lower expert id; a `-inf` key is never
///    chosen while a finite one remains.
/// 6. **weights** `w_j = s[id_j]` (the score, never the bias); for `SoftmaxTopK`,
///    `w_j = exp(l_j - l_max) / sum_i exp(l_i - l_max)` over the `k` chosen logits (f32,
///    summed in slot order).
/// 7. **renormalisation** when [`MoeConfig::norm_topk_prob`]: `d = (sum_j w_j^p)^(1/p)`
///    with `p = norm_p` (`p = 1`: the plain sum `w_0 + w_1 + ...` in slot order, which is
///    what every family but DBRX uses), then `d = d + norm_eps`, then `d = max(d, norm_min)`,
///    then `w_j = w_j / d`.
/// 8. **scaling** `w_j = w_j * routed_scaling_factor` (skipped when the factor is 1).
///
/// The combine then sums `w_j * expert_j(x)`; with `weights_on_input` (Llama 4) the weight
/// scales the expert's input instead, `expert_j(w_j * x)` (the product in f32, rounded once
/// to the activation dtype, as the rows travel in it), summed with weight 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    pub scoring: Scoring,
    /// Expert groups (1: no grouping).
    pub n_group: usize,
    /// Groups kept per token (`1..=n_group`).
    pub topk_group: usize,
    pub group_score: GroupScore,
    /// The router's bias vector is added to the scores for selection only (step 3).
    pub selection_bias: bool,
    /// The router's bias vector is added to the logits (step 1; gpt-oss's `router.bias`).
    /// At most one of `selection_bias` and `logit_bias`.
    pub logit_bias: bool,
    /// Factor on every routed weight (DeepSeek's `routed_scaling_factor`; 1 leaves them).
    pub routed_scaling_factor: f32,
    /// The `p` of the renormalisation's p-norm (1: the sum; DBRX's
    /// `moe_normalize_expert_weights`). Finite, positive.
    pub norm_p: f32,
    /// Added to the renormalisation's denominator (DeepSeek-V3 and GLM-4.5: 1e-20). Finite, >= 0.
    pub norm_eps: f32,
    /// Lower bound of the renormalisation's denominator (ERNIE-4.5's `moe_norm_min`). Finite, >= 0.
    pub norm_min: f32,
    /// The routing weight scales the expert's input, not its output (Llama 4).
    pub weights_on_input: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            scoring: Scoring::Softmax,
            n_group: 1,
            topk_group: 1,
            group_score: GroupScore::Max,
            selection_bias: false,
            logit_bias: false,
            routed_scaling_factor: 1.0,
            norm_p: 1.0,
            norm_eps: 0.0,
            norm_min: 0.0,
            weights_on_input: false,
        }
    }
}

impl RouterConfig {
    /// DeepSeek-V3's rules (`noaux_tc`): sigmoid scores, a per-expert selection bias, `n_group`
    /// groups scored by the sum of their two best, `topk_group` kept, weights scaled by
    /// `routed_scaling_factor` (renormalisation is `MoeConfig::norm_topk_prob`, whose
    /// denominator gets transformers' `+ 1e-20`).
    pub fn deepseek_v3(n_group: usize, topk_group: usize, routed_scaling_factor: f32) -> Self {
        RouterConfig {
            scoring: Scoring::Sigmoid,
            n_group,
            topk_group,
            group_score: GroupScore::TopTwoSum,
            selection_bias: true,
            routed_scaling_factor,
            norm_eps: 1e-20,
            ..Default::default()
        }
    }

    /// gpt-oss's rules: the router's bias added to the logits, top-k on the logits, softmax
    /// over the chosen k (pair with `norm_topk_prob = false`: the softmax already sums to 1).
    pub fn gpt_oss() -> Self {
        RouterConfig { scoring: Scoring::SoftmaxTopK, logit_bias: true, ..Default::default() }
    }

    /// Whether the rules use the router's per-expert bias vector (on the logits or for selection).
    pub fn uses_bias(&self) -> bool {
        self.selection_bias || self.logit_bias
    }

    /// Check the rules against `num_experts` and `top_k`: groups divide the experts, the kept
    /// groups hold at least `top_k` experts, the constants are finite and in range, at most
    /// one use of the bias, no groups or selection bias with `SoftmaxTopK`.
    pub fn validate(&self, num_experts: usize, top_k: usize) -> Result<()> {
        if self.n_group == 0 || !num_experts.is_multiple_of(self.n_group) {
            return Err(Error::invalid(format!(
                "n_group = {} must be positive and divide num_experts = {}",
                self.n_group, num_experts
            )));
        }
        let per_group = num_experts / self.n_group;
        if self.topk_group == 0 || self.topk_group > self.n_group || self.topk_group.saturating_mul(per_group) < top_k {
            return Err(Error::invalid(format!(
                "topk_group = {} must be in 1..={} and keep at least top_k = {} experts ({} per group)",
                self.topk_group, self.n_group, top_k, per_group
            )));
        }
        if self.n_group > 1 && self.group_score == GroupScore::TopTwoSum && per_group < 2 {
            return Err(Error::invalid(format!(
                "group score top_two_sum needs at least 2 experts per group, got {per_group}"
            )));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(Error::invalid(format!(
                "routed_scaling_factor {} must be finite and positive",
                self.routed_scaling_factor
            )));
        }
        if !(self.norm_p.is_finite() && self.norm_p > 0.0) {
            return Err(Error::invalid(format!("norm_p {} must be finite and positive", self.norm_p)));
        }
        for (name, v) in [("norm_eps", self.norm_eps), ("norm_min", self.norm_min)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!("{name} {v} must be finite and non-negative")));
            }
        }
        if self.selection_bias && self.logit_bias {
            return Err(Error::invalid("the router's bias is either for selection or on the logits, not both"));
        }
        if self.scoring == Scoring::SoftmaxTopK && (self.n_group > 1 || self.selection_bias) {
            return Err(Error::invalid(
                "softmax over the chosen k selects on the logits: no groups or selection bias with it",
            ));
        }
        Ok(())
    }

    /// The rules as named integers for the agreement round.
    fn fingerprint_fields(&self) -> [(&'static str, u64); 11] {
        [
            ("scoring", self.scoring as u64),
            ("n_group", self.n_group as u64),
            ("topk_group", self.topk_group as u64),
            ("group_score", self.group_score as u64),
            ("selection_bias", self.selection_bias as u64),
            ("logit_bias", self.logit_bias as u64),
            ("routed_scaling_factor", self.routed_scaling_factor.to_bits() as u64),
            ("norm_p", self.norm_p.to_bits() as u64),
            ("norm_eps", self.norm_eps.to_bits() as u64),
            ("norm_min", self.norm_min.to_bits() as u64),
            ("weights_on_input", self.weights_on_input as u64),
        ]
    }
}

/// The gated activation of every expert (routed and shared): what `a = act(g, u)` is, with
/// `g = x·Wg^T (+ bg)` and `u = x·Wu^T (+ bu)`; the expert's output is `a·Wd^T (+ bd)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU: `silu(g) * u = g / (1 + exp(-g)) * u` (Mixtral, Qwen, DeepSeek and most
    /// families). The default.
    #[default]
    Silu,
    /// gpt-oss's clamped SwiGLU: `g' = min(g, limit)`, `u' = clamp(u, -limit, limit)`,
    /// `a = (u' + 1) * g' * sigmoid(alpha * g')` (transformers' `GptOssExperts`: alpha 1.702,
    /// limit `swiglu_limit` = 7).
    ClampedSwiglu { alpha: f32, limit: f32 },
}

impl Activation {
    /// `act(g, u)` in f32, as the engines compute it (the CPU engine calls exactly this; GPU
    /// kernels mirror it).
    #[inline]
    pub fn apply(&self, g: f32, u: f32) -> f32 {
        match *self {
            Activation::Silu => g / (1.0 + (-g).exp()) * u,
            Activation::ClampedSwiglu { alpha, limit } => {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                (u + 1.0) * (g / (1.0 + (-alpha * g).exp()))
            }
        }
    }

    /// `g[i] = act(g[i], u[i])` over two equally long slices.
    #[inline]
    pub fn apply_slice(&self, g: &mut [f32], u: &[f32]) {
        match *self {
            Activation::Silu => {
                for (a, &b) in g.iter_mut().zip(u) {
                    *a = *a / (1.0 + (-*a).exp()) * b;
                }
            }
            act => {
                for (a, &b) in g.iter_mut().zip(u) {
                    *a = act.apply(*a, b);
                }
            }
        }
    }

    /// Check the constants: finite, `limit > 0`.
    pub fn validate(&self) -> Result<()> {
        if let Activation::ClampedSwiglu { alpha, limit } = *self
            && !(alpha.is_finite() && limit.is_finite() && limit > 0.0)
        {
            return Err(Error::invalid(format!(
                "clamped SwiGLU needs finite alpha and a positive finite limit (got alpha {alpha}, limit {limit})"
            )));
        }
        Ok(())
    }

    /// `(kind, alpha bits, limit bits)` for the agreement round.
    fn fingerprint(&self) -> (u64, u64, u64) {
        match *self {
            Activation::Silu => (0, 0, 0),
            Activation::ClampedSwiglu { alpha, limit } => (1, alpha.to_bits() as u64, limit.to_bits() as u64),
        }
    }
}

/// A shared expert: one SwiGLU MLP every token goes through on its own rank, added to the
/// routed experts' sum (Qwen2-MoE's `shared_expert`, DeepSeek's `shared_experts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExpertConfig {
    /// Its intermediate dimension (DeepSeek: `n_shared_experts * moe_intermediate_size`).
    pub intermediate: usize,
    /// Scaled per token by `sigmoid(x · g)` with a `[1, D]` gate weight (Qwen2-MoE's
    /// `shared_expert_gate`); added as is otherwise (DeepSeek).
    pub gated: bool,
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
    /// Dtype of expert weights (and of the router's, which may also be f32).
    pub weight_dtype: DType,
    /// Dropless (default) or a capacity limit.
    pub capacity: Capacity,
    /// Batch-invariant results: a token's output is bitwise the same whatever other tokens
    /// share its batch and whatever the world size. The layer then runs every call on one
    /// backend (never switching between CPU and GPU by batch size) and engines use kernels
    /// with one fixed reduction order. Off by default.
    #[serde(default)]
    pub deterministic: bool,
    /// Scoring, group-limited selection, selection bias and weight scaling.
    #[serde(default)]
    pub router: RouterConfig,
    /// A shared expert computed on every rank for its own tokens, if the model has one.
    #[serde(default)]
    pub shared_expert: Option<SharedExpertConfig>,
    /// The experts' gated activation (routed and shared alike).
    #[serde(default)]
    pub activation: Activation,
    /// Every routed expert has biases on its three projections (gpt-oss): see
    /// [`crate::model::weights::ExpertBias`].
    #[serde(default)]
    pub expert_bias: bool,
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
            router: RouterConfig::default(),
            shared_expert: None,
            activation: Activation::Silu,
            expert_bias: false,
        }
    }

    /// Use `activation` in every expert.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Routed experts with (`true`) or without biases on their projections.
    pub fn with_expert_bias(mut self, on: bool) -> Self {
        self.expert_bias = on;
        self
    }

    pub fn with_router(mut self, router: RouterConfig) -> Self {
        self.router = router;
        self
    }

    /// Add a shared expert of intermediate dimension `intermediate`, gated or not.
    pub fn with_shared_expert(mut self, intermediate: usize, gated: bool) -> Self {
        self.shared_expert = Some(SharedExpertConfig { intermediate, gated });
        self
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
        self.router.validate(self.num_experts, self.top_k)?;
        self.activation.validate()?;
        if let Some(s) = self.shared_expert
            && s.intermediate == 0
        {
            return Err(Error::invalid("the shared expert's intermediate dimension must be positive"));
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
        let act = self.activation.fingerprint();
        let mut v = vec![
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
            ("shared expert intermediate", self.shared_expert.map_or(0, |s| s.intermediate as u64)),
            ("shared expert gated", self.shared_expert.is_some_and(|s| s.gated) as u64),
            ("activation", act.0),
            ("activation alpha", act.1),
            ("activation limit", act.2),
            ("expert_bias", self.expert_bias as u64),
        ];
        v.extend(self.router.fingerprint_fields());
        v
    }
}
