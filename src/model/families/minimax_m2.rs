//! MiniMax-M2 (`modeling_minimax_m2.py`, `configuration_minimax_m2.py`).
//!
//! - Keys: `num_local_experts` (256; alias `num_experts`), `num_experts_per_tok` (8),
//!   `intermediate_size` (1536, the experts' F), `hidden_size` (3072), `num_hidden_layers`
//!   (62), `hidden_act`. Every layer is MoE. (Hub configs also carry `scoring_func: sigmoid`
//!   and `use_routing_bias: true`, which transformers does not read; other values are refused.)
//! - Routing (`MiniMaxM2TopKRouter`): `s = sigmoid(l)` in f32; keys `s + bias`
//!   (`e_score_correction_bias` `[E]`); top-k; weights `s`, always divided by their sum.
//!   No groups, no scaling, no shared expert.
//! - Names: Hub `block_sparse_moe.gate`, `block_sparse_moe.e_score_correction_bias`,
//!   `block_sparse_moe.experts.{e}.w1|w3|w2`; transformers 5: `mlp.gate`,
//!   `mlp.e_score_correction_bias`, fused `mlp.experts.gate_up_proj` / `down_proj`. The Hub
//!   release is FP8 with 128 x 128 block scales.

use super::keys::{KeyResult, Keys, require_silu};
use super::mixtral::mixtral_style;
use super::{MoeNames, check_layer};
use crate::model::config::{MoeConfig, RouterConfig, Scoring};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["num_hidden_layers"], 62, layer)?;
    require_silu(k, &["hidden_act"])?;
    k.only(&["scoring_func"], &["sigmoid"], "sigmoid scores")?;
    if !k.bool(&["use_routing_bias"], true)? {
        return Err(format!("{}use_routing_bias = false cannot be honoured: MiniMax-M2's router adds it", k.path));
    }
    let router = RouterConfig { scoring: Scoring::Sigmoid, selection_bias: true, ..Default::default() };
    let cfg = MoeConfig::new(
        k.usize(&["num_local_experts", "num_experts"], Some(256))?,
        k.usize(&["hidden_size"], Some(3072))?,
        k.usize(&["intermediate_size"], Some(1536))?,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    );
    Ok(cfg.with_norm_topk_prob(true).with_router(router))
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    mixtral_style(p, |m| (format!("{p}{m}.gate.weight"), Some(format!("{p}{m}.e_score_correction_bias"))))
}
