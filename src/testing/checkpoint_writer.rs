//! Writing small checkpoints in a family's layout and encoding: test fixtures and examples (the
//! library reads real checkpoints; it does not convert them).
//!
//! [`write_checkpoint_with`] writes `config.json` in the family's keys (the layer made the first
//! MoE layer, earlier ones dense by the family's own keys) and the layer's tensors in the
//! family's names for the chosen [`Layout`], dense or encoded as FP8 E4M3 with block scales or
//! MXFP4 ([`WriteEncoding`]), in one file or sharded with an index.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype as St;
use safetensors::tensor::TensorView;
use serde_json::json;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::checkpoint::dequant::{e2m1_value, e4m3_value};
use crate::model::checkpoint::layout::Layout;
use crate::model::config::{Activation, GroupScore, MoeConfig, RouterConfig, Scoring};
use crate::model::families::{BiasNames, ExpertNames, Family, Fused, GateUp, MoeNames};
use crate::model::weights::{ExpertWeights, LayerWeights};
use crate::tensor::Tensor;

/// How the experts (and shared experts) are encoded in the written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEncoding {
    /// As the weights are (their dtype).
    Dense,
    /// FP8 E4M3 with f32 block scales of `block` (rows, cols), `scale = max|w| / 448` per block.
    Fp8 { block: (usize, usize) },
    /// MXFP4 (fused layouts only): per 32 inputs the smallest power-of-two scale that fits.
    Mxfp4,
    /// As `mlx_lm.convert -q` writes it (mlx-lm's names; the layout is ignored): see
    /// [`crate::testing::mlx_writer`].
    Mlx(crate::testing::mlx_writer::MlxWrite),
}

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    pub layout: Layout,
    pub encoding: WriteEncoding,
    /// 1: one `model.safetensors`; more: that many files and an index.
    pub shards: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { layout: Layout::PerExpert, encoding: WriteEncoding::Dense, shards: 1 }
    }
}

/// One tensor as it goes into a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: St,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Entry {
    fn dense(name: String, shape: Vec<usize>, t: &Tensor) -> Entry {
        Entry { name, dtype: st_dtype(t.dtype()), shape, bytes: t.as_bytes().to_vec() }
    }
}

fn st_dtype(d: DType) -> St {
    match d {
        DType::F32 => St::F32,
        DType::F16 => St::F16,
        DType::BF16 => St::BF16,
    }
}

/// The layouts `family`'s checkpoints come in (gpt-oss, Llama 4 and DBRX ship only fused ones).
pub fn layouts(family: Family) -> Vec<Layout> {
    let mut v: Vec<Layout> = Vec::new();
    for c in family.candidates(0).into_iter().filter(|c| !c.mlx) {
        let l = layout_of(&c);
        if !v.contains(&l) {
            v.push(l);
        }
    }
    v
}

fn layout_of(n: &MoeNames) -> Layout {
    match n.experts {
        ExpertNames::PerExpert { .. } => Layout::PerExpert,
        ExpertNames::Fused(_) => Layout::Fused,
    }
}

/// The names `family` uses for `layer` in `layout` (the first such naming it reads).
fn names_for(family: Family, layer: usize, layout: Layout) -> Result<MoeNames> {
    family
        .candidates(layer)
        .into_iter()
        .find(|c| layout_of(c) == layout && !c.mlx)
        .ok_or_else(|| Error::invalid(format!("{family} checkpoints have no {layout} layout")))
}

/// The tensors of MoE layer `layer` (per-expert layout, dense) in `family`'s names, as
/// `(name, tensor)` with 2-D tensors (1-D ones `[1, n]`).
pub fn layer_tensors(family: Family, layer: usize, weights: &LayerWeights) -> Result<Vec<(String, Tensor)>> {
    let n = names_for(family, layer, Layout::PerExpert)?;
    let entries = entries(&n, weights, WriteEncoding::Dense)?;
    entries
        .into_iter()
        .map(|e| {
            let cols = *e.shape.last().unwrap_or(&1);
            let rows = e.shape.iter().rev().skip(1).product::<usize>();
            let dt = match e.dtype {
                St::F32 => DType::F32,
                St::F16 => DType::F16,
                _ => DType::BF16,
            };
            let mut t = Tensor::zeros(dt, rows, cols);
            t.as_bytes_mut().copy_from_slice(&e.bytes);
            Ok((e.name, t))
        })
        .collect()
}

