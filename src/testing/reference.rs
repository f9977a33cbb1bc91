//! A plain dense MoE in f64 on one rank: the reference every test compares with.
//!
//! Routing is computed in f64 with the same rules as the library (softmax or sigmoid scores,
//! selection bias, group-limited top-k with ties to the lower id, optional renormalisation,
//! scaling, capacity drops first-choice-first per source rank); every token then goes through
//! its experts, the weighted sum and the shared expert, all in f64.

use crate::model::config::{Activation, GroupScore, MoeConfig, Scoring};
use crate::model::families::Family;
use crate::model::weights::{ExpertWeights, LayerWeights, SharedExpert};
use crate::tensor::Tensor;
use crate::testing::dequant_ref::weight_f64;

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

/// Routing in f64 of `x` (`[N, D]`) with gate `[E, D]` and the router's `bias` under `cfg`'s
/// top-k, `norm_topk_prob` and [`crate::model::config::RouterConfig`], from the formulas:
/// logits (`+ bias` when `logit_bias`), scores (softmax over all, sigmoid, or none for
/// softmax-over-the-chosen-k), selection keys (score plus bias when `selection_bias`, else the
/// logit where it ranks as the score does, else the score), group-limited selection, top-k by a
/// stable sort (ties to the lower id), weights (scores, or the softmax of the chosen logits),
/// renormalised by `max((sum w^p)^(1/p) + eps, min)`, scaled.
pub fn route_f64_config(x: &Tensor, gate: &Tensor, bias: Option<&[f32]>, cfg: &MoeConfig) -> (Vec<u32>, Vec<f64>) {
    let (n, d, e, k) = (x.rows(), x.cols(), gate.rows(), cfg.top_k);
    let r = &cfg.router;
    let (xs, ws) = (x.to_f64_vec(), gate.to_f64_vec());
    let b = |i: usize| bias.map_or(0.0, |b| b[i] as f64);
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    for t in 0..n {
        let mut logits: Vec<f64> = (0..e).map(|j| (0..d).map(|c| xs[t * d + c] * ws[j * d + c]).sum()).collect();
        if r.logit_bias {
            logits.iter_mut().enumerate().for_each(|(i, l)| *l += b(i));
        }
        let scores: Vec<f64> = match r.scoring {
            Scoring::Softmax => {
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                logits.iter().map(|l| (l - max).exp() / z).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
            Scoring::SoftmaxTopK => vec![f64::NAN; e],
        };
        let mut keys: Vec<f64> = (0..e)
            .map(|i| {
                if r.selection_bias {
                    scores[i] + b(i)
                } else if r.scoring == Scoring::SoftmaxTopK || r.n_group == 1 || r.group_score == GroupScore::Max {
                    logits[i]
                } else {
                    scores[i]
                }
            })
            .collect();
        if r.n_group > 1 {
            limit_groups_f64(&mut keys, r.n_group, r.topk_group, r.group_score);
        }
        let top: Vec<usize> = desc(&keys)[..k].to_vec();
        let mut w: Vec<f64> = match r.scoring {
            Scoring::SoftmaxTopK => {
                let max = top.iter().map(|&j| logits[j]).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = top.iter().map(|&j| (logits[j] - max).exp()).sum();
                top.iter().map(|&j| (logits[j] - max).exp() / z).collect()
            }
            _ => top.iter().map(|&j| scores[j]).collect(),
        };
        if cfg.norm_topk_prob {
            let p = r.norm_p as f64;
            let norm = w.iter().map(|v| v.abs().powf(p)).sum::<f64>().powf(1.0 / p);
            let den = (norm + r.norm_eps as f64).max(r.norm_min as f64);
            w.iter_mut().for_each(|v| *v /= den);
        }
        w.iter_mut().for_each(|v| *v *= r.routed_scaling_factor as f64);
        ids.extend(top.iter().map(|&j| j as u32));
        weights.extend(w);
    }
    (ids, weights)
}

/// Indices of `v` by decreasing value; a stable sort, so equal values keep the lower index first.
fn desc(v: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).expect("finite scores"));
    order
}

