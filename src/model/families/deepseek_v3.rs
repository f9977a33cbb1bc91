//! DeepSeek-V3 (`modeling_deepseek_v3.py`, `configuration_deepseek_v3.py`), and Kimi-K2
//! (`model_type` `kimi_k2`, a DeepSeek-V3 config and checkpoint; its release is FP8).
//!
//! - Keys: `n_routed_experts` (256; alias `num_local_experts`), `num_experts_per_tok` (8),
//!   `moe_intermediate_size` (2048), `n_shared_experts` (1), `routed_scaling_factor` (2.5),
//!   `n_group` (8), `topk_group` (4), `norm_topk_prob` (true), `first_k_dense_replace` (3),
//!   `hidden_size` (7168), `num_hidden_layers` (61), `hidden_act`.
//! - transformers 5's config has no `scoring_func` / `topk_method`: the model type implies
//!   sigmoid and `noaux_tc`. When a (Hub) config names them, they must say so.
//! - MoE layers: `layer >= first_k_dense_replace` (`moe_layer_freq` must be 1).
//! - Routing (`DeepseekV3TopkRouter`), logits in f32: `s = sigmoid(l)`; keys `s + bias`
//!   (`mlp.gate.e_score_correction_bias`, f32 `[E]`); groups scored by their two best keys,
//!   `topk_group` kept, the rest `-inf`; top-k by key; weights `s`, divided by
//!   `sum + 1e-20` when `norm_topk_prob`, times `routed_scaling_factor`.
//! - Shared experts `mlp.shared_experts.*` (F = `n_shared_experts * moe_intermediate_size`).

use super::deepseek_v2::{dense_first, shared_experts};
use super::keys::{KeyResult, Keys, require_silu};
use super::{MoeNames, mlp_block, mlp_names};
use crate::model::config::{MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    dense_first(k, layer, 61, 3)?;
    noaux_tc(k)?;
    let f = k.usize(&["moe_intermediate_size"], Some(2048))?;
    let router = RouterConfig::deepseek_v3(
        k.usize(&["n_group"], Some(8))?,
        k.usize(&["topk_group"], Some(4))?,
        k.f64(&["routed_scaling_factor"], Some(2.5))? as f32,
    );
    let cfg = MoeConfig::new(
        k.usize(&["n_routed_experts", "num_local_experts"], Some(256))?,
        k.usize(&["hidden_size"], Some(7168))?,
        f,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    )
    .with_norm_topk_prob(k.bool(&["norm_topk_prob"], true)?)
    .with_router(router);
    shared_experts(k, cfg, f, 1)
}

/// SiLU experts, and `scoring_func` / `topk_method` (when present) saying sigmoid / `noaux_tc`.
pub(super) fn noaux_tc(k: &Keys<'_>) -> KeyResult<()> {
    require_silu(k, &["hidden_act"])?;
    k.only(&["scoring_func"], &["sigmoid"], "sigmoid scores")?;
    k.only(&["topk_method"], &["noaux_tc"], "noaux_tc selection")
}

/// DeepSeek-V3's names; GLM-4.5's and Kimi-K2's are the same.
pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let bias = Some(format!("{p}mlp.gate.e_score_correction_bias"));
    mlp_block(p, bias, Some((mlp_names(&format!("{p}mlp.shared_experts")), None)))
}
