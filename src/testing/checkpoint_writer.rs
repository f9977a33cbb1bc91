//! Writing small checkpoints in a family's layout: test fixtures and examples (the library
//! reads real checkpoints; it does not convert them).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::{GroupScore, MoeConfig, RouterConfig, Scoring};
use crate::model::families::Family;
use crate::model::weights::LayerWeights;
use crate::tensor::Tensor;

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    }
}

/// The tensors of MoE layer `layer` in `family`'s names: router, selection bias (`[1, E]`
/// f32, stored one-dimensional), every expert's three (`weights.experts` holds all `E`), the
/// shared expert's three and its gate. Errors when `weights` has a part `family` does not
/// name (a shared expert for Mixtral, a bias for DeepSeek-V2).
pub fn layer_tensors(family: Family, layer: usize, weights: &LayerWeights) -> Result<Vec<(String, Tensor)>> {
    let mut v = vec![(family.router_name(layer), weights.router.clone())];
    if let Some(b) = &weights.selection_bias {
        let name =
            family.bias_name(layer).ok_or_else(|| Error::invalid(format!("{family:?} has no selection bias")))?;
        v.push((name, Tensor::from_f32(DType::F32, 1, b.len(), b)?));
    }
    for (e, w) in weights.experts.iter().enumerate() {
        for (n, t) in family.expert_names(layer, e).into_iter().zip([&w.gate, &w.up, &w.down]) {
            v.push((n, t.clone()));
        }
    }
    if let Some(s) = &weights.shared {
        let (names, gate) =
            family.shared_names(layer).ok_or_else(|| Error::invalid(format!("{family:?} has no shared expert")))?;
        for (n, t) in names.into_iter().zip([&s.weights.gate, &s.weights.up, &s.weights.down]) {
            v.push((n, t.clone()));
        }
        match (gate, &s.gate) {
            (Some(n), Some(g)) => v.push((n, g.clone())),
            (None, None) => {}
            _ => return Err(Error::invalid(format!("{family:?}'s shared expert gating differs from the weights'"))),
        }
    }
    Ok(v)
}

/// The stored shape of a tensor: `[cols]` for the families' one 1-D tensor (the selection
/// bias, `*.e_score_correction_bias`), else `[rows, cols]`.
fn stored_shape(name: &str, t: &Tensor) -> Vec<usize> {
    if name.ends_with(".e_score_correction_bias") { vec![t.cols()] } else { vec![t.rows(), t.cols()] }
}

/// Write `tensors` to one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(st_dtype(t.dtype()), stored_shape(n, t), t.as_bytes())
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor {n}: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::invalid(format!("writing {}: {e:?}", path.display())))
}

/// `config.json` for a model of `layer + 1` decoder layers whose last is the MoE layer `cfg`
/// (the others dense), in `family`'s keys. Errors when `cfg` is not something `family`
/// expresses (its routing rules, its shared expert).
pub fn family_config(family: Family, cfg: &MoeConfig, layer: usize) -> Result<serde_json::Value> {
    let r = &cfg.router;
    let plain = *r == RouterConfig::default();
    let refuse = || {
        Error::invalid(format!("{family:?} cannot express routing {r:?} with shared expert {:?}", cfg.shared_expert))
    };
    let mut c = serde_json::json!({
        "hidden_size": cfg.hidden, "num_experts_per_tok": cfg.top_k, "num_hidden_layers": layer + 1,
        "norm_topk_prob": cfg.norm_topk_prob,
    });
    let extra = match family {
        Family::Mixtral if plain && cfg.shared_expert.is_none() && cfg.norm_topk_prob => serde_json::json!({
            "model_type": "mixtral", "intermediate_size": cfg.intermediate, "num_local_experts": cfg.num_experts,
        }),
        Family::Qwen3Moe | Family::Qwen2Moe if plain => {
            let shared = match (family, cfg.shared_expert) {
                (Family::Qwen3Moe, None) => 0,
                (Family::Qwen2Moe, None) => 0,
                (Family::Qwen2Moe, Some(s)) if s.gated => s.intermediate,
                _ => return Err(refuse()),
            };
            serde_json::json!({
                "model_type": if family == Family::Qwen2Moe { "qwen2_moe" } else { "qwen3_moe" },
                "moe_intermediate_size": cfg.intermediate, "num_experts": cfg.num_experts,
                "shared_expert_intermediate_size": shared,
                "mlp_only_layers": (0..layer).collect::<Vec<_>>(), "decoder_sparse_step": 1,
            })
        }
        Family::DeepseekV2 | Family::DeepseekV3 => {
            let n_shared = match cfg.shared_expert {
                None => 0,
                Some(s) if !s.gated && s.intermediate % cfg.intermediate == 0 => s.intermediate / cfg.intermediate,
                Some(_) => return Err(refuse()),
            };
            let (method, scoring) = match (family, r.scoring, r.group_score, r.selection_bias) {
                (Family::DeepseekV2, Scoring::Softmax, _, false) if r.n_group == 1 => ("greedy", "softmax"),
                (Family::DeepseekV2, Scoring::Softmax, GroupScore::Max, false) => ("group_limited_greedy", "softmax"),
                (Family::DeepseekV3, Scoring::Sigmoid, GroupScore::TopTwoSum, true) => ("noaux_tc", "sigmoid"),
                _ => return Err(refuse()),
            };
            // DeepSeek-V2 scales only weights it does not renormalise.
            if family == Family::DeepseekV2 && cfg.norm_topk_prob && r.routed_scaling_factor != 1.0 {
                return Err(refuse());
            }
            serde_json::json!({
                "model_type": if family == Family::DeepseekV2 { "deepseek_v2" } else { "deepseek_v3" },
                "moe_intermediate_size": cfg.intermediate, "n_routed_experts": cfg.num_experts,
                "n_shared_experts": n_shared, "n_group": r.n_group, "topk_group": r.topk_group,
                "topk_method": method, "scoring_func": scoring,
                "routed_scaling_factor": r.routed_scaling_factor,
                "first_k_dense_replace": layer, "moe_layer_freq": 1,
            })
        }
        _ => return Err(refuse()),
    };
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    Ok(c)
}

/// Write a checkpoint directory whose decoder layer `layer` (of `layer + 1`) is the MoE layer
/// `cfg` with `weights` (all `E` experts): `config.json` in the family's keys
/// ([`family_config`]), and the tensors ([`layer_tensors`]) in one `model.safetensors`
/// (`shards` = 1) or split over `shards` files with an index.
pub fn write_checkpoint(
    dir: &Path,
    family: Family,
    cfg: &MoeConfig,
    layer: usize,
    weights: &LayerWeights,
    shards: usize,
) -> Result<()> {
    let io = |e: std::io::Error| Error::invalid(format!("writing {}: {e}", dir.display()));
    let config = family_config(family, cfg, layer)?;
    let tensors = layer_tensors(family, layer, weights)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    if shards <= 1 {
        return write_safetensors(&dir.join("model.safetensors"), &tensors);
    }
    let per = tensors.len().div_ceil(shards);
    let mut map = HashMap::new();
    for (i, part) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_safetensors(&dir.join(&file), part)?;
        for (n, _) in part {
            map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(io)
}
