//! Hugging Face checkpoints: `config.json` and safetensors shards (one `model.safetensors`, or
//! several listed by `model.safetensors.index.json`), memory-mapped, so that a rank reads only
//! the tensors it asks for (its own experts and the router).
//!
//! ```text
//! let ckpt = Checkpoint::open("Qwen3-30B-A3B")?;
//! let cfg = ckpt.moe_config(layer)?;
//! let weights = ckpt.layer_weights(layer, &placement, rank)?; // router, bias, shared, mine
//! let layer = MoeLayer::from_weights(group, cfg, placement, weights, gpu, options)?;
//! ```
//!
//! Families: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE, DeepSeek-V2 (greedy and
//! group-limited greedy) and DeepSeek-V3 (sigmoid, selection bias, top-two group scores); see
//! [`Family`]. FP8 checkpoints (DeepSeek-V3's original release) are refused by dtype.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;

pub use crate::model::families::Family;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::MoeConfig;
use crate::model::placement::Placement;
use crate::model::weights::{ExpertWeights, LayerWeights, SharedExpert};
use crate::tensor::Tensor;

/// One mapped safetensors file and its parsed header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Bytes before the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    family: Family,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name -> shard.
    index: HashMap<String, usize>,
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

fn ckpt_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("checkpoint {}: {what}", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ckpt_error(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| ckpt_error(path, format!("not valid JSON: {e}")))
}

fn map_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| ckpt_error(path, format!("cannot open: {e}")))?;
    // SAFETY: the file is mapped read-only; a checkpoint modified while mapped is outside
    // what this library can defend against (as for every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ckpt_error(path, format!("cannot map: {e}")))?;
    let (n, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| ckpt_error(path, format!("not a complete safetensors file ({e:?}; truncated or corrupt?)")))?;
    Ok(Shard { path: path.to_path_buf(), map, data_start: 8 + n, meta })
}