/// Every tensor of the layer under `n` in `enc`.
fn entries(n: &MoeNames, w: &LayerWeights, enc: WriteEncoding) -> Result<Vec<Entry>> {
    let e = w.experts.len();
    let mut v = vec![Entry::dense(n.router.clone(), vec![w.router.rows(), w.router.cols()], &w.router)];
    if let Some(b) = &w.selection_bias {
        let name = n.bias.clone().ok_or_else(|| Error::invalid("this family's router has no bias vector"))?;
        let shape = if name.contains("moe_statics") { vec![1, e] } else { vec![e] };
        v.push(Entry::dense(name, shape, &Tensor::from_f32(DType::F32, 1, e, b)?));
    }
    match &n.experts {
        ExpertNames::PerExpert { prefix, proj } => {
            for (x, ew) in w.experts.iter().enumerate() {
                if ew.bias.is_some() {
                    return Err(Error::invalid("per-expert layouts have no expert biases"));
                }
                for (p, t) in proj.iter().zip([&ew.gate, &ew.up, &ew.down]) {
                    let t = t.dense_or_err("a written expert")?;
                    v.extend(matrix(format!("{prefix}{x}.{p}.weight"), t, enc, ".weight_scale_inv")?);
                }
            }
        }
        ExpertNames::Fused(f) => v.extend(fused(f, &w.experts, enc)?),
    }
    if let Some(s) = &w.shared {
        let (names, gate) = n.shared.clone().ok_or_else(|| Error::invalid("this family has no shared expert"))?;
        let enc = if enc == WriteEncoding::Mxfp4 { WriteEncoding::Dense } else { enc };
        for (name, t) in names.iter().zip([&s.weights.gate, &s.weights.up, &s.weights.down]) {
            v.extend(matrix(name.clone(), t.dense_or_err("a written shared expert")?, enc, "_scale_inv")?);
        }
        match (gate, &s.gate) {
            (Some(name), Some(g)) => v.push(Entry::dense(name, vec![1, g.cols()], g)),
            (None, None) => {}
            _ => return Err(Error::invalid("the shared expert's gating differs from the family's")),
        }
    }
    Ok(v)
}

/// A per-expert or shared `[out, in]` matrix, dense or FP8 with its `{stem}{suffix}` scales
/// (`.weight_scale_inv` replaces `.weight`; `_scale_inv` is appended).
fn matrix(name: String, t: &Tensor, enc: WriteEncoding, suffix: &str) -> Result<Vec<Entry>> {
    let shape = vec![t.rows(), t.cols()];
    match enc {
        WriteEncoding::Dense => Ok(vec![Entry::dense(name, shape, t)]),
        WriteEncoding::Fp8 { block } => {
            let scale_name = match suffix {
                ".weight_scale_inv" => format!("{}.weight_scale_inv", name.trim_end_matches(".weight")),
                _ => format!("{}_scale_inv", name),
            };
            let (q, s, sshape) = fp8_encode(&t.to_f32_vec(), t.rows(), t.cols(), block);
            Ok(vec![
                Entry { name, dtype: St::F8_E4M3, shape, bytes: q },
                Entry { name: scale_name, dtype: St::F32, shape: sshape.to_vec(), bytes: s },
            ])
        }
        WriteEncoding::Mxfp4 => Err(Error::invalid("MXFP4 is written for fused expert tensors only")),
        WriteEncoding::Mlx(_) => Err(Error::invalid("mlx-lm checkpoints are written by mlx_writer")),
    }
}

