//! What differs between model families: which `model_type` names them, their `config.json`
//! keys (spellings and the defaults their transformers configuration class applies), which
//! decoder layers are MoE, the routing and activation rules, and the tensor names of both
//! layouts they come in. One file per family, each written from that family's transformers 5
//! `configuration_*.py` and `modeling_*.py`; the README's family table sums them up.

mod dbrx;
mod deepseek_v2;
mod deepseek_v3;
mod ernie4_5_moe;
mod glm4_moe;
mod gpt_oss;
pub(crate) mod keys;
mod llama4;
mod minimax_m2;
mod mixtral;
mod mlx;
mod olmoe;
mod qwen2_moe;
mod qwen3_5_moe;
mod qwen3_moe;
mod qwen3_next;

use serde_json::Value;

use crate::model::config::MoeConfig;
use keys::{KeyResult, Keys};

/// A model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `mixtral`: softmax top-k, renormalised.
    Mixtral,
    /// `qwen2_moe`: softmax top-k, `norm_topk_prob`, a sigmoid-gated shared expert.
    Qwen2Moe,
    /// `qwen3_moe`: softmax top-k, `norm_topk_prob`.
    Qwen3Moe,
    /// `qwen3_next`: Qwen2-MoE's routing and gated shared expert.
    Qwen3Next,
    /// `qwen3_5_moe` (its `text_config`) or `qwen3_5_moe_text`: softmax top-k, always
    /// renormalised, a gated shared expert, every layer MoE.
    Qwen35Moe,
    /// `deepseek_v2`: softmax, greedy or group-limited greedy, scaled, shared experts.
    DeepseekV2,
    /// `deepseek_v3`: sigmoid, selection bias, top-two group scores, renormalised, scaled,
    /// shared experts.
    DeepseekV3,
    /// `kimi_k2`: a DeepSeek-V3 (its config and names); ships in FP8.
    KimiK2,
    /// `glm4_moe` (GLM-4.5, GLM-4.6): DeepSeek-V3's routing with its own defaults.
    Glm4Moe,
    /// `gpt_oss`: router bias on the logits, softmax over the chosen k, expert biases and the
    /// clamped SwiGLU; ships in MXFP4.
    GptOss,
    /// `olmoe`: softmax top-k, `norm_topk_prob`, every layer MoE.
    Olmoe,
    /// `llama4` (its `text_config`) or `llama4_text`: top-k on logits, sigmoid weights on the
    /// expert input, a shared expert.
    Llama4,
    /// `minimax_m2`: sigmoid, selection bias, always renormalised.
    MinimaxM2,
    /// `ernie4_5_moe`: softmax, selection bias, renormalised with a minimum, shared experts.
    Ernie45Moe,
    /// `dbrx`: softmax top-k, weights divided by their p-norm, experts fused as `w1`/`v1`/`w2`.
    Dbrx,
}

