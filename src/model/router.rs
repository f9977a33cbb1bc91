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

/// Routing of each row of `logits` (`[N, E]`) under `rules` (see [`RouterConfig`]): scores,
/// optional selection bias (`[E]`, required exactly when `rules.selection_bias`), group-limited
/// selection, top-k, optional renormalisation, scaling.
///
/// Ties go to the lower expert (and group) id. Where the selection score is a monotonic
/// function of the logit (no bias, no top-two-sum groups), experts are ranked by logit, which
/// ranks as the scores would without the ties that rounding the scores could create. Errors
/// when `k` is 0, above 16 or above `E`, the rules do not validate, or the bias is missing,
/// unexpected or not `E` long.
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
    if num_experts == 0 || logits.len() % num_experts != 0 {
        return Err(Error::invalid(format!("{} logits do not form rows of {num_experts} experts", logits.len())));
    }
    rules.validate(num_experts, k)?;
    match (rules.selection_bias, bias) {
        (true, Some(b)) if b.len() == num_experts => {}
        (true, Some(b)) => {
            return Err(Error::invalid(format!("selection bias has {} entries for {num_experts} experts", b.len())));
        }
        (true, None) => return Err(Error::invalid("the routing rules use a selection bias but none was given")),
        (false, Some(_)) => {
            return Err(Error::invalid("a selection bias was given but the routing rules do not use one"));
        }
        (false, None) => {}
    }
    let n = logits.len() / num_experts;
    let mut ids = vec![0u32; n * k];
    let mut weights = vec![0f32; n * k];
    let row_rule = RowRule { k, renormalize, rules, bias };
    ids.par_chunks_mut(k).zip(weights.par_chunks_mut(k)).zip(logits.par_chunks(num_experts)).for_each_init(
        || (vec![0f32; num_experts], vec![0f32; num_experts]),
        |(scores, keys), ((ids, ws), row)| row_rule.route(row, scores, keys, ids, ws),
    );
    Ok(Routing { n, k, ids, weights })
}

struct RowRule<'a> {
    k: usize,
    renormalize: bool,
    rules: &'a RouterConfig,
    bias: Option<&'a [f32]>,
}

impl RowRule<'_> {
    fn route(&self, row: &[f32], scores: &mut [f32], keys: &mut [f32], ids: &mut [u32], ws: &mut [f32]) {
        let (k, r, e) = (self.k, self.rules, row.len());
        match r.scoring {
            Scoring::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for &l in row {
                    sum += (l - max).exp();
                }
                for (s, &l) in scores.iter_mut().zip(row) {
                    *s = (l - max).exp() / sum;
                }
            }
            Scoring::Sigmoid => {
                for (s, &l) in scores.iter_mut().zip(row) {
                    *s = 1.0 / (1.0 + (-l).exp());
                }
            }
        }
        let by_logit = self.bias.is_none() && (r.n_group == 1 || r.group_score == GroupScore::Max);
        for i in 0..e {
            keys[i] = match self.bias {
                _ if by_logit => row[i],
                Some(b) => scores[i] + b[i],
                None => scores[i],
            };
        }
        // Groups left out: their experts' keys become -inf, never chosen while a kept one remains
        // (validation guarantees the kept groups hold at least k experts).
        if r.n_group > 1 {
            let per = e / r.n_group;
            let mut group_keys = vec![(f32::NEG_INFINITY, u32::MAX); r.topk_group];
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
            let kept = insertion_top(gtop.iter().copied(), r.topk_group, &mut group_keys);
            let mut keep = vec![false; r.n_group];
            for &(_, g) in &group_keys[..kept] {
                keep[g as usize] = true;
            }
            for g in (0..r.n_group).filter(|&g| !keep[g]) {
                keys[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
            }
        }
        let mut top = [(f32::NEG_INFINITY, u32::MAX); MAX_TOP_K];
        insertion_top(keys.iter().copied().enumerate().map(|(i, v)| (v, i as u32)), k, &mut top);
        for j in 0..k {
            ids[j] = top[j].1;
            ws[j] = scores[top[j].1 as usize];
        }
        if self.renormalize {
            let s: f32 = ws.iter().sum();
            for w in ws.iter_mut() {
                *w /= s;
            }
        }
        if r.routed_scaling_factor != 1.0 {
            for w in ws.iter_mut() {
                *w *= r.routed_scaling_factor;
            }
        }
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

/// Route `x` (`[N, D]`) with gate weight `[E, D]` and `bias` (`[E]`, when the config's routing
/// uses one) under `cfg`'s top-k, `norm_topk_prob` and [`RouterConfig`].
pub fn route_config(x: &Tensor, gate: &Tensor, bias: Option<&[f32]>, cfg: &MoeConfig) -> Result<Routing> {
    let logits = router_logits(x, gate)?;
    top_k(&logits, gate.rows(), cfg.top_k, cfg.norm_topk_prob, &cfg.router, bias)
}
