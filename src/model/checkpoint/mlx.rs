//! mlx-lm's quantization entry of `config.json`, as `mlx_lm.convert` writes it
//! (`quantize_model` in mlx-lm's `utils.py`): `"quantization": {"group_size": 64, "bits": 4,
//! "mode": "affine", "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}, ...}` (the same
//! object again under `quantization_config`). The top-level numbers apply to every module
//! that has a `.scales` tensor and no entry of its own; an entry of its own (a module path
//! mapped to `{group_size, bits[, mode]}`, or `false`) overrides them (mlx-lm's models pin
//! their routers at 8 bits that way). A module is quantized exactly when its `.scales`
//! tensor exists: mlx-lm leaves a linear dense when its input width is not a multiple of the
//! group size, and some routers are plain arrays, never quantized.

use std::collections::HashMap;

use serde_json::Value;

/// The quantization mode of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MlxMode {
    /// `w = scale * q + bias` per group ([`crate::model::quant::QuantFormat::Affine`]).
    Affine,
    /// MXFP4 (`uint32` words of E2M1 nibbles, `uint8` E8M0 scales per 32).
    Mxfp4,
}

/// Bits, group size and mode of a module.
pub(crate) type MlxParams = (u32, u32, MlxMode);

/// The parsed `quantization` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MlxQuant {
    default: MlxParams,
    /// Per-module entries: `None` for `false` (left dense).
    modules: HashMap<String, Option<MlxParams>>,
}

impl MlxQuant {
    /// The parameters of module `path` (a tensor name without `.weight`): its own entry, else
    /// the defaults; `None` when its entry says `false`.
    pub fn of(&self, path: &str) -> Option<MlxParams> {
        self.modules.get(path).copied().unwrap_or(Some(self.default))
    }
}

/// One entry's parameters; absent keys take `to_quantized`'s defaults (mode affine; 4 bits in
/// groups of 64, mxfp4 4 bits in groups of 32), not the top-level ones, as mlx's
/// `nn.quantize` passes a module's own entry as the keyword arguments of `to_quantized`.
fn params(v: &Value, at: &str) -> Result<MlxParams, String> {
    let num = |k: &str, d: Option<u32>| -> Result<u32, String> {
        match v.get(k) {
            None => d.ok_or_else(|| format!("{at}.{k} is missing")),
            Some(x) => x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{at}.{k} = {x} is not a non-negative integer")),
        }
    };
    let mode = match v.get("mode").map(|m| m.as_str().ok_or_else(|| format!("{at}.mode = {m} is not a string"))) {
        None => MlxMode::Affine,
        Some(m) => match m? {
            "affine" => MlxMode::Affine,
            "mxfp4" => MlxMode::Mxfp4,
            other => {
                return Err(format!("{at}.mode = {other:?} is not supported: this library reads affine and mxfp4"));
            }
        },
    };
    let (db, dg) = match mode {
        MlxMode::Mxfp4 => (Some(4), Some(32)),
        MlxMode::Affine => (Some(4), Some(64)),
    };
    let (bits, group) = (num("bits", db)?, num("group_size", dg)?);
    let ok = match mode {
        MlxMode::Affine => matches!(bits, 4 | 8) && matches!(group, 32 | 64 | 128),
        MlxMode::Mxfp4 => bits == 4 && group == 32,
    };
    if !ok {
        return Err(format!(
            "{at}: {bits}-bit {mode:?} in groups of {group} is not supported (affine: 4 or 8 bits in groups of \
             32, 64 or 128; mxfp4: 4 bits in groups of 32)"
        ));
    }
    Ok((bits, group, mode))
}

/// The `quantization` entry of `config` (or an mlx-lm `quantization_config`, which has no
/// `quant_method`), `None` when there is none. Errors name the key.
pub(crate) fn parse(config: &Value) -> Result<Option<MlxQuant>, String> {
    let (q, at) = match (config.get("quantization"), config.get("quantization_config")) {
        (Some(q), _) if !q.is_null() => (q, "quantization"),
        (_, Some(q)) if q.get("quant_method").is_none() && q.get("bits").is_some() => (q, "quantization_config"),
        _ => return Ok(None),
    };
    let obj = q.as_object().ok_or_else(|| format!("{at} = {q} is not an object"))?;
    let default = params(q, at)?;
    let mut modules = HashMap::new();
    for (k, v) in obj {
        if matches!(k.as_str(), "bits" | "group_size" | "mode") {
            continue;
        }
        let p = match v {
            Value::Bool(false) => None,
            Value::Bool(true) => Some(default),
            Value::Object(_) => Some(params(v, &format!("{at}.{k}"))?),
            other => return Err(format!("{at}.{k} = {other} is neither an object nor a boolean")),
        };
        modules.insert(k.clone(), p);
    }
    Ok(Some(MlxQuant { default, modules }))
}

/// `{stem}.{what}` for the `.weight` tensor `name` (mlx-lm's `.scales`, `.biases`, `.bias`).
pub(crate) fn companion(name: &str, what: &str) -> String {
    format!("{}.{what}", name.strip_suffix(".weight").unwrap_or(name))
}
