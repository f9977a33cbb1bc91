//! Expert weights.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::{Activation, MoeConfig};
use crate::model::quant::{PackedMatrix, WeightKind};
use crate::tensor::Tensor;

/// One weight matrix `[out, in]`: plain values ([`Tensor`] of f32, f16 or bf16) or packed
/// ([`PackedMatrix`]: MLX affine, MXFP4, FP8), kept as the files store it.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    Dense(Tensor),
    Packed(PackedMatrix),
}

impl Weight {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Weight::Dense(t) => t.rows(),
            Weight::Packed(p) => p.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Weight::Dense(t) => t.cols(),
            Weight::Packed(p) => p.cols(),
        }
    }

    /// The dtype or packed format.
    pub fn kind(&self) -> WeightKind {
        match self {
            Weight::Dense(t) => WeightKind::Dense(t.dtype()),
            Weight::Packed(p) => WeightKind::Packed(p.format()),
        }
    }

    /// The plain values, `None` when packed.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Packed(_) => None,
        }
    }

    /// The packed matrix, `None` when dense.
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            Weight::Packed(p) => Some(p),
            Weight::Dense(_) => None,
        }
    }

    /// The plain values, or an error naming `what` for a packed matrix (for code that
    /// computes on dense weights only).
    pub fn dense_or_err(&self, what: &str) -> Result<&Tensor> {
        self.dense()
            .ok_or_else(|| Error::invalid(format!("{what} is packed ({}); this path takes dense weights", self.kind())))
    }

    /// Bytes as held (packed: values and scales).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.as_bytes().len(),
            Weight::Packed(p) => p.bytes(),
        }
    }

    /// The bytes that define the matrix (dense values; packed words, scales and biases), for
    /// fingerprints.
    pub fn raw_parts(&self) -> Vec<&[u8]> {
        match self {
            Weight::Dense(t) => vec![t.as_bytes()],
            Weight::Packed(p) => {
                let mut v: Vec<&[u8]> = vec![bytemuck::cast_slice(p.words())];
                match p.scales() {
                    crate::model::quant::Scales::Affine { scales, biases } => {
                        v.extend([scales.as_bytes(), biases.as_bytes()])
                    }
                    crate::model::quant::Scales::E8m0(s) => v.push(s),
                    crate::model::quant::Scales::Block(s) => v.push(bytemuck::cast_slice(s)),
                }
                v
            }
        }
    }

    /// Every value as f32, row-major (packed ones decoded).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Weight::Dense(t) => t.to_f32_vec(),
            Weight::Packed(p) => p.to_tensor(DType::F32).to_f32_vec(),
        }
    }

    /// Check the shape (`[rows, cols]`) and kind, with a message naming `what`.
    pub fn expect(&self, what: &str, kind: WeightKind, rows: usize, cols: usize) -> Result<()> {
        if let (Weight::Dense(t), WeightKind::Dense(dt)) = (self, kind) {
            return t.expect(what, dt, Some(rows), cols);
        }
        if self.kind() != kind {
            return Err(Error::invalid(format!("{what} is {}, expected {kind}", self.kind())));
        }
        if self.rows() != rows || self.cols() != cols {
            return Err(Error::invalid(format!(
                "{what} has shape [{}, {}], expected [{rows}, {cols}]",
                self.rows(),
                self.cols()
            )));
        }
        Ok(())
    }
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl From<PackedMatrix> for Weight {
    fn from(p: PackedMatrix) -> Self {
        Weight::Packed(p)
    }
}

/// The three matrices of one SwiGLU expert, in Hugging Face layout `[out, in]`:
/// `out = down( silu(gate · h) * (up · h) )`. Each is dense or packed ([`Weight`]): a
/// checkpoint's quantized experts stay packed (MLX affine, MXFP4, FP8), and one projection may
/// be packed while another is dense (mlx-lm leaves a matrix dense when its inputs are not
/// whole groups).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[F, D]` (Mixtral `w1`, Qwen/DeepSeek `gate_proj`).
    pub gate: Weight,
    /// `[F, D]` (Mixtral `w3`, `up_proj`).
    pub up: Weight,
    /// `[D, F]` (Mixtral `w2`, `down_proj`).
    pub down: Weight,
    /// Biases of the three projections, for models whose experts have them (gpt-oss;
    /// `MoeConfig::expert_bias`).
    pub bias: Option<ExpertBias>,
}

