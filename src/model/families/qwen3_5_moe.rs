//! Qwen3.5-MoE (`modeling_qwen3_5_moe.py`, `configuration_qwen3_5_moe.py`); the keys sit in
//! `text_config` of a `qwen3_5_moe` config, or at the top of a `qwen3_5_moe_text` one.
//!
//! - Keys: `num_experts` (256), `num_experts_per_tok` (8), `moe_intermediate_size` (512),
//!   `shared_expert_intermediate_size` (512), `hidden_size` (2048), `num_hidden_layers` (40),
//!   `hidden_act`.
//! - Every decoder layer is MoE (`Qwen3_5MoeDecoderLayer` has no dense variant, no
//!   `decoder_sparse_step`, no `mlp_only_layers`).
//! - Routing (`Qwen3_5MoeTopKRouter`): softmax top-k, **always** renormalised (the class has no
//!   `norm_topk_prob`; a config saying `false` is refused). Gated shared expert as Qwen2-MoE.
//! - Names: Qwen2-MoE's under `model.language_model.layers.` (the multimodal checkpoint) or
//!   `model.layers.`.

use super::keys::{KeyResult, Keys, require_silu};
use super::{check_layer, not_moe};
use crate::model::config::MoeConfig;

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["num_hidden_layers"], 40, layer)?;
    require_silu(k, &["hidden_act"])?;
    if !k.bool(&["norm_topk_prob"], true)? {
        return Err(format!(
            "{}norm_topk_prob = false cannot be honoured: Qwen3.5-MoE's router always renormalises",
            k.path
        ));
    }
    let e = k.usize(&["num_experts"], Some(256))?;
    if e == 0 {
        return Err(not_moe(layer, format!("{}num_experts = 0", k.path)));
    }
    let cfg = MoeConfig::new(
        e,
        k.usize(&["hidden_size"], Some(2048))?,
        k.usize(&["moe_intermediate_size"], Some(512))?,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    );
    Ok(match k.usize(&["shared_expert_intermediate_size"], Some(512))? {
        0 => cfg,
        fs => cfg.with_shared_expert(fs, true),
    })
}
