//! The files of a checkpoint directory: `config.json`, `model.safetensors.index.json` and the
//! safetensors shards, opened only when they are regular files inside the directory.
//!
//! A path from the index must be relative with plain components (no `..`, no root, no drive):
//! nothing outside the directory is named. A file is opened without blocking (`O_NONBLOCK`, so
//! a FIFO or a device cannot hang the open) and checked to be a regular file on the open handle
//! before anything is read or mapped. Symbolic links inside the directory are followed (the
//! Hugging Face cache links every file of a snapshot to its blob store). JSON files are read up to
//! [`MAX_JSON_BYTES`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;

use crate::error::{Error, Result};

/// The largest `config.json` or index read (DeepSeek-V3's index is about 9 MB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

pub(crate) fn ckpt_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("checkpoint {}: {what}", path.display()))
}

/// The bytes of one shard: mapped from its file, or owned (checkpoints built in memory).
pub(crate) enum Bytes {
    Map(Mmap),
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One safetensors file and its parsed, validated header (offsets consistent with the shapes
/// and dtypes, the data section exactly the file's rest).
pub(crate) struct Shard {
    pub path: PathBuf,
    pub bytes: Bytes,
    /// Bytes before the data section (8 + header length).
    pub data_start: usize,
    pub meta: Metadata,
}

impl Shard {
    pub fn parse(path: PathBuf, bytes: Bytes) -> Result<Shard> {
        let (n, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            ckpt_error(&path, format!("not a complete safetensors file ({e:?}; truncated or corrupt?)"))
        })?;
        Ok(Shard { path, bytes, data_start: 8 + n, meta })
    }
}

/// `rel` joined to `dir` when it names a file inside `dir`: relative, plain components only.
pub(crate) fn inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    let plain = !rel.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(ckpt_error(dir, format!("{rel:?} is not a file name inside the checkpoint directory")));
    }
    Ok(dir.join(p))
}

/// Open `path` for reading if it is a regular file, without ever blocking on a FIFO or device.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| ckpt_error(path, format!("cannot open: {e}")))?;
    if !meta.is_file() {
        return Err(ckpt_error(path, "not a regular file"));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| ckpt_error(path, format!("cannot open: {e}")))?;
    // The path may have changed between the two looks: check what was opened.
    let meta = file.metadata().map_err(|e| ckpt_error(path, format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(ckpt_error(path, "not a regular file"));
    }
    Ok(file)
}

/// Read and parse a JSON file of at most [`MAX_JSON_BYTES`].
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let file = open_regular(path)?;
    let mut text = Vec::new();
    file.take(MAX_JSON_BYTES + 1).read_to_end(&mut text).map_err(|e| ckpt_error(path, format!("cannot read: {e}")))?;
    if text.len() as u64 > MAX_JSON_BYTES {
        return Err(ckpt_error(path, format!("larger than {MAX_JSON_BYTES} bytes")));
    }
    parse_json(path, &text)
}

pub(crate) fn parse_json(path: &Path, text: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(text).map_err(|e| ckpt_error(path, format!("not valid JSON: {e}")))
}

/// Map a shard file (a regular file inside the directory).
pub(crate) fn map_shard(path: PathBuf) -> Result<Shard> {
    let file = open_regular(&path)?;
    // SAFETY: the file is mapped read-only; a checkpoint modified while mapped is outside
    // what this library can defend against (as for every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ckpt_error(&path, format!("cannot map: {e}")))?;
    Shard::parse(path, Bytes::Map(map))
}

/// The `weight_map` of an index: tensor name -> file name, in the index's order of files.
pub(crate) fn parse_index(path: &Path, idx: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let map =
        idx.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ckpt_error(path, "no weight_map object"))?;
    map.iter()
        .map(|(name, file)| {
            let file = file.as_str().ok_or_else(|| ckpt_error(path, format!("{name}: file is not a string")))?;
            Ok((name.clone(), file.to_string()))
        })
        .collect()
}

/// Shards and the tensor -> shard index from a parsed `weight_map`, each file loaded once by
/// `load`; errors when a file lacks a tensor the index puts there.
pub(crate) fn index_shards(
    map: Vec<(String, String)>,
    mut load: impl FnMut(&str) -> Result<Shard>,
) -> Result<(Vec<Shard>, HashMap<String, usize>)> {
    let mut shards: Vec<Shard> = Vec::new();
    let mut by_file: HashMap<String, usize> = HashMap::new();
    let mut index = HashMap::new();
    for (name, file) in map {
        let s = match by_file.get(&file) {
            Some(&s) => s,
            None => {
                shards.push(load(&file)?);
                by_file.insert(file, shards.len() - 1);
                shards.len() - 1
            }
        };
        if shards[s].meta.info(&name).is_none() {
            return Err(ckpt_error(&shards[s].path, format!("the index puts tensor {name} here, but it is not")));
        }
        index.insert(name, s);
    }
    Ok((shards, index))
}