/// The biases of one expert's projections, in f32 (checkpoints store them in 16 bits, which
/// widen exactly): `g = x·Wg^T + gate`, `u = x·Wu^T + up`, `y = a·Wd^T + down`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBias {
    /// `[F]`.
    pub gate: Vec<f32>,
    /// `[F]`.
    pub up: Vec<f32>,
    /// `[D]`.
    pub down: Vec<f32>,
}

impl ExpertBias {
    /// Check the lengths (`[F]`, `[F]`, `[D]`) and that every value is finite.
    pub fn validate(&self, d: usize, f: usize, name: &str) -> Result<()> {
        for (v, what, len) in [(&self.gate, "gate", f), (&self.up, "up", f), (&self.down, "down", d)] {
            if v.len() != len {
                return Err(Error::invalid(format!("{name}.{what} bias has {} values, expected {len}", v.len())));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!("{name}.{what} bias {i} is {}", v[i])));
            }
        }
        Ok(())
    }

    /// Bytes of the three vectors.
    pub fn bytes(&self) -> usize {
        4 * (self.gate.len() + self.up.len() + self.down.len())
    }
}

impl ExpertWeights {
    /// SwiGLU weights (dense tensors or packed matrices) without biases.
    pub fn new(gate: impl Into<Weight>, up: impl Into<Weight>, down: impl Into<Weight>) -> Self {
        ExpertWeights { gate: gate.into(), up: up.into(), down: down.into(), bias: None }
    }

    /// The three projections, gate, up, down.
    pub fn projections(&self) -> [&Weight; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// Whether any projection is packed.
    pub fn is_packed(&self) -> bool {
        self.projections().iter().any(|w| w.packed().is_some())
    }

    /// The kinds of gate, up and down.
    pub fn kinds(&self) -> [WeightKind; 3] {
        self.projections().map(Weight::kind)
    }

    /// These weights with projection biases.
    pub fn with_bias(mut self, bias: ExpertBias) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Check shapes and dtype against `config`, and biases exactly when
    /// `config.expert_bias`; `name` goes into the message.
    pub fn validate(&self, config: &MoeConfig, name: &str) -> Result<()> {
        self.validate_shape(config.hidden, config.intermediate, config.weight_dtype, name)?;
        match (&self.bias, config.expert_bias) {
            (Some(b), true) => b.validate(config.hidden, config.intermediate, name),
            (None, false) => Ok(()),
            (Some(_), false) => Err(Error::invalid(format!("{name} has biases but the config's experts have none"))),
            (None, true) => Err(Error::invalid(format!("the config's experts have biases; {name} has none"))),
        }
    }

    /// Check for `gate [f, d]`, `up [f, d]`, `down [d, f]`, dense ones in `dt` (packed ones
    /// in any format), and bias lengths if there are biases.
    pub fn validate_shape(&self, d: usize, f: usize, dt: DType, name: &str) -> Result<()> {
        let check = |w: &Weight, what: &str, rows: usize, cols: usize| {
            let kind = match w {
                Weight::Dense(_) => WeightKind::Dense(dt),
                Weight::Packed(p) => WeightKind::Packed(p.format()),
            };
            w.expect(&format!("{name}.{what}"), kind, rows, cols)
        };
        check(&self.gate, "gate", f, d)?;
        check(&self.up, "up", f, d)?;
        check(&self.down, "down", d, f)?;
        self.bias.as_ref().map_or(Ok(()), |b| b.validate(d, f, name))
    }

    /// Bytes of the three matrices (packed ones as held) and the biases.
    pub fn bytes(&self) -> usize {
        self.projections().iter().map(|w| w.bytes()).sum::<usize>() + self.bias.as_ref().map_or(0, ExpertBias::bytes)
    }
}

/// A shared expert's weights (see [`crate::model::config::SharedExpertConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpert {
    /// `[Fs, D]`, `[Fs, D]`, `[D, Fs]` with `Fs` the shared expert's intermediate dimension.
    pub weights: ExpertWeights,
    /// `[1, D]`: the token's output is scaled by `sigmoid(x · gate)` (Qwen2-MoE); `None` when
    /// the shared expert is not gated (DeepSeek).
    pub gate: Option<Tensor>,
}

