//! OLMoE (`modeling_olmoe.py`, `configuration_olmoe.py`).
//!
//! - Keys: `num_experts` (64; alias `num_local_experts`), `num_experts_per_tok` (8),
//!   `intermediate_size` (2048: the experts' F, there is no `moe_intermediate_size`),
//!   `norm_topk_prob` (false), `hidden_size` (2048), `num_hidden_layers` (16), `hidden_act`.
//! - Every layer is MoE. Routing (`OlmoeTopKRouter`): softmax top-k, renormalised when
//!   `norm_topk_prob`. No shared expert. Names as Qwen3-MoE's.

use super::check_layer;
use super::keys::{KeyResult, Keys, require_silu};
use crate::model::config::MoeConfig;

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["num_hidden_layers"], 16, layer)?;
    require_silu(k, &["hidden_act"])?;
    let cfg = MoeConfig::new(
        k.usize(&["num_experts", "num_local_experts"], Some(64))?,
        k.usize(&["hidden_size"], Some(2048))?,
        k.usize(&["intermediate_size"], Some(2048))?,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    );
    Ok(cfg.with_norm_topk_prob(k.bool(&["norm_topk_prob"], false)?))
}