impl Family {
    /// Every family this library reads.
    pub const ALL: [Family; 15] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Qwen3Next,
        Family::Qwen35Moe,
        Family::DeepseekV2,
        Family::DeepseekV3,
        Family::KimiK2,
        Family::Glm4Moe,
        Family::GptOss,
        Family::Olmoe,
        Family::Llama4,
        Family::MinimaxM2,
        Family::Ernie45Moe,
        Family::Dbrx,
    ];

    /// The `model_type` values that name the family (the first is what the writer uses).
    pub fn model_types(self) -> &'static [&'static str] {
        match self {
            Family::Mixtral => &["mixtral"],
            Family::Qwen2Moe => &["qwen2_moe"],
            Family::Qwen3Moe => &["qwen3_moe"],
            Family::Qwen3Next => &["qwen3_next"],
            Family::Qwen35Moe => &["qwen3_5_moe", "qwen3_5_moe_text"],
            Family::DeepseekV2 => &["deepseek_v2"],
            Family::DeepseekV3 => &["deepseek_v3"],
            Family::KimiK2 => &["kimi_k2"],
            Family::Glm4Moe => &["glm4_moe"],
            Family::GptOss => &["gpt_oss"],
            Family::Olmoe => &["olmoe"],
            Family::Llama4 => &["llama4", "llama4_text"],
            Family::MinimaxM2 => &["minimax_m2"],
            Family::Ernie45Moe => &["ernie4_5_moe"],
            Family::Dbrx => &["dbrx"],
        }
    }

    /// The `model_type` values of every family, for messages.
    pub fn supported_model_types() -> String {
        Family::ALL.iter().flat_map(|f| f.model_types()).copied().collect::<Vec<_>>().join(", ")
    }

    /// The family of a parsed `config.json` and the object holding its text model's keys (the
    /// top level, or `text_config` for the multimodal `llama4` and `qwen3_5_moe` configs).
    pub(crate) fn from_config(config: &Value) -> KeyResult<(Family, Keys<'_>)> {
        let top = Keys::new(config, "");
        let t = top.opt_str(&["model_type"])?.ok_or("no model_type")?;
        let family = Family::ALL.into_iter().find(|f| f.model_types().contains(&t)).ok_or_else(|| {
            format!(
                "model_type {t:?} is not an MoE family this library reads (supported: {})",
                Family::supported_model_types()
            )
        })?;
        let keys = match t {
            "llama4" | "qwen3_5_moe" => top
                .object("text_config", "text_config.")?
                .ok_or_else(|| format!("model_type {t:?} has no text_config"))?,
            _ => top,
        };
        Ok((family, keys))
    }

    /// The MoE shape, routing, activation and shared expert of decoder layer `layer`, dtypes left
    /// at f32 for the caller. Errors name the key: a layer past the model or not an MoE layer,
    /// a missing or mistyped key, a value the library cannot honour.
    pub(crate) fn moe_config(self, k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
        let cfg = match self {
            Family::Mixtral => mixtral::config(k, layer),
            Family::Qwen2Moe => qwen2_moe::config(k, layer),
            Family::Qwen3Moe => qwen3_moe::config(k, layer),
            Family::Qwen3Next => qwen3_next::config(k, layer),
            Family::Qwen35Moe => qwen3_5_moe::config(k, layer),
            Family::DeepseekV2 => deepseek_v2::config(k, layer),
            Family::DeepseekV3 | Family::KimiK2 => deepseek_v3::config(k, layer),
            Family::Glm4Moe => glm4_moe::config(k, layer),
            Family::GptOss => gpt_oss::config(k, layer),
            Family::Olmoe => olmoe::config(k, layer),
            Family::Llama4 => llama4::config(k, layer),
            Family::MinimaxM2 => minimax_m2::config(k, layer),
            Family::Ernie45Moe => ernie4_5_moe::config(k, layer),
            Family::Dbrx => dbrx::config(k, layer),
        }?;
        cfg.validate().map_err(|e| format!("{e} ({}{})", k.path, self.key_names()))?;
        Ok(cfg)
    }

    /// Which keys give E, k, F and D (and the family's other constants), for messages.
    fn key_names(self) -> &'static str {
        match self {
            Family::Mixtral | Family::MinimaxM2 => {
                "E = num_local_experts, k = num_experts_per_tok, F = intermediate_size, D = hidden_size"
            }
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next | Family::Qwen35Moe => {
                "E = num_experts, k = num_experts_per_tok, F = moe_intermediate_size, D = hidden_size"
            }
            Family::DeepseekV2 | Family::DeepseekV3 | Family::KimiK2 | Family::Glm4Moe => {
                "E = n_routed_experts, k = num_experts_per_tok, F = moe_intermediate_size, D = hidden_size, \
                 groups = n_group / topk_group, scale = routed_scaling_factor"
            }
            Family::GptOss => {
                "E = num_local_experts, k = num_experts_per_tok, F = intermediate_size, D = hidden_size, \
                 alpha = swiglu_alpha, limit = swiglu_limit"
            }
            Family::Olmoe => "E = num_experts, k = num_experts_per_tok, F = intermediate_size, D = hidden_size",
            Family::Llama4 => "E = num_local_experts, k = num_experts_per_tok, F = intermediate_size, D = hidden_size",
            Family::Ernie45Moe => {
                "E = moe_num_experts, k = moe_k, F = moe_intermediate_size, D = hidden_size, min = moe_norm_min"
            }
            Family::Dbrx => {
                "E = ffn_config.moe_num_experts, k = ffn_config.moe_top_k, F = ffn_config.ffn_hidden_size, \
                 D = d_model, p = ffn_config.moe_normalize_expert_weights"
            }
        }
    }

    /// Where decoder layer `layer`'s tensors may be named: every (prefix, layout) the family's
    /// checkpoints use, in the order they are tried.
    pub(crate) fn candidates(self, layer: usize) -> Vec<MoeNames> {
        let prefixes: &[&str] = match self {
            Family::Llama4 => &["language_model.model.layers.", "model.language_model.layers.", "model.layers."],
            Family::Qwen35Moe => &["model.language_model.layers.", "model.layers."],
            Family::Dbrx => &["transformer.blocks."],
            _ => &["model.layers."],
        };
        let mut v = Vec::new();
        for p in prefixes {
            let p = format!("{p}{layer}.");
            v.extend(match self {
                Family::Mixtral => mixtral::names(&p),
                Family::Qwen2Moe | Family::Qwen3Next | Family::Qwen35Moe => qwen2_moe::names(&p),
                Family::Qwen3Moe | Family::Olmoe => qwen3_moe::names(&p),
                Family::DeepseekV2 => deepseek_v2::names(&p),
                Family::DeepseekV3 | Family::KimiK2 | Family::Glm4Moe => deepseek_v3::names(&p),
                Family::GptOss => gpt_oss::names(&p),
                Family::Llama4 => llama4::names(&p),
                Family::MinimaxM2 => minimax_m2::names(&p),
                Family::Ernie45Moe => ernie4_5_moe::names(&p),
                Family::Dbrx => dbrx::names(&p),
            });
        }
        // mlx-lm's conversions, tried after the transformers layouts.
        for p in mlx::prefixes(self) {
            v.extend(mlx::names(self, &format!("{p}{layer}.")));
        }
        v
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Mixtral => "Mixtral",
            Family::Qwen2Moe => "Qwen2-MoE",
            Family::Qwen3Moe => "Qwen3-MoE",
            Family::Qwen3Next => "Qwen3-Next",
            Family::Qwen35Moe => "Qwen3.5-MoE",
            Family::DeepseekV2 => "DeepSeek-V2",
            Family::DeepseekV3 => "DeepSeek-V3",
            Family::KimiK2 => "Kimi-K2",
            Family::Glm4Moe => "GLM-4.5",
            Family::GptOss => "gpt-oss",
            Family::Olmoe => "OLMoE",
            Family::Llama4 => "Llama 4",
            Family::MinimaxM2 => "MiniMax-M2",
            Family::Ernie45Moe => "ERNIE-4.5-MoE",
            Family::Dbrx => "DBRX",
        })
    }
}