impl SharedExpert {
    /// Check against `config.shared_expert`: shapes, dtype, and a gate exactly when gated.
    pub fn validate(&self, config: &MoeConfig) -> Result<()> {
        let Some(sc) = config.shared_expert else {
            return Err(Error::invalid("a shared expert was given but the config has none"));
        };
        let (d, dt) = (config.hidden, config.weight_dtype);
        self.weights.validate_shape(d, sc.intermediate, dt, "shared expert")?;
        match (&self.gate, sc.gated) {
            (Some(g), true) => g.expect("shared expert gate", dt, Some(1), d),
            (None, false) => Ok(()),
            (Some(_), false) => Err(Error::invalid("the shared expert has a gate but the config says ungated")),
            (None, true) => Err(Error::invalid("the config's shared expert is gated but no gate weight was given")),
        }
    }

    pub fn bytes(&self) -> usize {
        self.weights.bytes() + self.gate.as_ref().map_or(0, |g| g.as_bytes().len())
    }
}

/// What one rank holds of a layer: the router (replicated), its selection bias if the routing
/// uses one (replicated), this rank's experts in increasing global id, and the shared expert
/// if the model has one (replicated: every rank runs it on its own tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// `[E, D]`, in the weight dtype or f32.
    pub router: Tensor,
    /// `[E]`: the router's per-expert bias vector, used as the config's
    /// [`crate::RouterConfig`] says: for selection only (`selection_bias`: DeepSeek-V3's
    /// `e_score_correction_bias`, GLM-4.5, MiniMax-M2, ERNIE-4.5) or added to the logits
    /// (`logit_bias`: gpt-oss's `router.bias`).
    pub selection_bias: Option<Vec<f32>>,
    pub experts: Vec<ExpertWeights>,
    pub shared: Option<SharedExpert>,
}

impl LayerWeights {
    /// Router and local experts, no bias, no shared expert.
    pub fn new(router: Tensor, experts: Vec<ExpertWeights>) -> Self {
        LayerWeights { router, selection_bias: None, experts, shared: None }
    }

    pub fn with_selection_bias(mut self, bias: Vec<f32>) -> Self {
        self.selection_bias = Some(bias);
        self
    }

    pub fn with_shared(mut self, shared: SharedExpert) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Check everything but the experts (which the layer checks against its placement): the
    /// router, a bias exactly when the routing uses one (`[E]`, finite), a shared expert
    /// exactly when the config has one.
    pub fn validate_replicated(&self, config: &MoeConfig) -> Result<()> {
        self.validate_router_and_bias(config)?;
        match (&self.shared, config.shared_expert) {
            (Some(s), _) => s.validate(config),
            (None, None) => Ok(()),
            (None, Some(_)) => Err(Error::invalid("the config has a shared expert; no weights were given for it")),
        }
    }

    /// Check the router (`[E, D]`) and a bias exactly when the routing uses one
    /// ([`crate::RouterConfig::uses_bias`]; `[E]`, finite).
    pub fn validate_router_and_bias(&self, config: &MoeConfig) -> Result<()> {
        validate_router(&self.router, config)?;
        match (&self.selection_bias, config.router.uses_bias()) {
            (Some(b), true) => {
                if b.len() != config.num_experts {
                    return Err(Error::invalid(format!(
                        "router bias (selection bias) has {} entries for {} experts",
                        b.len(),
                        config.num_experts
                    )));
                }
                if let Some(i) = b.iter().position(|v| !v.is_finite()) {
                    return Err(Error::invalid(format!("selection bias of expert {i} is {}", b[i])));
                }
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(Error::invalid("a selection bias was given but the config's routing uses none"));
            }
            (None, true) => return Err(Error::invalid("the config's routing uses a selection bias; none was given")),
        }
        Ok(())
    }

    /// Rank `rank`'s expert-parallel share of a whole layer's weights (`self.experts` holding
    /// all `E`): the replicated parts cloned, and only the experts `placement` gives the rank.
    /// Errors when `self` does not hold `placement.num_experts()` experts or `rank` is not in it.
    pub fn ep_share(&self, placement: &crate::model::placement::Placement, rank: usize) -> Result<LayerWeights> {
        if self.experts.len() != placement.num_experts() || rank >= placement.world() {
            return Err(Error::invalid(format!(
                "an EP share needs all {} experts and a rank below {} (got {} experts, rank {rank})",
                placement.num_experts(),
                placement.world(),
                self.experts.len()
            )));
        }
        Ok(LayerWeights {
            router: self.router.clone(),
            selection_bias: self.selection_bias.clone(),
            experts: placement.experts_of(rank).iter().map(|&e| self.experts[e].clone()).collect(),
            shared: self.shared.clone(),
        })
    }

