//! ERNIE-4.5-MoE (`modeling_ernie4_5_moe.py`, `configuration_ernie4_5_moe.py`).
//!
//! - Keys: `moe_num_experts` (64; alias `num_experts`), `moe_k` (6; alias
//!   `num_experts_per_tok`), `moe_intermediate_size` (1536), `moe_num_shared_experts` (**2**),
//!   `moe_layer_start_index` (1), `moe_layer_end_index` (-1: the last layer),
//!   `moe_layer_interval` (1), `moe_norm_min` (1e-12), `use_bias` (false), `hidden_size`
//!   (2560), `num_hidden_layers` (28), `hidden_act`.
//! - MoE layers: `(layer + 1) % moe_layer_interval == 0` and
//!   `moe_layer_start_index <= layer <= moe_layer_end_index`.
//! - Routing (`Ernie4_5_MoeTopKRouter`), in f32: softmax over all; keys `softmax + bias`
//!   (`moe_statics.e_score_correction_bias`, `[1, E]`); top-k; weights the softmax values,
//!   always divided by `max(sum, moe_norm_min)`.
//! - Shared experts `mlp.shared_experts.*` (F = `moe_num_shared_experts * moe_intermediate_size`,
//!   ungated; `use_bias: true` would give them biases, which are refused).
//! - Names: `mlp.gate`, experts as Qwen's; the bias is `mlp.moe_statics.e_score_correction_bias`
//!   in Hub checkpoints, `mlp.gate.moe_statics.e_score_correction_bias` in transformers 5's.

use super::keys::{KeyResult, Keys, require_silu};
use super::{MoeNames, check_layer, mlp_block, mlp_names, not_moe};
use crate::model::config::{MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    let n = check_layer(k, &["num_hidden_layers"], 28, layer)?;
    require_silu(k, &["hidden_act"])?;
    let start = k.usize(&["moe_layer_start_index"], Some(1))?;
    let end = match k.i64(&["moe_layer_end_index"], -1)? {
        -1 => n as i64 - 1,
        e => e,
    };
    let interval = k.usize(&["moe_layer_interval"], Some(1))?;
    if interval == 0 {
        return Err(format!("{}moe_layer_interval = 0", k.path));
    }
    if !(layer + 1).is_multiple_of(interval) || layer < start || layer as i64 > end {
        return Err(not_moe(
            layer,
            format!(
                "{p}moe_layer_start_index = {start}, {p}moe_layer_end_index = {end}, {p}moe_layer_interval = {interval}",
                p = k.path
            ),
        ));
    }
    if k.bool(&["use_bias"], false)? {
        return Err(format!("{}use_bias = true (biases in the shared experts) is not supported", k.path));
    }
    let norm_min = k.f64(&["moe_norm_min"], Some(1e-12))? as f32;
    let f = k.usize(&["moe_intermediate_size"], Some(1536))?;
    let router = RouterConfig { selection_bias: true, norm_min, ..Default::default() };
    let cfg = MoeConfig::new(
        k.usize(&["moe_num_experts", "num_experts"], Some(64))?,
        k.usize(&["hidden_size"], Some(2560))?,
        f,
        k.usize(&["moe_k", "num_experts_per_tok"], Some(6))?,
    )
    .with_norm_topk_prob(true)
    .with_router(router);
    let n_shared = k.usize(&["moe_num_shared_experts"], Some(2))?;
    let fs = n_shared.checked_mul(f).ok_or_else(|| format!("{}moe_num_shared_experts overflows", k.path))?;
    Ok(if fs == 0 { cfg } else { cfg.with_shared_expert(fs, false) })
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let shared = Some((mlp_names(&format!("{p}mlp.shared_experts")), None));
    let mut v = Vec::new();
    for bias in ["mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias"] {
        v.extend(mlp_block(p, Some(format!("{p}{bias}")), shared.clone()));
    }
    v
}