impl Checkpoint {
    /// Open `dir`: read `config.json`, map `model.safetensors` or every file named by
    /// `model.safetensors.index.json`, and parse their headers (no tensor data is read).
    /// Errors name the file: missing, not JSON, an unknown `model_type`, a truncated or corrupt
    /// safetensors file, an index naming a tensor its file lacks.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::debug_span!("checkpoint_open", dir = %dir.display()).entered();
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let family = Family::from_config(&config).map_err(|e| ckpt_error(&config_path, e))?;
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let idx = read_json(&index_path)?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ckpt_error(&index_path, "no weight_map object"))?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            for (name, file) in map {
                let file =
                    file.as_str().ok_or_else(|| ckpt_error(&index_path, format!("{name}: file is not a string")))?;
                let s = match by_file.get(file) {
                    Some(&s) => s,
                    None => {
                        shards.push(map_shard(&dir.join(file))?);
                        by_file.insert(file.to_string(), shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if shards[s].meta.info(name).is_none() {
                    return Err(ckpt_error(
                        &shards[s].path,
                        format!("the index puts tensor {name} here, but it is not"),
                    ));
                }
                index.insert(name.clone(), s);
            }
        } else {
            let shard = map_shard(&dir.join("model.safetensors"))?;
            for name in shard.meta.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            shards.push(shard);
        }
        Ok(Checkpoint { dir, family, config, shards, index, bytes_read: AtomicU64::new(0) })
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
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// Bytes of tensor data copied out of the files so far (the pages this process touched).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The MoE layer shape and routing of decoder layer `layer`, with activations and weights
    /// in the checkpoint's dtype (of the layer's router weight). Errors when the layer has no
    /// MoE block, or when its keys describe a routing this library does not implement.
    pub fn moe_config(&self, layer: usize) -> Result<MoeConfig> {
        let cfg =
            self.family.moe_config(&self.config, layer).map_err(|e| ckpt_error(&self.dir.join("config.json"), e))?;
        let dtype = self.dtype_of(&self.family.router_name(layer))?;
        Ok(cfg.with_dtypes(dtype, dtype))
    }

    /// The router weight `[E, D]` of `layer`.
    pub fn router(&self, layer: usize) -> Result<Tensor> {
        let cfg = self.moe_config(layer)?;
        self.tensor(&self.family.router_name(layer), cfg.num_experts, cfg.hidden)
    }

    /// The weights of experts `ids` of `layer`, in that order, read from the files now.
    pub fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertWeights>> {
        let cfg = self.moe_config(layer)?;
        let (d, f) = (cfg.hidden, cfg.intermediate);
        ids.iter()
            .map(|&e| {
                if e >= cfg.num_experts {
                    return Err(Error::invalid(format!("expert {e} of a layer with {} experts", cfg.num_experts)));
                }
                let [g, u, dn] = self.family.expert_names(layer, e);
                Ok(ExpertWeights::new(self.tensor(&g, f, d)?, self.tensor(&u, f, d)?, self.tensor(&dn, d, f)?))
            })
            .collect()
    }

    /// The selection bias `[E]` of `layer` as f32, for families whose routing has one
    /// (DeepSeek-V3's `e_score_correction_bias`); `None` otherwise.
    pub fn selection_bias(&self, layer: usize) -> Result<Option<Vec<f32>>> {
        let cfg = self.moe_config(layer)?;
        match self.family.bias_name(layer) {
            Some(name) if cfg.router.selection_bias => Ok(Some(self.vector(&name, cfg.num_experts)?)),
            _ => Ok(None),
        }
    }

    /// The shared expert of `layer` (and its gate, for Qwen2-MoE), if the layer has one.
    pub fn shared_expert(&self, layer: usize) -> Result<Option<SharedExpert>> {
        let cfg = self.moe_config(layer)?;
        let (Some(sc), Some(([g, u, dn], gate))) = (cfg.shared_expert, self.family.shared_names(layer)) else {
            return Ok(None);
        };
        let (d, f) = (cfg.hidden, sc.intermediate);
        let weights = ExpertWeights::new(self.tensor(&g, f, d)?, self.tensor(&u, f, d)?, self.tensor(&dn, d, f)?);
        let gate = match gate {
            Some(name) if sc.gated => Some(self.tensor(&name, 1, d)?),
            _ => None,
        };
        Ok(Some(SharedExpert { weights, gate }))
    }

    /// Everything rank `rank` holds of `layer` under `placement`: the router, the selection bias
    /// and shared expert if the family has them, and only that rank's experts. Errors as
    /// [`Checkpoint::experts`] does, and when the placement is for another expert count.
    pub fn layer_weights(&self, layer: usize, placement: &Placement, rank: usize) -> Result<LayerWeights> {
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
            experts: self.experts(layer, placement.experts_of(rank))?,
            shared: self.shared_expert(layer)?,
        })
    }

    fn locate(&self, name: &str) -> Result<&Shard> {
        let s = self.index.get(name).ok_or_else(|| {
            let files: Vec<String> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
            Error::invalid(format!(
                "checkpoint {}: tensor {name} is in none of [{}]",
                self.dir.display(),
                files.join(", ")
            ))
        })?;
        Ok(&self.shards[*s])
    }

    fn dtype_of(&self, name: &str) -> Result<DType> {
        let shard = self.locate(name)?;
        let info = shard.meta.info(name).expect("indexed tensors are in their shard");
        convert_dtype(info.dtype).ok_or_else(|| {
            ckpt_error(&shard.path, format!("tensor {name} is {:?}; supported: F32, F16, BF16", info.dtype))
        })
    }

    /// Tensor `name` as `[rows, cols]`, copied out of its file. Errors name the tensor and
    /// the file: missing, another shape, an unsupported dtype.
    pub fn tensor(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        self.read(name, &[rows, cols], rows, cols)
    }

    /// One-dimensional tensor `name` of `len` entries, as f32 (from F32, F16 or BF16).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.read(name, &[len], 1, len)?.to_f32_vec())
    }

    /// Tensor `name`, stored with `shape`, copied out of its file as `[rows, cols]`; counts the
    /// bytes read. Errors name the tensor and the file.
    fn read(&self, name: &str, shape: &[usize], rows: usize, cols: usize) -> Result<Tensor> {
        let shard = self.locate(name)?;
        let dtype = self.dtype_of(name)?;
        let info = shard.meta.info(name).expect("indexed tensors are in their shard");
        if info.shape != shape {
            return Err(ckpt_error(
                &shard.path,
                format!("tensor {name} has shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        let (a, b) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + a..shard.data_start + b];
        let mut t = Tensor::zeros(dtype, rows, cols);
        t.as_bytes_mut().copy_from_slice(bytes);
        self.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(t)
    }
}

fn convert_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}
