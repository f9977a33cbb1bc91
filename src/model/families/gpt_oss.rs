//! gpt-oss (`modeling_gpt_oss.py`, `configuration_gpt_oss.py`, `integrations/mxfp4.py`).
//!
//! - Keys: `num_local_experts` (128; alias `num_experts`), `num_experts_per_tok` (4),
//!   `intermediate_size` (2880, the experts' F), `hidden_size` (2880), `num_hidden_layers`
//!   (36), `swiglu_alpha` (1.702), `swiglu_limit` (7.0). Every layer is MoE. (`hidden_act` is
//!   not read by the experts.)
//! - Routing (`GptOssTopKRouter`): logits `x·W^T + b` (`mlp.router.weight` `[E, D]`,
//!   `mlp.router.bias` `[E]`), top-k on the logits, softmax over the k chosen.
//! - Experts (`GptOssExperts`): `gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]` with
//!   `gate_up_proj` `[E, D, 2F]` (input-major) **interleaved** (gate = outputs 0, 2, 4, ..., up =
//!   1, 3, 5, ...), `gate_up_proj_bias` `[E, 2F]` likewise; `g = min(gate, limit)`,
//!   `u = clamp(up, -limit, limit)`, `a = (u + 1) * g * sigmoid(alpha * g)`;
//!   `y = a @ down_proj[e] + down_proj_bias[e]`, `down_proj` `[E, F, D]`, bias `[E, D]`.
//! - The Hub release is MXFP4: `gate_up_proj_blocks` `[E, 2F, D/32, 16]` and `_scales`
//!   `[E, 2F, D/32]` (output-major, rows interleaved as above), `down_proj_blocks`
//!   `[E, D, F/32, 16]`, `_scales` `[E, D, F/32]`; biases and router in bf16. There is no
//!   per-expert layout.

use super::check_layer;
use super::keys::{KeyResult, Keys};
use super::{BiasNames, ExpertNames, Fused, GateUp, MoeNames};
use crate::model::config::{Activation, MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    check_layer(k, &["num_hidden_layers"], 36, layer)?;
    let act = Activation::ClampedSwiglu {
        alpha: k.f64(&["swiglu_alpha"], Some(1.702))? as f32,
        limit: k.f64(&["swiglu_limit"], Some(7.0))? as f32,
    };
    let cfg = MoeConfig::new(
        k.usize(&["num_local_experts", "num_experts"], Some(128))?,
        k.usize(&["hidden_size"], Some(2880))?,
        k.usize(&["intermediate_size"], Some(2880))?,
        k.usize(&["num_experts_per_tok"], Some(4))?,
    );
    Ok(cfg.with_norm_topk_prob(false).with_router(RouterConfig::gpt_oss()).with_activation(act).with_expert_bias(true))
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let x = format!("{p}mlp.experts");
    vec![MoeNames {
        router: format!("{p}mlp.router.weight"),
        bias: Some(format!("{p}mlp.router.bias")),
        experts: ExpertNames::Fused(Fused {
            gate_up: GateUp::Joint { name: format!("{x}.gate_up_proj"), interleaved: true },
            down: format!("{x}.down_proj"),
            gate_up_in_major: true,
            down_in_major: true,
            biases: Some(BiasNames::Joint(format!("{x}.gate_up_proj_bias"), format!("{x}.down_proj_bias"))),
        }),
        shared: None,
        mlx: false,
    }]
}
