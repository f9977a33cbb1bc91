//! Routing: router logits, scores, (group-limited) top-k, weights.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::{GroupScore, MAX_TOP_K, MoeConfig, RouterConfig, Scoring};
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
        let nk =
            n.checked_mul(k).ok_or_else(|| Error::invalid(format!("routing of {n} tokens x {k} slots overflows")))?;
        if ids.len() != nk || weights.len() != nk {
            return Err(Error::invalid(format!(
                "routing for {n} tokens x {k} slots needs {nk} ids and weights, got {} and {}",
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
    let mut logits = Vec::new();
    match n.checked_mul(e) {
        Some(len) if logits.try_reserve_exact(len).is_ok() => logits.resize(len, 0f32),
        _ => return Err(Error::invalid(format!("router: {n} tokens x {e} experts of logits cannot be allocated"))),
    }
    if n == 0 {
        return Ok(logits);
    }
    let xf = x.to_f32_vec();
    let wf = gate.to_f32_vec();
    crate::compute::cpu::gemm::matmul_bt(&xf, &wf, &mut logits, n, d, e);
    Ok(logits)
}

/// Softmax over each row of `logits` (`[N, E]`), then the `k` largest probabilities.
///
/// Ties go to the lower expert id. With `renormalize`, the k weights are divided by their sum
/// (f32), so they sum to one. Errors when `k` is 0, above 16 or above `E`.
pub fn softmax_top_k(logits: &[f32], num_experts: usize, k: usize, renormalize: bool) -> Result<Routing> {
    top_k(logits, num_experts, k, renormalize, &RouterConfig::default(), None)
}

/// Routing of each row of `logits` (`[N, E]`, before any logit bias) under `rules`, in the
/// order [`RouterConfig`] states: logit bias, scores, selection keys, group-limited selection,
/// top-k, weights, optional renormalisation (`renormalize`), scaling. `bias` is the router's
/// per-expert bias vector (`[E]`), required exactly when `rules.uses_bias()`.
///
/// Ties go to the lower expert (and group) id. Errors when `k` is 0, above 16 or above `E`, the
/// rules do not validate, or the bias is missing, unexpected, not `E` long or not finite.
pub fn top_k(
    logits: &[f32],
    num_experts: usize,
    k: usize,
    renormalize: bool,
    rules: &RouterConfig,
    bias: Option<&[f32]>,
) -> Result<Routing> {
    if k == 0 || k > MAX_TOP_K || k > num_experts {
        return Err(Error::invalid(format!(
            "top-k {k} must be in 1..={} for {num_experts} experts",
            MAX_TOP_K.min(num_experts)
        )));
    }
    if num_experts == 0 || !logits.len().is_multiple_of(num_experts) {
        return Err(Error::invalid(format!("{} logits do not form rows of {num_experts} experts", logits.len())));
    }
    rules.validate(num_experts, k)?;
    check_bias(rules, bias, num_experts)?;
    let n = logits.len() / num_experts;
    let mut ids = vec![0u32; n * k];
    let mut weights = vec![0f32; n * k];
    let row_rule = RowRule { k, renormalize, rules, bias };
    ids.par_chunks_mut(k).zip(weights.par_chunks_mut(k)).zip(logits.par_chunks(num_experts)).for_each_init(
        || (vec![0f32; num_experts], vec![0f32; num_experts], vec![0f32; num_experts]),
        |(l, scores, keys), ((ids, ws), row)| row_rule.route(row, l, scores, keys, ids, ws),
    );
    Ok(Routing { n, k, ids, weights })
}

/// The bias is given exactly when the rules use one, `E` long and finite.
fn check_bias(rules: &RouterConfig, bias: Option<&[f32]>, num_experts: usize) -> Result<()> {
    match (rules.uses_bias(), bias) {
        (true, Some(b)) if b.len() != num_experts => {
            Err(Error::invalid(format!("router bias has {} entries for {num_experts} experts", b.len())))
        }
        (true, Some(b)) => match b.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(Error::invalid(format!("router bias of expert {i} is {}", b[i]))),
            None => Ok(()),
        },
        (true, None) => {
            Err(Error::invalid("the routing rules use a router bias (selection bias or logit bias) but none was given"))
        }
        (false, Some(_)) => Err(Error::invalid("a router bias was given but the routing rules do not use one")),
        (false, None) => Ok(()),
    }
}

struct RowRule<'a> {
    k: usize,
    renormalize: bool,
    rules: &'a RouterConfig,
    bias: Option<&'a [f32]>,
}

impl RowRule<'_> {
    /// One token: `row` the raw logits, `l`, `scores`, `keys` scratch of `E`; writes the k ids
    /// and weights. Steps numbered as in [`RouterConfig`].
    fn route(&self, row: &[f32], l: &mut [f32], scores: &mut [f32], keys: &mut [f32], ids: &mut [u32], ws: &mut [f32]) {
        let (k, r) = (self.k, self.rules);
        // 1. logits (+ logit bias).
        l.copy_from_slice(row);
        if let (true, Some(b)) = (r.logit_bias, self.bias) {
            for (v, &bv) in l.iter_mut().zip(b) {
                *v += bv;
            }
        }
        // 2. scores.
        scores_into(r.scoring, l, scores);
        // 3. selection keys.
        match (r.selection_bias, self.bias) {
            (true, Some(b)) => {
                for ((key, &s), &bv) in keys.iter_mut().zip(scores.iter()).zip(b) {
                    *key = s + bv;
                }
            }
            _ if r.scoring == Scoring::SoftmaxTopK || r.n_group == 1 || r.group_score == GroupScore::Max => {
                keys.copy_from_slice(l)
            }
            _ => keys.copy_from_slice(scores),
        }
        // 4. groups.
        if r.n_group > 1 {
            mask_groups(r, keys);
        }
        // 5. top-k.
        let mut top = [(f32::NEG_INFINITY, u32::MAX); MAX_TOP_K];
        insertion_top(keys.iter().copied().enumerate().map(|(i, v)| (v, i as u32)), k, &mut top);
        for j in 0..k {
            ids[j] = top[j].1;
        }
        // 6. weights.
        if r.scoring == Scoring::SoftmaxTopK {
            let max = ids.iter().map(|&e| l[e as usize]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (w, &e) in ws.iter_mut().zip(ids.iter()) {
                *w = (l[e as usize] - max).exp();
                sum += *w;
            }
            for w in ws.iter_mut() {
                *w /= sum;
            }
        } else {
            for (w, &e) in ws.iter_mut().zip(ids.iter()) {
                *w = scores[e as usize];
            }
        }
        // 7. renormalisation.
        if self.renormalize {
            renormalize(r, ws);
        }
        // 8. scaling.
        if r.routed_scaling_factor != 1.0 {
            for w in ws.iter_mut() {
                *w *= r.routed_scaling_factor;
            }
        }
    }
}

/// Step 2: scores of one row of logits (left untouched for `SoftmaxTopK`).
fn scores_into(scoring: Scoring, l: &[f32], scores: &mut [f32]) {
    match scoring {
        Scoring::Softmax => {
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for &v in l {
                sum += (v - max).exp();
            }
            for (s, &v) in scores.iter_mut().zip(l) {
                *s = (v - max).exp() / sum;
            }
        }
        Scoring::Sigmoid => {
            for (s, &v) in scores.iter_mut().zip(l) {
                *s = 1.0 / (1.0 + (-v).exp());
            }
        }
        Scoring::SoftmaxTopK => {}
    }
}

/// Step 4: every key outside the `topk_group` best groups becomes `-inf` (validation
/// guarantees the kept groups hold at least k experts).
fn mask_groups(r: &RouterConfig, keys: &mut [f32]) {
    let per = keys.len() / r.n_group;
    let mut gtop = Vec::with_capacity(r.n_group);
    for g in 0..r.n_group {
        let ks = &keys[g * per..(g + 1) * per];
        let gs = match r.group_score {
            GroupScore::Max => ks.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            GroupScore::TopTwoSum => {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in ks {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                a + b
            }
        };
        gtop.push((gs, g as u32));
    }
    let mut group_keys = vec![(f32::NEG_INFINITY, u32::MAX); r.topk_group];
    let kept = insertion_top(gtop.iter().copied(), r.topk_group, &mut group_keys);
    let mut keep = vec![false; r.n_group];
    for &(_, g) in &group_keys[..kept] {
        keep[g as usize] = true;
    }
    for g in (0..r.n_group).filter(|&g| !keep[g]) {
        keys[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
    }
}

/// Step 7: `d = (sum w^p)^(1/p) (+ eps, at least min)`, `w /= d`.
fn renormalize(r: &RouterConfig, ws: &mut [f32]) {
    let mut d = if r.norm_p == 1.0 {
        ws.iter().sum::<f32>()
    } else {
        ws.iter().map(|w| w.abs().powf(r.norm_p)).sum::<f32>().powf(1.0 / r.norm_p)
    };
    d += r.norm_eps;
    d = d.max(r.norm_min);
    for w in ws.iter_mut() {
        *w /= d;
    }
}

/// The `k` (at most `top.len()`) largest of `items` (value, id) into `top[..k]`, largest first; ties keep
/// the earlier item. A `-inf` value is taken only while fewer than `k` items were seen. Returns
/// how many entries were filled.
fn insertion_top(items: impl Iterator<Item = (f32, u32)>, k: usize, top: &mut [(f32, u32)]) -> usize {
    let mut filled = 0;
    for (v, id) in items {
        if filled < k || v > top[k - 1].0 {
            let mut i = filled.min(k - 1);
            while i > 0 && v > top[i - 1].0 {
                top[i] = top[i - 1];
                i -= 1;
            }
            top[i] = (v, id);
            filled = (filled + 1).min(k);
        }
    }
    filled
}

/// Route `x` (`[N, D]`) with gate weight `[E, D]`: logits, softmax, top-k.
pub fn route(x: &Tensor, gate: &Tensor, k: usize, renormalize: bool) -> Result<Routing> {
    let logits = router_logits(x, gate)?;
    softmax_top_k(&logits, gate.rows(), k, renormalize)
}

/// Route `x` (`[N, D]`) with gate weight `[E, D]` and the router's `bias` (`[E]`, when the
/// config's routing uses one: on the logits or for selection) under `cfg`'s top-k,
/// `norm_topk_prob` and [`RouterConfig`], in the order [`RouterConfig`] states. With
/// `cfg.router.weights_on_input` the weights returned are the expert-input scales.
pub fn route_config(x: &Tensor, gate: &Tensor, bias: Option<&[f32]>, cfg: &MoeConfig) -> Result<Routing> {
    let logits = router_logits(x, gate)?;
    top_k(&logits, gate.rows(), cfg.top_k, cfg.norm_topk_prob, &cfg.router, bias)
}
