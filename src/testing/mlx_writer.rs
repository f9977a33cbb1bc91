//! Checkpoints as `mlx_lm.convert -q` writes them, for tests: every linear of the layer in
//! mlx-lm's names for the family, quantized with MLX's affine rounding
//! ([`crate::model::quant::affine`]) or in its mxfp4 mode, and `config.json`'s `quantization`
//! entry (also under `quantization_config`), with the per-module entries mlx-lm's models add.

use safetensors::Dtype as St;
use serde_json::{Value, json};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::families::{ExpertNames, Family, GateUp, MoeNames};
use crate::model::quant::affine::{MlxKernel, quantize_tensor};
use crate::model::weights::LayerWeights;
use crate::tensor::Tensor;
use crate::testing::checkpoint_writer::{Entry, mxfp4_encode};

/// How `mlx_lm.convert` quantized a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlxWrite {
    /// 4 or 8 (affine; mxfp4 is 4).
    pub bits: u32,
    /// 32, 64 or 128 (affine; mxfp4 is 32).
    pub group: u32,
    /// `--q-mode mxfp4` instead of affine.
    pub mxfp4: bool,
    /// Whether the router and the shared expert's gate are quantized as mlx-lm does (8 bits in
    /// groups of 64 where the family's model class pins them, the layer's bits otherwise;
    /// DeepSeek's and GLM's routers are plain arrays, left dense); `false` leaves them dense.
    pub routers: bool,
}

impl MlxWrite {
    /// Affine `bits` in groups of `group`, routers as mlx-lm quantizes them.
    pub fn affine(bits: u32, group: u32) -> Self {
        MlxWrite { bits, group, mxfp4: false, routers: true }
    }
}

/// mlx-lm's names of `family`'s layer `layer`.
pub(crate) fn mlx_names(family: Family, layer: usize) -> Result<MoeNames> {
    family
        .candidates(layer)
        .into_iter()
        .find(|c| c.mlx)
        .ok_or_else(|| Error::invalid(format!("mlx-lm does not convert {family}")))
}

/// Whether mlx-lm's model class pins `family`'s router (and shared gate) at 8 bits (its
/// `quant_predicate`), and whether its router is a plain array (never quantized).
fn router_rule(family: Family) -> (bool, bool) {
    match family {
        Family::Qwen3Moe | Family::Qwen3Next | Family::Qwen35Moe | Family::MinimaxM2 | Family::GptOss => (true, false),
        Family::DeepseekV2 | Family::DeepseekV3 | Family::KimiK2 | Family::Glm4Moe => (false, true),
        _ => (false, false),
    }
}

/// One linear `name` (`{module}.weight`) of `[rows, cols]` values (`e` stacked matrices of
/// `t`'s rows each, `stacked` giving them a leading dimension) as mlx-lm writes it:
/// quantized with `(bits, group)` (or mxfp4) when its inputs are whole groups, dense otherwise.
fn linear(name: &str, t: &Tensor, e: usize, q: Option<(u32, u32, bool)>) -> Result<Vec<Entry>> {
    let (rows, cols) = (t.rows() / e.max(1), t.cols());
    let lead = |last: usize| if e > 1 { vec![e, rows, last] } else { vec![rows, last] };
    let stem = name.strip_suffix(".weight").unwrap_or(name);
    let Some((bits, group, mx)) = q.filter(|&(_, g, _)| cols % g as usize == 0) else {
        return Ok(vec![Entry {
            name: name.into(),
            dtype: st(t.dtype()),
            shape: lead(cols),
            bytes: t.as_bytes().to_vec(),
        }]);
    };
    if mx {
        let (blocks, scales) = mxfp4_encode(&t.to_f32_vec(), t.rows(), cols)?;
        return Ok(vec![
            Entry { name: name.into(), dtype: St::U32, shape: lead(cols / 8), bytes: blocks },
            Entry { name: format!("{stem}.scales"), dtype: St::U8, shape: lead(cols / 32), bytes: scales },
        ]);
    }
    let m = quantize_tensor(t, bits, group, MlxKernel::Gpu)?;
    let crate::model::quant::Scales::Affine { scales, biases } = m.scales() else { unreachable!() };
    let words: Vec<u8> = m.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    let g = cols / group as usize;
    Ok(vec![
        Entry { name: name.into(), dtype: St::U32, shape: lead(cols * bits as usize / 32), bytes: words },
        Entry {
            name: format!("{stem}.scales"),
            dtype: st(scales.dtype()),
            shape: lead(g),
            bytes: scales.as_bytes().to_vec(),
        },
        Entry {
            name: format!("{stem}.biases"),
            dtype: st(biases.dtype()),
            shape: lead(g),
            bytes: biases.as_bytes().to_vec(),
        },
    ])
}

