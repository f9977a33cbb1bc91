//! Qwen2-MoE (`modeling_qwen2_moe.py`, `configuration_qwen2_moe.py`).
//!
//! - Keys: `num_experts` (60), `num_experts_per_tok` (4), `moe_intermediate_size` (1408),
//!   `shared_expert_intermediate_size` (5632), `norm_topk_prob` (false), `hidden_size` (2048),
//!   `num_hidden_layers` (24), `decoder_sparse_step` (1), `mlp_only_layers` ([]), `hidden_act`.
//! - MoE layers: `layer` not in `mlp_only_layers`, `num_experts > 0` and
//!   `(layer + 1) % decoder_sparse_step == 0`.
//! - Routing (`Qwen2MoeTopKRouter`): softmax over all in f32, top-k, divided by their sum when
//!   `norm_topk_prob`.
//! - Shared expert `mlp.shared_expert.*` (F = `shared_expert_intermediate_size`), scaled by
//!   `sigmoid(mlp.shared_expert_gate · x)` (`[1, D]`); a size of 0 means none.
//! - Names: `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj` or the fused
//!   `mlp.experts.gate_up_proj` `[E, 2F, D]` / `down_proj` `[E, D, F]`.

use super::keys::{KeyResult, Keys, require_silu};
use super::{MoeNames, check_layer, mlp_block, mlp_names, not_moe};
use crate::model::config::MoeConfig;

/// Qwen2-MoE's class defaults, shared with Qwen3-Next (which has others).
pub(super) struct Defaults {
    pub layers: usize,
    pub hidden: usize,
    pub experts: usize,
    pub k: usize,
    pub moe_f: usize,
    pub shared_f: usize,
    pub norm: bool,
}

pub(super) const QWEN2_MOE: Defaults =
    Defaults { layers: 24, hidden: 2048, experts: 60, k: 4, moe_f: 1408, shared_f: 5632, norm: false };

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    with_defaults(k, layer, &QWEN2_MOE, &["num_experts"])
}

/// The config of a Qwen-style layer with a gated shared expert; `experts` are the spellings of
/// the expert count.
pub(super) fn with_defaults(
    k: &Keys<'_>,
    layer: usize,
    d: &Defaults,
    experts: &[&'static str],
) -> KeyResult<MoeConfig> {
    let e = sparse_layer(k, layer, d.layers, d.experts, experts)?;
    require_silu(k, &["hidden_act"])?;
    let cfg = MoeConfig::new(
        e,
        k.usize(&["hidden_size"], Some(d.hidden))?,
        k.usize(&["moe_intermediate_size"], Some(d.moe_f))?,
        k.usize(&["num_experts_per_tok"], Some(d.k))?,
    )
    .with_norm_topk_prob(k.bool(&["norm_topk_prob"], d.norm)?);
    Ok(match k.usize(&["shared_expert_intermediate_size"], Some(d.shared_f))? {
        0 => cfg,
        fs => cfg.with_shared_expert(fs, true),
    })
}

/// The expert count of a Qwen-style layer after checking that `layer` is an MoE layer:
/// not in `mlp_only_layers`, `num_experts > 0`, `(layer + 1) % decoder_sparse_step == 0`.
pub(super) fn sparse_layer(
    k: &Keys<'_>,
    layer: usize,
    layers: usize,
    experts: usize,
    names: &[&'static str],
) -> KeyResult<usize> {
    check_layer(k, &["num_hidden_layers"], layers, layer)?;
    let e = k.usize(names, Some(experts))?;
    let step = k.usize(&["decoder_sparse_step"], Some(1))?;
    if step == 0 {
        return Err(format!("{}decoder_sparse_step = 0 (the layer rule divides by it)", k.path));
    }
    if k.usize_list(&["mlp_only_layers"])?.unwrap_or_default().contains(&layer) {
        return Err(not_moe(layer, format!("it is in {}mlp_only_layers", k.path)));
    }
    if e == 0 {
        return Err(not_moe(layer, format!("{}{} = 0", k.path, names[0])));
    }
    if !(layer + 1).is_multiple_of(step) {
        return Err(not_moe(layer, format!("{}decoder_sparse_step = {step}", k.path)));
    }
    Ok(e)
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let shared = (mlp_names(&format!("{p}mlp.shared_expert")), Some(format!("{p}mlp.shared_expert_gate.weight")));
    mlp_block(p, None, Some(shared))
}
