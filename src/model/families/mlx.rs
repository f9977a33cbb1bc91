//! The tensor names mlx-lm's converter (`mlx_lm.convert`) writes for each family: its model
//! classes' `sanitize` renames the Hugging Face tensors and stacks the experts into one
//! `SwitchGLU` per layer (`switch_mlp.{gate,up,down}_proj` `[E, out, in]`, or the family's own
//! module name: gpt-oss's and Llama 4's `experts.*`), except DBRX, whose experts stay one
//! module each (`experts.{e}.w1`, `v1`, `w2`). Every linear is `{module}.weight` with, when
//! quantized, `{module}.scales` and (mode `affine`) `{module}.biases` beside it, and its own
//! `{module}.bias` when it has one. Read from mlx-lm's `models/*.py`.
//!
//! Where mlx-lm's routing differs from transformers' (Qwen2-MoE never renormalises, DeepSeek
//! masks groups with 0 and omits the 1e-20, MiniMax adds 1e-20, DBRX always takes the L1
//! norm, ERNIE drops `e_score_correction_bias`), the layer follows transformers (the family
//! files); an mlx-lm ERNIE checkpoint has no selection bias tensor and routes with a zero one.

use super::{BiasNames, ExpertNames, Family, Fused, GateUp, MoeNames};

/// A stacked `SwitchGLU` under `{p}{module}.{experts}` with the router `{p}{module}.{router}`.
fn stacked(p: &str, module: &str, router: &str, experts: &str, bias: Option<&str>, shared: Option<&str>) -> MoeNames {
    let m = format!("{p}{module}");
    let proj = |n: &str| format!("{m}.{experts}.{n}.weight");
    MoeNames {
        router: format!("{m}.{router}.weight"),
        bias: bias.map(|b| format!("{m}.{b}")),
        experts: ExpertNames::Fused(Fused {
            gate_up: GateUp::Split { gate: proj("gate_proj"), up: proj("up_proj") },
            down: proj("down_proj"),
            gate_up_in_major: false,
            down_in_major: false,
            biases: None,
        }),
        shared: shared.map(|s| {
            let names = ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{m}.{s}.{n}.weight"));
            let gate = (module == "mlp" && s == "shared_expert").then(|| format!("{m}.shared_expert_gate.weight"));
            (names, gate)
        }),
        mlx: true,
    }
}

/// mlx-lm's names of decoder layer prefix `p` (`model.layers.{L}.` or the family's own).
pub(super) fn names(family: Family, p: &str) -> Vec<MoeNames> {
    let n = match family {
        Family::Mixtral => stacked(p, "block_sparse_moe", "gate", "switch_mlp", None, None),
        Family::MinimaxM2 => {
            stacked(p, "block_sparse_moe", "gate", "switch_mlp", Some("e_score_correction_bias"), None)
        }
        Family::Qwen2Moe | Family::Qwen3Next | Family::Qwen35Moe => {
            stacked(p, "mlp", "gate", "switch_mlp", None, Some("shared_expert"))
        }
        Family::Qwen3Moe | Family::Olmoe => stacked(p, "mlp", "gate", "switch_mlp", None, None),
        Family::DeepseekV2 | Family::Ernie45Moe => {
            stacked(p, "mlp", "gate", "switch_mlp", None, Some("shared_experts"))
        }
        Family::DeepseekV3 | Family::KimiK2 | Family::Glm4Moe => {
            stacked(p, "mlp", "gate", "switch_mlp", Some("gate.e_score_correction_bias"), Some("shared_experts"))
        }
        Family::GptOss => {
            let mut n = stacked(p, "mlp", "router", "experts", Some("router.bias"), None);
            if let ExpertNames::Fused(f) = &mut n.experts {
                let b = |x: &str| format!("{p}mlp.experts.{x}.bias");
                f.biases = Some(BiasNames::Split([b("gate_proj"), b("up_proj"), b("down_proj")]));
            }
            n
        }
        Family::Llama4 => stacked(p, "feed_forward", "router", "experts", None, Some("shared_expert")),
        Family::Dbrx => MoeNames {
            router: format!("{p}ffn.router.layer.weight"),
            bias: None,
            experts: ExpertNames::PerExpert { prefix: format!("{p}ffn.experts."), proj: ["w1", "v1", "w2"] },
            shared: None,
            mlx: true,
        },
    };
    vec![n]
}

/// The layer prefixes mlx-lm's checkpoints use.
pub(super) fn prefixes(family: Family) -> &'static [&'static str] {
    match family {
        Family::Llama4 | Family::Qwen35Moe => &["language_model.model.layers."],
        Family::Dbrx => &["transformer.blocks."],
        _ => &["model.layers."],
    }
}
