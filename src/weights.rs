//! Expert weights.

use crate::config::MoeConfig;
use crate::error::Result;
use crate::tensor::Tensor;

/// The three matrices of one SwiGLU expert, in Hugging Face layout `[out, in]`:
/// `out = down( silu(gate · h) * (up · h) )`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[F, D]` (Mixtral `w1`, Qwen/DeepSeek `gate_proj`).
    pub gate: Tensor,
    /// `[F, D]` (Mixtral `w3`, `up_proj`).
    pub up: Tensor,
    /// `[D, F]` (Mixtral `w2`, `down_proj`).
    pub down: Tensor,
}

impl ExpertWeights {
    /// Check shapes and dtype against `config`; `name` goes into the message.
    pub fn validate(&self, config: &MoeConfig, name: &str) -> Result<()> {
        let (d, f, dt) = (config.hidden, config.intermediate, config.weight_dtype);
        let check = |t: &Tensor, what: &str, rows: usize, cols: usize| {
            t.expect(&format!("{name}.{what}"), dt, Some(rows), cols)
        };
        check(&self.gate, "gate", f, d)?;
        check(&self.up, "up", f, d)?;
        check(&self.down, "down", d, f)?;
        Ok(())
    }

    /// Bytes of the three matrices.
    pub fn bytes(&self) -> usize {
        self.gate.as_bytes().len() + self.up.as_bytes().len() + self.down.as_bytes().len()
    }
}

/// Check a router (gate) weight: `[E, D]` in the weight dtype.
pub fn validate_router(gate: &Tensor, config: &MoeConfig) -> Result<()> {
    gate.expect("router weight", config.weight_dtype, Some(config.num_experts), config.hidden)
}

/// One rank's expert weights as a unit that engines may keep copies of (a GPU engine uploads
/// them once), identified by an id unique in the process.
#[derive(Debug)]
pub struct ExpertSet {
    id: u64,
    weights: Vec<ExpertWeights>,
}

impl ExpertSet {
    /// Wrap `weights` (local experts in increasing global id) under a fresh id.
    pub fn new(weights: Vec<ExpertWeights>) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ExpertSet { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), weights }
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
}

impl std::ops::Deref for ExpertSet {
    type Target = [ExpertWeights];
    fn deref(&self) -> &[ExpertWeights] {
        &self.weights
    }
}