/// Keys outside the `topk_group` best of `n_group` consecutive groups become `-inf`; a group
/// scores its best key or the sum of its best two.
fn limit_groups_f64(keys: &mut [f64], n_group: usize, topk_group: usize, score: GroupScore) {
    let per = keys.len() / n_group;
    let group_scores: Vec<f64> = keys
        .chunks(per)
        .map(|g| {
            let o = desc(g);
            match score {
                GroupScore::Max => g[o[0]],
                GroupScore::TopTwoSum => g[o[0]] + g[o[1]],
            }
        })
        .collect();
    let kept = desc(&group_scores)[..topk_group].to_vec();
    for g in (0..n_group).filter(|g| !kept.contains(g)) {
        keys[g * per..(g + 1) * per].fill(f64::NEG_INFINITY);
    }
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

/// The f64 reference of a grouped FFN call ([`crate::Engine::ffn`]): rows
/// `offsets[l]..offsets[l + 1]` of `batch` through `experts[l]` with `act`, `[rows * D]`.
pub fn ffn_f64(batch: &Tensor, offsets: &[usize], experts: &[ExpertWeights], act: Activation) -> Vec<f64> {
    let (x, d) = (batch.to_f64_vec(), batch.cols());
    let mut y = Vec::with_capacity(x.len());
    for (l, w) in experts.iter().enumerate() {
        for r in offsets[l]..offsets[l + 1] {
            y.extend(expert_f64_with(w, act, &x[r * d..(r + 1) * d]));
        }
    }
    y
}

/// One SwiGLU expert applied to one row, in f64.
pub fn expert_f64(w: &ExpertWeights, h: &[f64]) -> Vec<f64> {
    expert_f64_with(w, Activation::Silu, h)
}

/// One expert with activation `act` (and its biases, if it has them) applied to one row, in
/// f64, from the formulas (transformers' `MixtralBlockSparseTop2MLP`, `GptOssExperts`).
pub fn expert_f64_with(w: &ExpertWeights, act: Activation, h: &[f64]) -> Vec<f64> {
    let (f, d) = (w.gate.rows(), w.gate.cols());
    // Packed projections dequantized in f64 from the formats' definitions, independently of
    // the library's decoders.
    let (wg, wu, wd) = (weight_f64(&w.gate), weight_f64(&w.up), weight_f64(&w.down));
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

/// The dense MoE with given routing (`[N, k]` ids and weights): `y = sum_j w_j expert_j(x)`, or
/// `sum_j expert_j(w_j x)` with `cfg.router.weights_on_input` (Llama 4).
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
            let (w, h) = (weights[t * k + j], &xs[t * d..(t + 1) * d]);
            let expert = &experts[ids[t * k + j] as usize];
            if cfg.router.weights_on_input {
                // Llama 4: expert(w * x), summed with weight 1.
                let scaled: Vec<f64> = h.iter().map(|v| v * w).collect();
                let o = expert_f64_with(expert, cfg.activation, &scaled);
                y[t * d..(t + 1) * d].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            } else {
                let o = expert_f64_with(expert, cfg.activation, h);
                y[t * d..(t + 1) * d].iter_mut().zip(&o).for_each(|(a, b)| *a += w * b);
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

/// The MoE block of `family` in f64, written from the family's transformers 5 modeling code,
/// with its hyper-parameters read from `config` (a parsed `config.json` holding every key the
/// family uses, as [`crate::testing::checkpoint_writer::family_config`] writes them) rather than
/// from a [`MoeConfig`]: so that a wrong mapping of keys to rules is caught. `w` holds every
/// expert, the router's bias vector and the shared expert. Returns `[N, D]`.
pub fn family_moe_f64(family: Family, config: &serde_json::Value, x: &Tensor, w: &LayerWeights) -> Vec<f64> {
    let c = match family {
        Family::Llama4 | Family::Qwen35Moe => &config["text_config"],
        Family::Dbrx => &config["ffn_config"],
        _ => config,
    };
    let num = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("reference: {k} missing"));
    let flag = |k: &str| c[k].as_bool().unwrap_or_else(|| panic!("reference: {k} missing"));
    let k = match family {
        Family::Ernie45Moe => num("moe_k"),
        Family::Dbrx => num("moe_top_k"),
        _ => num("num_experts_per_tok"),
    } as usize;
    let act = match family {
        Family::GptOss => {
            Activation::ClampedSwiglu { alpha: num("swiglu_alpha") as f32, limit: num("swiglu_limit") as f32 }
        }
        _ => Activation::Silu,
    };
    let (n, d) = (x.rows(), x.cols());
    let (xs, g) = (x.to_f64_vec(), w.router.to_f64_vec());
    let e = w.router.rows();
    let bias: Vec<f64> = w.selection_bias.as_ref().map_or(vec![0.0; e], |b| b.iter().map(|&v| v as f64).collect());
    let mut y = vec![0f64; n * d];
    for t in 0..n {
        let h = &xs[t * d..(t + 1) * d];
        let l: Vec<f64> = (0..e).map(|j| (0..d).map(|c| h[c] * g[j * d + c]).sum()).collect();
        let (ids, ws) = family_route(family, c, &l, &bias, k, &num, &flag);
        let out = &mut y[t * d..(t + 1) * d];
        for (&id, &wt) in ids.iter().zip(&ws) {
            if family == Family::Llama4 {
                // routed_in = hidden * score; the expert's output summed with weight 1.
                let scaled: Vec<f64> = h.iter().map(|v| v * wt).collect();
                let o = expert_f64_with(&w.experts[id], act, &scaled);
                out.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            } else {
                let o = expert_f64_with(&w.experts[id], act, h);
                out.iter_mut().zip(&o).for_each(|(a, b)| *a += wt * b);
            }
        }
        if let Some(s) = &w.shared {
            let o = expert_f64_with(&s.weights, Activation::Silu, h);
            let scale = s.gate.as_ref().map_or(1.0, |gw| {
                let z: f64 = gw.to_f64_vec().iter().zip(h).map(|(a, b)| a * b).sum();
                1.0 / (1.0 + (-z).exp())
            });
            out.iter_mut().zip(&o).for_each(|(a, b)| *a += scale * b);
        }
    }
    y
}

/// One token's experts and weights under `family`'s router, from logits `l` and the router's
/// bias vector.
fn family_route(
    family: Family,
    c: &serde_json::Value,
    l: &[f64],
    bias: &[f64],
    k: usize,
    num: &dyn Fn(&str) -> f64,
    flag: &dyn Fn(&str) -> bool,
) -> (Vec<usize>, Vec<f64>) {
    let sigmoid = |v: &f64| 1.0 / (1.0 + (-v).exp());
    let plus = |s: &[f64]| -> Vec<f64> { s.iter().zip(bias).map(|(a, b)| a + b).collect() };
    match family {
        // MixtralTopKRouter, Qwen3_5MoeTopKRouter: softmax, top-k, divided by the sum.
        Family::Mixtral | Family::Qwen35Moe => chosen(&softmax_f64(l), &softmax_f64(l), k, Some(1.0)),
        // Qwen2Moe / Qwen3Moe / Qwen3Next / Olmoe TopKRouter: divided only with norm_topk_prob.
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next | Family::Olmoe => {
            let p = softmax_f64(l);
            chosen(&p, &p, k, flag("norm_topk_prob").then_some(1.0))
        }
        Family::DeepseekV2 => deepseek_v2_f64(c, l, k, num),
        Family::DeepseekV3 | Family::KimiK2 | Family::Glm4Moe => noaux_tc_f64(l, bias, k, num, flag),
        // GptOssTopKRouter: top-k of x·W^T + b, softmax over the k.
        Family::GptOss => {
            let lb = plus(l);
            let ids = desc(&lb)[..k].to_vec();
            let w = softmax_f64(&ids.iter().map(|&i| lb[i]).collect::<Vec<_>>());
            (ids, w)
        }
        // Llama4Router: top-k of the logits, sigmoid of the chosen.
        Family::Llama4 => {
            let s: Vec<f64> = l.iter().map(sigmoid).collect();
            chosen(l, &s, k, None)
        }
        // MiniMaxM2TopKRouter: sigmoid, chosen by score + bias, divided by the sum.
        Family::MinimaxM2 => {
            let s: Vec<f64> = l.iter().map(sigmoid).collect();
            chosen(&plus(&s), &s, k, Some(1.0))
        }
        // Ernie4_5_MoeTopKRouter: softmax, chosen by softmax + bias, / max(sum, moe_norm_min).
        Family::Ernie45Moe => {
            let p = softmax_f64(l);
            let (ids, w) = chosen(&plus(&p), &p, k, None);
            let den = w.iter().sum::<f64>().max(num("moe_norm_min"));
            (ids, w.iter().map(|v| v / den).collect())
        }
        // DbrxFFN.route_tokens_to_experts: softmax, top-k, / p-norm.
        Family::Dbrx => {
            let p = softmax_f64(l);
            chosen(&p, &p, k, c["moe_normalize_expert_weights"].as_f64())
        }
    }
}

fn softmax_f64(v: &[f64]) -> Vec<f64> {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = v.iter().map(|a| (a - m).exp()).sum();
    v.iter().map(|a| (a - m).exp() / z).collect()
}

/// The `k` best by `keys` with weights from `values`, divided by their `p`-norm when `p` is given.
fn chosen(keys: &[f64], values: &[f64], k: usize, p: Option<f64>) -> (Vec<usize>, Vec<f64>) {
    let ids = desc(keys)[..k].to_vec();
    let mut w: Vec<f64> = ids.iter().map(|&i| values[i]).collect();
    if let Some(p) = p {
        let norm = w.iter().map(|v| v.abs().powf(p)).sum::<f64>().powf(1.0 / p);
        w.iter_mut().for_each(|v| *v /= norm);
    }
    (ids, w)
}

/// DeepseekV2TopkRouter: softmax; `group_limited_greedy` zeroes the groups outside the
/// `topk_group` best (by their best score); top-k; times `routed_scaling_factor`.
fn deepseek_v2_f64(c: &serde_json::Value, l: &[f64], k: usize, num: &dyn Fn(&str) -> f64) -> (Vec<usize>, Vec<f64>) {
    let w0 = softmax_f64(l);
    let mut p = w0.clone();
    if c["topk_method"] == "group_limited_greedy" {
        let (ng, kg) = (num("n_group") as usize, num("topk_group") as usize);
        let per = l.len() / ng;
        let gs: Vec<f64> = p.chunks(per).map(|g| g.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect();
        let kept = desc(&gs)[..kg].to_vec();
        for (i, v) in p.iter_mut().enumerate() {
            if !kept.contains(&(i / per)) {
                *v = 0.0;
            }
        }
    }
    let (ids, w) = chosen(&p, &w0, k, None);
    let scale = num("routed_scaling_factor");
    (ids, w.iter().map(|v| v * scale).collect())
}

/// DeepseekV3TopkRouter / Glm4MoeTopkRouter (`noaux_tc`): sigmoid; keys score + bias; groups
/// by the sum of their two best keys, the others `-inf`; top-k; weights the scores, divided by
/// `sum + 1e-20` with `norm_topk_prob`; times `routed_scaling_factor`.
fn noaux_tc_f64(
    l: &[f64],
    bias: &[f64],
    k: usize,
    num: &dyn Fn(&str) -> f64,
    flag: &dyn Fn(&str) -> bool,
) -> (Vec<usize>, Vec<f64>) {
    let s: Vec<f64> = l.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    let mut keys: Vec<f64> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
    let (ng, kg) = (num("n_group") as usize, num("topk_group") as usize);
    let per = l.len() / ng;
    let gs: Vec<f64> = keys
        .chunks(per)
        .map(|g| {
            let o = desc(g);
            g[o[0]] + g[o[1]]
        })
        .collect();
    let kept = desc(&gs)[..kg].to_vec();
    for (i, v) in keys.iter_mut().enumerate() {
        if !kept.contains(&(i / per)) {
            *v = f64::NEG_INFINITY;
        }
    }
    let (ids, mut w) = chosen(&keys, &s, k, None);
    if flag("norm_topk_prob") {
        let den = w.iter().sum::<f64>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= den);
    }
    let scale = num("routed_scaling_factor");
    (ids, w.iter().map(|v| v * scale).collect())
}