    /// Bytes of every tensor this rank holds.
    pub fn bytes(&self) -> usize {
        self.router.as_bytes().len()
            + self.selection_bias.as_ref().map_or(0, |b| b.len() * 4)
            + self.experts.iter().map(ExpertWeights::bytes).sum::<usize>()
            + self.shared.as_ref().map_or(0, SharedExpert::bytes)
    }
}

/// Check a router (gate) weight: `[E, D]` in the weight dtype, or in f32 (transformers keeps
/// DeepSeek-V3's, GLM-4.5's and ERNIE-4.5's routers in f32 whatever the experts' dtype; the
/// router's logits are computed in f32 either way).
pub fn validate_router(gate: &Tensor, config: &MoeConfig) -> Result<()> {
    let dt = if gate.dtype() == crate::dtype::DType::F32 { gate.dtype() } else { config.weight_dtype };
    gate.expect("router weight", dt, Some(config.num_experts), config.hidden)
}

/// A fresh id for a set of weights engines may keep a copy of, never reused in the process.
pub fn fresh_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One rank's expert weights as a unit that engines may keep copies of (a GPU engine uploads
/// them once), identified by an id unique in the process.
#[derive(Debug)]
pub struct ExpertSet {
    id: u64,
    weights: Vec<ExpertWeights>,
    activation: Activation,
    /// The weights again in the CPU GEMM's panels ([`ExpertSet::with_cpu_gemm_panels`]).
    panels: Option<crate::compute::cpu::panels::SetPanels>,
}

impl ExpertSet {
    /// Wrap `weights` (local experts in increasing global id) under a fresh id, with SwiGLU.
    pub fn new(weights: Vec<ExpertWeights>) -> Self {
        Self::with_activation(weights, Activation::Silu)
    }

    /// Wrap `weights` under a fresh id; every expert applies `activation`.
    pub fn with_activation(weights: Vec<ExpertWeights>, activation: Activation) -> Self {
        ExpertSet { id: fresh_id(), weights, activation, panels: None }
    }

    /// The gated activation every expert of the set applies.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Whether any expert has projection biases.
    pub fn has_bias(&self) -> bool {
        self.weights.iter().any(|w| w.bias.is_some())
    }

    /// The id engines key their copies by; never reused within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The weights, in local expert order.
    pub fn weights(&self) -> &[ExpertWeights] {
        &self.weights
    }

    /// Bytes of every matrix of every expert.
    pub fn bytes(&self) -> usize {
        self.weights.iter().map(ExpertWeights::bytes).sum()
    }

    /// Whether any expert has a packed projection.
    pub fn is_packed(&self) -> bool {
        self.weights.iter().any(ExpertWeights::is_packed)
    }

    /// The set with every expert's weights also packed, once, into the CPU GEMM's panel
    /// layout: the CPU FFN then multiplies experts of many rows (from
    /// [`crate::compute::cpu::ffn::Plan::with_panels`]'s row count) without repacking their
    /// weights on each call, which is most of a GEMM's cost at a few dozen rows an expert.
    /// Costs as much host memory again as the dense weights ([`ExpertSet::panel_bytes`]).
    /// Sets whose projections are not all dense in one dtype (quantized experts) are returned
    /// unchanged. The id stays; results stay within the GEMM's rounding of the unpacked path
    /// (the deterministic mode never uses the GEMM, so its bits do not change).
    pub fn with_cpu_gemm_panels(mut self) -> Self {
        self.panels = crate::compute::cpu::panels::SetPanels::new(&self.weights);
        self
    }

    /// The CPU GEMM panels, if [`ExpertSet::with_cpu_gemm_panels`] made them.
    pub fn cpu_gemm_panels(&self) -> Option<&crate::compute::cpu::panels::SetPanels> {
        self.panels.as_ref()
    }

    /// Host bytes the panels hold (0 without them): about those of the dense weights.
    pub fn panel_bytes(&self) -> usize {
        self.panels.as_ref().map_or(0, |_| self.bytes())
    }
}

impl std::ops::Deref for ExpertSet {
    type Target = [ExpertWeights];
    fn deref(&self) -> &[ExpertWeights] {
        &self.weights
    }
}
