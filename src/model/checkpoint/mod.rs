//! Hugging Face checkpoints: `config.json` and safetensors shards (one `model.safetensors`, or
//! several listed by `model.safetensors.index.json`), memory-mapped, so that a rank reads only
//! the tensors it asks for (its own experts, or its experts' slices of fused tensors, and the
//! router).
//!
//! ```text
//! let ckpt = Checkpoint::open("Qwen3-30B-A3B")?;
//! let cfg = ckpt.moe_config(layer)?;                       // checked against the tensors' shapes
//! println!("{}", ckpt.describe(layer)?);                   // family, layout, dtype
//! let weights = ckpt.layer_weights(layer, &placement, rank)?; // router, bias, shared, mine
//! let layer = MoeLayer::from_weights(group, cfg, placement, weights, gpu, options)?;
//! ```
//!
//! Families: see [`Family`] (one file each under `model/families/`). Layouts: per-expert or
//! fused ([`Layout`]), detected from the files. Encodings: f32, f16, bf16, FP8 E4M3 with block
//! scales and MXFP4, the quantized ones decoded to bf16 at load, one expert at a time on the
//! rank that owns it ([`dequant`]); [`Checkpoint::expert_projections`] gives the raw slices
//! instead, for a packed path.
//!
//! Every count in `config.json` is checked against the tensors' shapes before anything is
//! allocated from it; only regular files inside the directory are opened (`files`).

pub mod dequant;
pub(crate) mod files;
pub mod layout;
mod mlx;
mod resolve;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::model::families::Family;
pub use layout::{Encoding, Layout, RawProjection};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::MoeConfig;
use crate::model::placement::Placement;
use crate::model::quant::Quantize;
use crate::model::quant::affine::quantize_tensor;
use crate::model::weights::{ExpertBias, ExpertWeights, LayerWeights, SharedExpert, Weight};
use crate::tensor::Tensor;
#[cfg(feature = "testing")]
use files::Bytes;
use files::{Shard, ckpt_error};
use resolve::Resolved;

/// How [`Checkpoint::layer_weights_with`] reads expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Decode quantized experts at load (FP8 and MXFP4 to bf16, MLX affine to its scales'
    /// dtype) instead of keeping them packed, as they are by default (both engines compute
    /// on packed weights).
    pub decode: bool,
    /// Quantize dense experts (routed and shared) at load with MLX's affine quantization
    /// and rounding ([`crate::model::quant::affine`]), scales and biases in the weights'
    /// dtype; a projection whose inputs are not whole groups stays dense, as mlx-lm leaves
    /// it. The router and the shared expert's gate stay as the files have them.
    pub quantize: Option<Quantize>,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    family: Family,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name -> shard.
    index: HashMap<String, usize>,
    /// mlx-lm's `quantization` entry, for checkpoints `mlx_lm.convert` wrote.
    mlx: Option<mlx::MlxQuant>,
    bytes_read: AtomicU64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("family", &self.family)
            .field("files", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// What a layer's weights are in the files: the layout of the routed experts, how they are
/// encoded, and the dtype every weight has once read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub family: Family,
    pub layout: Layout,
    pub experts: Encoding,
    /// The weights' dtype once read ([`MoeConfig::weight_dtype`]).
    pub dtype: DType,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "family {}, layout {}, experts {}, weights {}", self.family, self.layout, self.experts, self.dtype)
    }
}

impl Checkpoint {
    /// Open `dir`: read `config.json`, map `model.safetensors` or every file named by
    /// `model.safetensors.index.json`, and parse their headers (no tensor data is read).
    /// Errors name the file: missing, not a regular file inside `dir`, not JSON, an unknown
    /// `model_type`, a truncated or corrupt safetensors file, an index naming a tensor its file
    /// lacks or a file outside the directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::debug_span!("checkpoint_open", dir = %dir.display()).entered();
        let config = files::read_json(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let (shards, index) = if std::fs::symlink_metadata(&index_path).is_ok() {
            let map = files::parse_index(&index_path, &files::read_json(&index_path)?)?;
            files::index_shards(map, |f| files::map_shard(files::inside(&dir, f)?))?
        } else {
            single(files::map_shard(dir.join("model.safetensors"))?)
        };
        Self::build(dir, config, shards, index)
    }

