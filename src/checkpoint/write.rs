//! Writing small checkpoints in a family's layout: test fixtures and examples (the library
//! reads real checkpoints; it does not convert them).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;

use super::Family;
use crate::config::MoeConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::ExpertWeights;

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    }
}

/// The tensors of MoE layer `layer` in `family`'s names: router, then every expert's three.
pub fn layer_tensors(family: Family, layer: usize, gate: &Tensor, experts: &[ExpertWeights]) -> Vec<(String, Tensor)> {
    let mut v = vec![(family.router_name(layer), gate.clone())];
    for (e, w) in experts.iter().enumerate() {
        for (n, t) in family.expert_names(layer, e).into_iter().zip([&w.gate, &w.up, &w.down]) {
            v.push((n, t.clone()));
        }
    }
    v
}

/// Write `tensors` to one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(st_dtype(t.dtype()), vec![t.rows(), t.cols()], t.as_bytes())
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor {n}: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::invalid(format!("writing {}: {e:?}", path.display())))
}

/// Write a checkpoint directory whose decoder layer `layer` (of `layer + 1`) is the MoE layer
/// `cfg` with router `gate` and `experts`: `config.json` in the family's keys, and the tensors
/// in one `model.safetensors` (`shards` = 1) or split over `shards` files with an index.
/// Mixtral and Qwen3-MoE only (the families [`super::Checkpoint`] reads).
pub fn write_checkpoint(
    dir: &Path,
    family: Family,
    cfg: &MoeConfig,
    layer: usize,
    gate: &Tensor,
    experts: &[ExpertWeights],
    shards: usize,
) -> Result<()> {
    let io = |e: std::io::Error| Error::invalid(format!("writing {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let config = match family {
        Family::Mixtral => serde_json::json!({
            "model_type": "mixtral", "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "num_hidden_layers": layer + 1
        }),
        Family::Qwen3Moe => serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": cfg.hidden, "moe_intermediate_size": cfg.intermediate,
            "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
            "num_hidden_layers": layer + 1, "norm_topk_prob": cfg.norm_topk_prob,
            "mlp_only_layers": (0..layer).collect::<Vec<_>>(), "decoder_sparse_step": 1
        }),
        other => return Err(Error::invalid(format!("writing {other:?} checkpoints is not supported"))),
    };
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    let tensors = layer_tensors(family, layer, gate, experts);
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
