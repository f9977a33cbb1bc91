//! Llama 4 (`modeling_llama4.py`, `configuration_llama4.py`); the keys sit in `text_config`
//! of a `llama4` config or at the top of a `llama4_text` one.
//!
//! - Keys: `num_local_experts` (16), `num_experts_per_tok` (1), `intermediate_size` (8192: the
//!   experts' and the shared expert's F; dense layers use `intermediate_size_mlp`),
//!   `hidden_size` (5120), `num_hidden_layers` (48), `moe_layers` (none),
//!   `interleave_moe_layer_step` (1), `hidden_act`.
//! - MoE layers: those in `moe_layers` when it is set, else
//!   `range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step)`.
//! - Routing (`Llama4Router`): top-k on the logits; the chosen get `sigmoid(logit)`, the rest 0.
//!   `Llama4TextMoe` multiplies each expert's **input** by its score and sums the experts'
//!   outputs with weight 1 (`RouterConfig::weights_on_input`), then adds the shared expert
//!   (`feed_forward.shared_expert.*`, ungated) on the unscaled input.
//! - Names: `feed_forward.router.weight`, `feed_forward.experts.gate_up_proj` `[E, D, 2F]`
//!   (input-major, gate then up), `feed_forward.experts.down_proj` `[E, F, D]`; under
//!   `language_model.model.layers.` (Hub and transformers' multimodal save),
//!   `model.language_model.layers.` or `model.layers.` (text only). The Hub ships only this
//!   fused layout.

use super::keys::{KeyResult, Keys, require_silu};
use super::{ExpertNames, Fused, GateUp, MoeNames, check_layer, mlp_names, not_moe};
use crate::model::config::{MoeConfig, RouterConfig, Scoring};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    let n = check_layer(k, &["num_hidden_layers"], 48, layer)?;
    require_silu(k, &["hidden_act"])?;
    let moe = match k.usize_list(&["moe_layers"])? {
        Some(list) => list.contains(&layer),
        None => {
            let step = k.usize(&["interleave_moe_layer_step"], Some(1))?;
            if step == 0 {
                return Err(format!("{}interleave_moe_layer_step = 0", k.path));
            }
            layer + 1 >= step && (layer + 1 - step).is_multiple_of(step) && layer < n
        }
    };
    if !moe {
        return Err(not_moe(layer, format!("{}moe_layers / interleave_moe_layer_step", k.path)));
    }
    let f = k.usize(&["intermediate_size"], Some(8192))?;
    let router = RouterConfig { scoring: Scoring::Sigmoid, weights_on_input: true, ..Default::default() };
    let cfg = MoeConfig::new(
        k.usize(&["num_local_experts"], Some(16))?,
        k.usize(&["hidden_size"], Some(5120))?,
        f,
        k.usize(&["num_experts_per_tok"], Some(1))?,
    );
    Ok(cfg.with_norm_topk_prob(false).with_router(router).with_shared_expert(f, false))
}

pub(super) fn names(p: &str) -> Vec<MoeNames> {
    let m = format!("{p}feed_forward");
    vec![MoeNames {
        router: format!("{m}.router.weight"),
        bias: None,
        experts: ExpertNames::Fused(Fused {
            gate_up: GateUp::Joint { name: format!("{m}.experts.gate_up_proj"), interleaved: false },
            down: format!("{m}.experts.down_proj"),
            gate_up_in_major: true,
            down_in_major: true,
            biases: None,
        }),
        shared: Some((mlp_names(&format!("{m}.shared_expert")), None)),
        mlx: false,
    }]
}
