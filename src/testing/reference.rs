//! A plain dense MoE in f64 on one rank: the reference every test compares with.
//!
//! Routing is computed in f64 with the same rules as the library (softmax or sigmoid scores,
//! selection bias, group-limited top-k with ties to the lower id, optional renormalisation,
//! scaling, capacity drops first-choice-first per source rank); every token then goes through
//! its experts, the weighted sum and the shared expert, all in f64.

use crate::model::config::{Activation, GroupScore, MoeConfig, Scoring};
use crate::model::weights::{ExpertWeights, SharedExpert};
use crate::tensor::Tensor;

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
    let cfg = MoeConfig::new(gate.rows(), gate.cols(), 1, k).with_norm_topk_prob(renormalize);
    route_f64_config(x, gate, None, &cfg)
}

/// Routing in f64 of `x` (`[N, D]`) with gate `[E, D]` and selection `bias` under `cfg`'s
/// top-k, `norm_topk_prob` and [`crate::model::config::RouterConfig`]: scores (softmax or sigmoid),
/// selection keys (the logit where it ranks as the score does, else score plus bias),
/// group-limited selection, top-k by a stable sort (ties to the lower id), weights = scores,
/// renormalised, scaled.
pub fn route_f64_config(x: &Tensor, gate: &Tensor, bias: Option<&[f32]>, cfg: &MoeConfig) -> (Vec<u32>, Vec<f64>) {
    let (n, d, e, k) = (x.rows(), x.cols(), gate.rows(), cfg.top_k);
    let r = &cfg.router;
    let (xs, ws) = (x.to_f64_vec(), gate.to_f64_vec());
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    let desc = |v: &[f64]| {
        let mut order: Vec<usize> = (0..v.len()).collect();
        // Stable sort: equal values keep the lower index first.
        order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).expect("finite scores"));
        order
    };
    for t in 0..n {
        let logits: Vec<f64> = (0..e).map(|j| (0..d).map(|c| xs[t * d + c] * ws[j * d + c]).sum()).collect();
        let scores: Vec<f64> = match r.scoring {
            Scoring::Softmax => {
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                logits.iter().map(|l| (l - max).exp() / z).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let by_logit = bias.is_none() && (r.n_group == 1 || r.group_score == GroupScore::Max);
        let mut keys: Vec<f64> = (0..e)
            .map(|i| match bias {
                _ if by_logit => logits[i],
                Some(b) => scores[i] + b[i] as f64,
                None => scores[i],
            })
            .collect();
        if r.n_group > 1 {
            let per = e / r.n_group;
            let group_scores: Vec<f64> = keys
                .chunks(per)
                .map(|g| {
                    let o = desc(g);
                    match r.group_score {
                        GroupScore::Max => g[o[0]],
                        GroupScore::TopTwoSum => g[o[0]] + g[o[1]],
                    }
                })
                .collect();
            let kept = &desc(&group_scores)[..r.topk_group];
            for g in (0..r.n_group).filter(|g| !kept.contains(g)) {
                keys[g * per..(g + 1) * per].fill(f64::NEG_INFINITY);
            }
        }
        let top: Vec<usize> = desc(&keys)[..k].to_vec();
        let mut w: Vec<f64> = top.iter().map(|&j| scores[j]).collect();
        if cfg.norm_topk_prob {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
        }
        w.iter_mut().for_each(|v| *v *= r.routed_scaling_factor as f64);
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
    expert_f64_with(w, Activation::Silu, h)
}

/// One expert with activation `act` (and its biases, if it has them) applied to one row, in
/// f64, from the formulas (transformers' `MixtralBlockSparseTop2MLP`, `GptOssExperts`).
pub fn expert_f64_with(w: &ExpertWeights, act: Activation, h: &[f64]) -> Vec<f64> {
    let (f, d) = (w.gate.rows(), w.gate.cols());
    let (wg, wu, wd) = (w.gate.to_f64_vec(), w.up.to_f64_vec(), w.down.to_f64_vec());
    let bias = |v: Option<&Vec<f32>>, i: usize| v.map_or(0.0, |b| b[i] as f64);
    let a: Vec<f64> = (0..f)
        .map(|i| {
            let g: f64 = (0..d).map(|c| wg[i * d + c] * h[c]).sum::<f64>() + bias(w.bias.as_ref().map(|b| &b.gate), i);
            let u: f64 = (0..d).map(|c| wu[i * d + c] * h[c]).sum::<f64>() + bias(w.bias.as_ref().map(|b| &b.up), i);
            match act {
                Activation::Silu => g / (1.0 + (-g).exp()) * u,
                Activation::ClampedSwiglu { alpha, limit } => {
                    let (alpha, limit) = (alpha as f64, limit as f64);
                    let g = if g > limit { limit } else { g };
                    let u = u.max(-limit).min(limit);
                    (u + 1.0) * g / (1.0 + (-alpha * g).exp())
                }
            }
        })
        .collect();
    (0..d)
        .map(|o| (0..f).map(|i| wd[o * f + i] * a[i]).sum::<f64>() + bias(w.bias.as_ref().map(|b| &b.down), o))
        .collect()
}

/// The dense MoE of one rank's tokens `x` with all `E` experts (`experts[e]` is expert `e`),
/// for configs without selection bias or shared expert.
pub fn dense_moe(x: &Tensor, gate: &Tensor, experts: &[ExpertWeights], cfg: &MoeConfig) -> Reference {
    dense_moe_full(x, gate, None, experts, None, cfg)
}

/// The dense MoE with the config's full routing rules, selection `bias` (`[E]`) and the
/// shared expert: `y = sum_j w_j expert_j(x) + g(x) shared(x)`, `g = sigmoid(x · gate)` when
/// the shared expert is gated, else 1.
pub fn dense_moe_full(
    x: &Tensor,
    gate: &Tensor,
    bias: Option<&[f32]>,
    experts: &[ExpertWeights],
    shared: Option<&SharedExpert>,
    cfg: &MoeConfig,
) -> Reference {
    let (ids, weights) = route_f64_config(x, gate, bias, cfg);
    let mut r = dense_moe_routed(x, &ids, &weights, experts, cfg);
    if let Some(s) = shared {
        let (n, d) = (x.rows(), x.cols());
        let xs = x.to_f64_vec();
        let g = s.gate.as_ref().map(|g| g.to_f64_vec());
        for t in 0..n {
            let h = &xs[t * d..(t + 1) * d];
            let o = expert_f64_with(&s.weights, cfg.activation, h);
            let scale = g.as_ref().map_or(1.0, |g| {
                let z: f64 = g.iter().zip(h).map(|(a, b)| a * b).sum();
                1.0 / (1.0 + (-z).exp())
            });
            for (yc, oc) in r.y[t * d..(t + 1) * d].iter_mut().zip(&o) {
                *yc += scale * oc;
            }
        }
    }
    r
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
            let o = expert_f64_with(&experts[ids[t * k + j] as usize], cfg.activation, &xs[t * d..(t + 1) * d]);
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
