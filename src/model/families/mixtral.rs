//! Mixtral (`modeling_mixtral.py`, `configuration_mixtral.py`).
//!
//! - Keys: `num_local_experts` (alias `num_experts`, default 8), `num_experts_per_tok` (2),
//!   `intermediate_size` (14336, the experts' F), `hidden_size` (4096), `num_hidden_layers`
//!   (32), `hidden_act` (silu). Every layer is MoE.
//! - Routing (`MixtralTopKRouter`): softmax over all experts in f32, top-k, always divided by
//!   the k weights' sum (there is no `norm_topk_prob`).
//! - Names: Hub `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1|w3|w2` (gate, up,
//!   down); transformers 5 renames the block to `mlp` and fuses `mlp.experts.gate_up_proj`
//!   `[E, 2F, D]` (w1 then w3) and `mlp.experts.down_proj` `[E, D, F]`.

use super::keys::{KeyResult, Keys, require_silu};
use super::{MoeNames, both_layouts, check_layer};
use crate::model::config::MoeConfig;

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["num_hidden_layers"], 32, layer)?;
    require_silu(k, &["hidden_act"])?;
    let e = k.usize(&["num_local_experts", "num_experts"], Some(8))?;
    let cfg = MoeConfig::new(
        e,
        k.usize(&["hidden_size"], Some(4096))?,
        k.usize(&["intermediate_size"], Some(14336))?,
        k.usize(&["num_experts_per_tok"], Some(2))?,
    );
    Ok(cfg.with_norm_topk_prob(true))
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    mixtral_style(p, |m| (format!("{p}{m}.gate.weight"), None))
}

/// Hub per-expert names under `block_sparse_moe`, transformers 5's fused ones under `mlp`, then
/// the other two combinations; `router(module)` gives the router and bias names.
pub(super) fn mixtral_style(p: &str, router: impl Fn(&str) -> (String, Option<String>)) -> Vec<MoeNames> {
    let mut hub = Vec::new();
    let mut other = Vec::new();
    for m in ["block_sparse_moe", "mlp"] {
        let (r, b) = router(m);
        let [per, fused] = <[MoeNames; 2]>::try_from(both_layouts(r, b, format!("{p}{m}.experts"), W1_W3_W2, None))
            .expect("two layouts");
        let (first, second) = if m == "block_sparse_moe" { (per, fused) } else { (fused, per) };
        hub.push(first);
        other.push(second);
    }
    hub.extend(other);
    hub
}

/// Mixtral's expert projection names: gate, up, down.
pub(super) const W1_W3_W2: [&str; 3] = ["w1", "w3", "w2"];
