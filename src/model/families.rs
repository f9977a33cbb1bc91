//! What differs between model families: `config.json` keys, which layers are MoE, the tensor
//! names, the routing. Names and keys follow each family's modeling code in Hugging Face
//! transformers (`modeling_mixtral.py`, `modeling_qwen2_moe.py`, `modeling_qwen3_moe.py`,
//! `modeling_deepseek_v2.py` / `_v3.py`).

use crate::model::config::{GroupScore, MoeConfig, RouterConfig};

/// A model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `mixtral`: `block_sparse_moe.gate`, `experts.{e}.w1` (gate), `w3` (up), `w2` (down);
    /// softmax over all experts, top-k, renormalised.
    Mixtral,
    /// `qwen2_moe`: `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj`, and a shared
    /// expert `mlp.shared_expert.*` scaled by `sigmoid(mlp.shared_expert_gate · x)`; softmax
    /// top-k, `norm_topk_prob`.
    Qwen2Moe,
    /// `qwen3_moe`: Qwen2-MoE's names without the shared expert; `norm_topk_prob`.
    Qwen3Moe,
    /// `deepseek_v2`: `mlp.gate`, `mlp.experts.{e}.*`, `mlp.shared_experts.*` (ungated);
    /// softmax scores, `greedy` or `group_limited_greedy` selection (groups scored by their
    /// best expert), weights scaled by `routed_scaling_factor` unless renormalised (as in
    /// DeepSeek's `modeling_deepseek.py`).
    DeepseekV2,
    /// `deepseek_v3`: V2's names plus `mlp.gate.e_score_correction_bias`; sigmoid scores, the
    /// bias added for selection only, groups scored by their top two (`noaux_tc`), weights
    /// renormalised if `norm_topk_prob`, then scaled by `routed_scaling_factor`.
    DeepseekV3,
}

fn bool_key(config: &serde_json::Value, key: &str) -> Option<bool> {
    config.get(key).and_then(|v| v.as_bool())
}

fn str_key<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    config.get(key).and_then(|v| v.as_str())
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

    /// The MoE shape, routing and shared expert of `layer` (dtypes left at f32 for the caller
    /// to set).
    pub(crate) fn moe_config(self, config: &serde_json::Value, layer: usize) -> Result<MoeConfig, String> {
        if !self.is_moe_layer(config, layer)? {
            return Err(format!("layer {layer} is a dense MLP layer in this {self:?} model, not an MoE layer"));
        }
        let hidden = usize_key(config, &["hidden_size"])?;
        let k = usize_key(config, &["num_experts_per_tok"])?;
        let norm = bool_key(config, "norm_topk_prob");
        let cfg = match self {
            Family::Mixtral => MoeConfig::new(
                usize_key(config, &["num_local_experts"])?,
                hidden,
                usize_key(config, &["intermediate_size"])?,
                k,
            ),
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let e = usize_key(config, &["num_experts"])?;
                let f = usize_key(config, &["moe_intermediate_size"])?;
                // transformers' Qwen2/Qwen3-MoE configs default norm_topk_prob to false.
                let cfg = MoeConfig::new(e, hidden, f, k).with_norm_topk_prob(norm.unwrap_or(false));
                match self {
                    Family::Qwen2Moe => match usize_key(config, &["shared_expert_intermediate_size"])? {
                        0 => cfg,
                        fs => cfg.with_shared_expert(fs, true),
                    },
                    _ => cfg,
                }
            }
            Family::DeepseekV2 | Family::DeepseekV3 => self.deepseek_config(config, hidden, k, norm)?,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    fn deepseek_config(
        self,
        config: &serde_json::Value,
        hidden: usize,
        k: usize,
        norm: Option<bool>,
    ) -> Result<MoeConfig, String> {
        let e = usize_key(config, &["n_routed_experts"])?;
        let f = usize_key(config, &["moe_intermediate_size"])?;
        let method = str_key(config, "topk_method").unwrap_or("greedy");
        let scoring = str_key(config, "scoring_func").unwrap_or("softmax");
        let scale = config.get("routed_scaling_factor").and_then(|v| v.as_f64()).unwrap_or(1.0) as f32;
        // DeepSeek's code renormalises only when top_k > 1.
        let norm = norm.unwrap_or(false) && k > 1;
        let groups = || -> Result<(usize, usize), String> {
            Ok((usize_key(config, &["n_group"])?, usize_key(config, &["topk_group"])?))
        };
        let router = match (self, method, scoring) {
            (Family::DeepseekV2, "greedy", "softmax") => {
                RouterConfig { routed_scaling_factor: if norm { 1.0 } else { scale }, ..Default::default() }
            }
            (Family::DeepseekV2, "group_limited_greedy", "softmax") => {
                let (n_group, topk_group) = groups()?;
                RouterConfig {
                    n_group,
                    topk_group,
                    group_score: GroupScore::Max,
                    routed_scaling_factor: if norm { 1.0 } else { scale },
                    ..Default::default()
                }
            }
            (Family::DeepseekV3, "noaux_tc", "sigmoid") => {
                let (n_group, topk_group) = groups()?;
                RouterConfig::deepseek_v3(n_group, topk_group, scale)
            }
            _ => {
                return Err(format!(
                    "{self:?} with topk_method {method:?} and scoring_func {scoring:?} is not a routing this \
                     library implements (V2: greedy or group_limited_greedy with softmax; V3: noaux_tc with sigmoid)"
                ));
            }
        };
        let cfg = MoeConfig::new(e, hidden, f, k).with_norm_topk_prob(norm).with_router(router);
        Ok(match config.get("n_shared_experts").and_then(|v| v.as_u64()).unwrap_or(0) {
            0 => cfg,
            n => cfg.with_shared_expert(n as usize * f, false),
        })
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

    /// The selection bias's tensor name (`[E]`), for families whose routing has one.
    pub(crate) fn bias_name(self, layer: usize) -> Option<String> {
        (self == Family::DeepseekV3).then(|| format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"))
    }

    /// The shared expert's gate, up, down tensor names and its gate weight's (`[1, D]`, gated
    /// families only); `None` for families without a shared expert.
    pub(crate) fn shared_names(self, layer: usize) -> Option<([String; 3], Option<String>)> {
        let p = match self {
            Family::Qwen2Moe => format!("model.layers.{layer}.mlp.shared_expert"),
            Family::DeepseekV2 | Family::DeepseekV3 => format!("model.layers.{layer}.mlp.shared_experts"),
            Family::Mixtral | Family::Qwen3Moe => return None,
        };
        let gate = (self == Family::Qwen2Moe).then(|| format!("model.layers.{layer}.mlp.shared_expert_gate.weight"));
        Some(([format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight"), format!("{p}.down_proj.weight")], gate))
    }
}