    /// A checkpoint held in memory: `config.json`'s bytes, the index's (or `None` for one file
    /// `model.safetensors`), and the files by name. Parsed and checked as [`Checkpoint::open`]
    /// does; for tests and the parser's fuzzing.
    #[cfg(feature = "testing")]
    pub fn from_memory(config: &[u8], index: Option<&[u8]>, files: Vec<(String, Vec<u8>)>) -> Result<Self> {
        let dir = PathBuf::from("<memory>");
        let config = files::parse_json(&dir.join("config.json"), config)?;
        let mut files: HashMap<String, Vec<u8>> = files.into_iter().collect();
        let mut take = |name: &str| -> Result<Shard> {
            let path = files::inside(&dir, name)?;
            let bytes = files.remove(name).ok_or_else(|| ckpt_error(&path, "cannot open: no such file"))?;
            Shard::parse(path, Bytes::Owned(bytes))
        };
        let (shards, index) = match index {
            Some(text) => {
                let p = dir.join("model.safetensors.index.json");
                files::index_shards(files::parse_index(&p, &files::parse_json(&p, text)?)?, take)?
            }
            None => single(take("model.safetensors")?),
        };
        Self::build(dir, config, shards, index)
    }

    fn build(
        dir: PathBuf,
        config: serde_json::Value,
        shards: Vec<Shard>,
        index: HashMap<String, usize>,
    ) -> Result<Self> {
        let family = Family::from_config(&config).map_err(|e| ckpt_error(&dir.join("config.json"), e))?.0;
        let mlx = mlx::parse(&config).map_err(|e| ckpt_error(&dir.join("config.json"), e))?;
        Ok(Checkpoint { dir, family, config, shards, index, mlx, bytes_read: AtomicU64::new(0) })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Bytes of all mapped files.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes.len() as u64).sum()
    }

    /// Bytes of tensor data (and scales) read out of the files so far: the pages this process
    /// touched. A fused tensor counts only the slices that were read.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The MoE layer shape and rules of decoder layer `layer`, with activations and weights in
    /// the dtype the weights have once read ([`Found::dtype`]). Every count is checked against
    /// the tensors' shapes. Errors when the layer has no MoE block, a key is missing, mistyped or
    /// describes what this library cannot honour, a tensor is missing or misshapen, or an
    /// encoding is not supported.
    pub fn moe_config(&self, layer: usize) -> Result<MoeConfig> {
        Ok(self.resolve(layer)?.cfg)
    }

    /// What layer `layer`'s weights are in the files (family, layout, encoding, dtype).
    pub fn found(&self, layer: usize) -> Result<Found> {
        let r = self.resolve(layer)?;
        Ok(Found { family: self.family, layout: r.layout, experts: r.enc, dtype: r.cfg.weight_dtype })
    }

    /// The router weight `[E, D]` of `layer`, in the weight dtype, or in f32 when the file has
    /// it in f32 (as transformers saves DeepSeek-V3's, GLM-4.5's and ERNIE-4.5's). A router
    /// mlx-lm quantized (most are kept at 8 bits) is dequantized to f32: it is replicated and
    /// small, and its values `s * q + b` round once to f32 (not to the weight dtype).
    pub fn router(&self, layer: usize) -> Result<Tensor> {
        let r = self.resolve(layer)?;
        self.linear(&r.names.router, r.cfg.num_experts, r.cfg.hidden, r.cfg.weight_dtype, r.names.mlx)
    }

    /// The router's per-expert bias vector `[E]` of `layer` as f32 (the selection bias of
    /// DeepSeek-V3, GLM-4.5, MiniMax-M2 and ERNIE, or gpt-oss's logit bias), `None` for
    /// families without one.
    pub fn selection_bias(&self, layer: usize) -> Result<Option<Vec<f32>>> {
        let r = self.resolve(layer)?;
        match &r.names.bias {
            Some(name) if r.cfg.router.uses_bias() => Ok(Some(self.bias_vector(name, r.cfg.num_experts)?)),
            // mlx-lm drops ERNIE-4.5's selection bias: its checkpoints route with none.
            None if r.cfg.router.uses_bias() && r.names.mlx => Ok(Some(vec![0.0; r.cfg.num_experts])),
            _ => Ok(None),
        }
    }

    /// The three projections of expert `e` of `layer` (gate, up, down) as stored: raw slices of
    /// the memory map and their scales, not yet decoded (nothing is counted as read).
    pub fn expert_projections(&self, layer: usize, e: usize) -> Result<[RawProjection<'_>; 3]> {
        let r = self.resolve(layer)?;
        self.check_expert(&r, e)?;
        self.projections(&r, e)
    }

    /// The weights of experts `ids` of `layer`, in that order, read from the files now (each
    /// expert's bytes only; quantized ones kept packed).
    pub fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertWeights>> {
        self.experts_with(layer, ids, &LoadOptions::default())
    }

    /// [`Checkpoint::experts`] read as `opts` says.
    pub fn experts_with(&self, layer: usize, ids: &[usize], opts: &LoadOptions) -> Result<Vec<ExpertWeights>> {
        let r = self.resolve(layer)?;
        ids.iter().map(|&e| self.expert(&r, e, opts)).collect()
    }

    fn check_expert(&self, r: &Resolved, e: usize) -> Result<()> {
        if e >= r.cfg.num_experts {
            return Err(Error::invalid(format!("expert {e} of a layer with {} experts", r.cfg.num_experts)));
        }
        Ok(())
    }

    fn expert(&self, r: &Resolved, e: usize, opts: &LoadOptions) -> Result<ExpertWeights> {
        self.check_expert(r, e)?;
        let p = self.projections(r, e)?;
        let w = self.load(r, &p, &format!("expert {e}"), opts)?;
        Ok(match self.expert_bias(r, e)? {
            Some(b) => w.with_bias(b),
            None => w,
        })
    }

    /// Three projections as expert weights: quantized ones packed (or with `opts.decode`
    /// decoded to the config's dtype), dense ones widened to it (or with `opts.quantize`
    /// quantized); counts the bytes read (a slice shared by gate and up once).
    fn load(&self, r: &Resolved, p: &[RawProjection<'_>; 3], what: &str, opts: &LoadOptions) -> Result<ExpertWeights> {
        let dt = r.cfg.weight_dtype;
        let mut t: Vec<Weight> = Vec::with_capacity(3);
        for (proj, name) in p.iter().zip(["gate", "up", "down"]) {
            let err = |m: String| ckpt_error(&self.dir, format!("{what} {name} projection: {m}"));
            t.push(match (proj.encoding.format(), opts.quantize) {
                (Some(_), _) if !opts.decode => Weight::Packed(proj.packed().map_err(err)?),
                (None, Some(q)) if proj.inp % q.group_size as usize == 0 => {
                    let dense = proj.decode(proj.encoding.decoded()).map_err(err)?;
                    Weight::Packed(quantize_tensor(&dense, q.bits, q.group_size, q.kernel)?)
                }
                _ => Weight::Dense(proj.decode(dt).map_err(err)?),
            });
        }
        let mut seen: Vec<(*const u8, usize)> = Vec::new();
        for proj in p {
            for s in [Some(proj.data), proj.scales, proj.biases].into_iter().flatten() {
                if !seen.contains(&(s.as_ptr(), s.len())) {
                    seen.push((s.as_ptr(), s.len()));
                    self.bytes_read.fetch_add(s.len() as u64, Ordering::Relaxed);
                }
            }
        }
        let down = t.pop().expect("three");
        let up = t.pop().expect("three");
        Ok(ExpertWeights::new(t.pop().expect("three"), up, down))
    }

    /// [`Checkpoint::shared_expert`] read as `opts` says.
    pub fn shared_expert_with(&self, layer: usize, opts: &LoadOptions) -> Result<Option<SharedExpert>> {
        let r = self.resolve(layer)?;
        let (Some(sc), Some((names, gate))) = (r.cfg.shared_expert, &r.names.shared) else {
            return Ok(None);
        };
        let p = self.shared_projections(&r, names, sc.intermediate)?;
        let weights = self.load(&r, &p, "the shared expert", opts)?;
        // A quantized gate (mlx-lm) is dequantized to f32, then rounded to the weight dtype.
        let gate = match gate {
            Some(name) if sc.gated => {
                Some(self.linear(name, 1, r.cfg.hidden, r.cfg.weight_dtype, r.names.mlx)?.to_dtype(r.cfg.weight_dtype))
            }
            _ => None,
        };
        Ok(Some(SharedExpert { weights, gate }))
    }

    /// The shared expert of `layer` (and its gate, when gated), if the layer has one; quantized
    /// ones kept packed.
    pub fn shared_expert(&self, layer: usize) -> Result<Option<SharedExpert>> {
        self.shared_expert_with(layer, &LoadOptions::default())
    }

    /// Everything rank `rank` holds of `layer` under `placement`: the router, the router's bias
    /// and shared expert if the family has them, and only that rank's experts. Errors as
    /// [`Checkpoint::experts`] does, and when the placement is for another expert count.
    pub fn layer_weights(&self, layer: usize, placement: &Placement, rank: usize) -> Result<LayerWeights> {
        self.layer_weights_with(layer, placement, rank, &LoadOptions::default())
    }

    /// [`Checkpoint::layer_weights`] with the experts read as `opts` says (packed, decoded,
    /// or quantized at load).
    pub fn layer_weights_with(
        &self,
        layer: usize,
        placement: &Placement,
        rank: usize,
        opts: &LoadOptions,
    ) -> Result<LayerWeights> {
        let cfg = self.moe_config(layer)?;
        if placement.num_experts() != cfg.num_experts || rank >= placement.world() {
            return Err(Error::invalid(format!(
                "placement of {} experts over {} ranks, asked for rank {rank}, for a layer of {} experts",
                placement.num_experts(),
                placement.world(),
                cfg.num_experts
            )));
        }
        Ok(LayerWeights {
            router: self.router(layer)?,
            selection_bias: self.selection_bias(layer)?,
            experts: self.experts_with(layer, placement.experts_of(rank), opts)?,
            shared: self.shared_expert_with(layer, opts)?,
        })
    }

    /// Tensor `name` as `[rows, cols]` in its own dtype (f32, f16, bf16), copied out of its file.
    /// Errors name the tensor and the file: missing, another shape, an unsupported dtype.
    pub fn tensor(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let dt = self.dense_dtype(name)?;
        self.tensor_as(name, &[rows, cols], dt)
    }

    /// One-dimensional tensor `name` of `len` entries, as f32 (from f32, f16 or bf16).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.tensor_as(name, &[len], DType::F32)?.to_f32_vec())
    }
}

/// One file holding every tensor.
fn single(shard: Shard) -> (Vec<Shard>, HashMap<String, usize>) {
    let index = shard.meta.tensors().keys().map(|n| (n.clone(), 0)).collect();
    (vec![shard], index)
}

impl Checkpoint {
    /// The expert biases of expert `e` (gpt-oss), as f32.
    fn expert_bias(&self, r: &Resolved, e: usize) -> Result<Option<ExpertBias>> {
        resolve::expert_bias(self, r, e)
    }
}
