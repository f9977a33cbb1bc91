//! A plain dense MoE in f64 on one rank: the reference every test compares with.
//!
//! Routing is computed in f64 with the same rules as the library (softmax, top-k with ties to
//! the lower id, optional renormalisation, capacity drops first-choice-first per source rank);
//! every token then goes through its experts and the weighted sum, all in f64.

use crate::config::MoeConfig;
use crate::tensor::Tensor;
use crate::weights::ExpertWeights;

/// Result of the reference on one rank's tokens.
#[derive(Debug, Clone)]
pub struct Reference {
    /// `[N, D]` outputs.
    pub y: Vec<f64>,
    /// `[N, k]` chosen experts.
    pub ids: Vec<u32>,
    /// `[N, k]` weights.
    pub weights: Vec<f64>,
    /// `[N, k]` whether capacity dropped the assignment.
    pub dropped: Vec<bool>,
}

/// Softmax top-k routing in f64 of `x` (`[N, D]`) with gate `[E, D]`.
pub fn route_f64(x: &Tensor, gate: &Tensor, k: usize, renormalize: bool) -> (Vec<u32>, Vec<f64>) {
    let (n, d, e) = (x.rows(), x.cols(), gate.rows());
    let (xs, ws) = (x.to_f64_vec(), gate.to_f64_vec());
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    for t in 0..n {
        let logits: Vec<f64> = (0..e).map(|j| (0..d).map(|c| xs[t * d + c] * ws[j * d + c]).sum()).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut order: Vec<usize> = (0..e).collect();
        // Stable sort: equal logits keep the lower id first.
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).expect("finite logits"));
        let top = &order[..k];
        let mut w: Vec<f64> = top.iter().map(|&j| (logits[j] - max).exp() / z).collect();
        if renormalize {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
        }
        ids.extend(top.iter().map(|&j| j as u32));
        weights.extend(w);
    }
    (ids, weights)
}

/// Capacity drops for one source rank's assignments (`[N, k]` ids), first choice first.
pub fn drops_f64(ids: &[u32], n: usize, cfg: &MoeConfig) -> Vec<bool> {
    let k = cfg.top_k;
    let mut dropped = vec![false; n * k];
    if let Some(cap) = cfg.capacity.limit(n, k, cfg.num_experts) {
        let mut taken = vec![0usize; cfg.num_experts];
        for j in 0..k {
            for t in 0..n {
                let e = ids[t * k + j] as usize;
                if taken[e] < cap {
                    taken[e] += 1;
                } else {
                    dropped[t * k + j] = true;
                }
            }
        }
    }
    dropped
}

/// One SwiGLU expert applied to one row, in f64.
pub fn expert_f64(w: &ExpertWeights, h: &[f64]) -> Vec<f64> {
    let (f, d) = (w.gate.rows(), w.gate.cols());
    let (wg, wu, wd) = (w.gate.to_f64_vec(), w.up.to_f64_vec(), w.down.to_f64_vec());
    let a: Vec<f64> = (0..f)
        .map(|i| {
            let g: f64 = (0..d).map(|c| wg[i * d + c] * h[c]).sum();
            let u: f64 = (0..d).map(|c| wu[i * d + c] * h[c]).sum();
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    (0..d).map(|o| (0..f).map(|i| wd[o * f + i] * a[i]).sum()).collect()
}

/// The dense MoE of one rank's tokens `x` with all `E` experts (`experts[e]` is expert `e`).
pub fn dense_moe(x: &Tensor, gate: &Tensor, experts: &[ExpertWeights], cfg: &MoeConfig) -> Reference {
    let (ids, weights) = route_f64(x, gate, cfg.top_k, cfg.norm_topk_prob);
    dense_moe_routed(x, &ids, &weights, experts, cfg)
}

/// The dense MoE with given routing (`[N, k]` ids and weights).
pub fn dense_moe_routed(
    x: &Tensor,
    ids: &[u32],
    weights: &[f64],
    experts: &[ExpertWeights],
    cfg: &MoeConfig,
) -> Reference {
    let (n, d, k) = (x.rows(), x.cols(), cfg.top_k);
    let dropped = drops_f64(ids, n, cfg);
    let xs = x.to_f64_vec();
    let mut y = vec![0f64; n * d];
    for t in 0..n {
        for j in 0..k {
            if dropped[t * k + j] {
                continue;
            }
            let o = expert_f64(&experts[ids[t * k + j] as usize], &xs[t * d..(t + 1) * d]);
            for c in 0..d {
                y[t * d + c] += weights[t * k + j] * o[c];
            }
        }
    }
    Reference { y, ids: ids.to_vec(), weights: weights.to_vec(), dropped }
}

/// Norm-wise relative error `||got - want|| / ||want||` (0 when both are empty).
pub fn rel_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_error: lengths differ");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}