/// The tensor names of one MoE layer in one layout.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MoeNames {
    /// The router weight, `[E, D]`.
    pub router: String,
    /// The router's per-expert bias vector (`[E]` or `[1, E]`): selection bias or logit bias.
    pub bias: Option<String>,
    pub experts: ExpertNames,
    /// The shared expert's gate, up, down projections (`.weight`) and its `[1, D]` gate weight.
    pub shared: Option<([String; 3], Option<String>)>,
    /// mlx-lm's naming: every linear is `{module}.weight`, quantized exactly when
    /// `{module}.scales` exists (with `{module}.biases` in affine mode), per
    /// [`crate::model::checkpoint`]'s reading of `config.json`'s `quantization`.
    pub mlx: bool,
}

/// Where the routed experts' weights are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ExpertNames {
    /// One tensor per expert and projection: `{prefix}{e}.{proj}.weight`, projections in the
    /// order gate, up, down, each `[out, in]`.
    PerExpert { prefix: String, proj: [&'static str; 3] },
    /// Tensors holding every expert.
    Fused(Fused),
}

/// Fused expert tensors: each `[E, a, b]` (or the same bytes as `[E * a, b]`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fused {
    pub gate_up: GateUp,
    pub down: String,
    /// Dense matrices stored `[E, in, out]` (gpt-oss, Llama 4) rather than `[E, out, in]`;
    /// for gate/up and for down. Quantized encodings are always `[E, out, in]`.
    pub gate_up_in_major: bool,
    pub down_in_major: bool,
    /// Projection biases (gpt-oss).
    pub biases: Option<BiasNames>,
}