/// One expert's stored gate/up matrix (`[2F, D]`, or `[D, 2F]` when `in_major`), f32.
fn gate_up_of(w: &ExpertWeights, interleaved: bool, in_major: bool) -> Vec<f32> {
    let (f, d) = (w.gate.rows(), w.gate.cols());
    let (g, u) = (w.gate.to_f32_vec(), w.up.to_f32_vec());
    let mut out = vec![0f32; 2 * f * d];
    for j in 0..f {
        let (rg, ru) = if interleaved { (2 * j, 2 * j + 1) } else { (j, f + j) };
        for c in 0..d {
            let (ig, iu) = if in_major { (c * 2 * f + rg, c * 2 * f + ru) } else { (rg * d + c, ru * d + c) };
            out[ig] = g[j * d + c];
            out[iu] = u[j * d + c];
        }
    }
    out
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Fused tensors of every expert.
fn fused(fu: &Fused, experts: &[ExpertWeights], enc: WriteEncoding) -> Result<Vec<Entry>> {
    let w0 = experts.first().ok_or_else(|| Error::invalid("no experts"))?;
    let dt = w0.gate.dense_or_err("a written expert")?.dtype();
    let (e, f, d) = (experts.len(), w0.gate.rows(), w0.gate.cols());
    let dense_major = enc == WriteEncoding::Dense;
    let mut v = Vec::new();
    match &fu.gate_up {
        GateUp::Joint { name, interleaved } => {
            let im = fu.gate_up_in_major && dense_major;
            let all: Vec<f32> = experts.iter().flat_map(|w| gate_up_of(w, *interleaved, im)).collect();
            let (rows, cols) = if im { (d, 2 * f) } else { (2 * f, d) };
            v.extend(stack(name, &all, e, rows, cols, dt, enc, *interleaved)?);
        }
        GateUp::Split { gate, up } => {
            for (name, pick) in [(gate, 0), (up, 1)] {
                let all: Vec<f32> = experts
                    .iter()
                    .flat_map(|w| if pick == 0 { w.gate.to_f32_vec() } else { w.up.to_f32_vec() })
                    .collect();
                let mut es = stack(name, &all, e, f, d, dt, enc, false)?;
                es[0].shape = vec![e * f, d];
                v.extend(es);
            }
        }
    }
    let im = fu.down_in_major && dense_major;
    let all: Vec<f32> = experts
        .iter()
        .flat_map(|w| if im { transpose(&w.down.to_f32_vec(), d, f) } else { w.down.to_f32_vec() })
        .collect();
    let (rows, cols) = if im { (f, d) } else { (d, f) };
    let mut es = stack(&fu.down, &all, e, rows, cols, dt, enc, false)?;
    if matches!(fu.gate_up, GateUp::Split { .. }) {
        es[0].shape = vec![e * rows, cols];
    }
    v.extend(es);
    if let Some(BiasNames::Joint(gb, db)) = &fu.biases {
        let interleaved = matches!(fu.gate_up, GateUp::Joint { interleaved: true, .. });
        let mut both = Vec::with_capacity(e * 2 * f);
        let mut down = Vec::with_capacity(e * d);
        for w in experts {
            let b = w.bias.as_ref().ok_or_else(|| Error::invalid("this family's experts have biases"))?;
            for j in 0..f {
                if interleaved {
                    both.extend([b.gate[j], b.up[j]]);
                }
            }
            if !interleaved {
                both.extend(&b.gate);
                both.extend(&b.up);
            }
            down.extend(&b.down);
        }
        v.push(Entry::dense(gb.clone(), vec![e, 2 * f], &Tensor::from_f32(DType::F32, e, 2 * f, &both)?));
        v.push(Entry::dense(db.clone(), vec![e, d], &Tensor::from_f32(DType::F32, e, d, &down)?));
    } else if experts.iter().any(|w| w.bias.is_some()) {
        return Err(Error::invalid("this family's experts have no biases"));
    }
    Ok(v)
}

/// `[E, rows, cols]` (f32 values, every expert's stored matrix in turn) as `name` in `enc`.
#[allow(clippy::too_many_arguments)]
fn stack(
    name: &str,
    all: &[f32],
    e: usize,
    rows: usize,
    cols: usize,
    dt: DType,
    enc: WriteEncoding,
    interleaved: bool,
) -> Result<Vec<Entry>> {
    let per = rows * cols;
    match enc {
        WriteEncoding::Dense => {
            let t = Tensor::from_f32(dt, e * rows, cols, all)?;
            Ok(vec![Entry::dense(name.to_string(), vec![e, rows, cols], &t)])
        }
        WriteEncoding::Fp8 { block } => {
            if interleaved {
                return Err(Error::invalid("FP8 fused tensors are written with gate then up"));
            }
            let (mut q, mut s) = (Vec::new(), Vec::new());
            let mut srows = 0;
            for x in 0..e {
                let m = &all[x * per..(x + 1) * per];
                // gate_up scales per half (as transformers concatenates gate's and up's).
                let halves: Vec<(usize, usize)> = if name.ends_with("gate_up_proj") {
                    vec![(0, rows / 2), (rows / 2, rows)]
                } else {
                    vec![(0, rows)]
                };
                srows = 0;
                for (a, b) in halves {
                    let (qq, ss, sh) = fp8_encode(&m[a * cols..b * cols], b - a, cols, block);
                    q.extend(qq);
                    s.extend(ss);
                    srows += sh[0];
                }
            }
            let sc = cols.div_ceil(block.1);
            Ok(vec![
                Entry { name: name.to_string(), dtype: St::F8_E4M3, shape: vec![e, rows, cols], bytes: q },
                Entry { name: format!("{name}_scale_inv"), dtype: St::F32, shape: vec![e, srows, sc], bytes: s },
            ])
        }
        WriteEncoding::Mxfp4 => {
            let (blocks, scales) = mxfp4_encode(all, e * rows, cols)?;
            Ok(vec![
                Entry {
                    name: format!("{name}_blocks"),
                    dtype: St::U8,
                    shape: vec![e, rows, cols / 32, 16],
                    bytes: blocks,
                },
                Entry { name: format!("{name}_scales"), dtype: St::U8, shape: vec![e, rows, cols / 32], bytes: scales },
            ])
        }
        WriteEncoding::Mlx(_) => Err(Error::invalid("mlx-lm checkpoints are written by mlx_writer")),
    }
}

/// FP8 E4M3 bytes of `[rows, cols]` values with `scale = max|w| / 448` per block (1 for an
/// all-zero block), the scales as little-endian f32 bytes, and the scale grid's shape.
pub fn fp8_encode(v: &[f32], rows: usize, cols: usize, (bn, bk): (usize, usize)) -> (Vec<u8>, Vec<u8>, [usize; 2]) {
    let (sr, sc) = (rows.div_ceil(bn), cols.div_ceil(bk));
    let mut scales = vec![1f32; sr * sc];
    for (i, s) in scales.iter_mut().enumerate() {
        let (br, bc) = (i / sc, i % sc);
        let mut m = 0f32;
        for r in br * bn..((br + 1) * bn).min(rows) {
            for c in bc * bk..((bc + 1) * bk).min(cols) {
                m = m.max(v[r * cols + c].abs());
            }
        }
        if m > 0.0 {
            *s = m / 448.0;
        }
    }
    let q = (0..rows * cols).map(|i| e4m3_nearest(v[i] / scales[(i / cols / bn) * sc + (i % cols) / bk])).collect();
    (q, scales.iter().flat_map(|s| s.to_le_bytes()).collect(), [sr, sc])
}

/// The E4M3 byte nearest to `x` (ties to the even code), saturating at +-448.
fn e4m3_nearest(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let mut best = 0u8;
    for code in 0..0x7Fu8 {
        let (v, b) = (e4m3_value(code).expect("finite"), e4m3_value(best).expect("finite"));
        let (dv, db) = ((v - a).abs(), (b - a).abs());
        if dv < db || (dv == db && code % 2 == 0) {
            best = code;
        }
    }
    best | sign
}

/// MXFP4 blocks (`rows x cols / 2` bytes, low nibble first) and E8M0 scales (`rows x cols / 32`)
/// of `[rows, cols]` values: per 32 values the smallest power of two `2^s` with
/// `max|w| / 2^s <= 6`, values rounded to the nearest E2M1 (ties to the even code).
pub fn mxfp4_encode(v: &[f32], rows: usize, cols: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    if !cols.is_multiple_of(32) {
        return Err(Error::invalid(format!("MXFP4 needs inputs in blocks of 32, got {cols}")));
    }
    let (mut blocks, mut scales) = (Vec::new(), Vec::new());
    for blk in v[..rows * cols].chunks(32) {
        let m = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
        let s = if m == 0.0 { -127 } else { ((m / 6.0).log2().ceil() as i32).clamp(-127, 127) };
        scales.push((s + 127) as u8);
        let nib = |x: f32| -> u8 {
            let a = x.abs() / 2f32.powi(s);
            let mut best = 0u8;
            for code in 0..8u8 {
                let (dv, db) = ((e2m1_value(code) - a).abs(), (e2m1_value(best) - a).abs());
                if dv < db || (dv == db && code % 2 == 0) {
                    best = code;
                }
            }
            best | if x.is_sign_negative() && best != 0 { 8 } else { 0 }
        };
        for pair in blk.chunks(2) {
            blocks.push(nib(pair[0]) | (nib(pair[1]) << 4));
        }
    }
    Ok((blocks, scales))
}

/// Write `entries` to one safetensors file.
pub fn write_entries(path: &Path, entries: &[Entry]) -> Result<()> {
    let views = entries
        .iter()
        .map(|e| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (e.name.clone(), v))
                .map_err(|err| Error::invalid(format!("tensor {}: {err:?}", e.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::invalid(format!("writing {}: {e:?}", path.display())))
}

/// Write `(name, tensor)` pairs to one safetensors file (1-D for the selection bias names).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let entries: Vec<Entry> = tensors
        .iter()
        .map(|(n, t)| {
            let shape =
                if n.ends_with("e_score_correction_bias") && !n.contains("moe_statics") || n.ends_with("router.bias") {
                    vec![t.cols()]
                } else {
                    vec![t.rows(), t.cols()]
                };
            Entry::dense(n.clone(), shape, t)
        })
        .collect();
    write_entries(path, &entries)
}

/// `config.json` for a model whose decoder layer `layer` is the MoE layer `cfg` (earlier layers
/// dense by the family's keys where it has such keys), in `family`'s keys. Errors when `cfg` is
/// not something `family` expresses: the written config must read back as `cfg`.
pub fn family_config(family: Family, cfg: &MoeConfig, layer: usize) -> Result<serde_json::Value> {
    let c = family_keys(family, cfg, layer)?;
    let (f, keys) = Family::from_config(&c).map_err(Error::invalid)?;
    let back = f.moe_config(&keys, layer).map_err(Error::invalid)?;
    let want = cfg.clone().with_dtypes(crate::DType::F32, crate::DType::F32);
    let got = back.with_capacity(want.capacity).with_deterministic(want.deterministic);
    if got != want {
        return Err(Error::invalid(format!(
            "{family:?} cannot express this layer: its keys read back as {got:?}, not {want:?}"
        )));
    }
    Ok(c)
}

/// The keys, before the read-back check.
fn family_keys(family: Family, cfg: &MoeConfig, layer: usize) -> Result<serde_json::Value> {
    let (e, d, f, k, n) = (cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k, layer + 1);
    if cfg.activation != Activation::Silu && family != Family::GptOss {
        return Err(Error::invalid(format!("{family:?} cannot express this layer's activation {:?}", cfg.activation)));
    }
    Ok(match family {
        Family::Mixtral => json!({
            "model_type": "mixtral", "hidden_size": d, "intermediate_size": f, "num_local_experts": e,
            "num_experts_per_tok": k, "num_hidden_layers": n, "hidden_act": "silu",
        }),
        Family::Qwen2Moe => qwen_keys("qwen2_moe", "num_experts", cfg, layer),
        // transformers 5 writes Qwen3-MoE's expert count under its alias.
        Family::Qwen3Moe => qwen_keys("qwen3_moe", "num_local_experts", cfg, layer),
        Family::Qwen3Next => qwen_keys("qwen3_next", "num_experts", cfg, layer),
        Family::Qwen35Moe => json!({
            "model_type": "qwen3_5_moe",
            "text_config": {
                "model_type": "qwen3_5_moe_text", "hidden_size": d, "num_hidden_layers": n, "num_experts": e,
                "num_experts_per_tok": k, "moe_intermediate_size": f,
                "shared_expert_intermediate_size": cfg.shared_expert.map_or(0, |s| s.intermediate), "hidden_act": "silu",
            },
        }),
        Family::DeepseekV2 => {
            let mut c = deepseek_keys("deepseek_v2", cfg, layer);
            c["topk_method"] = if cfg.router.n_group > 1 { "group_limited_greedy" } else { "greedy" }.into();
            c["scoring_func"] = "softmax".into();
            c
        }
        // transformers 5's DeepSeek-V3 config has no scoring_func / topk_method; Kimi-K2's Hub
        // config (and GLM's) carry them.
        Family::DeepseekV3 => deepseek_keys("deepseek_v3", cfg, layer),
        Family::KimiK2 | Family::Glm4Moe => {
            let mut c = deepseek_keys(if family == Family::KimiK2 { "kimi_k2" } else { "glm4_moe" }, cfg, layer);
            c["scoring_func"] = "sigmoid".into();
            c["topk_method"] = "noaux_tc".into();
            c
        }
        _ => other_keys(family, cfg, layer)?,
    })
}

/// Qwen2-MoE-style keys, earlier layers dense through `mlp_only_layers`.
fn qwen_keys(mt: &str, experts_key: &str, cfg: &MoeConfig, layer: usize) -> serde_json::Value {
    json!({
        "model_type": mt, "hidden_size": cfg.hidden, "num_hidden_layers": layer + 1, experts_key: cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.intermediate,
        "shared_expert_intermediate_size": cfg.shared_expert.map_or(0, |s| s.intermediate),
        "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1,
        "mlp_only_layers": (0..layer).collect::<Vec<_>>(), "hidden_act": "silu",
    })
}

/// DeepSeek-style keys, earlier layers dense through `first_k_dense_replace`.
fn deepseek_keys(mt: &str, cfg: &MoeConfig, layer: usize) -> serde_json::Value {
    let (r, f) = (&cfg.router, cfg.intermediate);
    let shared = cfg.shared_expert.map_or(0, |s| s.intermediate);
    json!({
        "model_type": mt, "hidden_size": cfg.hidden, "num_hidden_layers": layer + 1, "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": f,
        "n_shared_experts": if shared.is_multiple_of(f) { shared / f } else { usize::MAX },
        "n_group": r.n_group, "topk_group": r.topk_group, "routed_scaling_factor": r.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob, "first_k_dense_replace": layer, "hidden_act": "silu",
    })
}

/// gpt-oss, OLMoE, Llama 4, MiniMax-M2, ERNIE-4.5 and DBRX keys.
fn other_keys(family: Family, cfg: &MoeConfig, layer: usize) -> Result<serde_json::Value> {
    let (e, d, f, k, n) = (cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k, layer + 1);
    let shared = cfg.shared_expert.map_or(0, |s| s.intermediate);
    Ok(match family {
        Family::GptOss => {
            let Activation::ClampedSwiglu { alpha, limit } = cfg.activation else {
                return Err(Error::invalid("gpt-oss experts use the clamped SwiGLU"));
            };
            json!({
                "model_type": "gpt_oss", "hidden_size": d, "intermediate_size": f, "num_local_experts": e,
                "num_experts_per_tok": k, "num_hidden_layers": n, "swiglu_alpha": alpha, "swiglu_limit": limit,
            })
        }
        Family::Olmoe => json!({
            "model_type": "olmoe", "hidden_size": d, "intermediate_size": f, "num_experts": e,
            "num_experts_per_tok": k, "num_hidden_layers": n, "norm_topk_prob": cfg.norm_topk_prob,
        }),
        Family::Llama4 => json!({
            "model_type": "llama4",
            "text_config": {
                "model_type": "llama4_text", "hidden_size": d, "intermediate_size": f, "num_local_experts": e,
                "num_experts_per_tok": k, "num_hidden_layers": n, "interleave_moe_layer_step": n,
                "hidden_act": "silu",
            },
        }),
        Family::MinimaxM2 => json!({
            "model_type": "minimax_m2", "hidden_size": d, "intermediate_size": f, "num_local_experts": e,
            "num_experts_per_tok": k, "num_hidden_layers": n, "scoring_func": "sigmoid", "use_routing_bias": true,
        }),
        Family::Ernie45Moe => json!({
            "model_type": "ernie4_5_moe", "hidden_size": d, "num_hidden_layers": n, "moe_num_experts": e,
            "moe_k": k, "moe_intermediate_size": f, "moe_num_shared_experts": if shared.is_multiple_of(f) { shared / f } else { usize::MAX },
            "moe_layer_start_index": layer, "moe_layer_end_index": -1, "moe_layer_interval": 1,
            "moe_norm_min": cfg.router.norm_min, "hidden_act": "silu",
        }),
        Family::Dbrx => json!({
            "model_type": "dbrx", "d_model": d, "n_layers": n,
            "ffn_config": {
                "moe_num_experts": e, "moe_top_k": k, "ffn_hidden_size": f,
                "moe_normalize_expert_weights": if cfg.norm_topk_prob { json!(cfg.router.norm_p) } else { json!(null) },
                "ffn_act_fn": {"name": "silu"},
            },
        }),
        other => return Err(Error::invalid(format!("{other:?} is written by family_keys"))),
    })
}

/// Write a checkpoint directory whose decoder layer `layer` (of `layer + 1`) is the MoE layer
/// `cfg` with `weights` (all `E` experts): `config.json` ([`family_config`]) and the tensors in
/// the family's per-expert names, dense, in one `model.safetensors` (`shards` = 1) or split over
/// `shards` files with an index. Families without a per-expert layout get their fused one.
pub fn write_checkpoint(
    dir: &Path,
    family: Family,
    cfg: &MoeConfig,
    layer: usize,
    weights: &LayerWeights,
    shards: usize,
) -> Result<()> {
    let layout = layouts(family)[0];
    write_checkpoint_with(dir, family, cfg, layer, weights, &WriteOptions { layout, shards, ..Default::default() })
}

/// [`write_checkpoint`] in a chosen layout and encoding. Quantized encodings add the
/// `quantization_config` the releases carry (`fp8` with `weight_block_size`, or `mxfp4`).
pub fn write_checkpoint_with(
    dir: &Path,
    family: Family,
    cfg: &MoeConfig,
    layer: usize,
    weights: &LayerWeights,
    opts: &WriteOptions,
) -> Result<()> {
    let io = |e: std::io::Error| Error::invalid(format!("writing {}: {e}", dir.display()));
    let mut config = family_config(family, cfg, layer)?;
    match opts.encoding {
        WriteEncoding::Dense => {}
        WriteEncoding::Fp8 { block } => {
            config["quantization_config"] = json!({
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block.0, block.1],
            })
        }
        WriteEncoding::Mxfp4 => config["quantization_config"] = json!({"quant_method": "mxfp4"}),
        WriteEncoding::Mlx(_) => {}
    }
    let tensors = if let WriteEncoding::Mlx(mw) = opts.encoding {
        let names = crate::testing::mlx_writer::mlx_names(family, layer)?;
        let (t, q) = crate::testing::mlx_writer::mlx_entries(family, &names, weights, mw)?;
        config["quantization"] = q.clone();
        config["quantization_config"] = q;
        t
    } else {
        entries(&names_for(family, layer, opts.layout)?, weights, opts.encoding)?
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    if opts.shards <= 1 {
        return write_entries(&dir.join("model.safetensors"), &tensors);
    }
    let per = tensors.len().div_ceil(opts.shards);
    let mut map = HashMap::new();
    for (i, part) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, opts.shards);
        write_entries(&dir.join(&file), part)?;
        for e in part {
            map.insert(e.name.clone(), file.clone());
        }
    }
    let index = json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(io)
}

