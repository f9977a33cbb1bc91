//! Qwen3-MoE (`modeling_qwen3_moe.py`, `configuration_qwen3_moe.py`); OLMoE shares its names.
//!
//! - Keys: `num_experts` (128; transformers 5 writes it as `num_local_experts`, its
//!   `attribute_map` alias), `num_experts_per_tok` (8), `moe_intermediate_size` (768),
//!   `norm_topk_prob` (false), `hidden_size` (2048), `num_hidden_layers` (24),
//!   `decoder_sparse_step` (1), `mlp_only_layers` ([]), `hidden_act`.
//! - MoE layers and routing as Qwen2-MoE's; no shared expert.
//! - Names: `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj` or fused
//!   `mlp.experts.gate_up_proj` `[E, 2F, D]` / `down_proj` `[E, D, F]`.

use super::keys::{KeyResult, Keys, require_silu};
use super::qwen2_moe::sparse_layer;
use super::{MoeNames, mlp_block};
use crate::model::config::MoeConfig;

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    let e = sparse_layer(k, layer, 24, 128, &["num_local_experts", "num_experts"])?;
    require_silu(k, &["hidden_act"])?;
    let cfg = MoeConfig::new(
        e,
        k.usize(&["hidden_size"], Some(2048))?,
        k.usize(&["moe_intermediate_size"], Some(768))?,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    );
    Ok(cfg.with_norm_topk_prob(k.bool(&["norm_topk_prob"], false)?))
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    mlp_block(p, None, None)
}