/// Where fused experts' projection biases are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BiasNames {
    /// Gate and up `[E, 2F]`, split as the weights are, and down `[E, D]` (transformers).
    Joint(String, String),
    /// Gate `[E, F]`, up `[E, F]` and down `[E, D]` (mlx-lm's gpt-oss).
    Split([String; 3]),
}

/// How gate and up are stored in a fused layout.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GateUp {
    /// One tensor of `2F` outputs: gate then up (`concat`), or alternating gate, up
    /// (`interleaved`: output `2i` is gate `i`, `2i + 1` is up `i`).
    Joint { name: String, interleaved: bool },
    /// Two tensors of `F` outputs each (DBRX's `w1`, `v1`).
    Split { gate: String, up: String },
}

impl MoeNames {
    /// The layout's name, for messages.
    pub fn layout_name(&self) -> &'static str {
        match self.experts {
            ExpertNames::PerExpert { .. } => "per-expert",
            ExpertNames::Fused(_) => "fused",
        }
    }
}

/// The error for a dense layer.
pub(crate) fn not_moe(layer: usize, why: String) -> String {
    format!("layer {layer} is not an MoE layer ({why})")
}

/// `num_hidden_layers` (or its spellings), and an error for a layer past it.
pub(crate) fn check_layer(k: &Keys<'_>, names: &[&'static str], default: usize, layer: usize) -> KeyResult<usize> {
    let n = k.usize(names, Some(default))?;
    if layer >= n {
        return Err(format!("layer {layer} of a model with {n} layers ({}{} = {n})", k.path, names[0]));
    }
    Ok(n)
}

/// Per-expert names `{p}{module}.experts.{e}.{gate,up,down}.weight` and the transformers 5 fused
/// layout `{p}{module}.experts.gate_up_proj` `[E, 2F, D]` (gate then up) and `down_proj`
/// `[E, D, F]`, both with `{p}{module}.{router}`, the bias and shared expert as given.
pub(crate) fn both_layouts(
    router: String,
    bias: Option<String>,
    experts: String,
    proj: [&'static str; 3],
    shared: Option<([String; 3], Option<String>)>,
) -> Vec<MoeNames> {
    let per = MoeNames {
        router: router.clone(),
        bias: bias.clone(),
        experts: ExpertNames::PerExpert { prefix: format!("{experts}."), proj },
        shared: shared.clone(),
        mlx: false,
    };
    let fused = MoeNames {
        router,
        bias,
        experts: ExpertNames::Fused(Fused {
            gate_up: GateUp::Joint { name: format!("{experts}.gate_up_proj"), interleaved: false },
            down: format!("{experts}.down_proj"),
            gate_up_in_major: false,
            down_in_major: false,
            biases: None,
        }),
        shared,
        mlx: false,
    };
    vec![per, fused]
}

/// The three projections of a SwiGLU MLP module `{m}.{gate,up,down}_proj.weight`.
pub(crate) fn mlp_names(m: &str) -> [String; 3] {
    [format!("{m}.gate_proj.weight"), format!("{m}.up_proj.weight"), format!("{m}.down_proj.weight")]
}

/// The names every Qwen-style family's MoE block uses: `mlp.gate`, `mlp.experts`.
pub(crate) fn mlp_block(p: &str, bias: Option<String>, shared: Option<([String; 3], Option<String>)>) -> Vec<MoeNames> {
    both_layouts(format!("{p}mlp.gate.weight"), bias, format!("{p}mlp.experts"), GATE_UP_DOWN, shared)
}

/// Projection names of Qwen-style experts.
pub(crate) const GATE_UP_DOWN: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The family of a parsed `config.json` and the MoE config of its decoder layer `layer`, from
/// the keys alone (dtypes f32; [`crate::Checkpoint::moe_config`] also checks the counts against
/// the tensors and sets the dtypes). Errors name the key.
pub fn parse_config(config: &Value, layer: usize) -> crate::Result<(Family, MoeConfig)> {
    let (family, keys) = Family::from_config(config).map_err(crate::Error::invalid)?;
    Ok((family, family.moe_config(&keys, layer).map_err(crate::Error::invalid)?))
}