fn st(d: DType) -> St {
    match d {
        DType::F32 => St::F32,
        DType::F16 => St::F16,
        DType::BF16 => St::BF16,
    }
}

/// Rows of `ts` stacked into one tensor.
fn stack(ts: &[&Tensor]) -> Result<Tensor> {
    let first = ts.first().ok_or_else(|| Error::invalid("no experts"))?;
    let mut bytes = Vec::new();
    for t in ts {
        if t.dtype() != first.dtype() || t.cols() != first.cols() {
            return Err(Error::invalid("experts differ in dtype or shape"));
        }
        bytes.extend_from_slice(t.as_bytes());
    }
    Tensor::from_bytes(first.dtype(), ts.len() * first.rows(), first.cols(), &bytes)
}

/// Every tensor of the layer in mlx-lm's names `n`, and `config.json`'s `quantization` entry.
pub(crate) fn mlx_entries(family: Family, n: &MoeNames, w: &LayerWeights, mw: MlxWrite) -> Result<(Vec<Entry>, Value)> {
    let base = Some((mw.bits, mw.group, mw.mxfp4));
    let mut q = if mw.mxfp4 {
        json!({"group_size": 32, "bits": 4, "mode": "mxfp4"})
    } else {
        json!({"group_size": mw.group, "bits": mw.bits, "mode": "affine"})
    };
    let (pinned, plain) = router_rule(family);
    let mut small = |name: &str, t: &Tensor| -> Result<Vec<Entry>> {
        if !mw.routers || plain {
            return linear(name, t, 1, None);
        }
        if pinned {
            q[name.strip_suffix(".weight").unwrap_or(name)] = json!({"group_size": 64, "bits": 8});
            return linear(name, t, 1, Some((8, 64, false)));
        }
        linear(name, t, 1, base)
    };
    let mut v = small(&n.router, &w.router)?;
    if let (Some(b), Some(name)) = (&w.selection_bias, &n.bias) {
        let e = b.len();
        v.push(Entry {
            name: name.clone(),
            dtype: St::F32,
            shape: vec![e],
            bytes: b.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
    }
    let e = w.experts.len();
    match &n.experts {
        ExpertNames::Fused(fu) => {
            let GateUp::Split { gate, up } = &fu.gate_up else {
                return Err(Error::invalid("mlx-lm's stacked experts are split"));
            };
            let pick = |i: usize| -> Result<Vec<&Tensor>> {
                w.experts.iter().map(|x| x.projections()[i].dense_or_err("a written expert")).collect()
            };
            for (i, name) in [gate, up, &fu.down].into_iter().enumerate() {
                v.extend(linear(name, &stack(&pick(i)?)?, e, base)?);
            }
            if let Some(crate::model::families::BiasNames::Split(names)) = &fu.biases {
                for (i, name) in names.iter().enumerate() {
                    let vals: Vec<f32> = w
                        .experts
                        .iter()
                        .flat_map(|x| {
                            let b = x.bias.as_ref().expect("biased experts");
                            [&b.gate, &b.up, &b.down][i].clone()
                        })
                        .collect();
                    let t = Tensor::from_f32(DType::F32, e, vals.len() / e, &vals)?;
                    v.push(Entry {
                        name: name.clone(),
                        dtype: st(t.dtype()),
                        shape: vec![e, t.cols()],
                        bytes: t.as_bytes().to_vec(),
                    });
                }
            }
        }
        ExpertNames::PerExpert { prefix, proj } => {
            for (x, ew) in w.experts.iter().enumerate() {
                for (p, t) in proj.iter().zip([&ew.gate, &ew.up, &ew.down]) {
                    v.extend(linear(&format!("{prefix}{x}.{p}.weight"), t.dense_or_err("a written expert")?, 1, base)?);
                }
            }
        }
    }
    if let (Some(s), Some((names, gate))) = (&w.shared, &n.shared) {
        for (name, t) in names.iter().zip([&s.weights.gate, &s.weights.up, &s.weights.down]) {
            v.extend(linear(name, t.dense_or_err("a written shared expert")?, 1, base)?);
        }
        if let (Some(g), Some(name)) = (&s.gate, gate) {
            v.extend(small(name, g)?);
        }
    }
    Ok((v, q))
}
