//! DeepSeek-V2 (`modeling_deepseek_v2.py`, `configuration_deepseek_v2.py`).
//!
//! - Keys: `n_routed_experts` (64; alias `num_experts`), `num_experts_per_tok` (no default),
//!   `moe_intermediate_size` (1407), `n_shared_experts` (**2**), `routed_scaling_factor` (1.0),
//!   `topk_method` (`greedy`), `n_group`, `topk_group` (none), `first_k_dense_replace` (0),
//!   `hidden_size` (4096), `num_hidden_layers` (32), `hidden_act`.
//! - MoE layers: `layer >= first_k_dense_replace` (transformers 5 has no `moe_layer_freq`; a
//!   value other than 1 is refused, since DeepSeek's own code would honour it).
//! - Routing (`DeepseekV2TopkRouter`), logits in f32: softmax over all; `greedy`: top-k;
//!   `group_limited_greedy`: groups scored by their best score, `topk_group` kept, top-k among
//!   them. Weights = scores times `routed_scaling_factor`, **never renormalised**: transformers 5
//!   ignores `norm_topk_prob` (DeepSeek's original code renormalised when it was set), so a
//!   config with `norm_topk_prob: true` is refused rather than run one way or the other.
//!   `scoring_func`, when present, must be `softmax`.
//! - Shared experts `mlp.shared_experts.*` (F = `n_shared_experts * moe_intermediate_size`,
//!   ungated). Names as Qwen's, `mlp.gate`, `mlp.experts`.

use super::keys::{KeyResult, Keys, require_silu};
use super::{MoeNames, check_layer, mlp_block, mlp_names, not_moe};
use crate::model::config::{GroupScore, MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    dense_first(k, layer, 32, 0)?;
    require_silu(k, &["hidden_act"])?;
    k.only(&["scoring_func"], &["softmax"], "softmax scores")?;
    if k.bool(&["norm_topk_prob"], false)? {
        return Err(format!(
            "{}norm_topk_prob = true cannot be honoured: transformers' DeepSeek-V2 router never renormalises \
             (DeepSeek's original code does)",
            k.path
        ));
    }
    let e = k.usize(&["n_routed_experts", "num_experts"], Some(64))?;
    let f = k.usize(&["moe_intermediate_size"], Some(1407))?;
    let scale = k.f64(&["routed_scaling_factor"], Some(1.0))? as f32;
    let router = match k.opt_str(&["topk_method"])?.unwrap_or("greedy") {
        "greedy" => RouterConfig { routed_scaling_factor: scale, ..Default::default() },
        "group_limited_greedy" => RouterConfig {
            n_group: k.usize(&["n_group"], None)?,
            topk_group: k.usize(&["topk_group"], None)?,
            group_score: GroupScore::Max,
            routed_scaling_factor: scale,
            ..Default::default()
        },
        other => {
            return Err(format!(
                "{}topk_method = {other:?} is not supported: DeepSeek-V2's router implements greedy and \
                 group_limited_greedy",
                k.path
            ));
        }
    };
    let cfg = MoeConfig::new(e, k.usize(&["hidden_size"], Some(4096))?, f, k.usize(&["num_experts_per_tok"], None)?)
        .with_norm_topk_prob(false)
        .with_router(router);
    shared_experts(k, cfg, f, 2)
}

/// DeepSeek-style dense layers: `layer < first_k_dense_replace`; `moe_layer_freq` must be 1.
pub(super) fn dense_first(k: &Keys<'_>, layer: usize, layers: usize, first: usize) -> KeyResult<()> {
    check_layer(k, &["num_hidden_layers"], layers, layer)?;
    let freq = k.usize(&["moe_layer_freq"], Some(1))?;
    if freq != 1 {
        return Err(format!(
            "{}moe_layer_freq = {freq} cannot be honoured: transformers' code makes every layer from \
             first_k_dense_replace on an MoE layer",
            k.path
        ));
    }
    let first = k.usize(&["first_k_dense_replace"], Some(first))?;
    if layer < first {
        return Err(not_moe(layer, format!("{}first_k_dense_replace = {first}", k.path)));
    }
    Ok(())
}

/// `n_shared_experts * f` ungated (0: none).
pub(super) fn shared_experts(k: &Keys<'_>, cfg: MoeConfig, f: usize, default: usize) -> KeyResult<MoeConfig> {
    let n = k.usize(&["n_shared_experts"], Some(default))?;
    let fs = n.checked_mul(f).ok_or_else(|| format!("{}n_shared_experts = {n} overflows", k.path))?;
    Ok(if fs == 0 { cfg } else { cfg.with_shared_expert(fs, false) })
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    mlp_block(p, None, Some((mlp_names(&format!("{p}mlp.shared_experts")), None)))
}
