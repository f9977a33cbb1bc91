//! DBRX (`modeling_dbrx.py`, `configuration_dbrx.py`).
//!
//! - Keys: `d_model` (2048; alias `hidden_size`), `n_layers` (24; alias `num_hidden_layers`),
//!   and in `ffn_config`: `moe_num_experts` (4), `moe_top_k` (1), `ffn_hidden_size` (3584, the
//!   experts' F), `moe_normalize_expert_weights` (1.0; null: no normalisation), `ffn_act_fn`
//!   (`{"name": "silu"}`). Every block is MoE.
//! - Routing (`DbrxFFN.route_tokens_to_experts`): softmax over all (in the logits' dtype),
//!   top-k, weights divided by their p-norm `(sum |w|^p)^(1/p)`, p = `moe_normalize_expert_weights`.
//! - Experts (`DbrxExpertGLU`): `transformer.blocks.{L}.ffn.experts.mlp.w1`, `v1`, `w2`, each
//!   `[E * F, D]`: expert `e` is rows `e*F .. (e+1)*F`; gate `x·w1ᵀ`, up `x·v1ᵀ`,
//!   `down = a · w2` (so `w2` holds the down projection input-major). Router
//!   `transformer.blocks.{L}.ffn.router.layer.weight` `[E, D]`. This fused layout is the only
//!   one DBRX checkpoints use.

use super::keys::{KeyResult, Keys};
use super::{ExpertNames, Fused, GateUp, MoeNames, check_layer};
use crate::model::config::{MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["n_layers", "num_hidden_layers"], 24, layer)?;
    let hidden = k.usize(&["d_model", "hidden_size"], Some(2048))?;
    let empty = serde_json::json!({});
    let ffn = k.object("ffn_config", "ffn_config.")?.unwrap_or(Keys::new(&empty, "ffn_config."));
    if let Some(act) = ffn.object("ffn_act_fn", "ffn_config.ffn_act_fn.")? {
        act.only(&["name"], &["silu", "swish"], "SwiGLU experts")?;
    }
    let cfg = MoeConfig::new(
        ffn.usize(&["moe_num_experts"], Some(4))?,
        hidden,
        ffn.usize(&["ffn_hidden_size"], Some(3584))?,
        ffn.usize(&["moe_top_k"], Some(1))?,
    );
    Ok(match ffn.opt_f64(&["moe_normalize_expert_weights"], Some(1.0))? {
        None => cfg.with_norm_topk_prob(false),
        Some(p) => cfg.with_norm_topk_prob(true).with_router(RouterConfig { norm_p: p as f32, ..Default::default() }),
    })
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let m = format!("{p}ffn");
    vec![MoeNames {
        router: format!("{m}.router.layer.weight"),
        bias: None,
        experts: ExpertNames::Fused(Fused {
            gate_up: GateUp::Split { gate: format!("{m}.experts.mlp.w1"), up: format!("{m}.experts.mlp.v1") },
            down: format!("{m}.experts.mlp.w2"),
            gate_up_in_major: false,
            down_in_major: true,
            biases: None,
        }),
        shared: None,
        mlx: false,
    }]
}
