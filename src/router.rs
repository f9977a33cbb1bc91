//! Softmax top-k routing.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::MAX_TOP_K;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The experts chosen for each token and their weights, `[N, k]` row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    /// Tokens.
    pub n: usize,
    /// Slots per token.
    pub k: usize,
    /// Expert id of (token, slot), slot 0 being the first choice.
    pub ids: Vec<u32>,
    /// Combine weight of (token, slot).
    pub weights: Vec<f32>,
}

impl Routing {
    /// Build from explicit ids and weights (for callers with their own router).
    /// Errors when the lengths are not `n * k`. Expert ids are checked against the placement
    /// when the routing is planned.
    pub fn new(n: usize, k: usize, ids: Vec<u32>, weights: Vec<f32>) -> Result<Self> {
        if k == 0 || k > MAX_TOP_K {
            return Err(Error::invalid(format!("top-k {k} must be in 1..={MAX_TOP_K}")));
        }
        if ids.len() != n * k || weights.len() != n * k {
            return Err(Error::invalid(format!(
                "routing for {n} tokens x {k} slots needs {} ids and weights, got {} and {}",
                n * k,
                ids.len(),
                weights.len()
            )));
        }
        Ok(Routing { n, k, ids, weights })
    }

    /// Routing of zero tokens.
    pub fn empty(k: usize) -> Self {
        Routing { n: 0, k, ids: Vec::new(), weights: Vec::new() }
    }
}

/// Router logits `x · Wg^T`, `[N, E]` f32 with f32 accumulation.
///
/// `x` is `[N, D]`, `gate` is `[E, D]`, any dtypes. Errors when the inner dimensions differ.
pub fn router_logits(x: &Tensor, gate: &Tensor) -> Result<Vec<f32>> {
    if x.cols() != gate.cols() {
        return Err(Error::invalid(format!(
            "router: tokens have {} features but the gate weight is [{}, {}]",
            x.cols(),
            gate.rows(),
            gate.cols()
        )));
    }
    let (n, d, e) = (x.rows(), x.cols(), gate.rows());
    let mut logits = vec![0f32; n * e];
    if n == 0 {
        return Ok(logits);
    }
    let xf = x.to_f32_vec();
    let wf = gate.to_f32_vec();
    crate::cpu::gemm::matmul_bt(&xf, &wf, &mut logits, n, d, e);
    Ok(logits)
}

/// Softmax over each row of `logits` (`[N, E]`), then the `k` largest probabilities.
///
/// Ties go to the lower expert id. With `renormalize`, the k weights are divided by their sum
/// (f32), so they sum to one. Errors when `k` is 0, above 16 or above `E`.
pub fn softmax_top_k(logits: &[f32], num_experts: usize, k: usize, renormalize: bool) -> Result<Routing> {
    if k == 0 || k > MAX_TOP_K || k > num_experts {
        return Err(Error::invalid(format!(
            "top-k {k} must be in 1..={} for {num_experts} experts",
            MAX_TOP_K.min(num_experts)
        )));
    }
    if num_experts == 0 || logits.len() % num_experts != 0 {
        return Err(Error::invalid(format!("{} logits do not form rows of {num_experts} experts", logits.len())));
    }
    let n = logits.len() / num_experts;
    let mut ids = vec![0u32; n * k];
    let mut weights = vec![0f32; n * k];
    ids.par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(logits.par_chunks(num_experts))
        .for_each(|((ids, ws), row)| route_one(row, k, renormalize, ids, ws));
    Ok(Routing { n, k, ids, weights })
}

fn route_one(row: &[f32], k: usize, renormalize: bool, ids: &mut [u32], ws: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for &l in row {
        sum += (l - max).exp();
    }
    // Selection by insertion into a sorted list of k: stable, so ties keep the lower id.
    let mut top: [(f32, u32); MAX_TOP_K] = [(f32::NEG_INFINITY, u32::MAX); MAX_TOP_K];
    for (e, &l) in row.iter().enumerate() {
        if l > top[k - 1].0 || top[k - 1].1 == u32::MAX {
            let mut i = k - 1;
            while i > 0 && (l > top[i - 1].0 || top[i - 1].1 == u32::MAX) {
                top[i] = top[i - 1];
                i -= 1;
            }
            top[i] = (l, e as u32);
        }
    }
    for j in 0..k {
        ids[j] = top[j].1;
        ws[j] = (top[j].0 - max).exp() / sum;
    }
    if renormalize {
        let s: f32 = ws.iter().sum();
        for w in ws.iter_mut() {
            *w /= s;
        }
    }
}

/// Route `x` (`[N, D]`) with gate weight `[E, D]`: logits, softmax, top-k.
pub fn route(x: &Tensor, gate: &Tensor, k: usize, renormalize: bool) -> Result<Routing> {
    let logits = router_logits(x, gate)?;
    softmax_top_k(&logits, gate.rows(), k, renormalize)
}
