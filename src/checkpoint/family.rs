//! What differs between model families: `config.json` keys, which layers are MoE, the tensor
//! names, the routing. Names and keys follow each family's modeling code in Hugging Face
//! transformers (`modeling_mixtral.py`, `modeling_qwen2_moe.py`, `modeling_qwen3_moe.py`,
//! `modeling_deepseek_v2.py` / `_v3.py`).

use crate::config::MoeConfig;

/// A model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `mixtral`: `block_sparse_moe.gate`, `experts.{e}.w1` (gate), `w3` (up), `w2` (down);
    /// softmax over all experts, top-k, renormalised.
    Mixtral,
    /// `qwen2_moe`: `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj`, and a gated
    /// shared expert (not supported yet).
    Qwen2Moe,
    /// `qwen3_moe`: Qwen2-MoE's names without the shared expert; `norm_topk_prob`.
    Qwen3Moe,
    /// `deepseek_v2`: group-limited greedy routing and shared experts (not supported yet).
    DeepseekV2,
    /// `deepseek_v3`: sigmoid scores with a selection bias, group-limited top-k, shared
    /// experts (not supported yet).
    DeepseekV3,
}

fn usize_key(config: &serde_json::Value, keys: &[&str]) -> Result<usize, String> {
    for k in keys {
        if let Some(v) = config.get(*k) {
            return v.as_u64().map(|v| v as usize).ok_or_else(|| format!("{k} is not a non-negative integer"));
        }
    }
    Err(format!("none of {keys:?} is set"))
}

impl Family {
    pub(crate) fn from_config(config: &serde_json::Value) -> Result<Family, String> {
        let t = config.get("model_type").and_then(|v| v.as_str()).ok_or("no model_type")?;
        Ok(match t {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "deepseek_v2" => Family::DeepseekV2,
            "deepseek_v3" => Family::DeepseekV3,
            other => {
                return Err(format!(
                    "model_type {other:?} is not an MoE family this library reads \
                     (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)"
                ));
            }
        })
    }

    /// Whether decoder layer `layer` has an MoE block, by the family's config keys.
    fn is_moe_layer(self, config: &serde_json::Value, layer: usize) -> Result<bool, String> {
        let layers = usize_key(config, &["num_hidden_layers"])?;
        if layer >= layers {
            return Err(format!("layer {layer} of a model with {layers} layers"));
        }
        Ok(match self {
            Family::Mixtral => true,
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let dense: Vec<u64> = config
                    .get("mlp_only_layers")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                let step = usize_key(config, &["decoder_sparse_step"]).unwrap_or(1).max(1);
                !dense.contains(&(layer as u64)) && (layer + 1) % step == 0
            }
            Family::DeepseekV2 | Family::DeepseekV3 => {
                let first = usize_key(config, &["first_k_dense_replace"]).unwrap_or(0);
                let freq = usize_key(config, &["moe_layer_freq"]).unwrap_or(1).max(1);
                layer >= first && layer % freq == 0
            }
        })
    }

    /// The MoE shape and routing of `layer` (dtypes left at f32 for the caller to set).
    pub(crate) fn moe_config(self, config: &serde_json::Value, layer: usize) -> Result<MoeConfig, String> {
        if !self.is_moe_layer(config, layer)? {
            return Err(format!("layer {layer} is a dense MLP layer in this {self:?} model, not an MoE layer"));
        }
        match self {
            Family::Qwen2Moe => {
                return Err("Qwen2-MoE's gated shared expert is not supported yet (issue 7)".into());
            }
            Family::DeepseekV2 | Family::DeepseekV3 => {
                return Err(format!(
                    "{self:?} routing (group-limited top-k) and shared experts are not supported yet (issue 7)"
                ));
            }
            Family::Mixtral | Family::Qwen3Moe => {}
        }
        let hidden = usize_key(config, &["hidden_size"])?;
        let (experts, inter, norm) = match self {
            Family::Mixtral => {
                (usize_key(config, &["num_local_experts"])?, usize_key(config, &["intermediate_size"])?, true)
            }
            _ => (
                usize_key(config, &["num_experts"])?,
                usize_key(config, &["moe_intermediate_size"])?,
                // transformers' Qwen3MoeConfig defaults norm_topk_prob to false.
                config.get("norm_topk_prob").and_then(|v| v.as_bool()).unwrap_or(false),
            ),
        };
        let k = usize_key(config, &["num_experts_per_tok"])?;
        let cfg = MoeConfig::new(experts, hidden, inter, k).with_norm_topk_prob(norm);
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// The router weight's tensor name.
    pub(crate) fn router_name(self, layer: usize) -> String {
        match self {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
            _ => format!("model.layers.{layer}.mlp.gate.weight"),
        }
    }

    /// Gate (`[F, D]`), up (`[F, D]`) and down (`[D, F]`) tensor names of expert `e`.
    pub(crate) fn expert_names(self, layer: usize, e: usize) -> [String; 3] {
        match self {
            Family::Mixtral => {
                let p = format!("model.layers.{layer}.block_sparse_moe.experts.{e}");
                [format!("{p}.w1.weight"), format!("{p}.w3.weight"), format!("{p}.w2.weight")]
            }
            _ => {
                let p = format!("model.layers.{layer}.mlp.experts.{e}");
                [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")]
            }
        }
    }
}