/// A small config of `family`'s routing, activation and shared expert (E experts, D, F, k as
/// given), as [`family_config`] expresses it; for tests and examples.
pub fn family_moe(family: Family, e: usize, d: usize, f: usize, k: usize) -> MoeConfig {
    let base = MoeConfig::new(e, d, f, k);
    let v3 = RouterConfig::deepseek_v3(4.min(e / 2).max(1), 2.min(e / 2).max(1), 2.5);
    match family {
        Family::Mixtral => base,
        Family::Qwen2Moe | Family::Qwen3Next => {
            base.with_norm_topk_prob(family == Family::Qwen3Next).with_shared_expert(f + 8, true)
        }
        Family::Qwen35Moe => base.with_shared_expert(f + 8, true),
        Family::Qwen3Moe | Family::Olmoe => base.with_norm_topk_prob(false),
        Family::DeepseekV2 => {
            base.with_norm_topk_prob(false).with_shared_expert(2 * f, false).with_router(RouterConfig {
                n_group: 4,
                topk_group: 2,
                group_score: GroupScore::Max,
                routed_scaling_factor: 16.0,
                ..Default::default()
            })
        }
        Family::DeepseekV3 | Family::KimiK2 => base.with_router(v3).with_shared_expert(f, false),
        Family::Glm4Moe => {
            base.with_router(RouterConfig { routed_scaling_factor: 1.5, ..v3 }).with_shared_expert(f, false)
        }
        Family::GptOss => base
            .with_norm_topk_prob(false)
            .with_router(RouterConfig::gpt_oss())
            .with_activation(Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 })
            .with_expert_bias(true),
        Family::Llama4 => MoeConfig::new(e, d, f, 1)
            .with_norm_topk_prob(false)
            .with_router(RouterConfig { scoring: Scoring::Sigmoid, weights_on_input: true, ..Default::default() })
            .with_shared_expert(f, false),
        Family::MinimaxM2 => {
            base.with_router(RouterConfig { scoring: Scoring::Sigmoid, selection_bias: true, ..Default::default() })
        }
        Family::Ernie45Moe => base
            .with_router(RouterConfig { selection_bias: true, norm_min: 1e-12, ..Default::default() })
            .with_shared_expert(2 * f, false),
        Family::Dbrx => base.with_router(RouterConfig { norm_p: 1.0, ..Default::default() }),
    }
}
