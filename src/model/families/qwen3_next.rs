//! Qwen3-Next (`modeling_qwen3_next.py`, `configuration_qwen3_next.py`).
//!
//! - Keys and MoE layers as Qwen2-MoE's (no `attribute_map`: `num_experts` only), with
//!   Qwen3-Next's defaults: `num_experts` 512, `num_experts_per_tok` 10,
//!   `moe_intermediate_size` 512, `shared_expert_intermediate_size` 512, `norm_topk_prob`
//!   **true**, `hidden_size` 2048, `num_hidden_layers` 48.
//! - Routing: softmax top-k, renormalised when `norm_topk_prob`; shared expert gated by
//!   `sigmoid(shared_expert_gate · x)`. Names as Qwen2-MoE's.

use super::keys::{KeyResult, Keys};
use super::qwen2_moe::{Defaults, with_defaults};
use crate::model::config::MoeConfig;

const QWEN3_NEXT: Defaults =
    Defaults { layers: 48, hidden: 2048, experts: 512, k: 10, moe_f: 512, shared_f: 512, norm: true };

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    with_defaults(k, layer, &QWEN3_NEXT, &["num_experts"])
}
