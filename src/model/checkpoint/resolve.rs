//! Finding a layer's tensors: which names and layout the files use, how the experts are
//! encoded, and every shape checked against the config's counts before anything is read.

use std::sync::atomic::Ordering;

use safetensors::Dtype as St;
use safetensors::tensor::TensorInfo;

use super::Checkpoint;
use super::files::{Shard, ckpt_error};
use super::layout::{Encoding, Layout, RawProjection};
use super::mlx::{MlxMode, companion};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::MoeConfig;
use crate::model::families::keys::Keys;
use crate::model::families::{BiasNames, ExpertNames, Family, Fused, GateUp, MoeNames};
use crate::model::weights::ExpertBias;
use crate::tensor::Tensor;

/// A layer's config (dtypes set), names, layout and expert encoding, all checked.
pub(crate) struct Resolved {
    pub cfg: MoeConfig,
    pub names: MoeNames,
    pub layout: Layout,
    pub enc: Encoding,
}

/// The dtypes a dense tensor may have.
const DENSE: &str = "F32, F16, BF16";
/// What expert weights may be.
const ENCODINGS: &str = "F32, F16, BF16, F8_E4M3 with its weight_scale_inv (F32 block scales), \
                         MXFP4 (U8 *_blocks with *_scales), mlx-lm's U32 .weight with .scales (and .biases)";

fn dense_of(d: St) -> Option<DType> {
    match d {
        St::F32 => Some(DType::F32),
        St::F16 => Some(DType::F16),
        St::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The dtype both `a` and `b` widen to exactly.
fn widest(a: DType, b: DType) -> DType {
    if a == b { a } else { DType::F32 }
}

/// One expert's stored matrix in a fused tensor: its bytes, and its scales' (and affine
/// biases') bytes.
struct Slab<'a> {
    data: &'a [u8],
    scales: Option<&'a [u8]>,
    biases: Option<&'a [u8]>,
}

/// The safetensors dtype of a dense dtype.
fn st_of(d: DType) -> St {
    match d {
        DType::F32 => St::F32,
        DType::F16 => St::F16,
        DType::BF16 => St::BF16,
    }
}

impl Checkpoint {
    pub(crate) fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let s = &self.shards[*self.index.get(name)?];
        Some((s, s.meta.info(name)?))
    }

    fn missing(&self, name: &str) -> Error {
        let files: Vec<String> = self.shards.iter().map(|s| s.path.display().to_string()).collect();
        Error::invalid(format!("checkpoint {}: tensor {name} is in none of [{}]", self.dir.display(), files.join(", ")))
    }

    /// The tensor's bytes after checking it exists with `shape` (or, when `alt` is given, that
    /// shape instead) and one of `dtypes`.
    fn bytes_of(&self, name: &str, shapes: &[&[usize]], dtypes: &[St]) -> Result<(&[u8], St)> {
        let (shard, info) = self.info(name).ok_or_else(|| self.missing(name))?;
        if !dtypes.contains(&info.dtype) {
            let want: Vec<String> = dtypes.iter().map(|d| format!("{d:?}")).collect();
            return Err(ckpt_error(
                &shard.path,
                format!("tensor {name} is {:?}; supported: {}", info.dtype, want.join(", ")),
            ));
        }
        if !shapes.iter().any(|s| info.shape == *s) {
            return Err(ckpt_error(
                &shard.path,
                format!(
                    "tensor {name} has shape {:?}, expected {:?} (from config.json's counts)",
                    info.shape, shapes[0]
                ),
            ));
        }
        let (a, b) = info.data_offsets;
        Ok((&shard.bytes[shard.data_start + a..shard.data_start + b], info.dtype))
    }

    /// The dtype of dense tensor `name`; an error naming the supported ones otherwise.
    pub(crate) fn dense_dtype(&self, name: &str) -> Result<DType> {
        let (shard, info) = self.info(name).ok_or_else(|| self.missing(name))?;
        dense_of(info.dtype)
            .ok_or_else(|| ckpt_error(&shard.path, format!("tensor {name} is {:?}; supported: {DENSE}", info.dtype)))
    }

    /// Dense tensor `name` of `shape` (1-D or 2-D) read as `[rows, cols]` and widened to `to`.
    pub(crate) fn tensor_as(&self, name: &str, shape: &[usize], to: DType) -> Result<Tensor> {
        self.tensor_shapes(name, &[shape], to)
    }

    fn tensor_shapes(&self, name: &str, shapes: &[&[usize]], to: DType) -> Result<Tensor> {
        let dt = self.dense_dtype(name)?;
        let (bytes, _) = self.bytes_of(name, shapes, &[St::F32, St::F16, St::BF16])?;
        let cols = shapes[0].last().copied().unwrap_or(1);
        let rows = (bytes.len() / dt.size()).checked_div(cols).unwrap_or(0);
        let mut t = Tensor::zeros(dt, rows, cols);
        t.as_bytes_mut().copy_from_slice(bytes);
        self.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(if dt == to { t } else { t.to_dtype(to) })
    }

    /// A bias vector `[E]` (or `[1, E]`) as f32.
    pub(crate) fn bias_vector(&self, name: &str, e: usize) -> Result<Vec<f32>> {
        Ok(self.tensor_shapes(name, &[&[e], &[1, e]], DType::F32)?.to_f32_vec())
    }

    /// The layer's config, names, layout and encoding, every shape checked.
    pub(crate) fn resolve(&self, layer: usize) -> Result<Resolved> {
        let cfg_path = self.dir.join("config.json");
        let (family, keys) = Family::from_config(&self.config).map_err(|e| ckpt_error(&cfg_path, e))?;
        let cfg = family.moe_config(&keys, layer).map_err(|e| ckpt_error(&cfg_path, e))?;
        let block = fp8_block(&self.config).map_err(|e| ckpt_error(&cfg_path, e))?;
        let (names, enc) = self.pick(family, layer, block)?;
        let layout = match names.experts {
            ExpertNames::PerExpert { .. } => Layout::PerExpert,
            ExpertNames::Fused(_) => Layout::Fused,
        };
        self.check_counts(&cfg)?;
        let mut r = Resolved { cfg, names, layout, enc };
        self.check_shapes(&mut r)?;
        Ok(r)
    }

    /// Counts whose products the files cannot hold (one expert's `3 x D x F` values at half a
    /// byte each at least, the router's `E x D`, the shared expert's) are refused before any
    /// arithmetic on them can overflow.
    fn check_counts(&self, cfg: &MoeConfig) -> Result<()> {
        let bytes = self.shards.iter().map(|s| s.bytes.len() as u128).sum::<u128>();
        let (e, d, f) = (cfg.num_experts as u128, cfg.hidden as u128, cfg.intermediate as u128);
        let fs = cfg.shared_expert.map_or(0, |s| s.intermediate as u128);
        let values = (e.saturating_mul(d)).saturating_add(3u128.saturating_mul(d).saturating_mul(f.saturating_add(fs)));
        if values > 2 * bytes {
            return Err(Error::invalid(format!(
                "checkpoint {}: config.json's counts (E = {e}, D = {d} from hidden_size, F = {f}, shared F = {fs}) \
                 need more values than the files' {bytes} bytes hold",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// The first candidate naming whose router and experts are in the files, and the experts'
    /// encoding; an error listing what was looked for otherwise.
    fn pick(&self, family: Family, layer: usize, block: (usize, usize)) -> Result<(MoeNames, Encoding)> {
        let candidates = family.candidates(layer);
        for c in &candidates {
            if self.info(&c.router).is_none() {
                continue;
            }
            if let Some(enc) = self.expert_encoding(&c.experts, block, c.mlx)? {
                return Ok((c.clone(), enc));
            }
        }
        let tried: Vec<String> = candidates.iter().map(|c| format!("{} ({})", c.router, c.layout_name())).collect();
        Err(Error::invalid(format!(
            "checkpoint {}: no {family} MoE layer {layer} in the files (looked for {})",
            self.dir.display(),
            tried.join(", ")
        )))
    }

    /// The encoding of the tensor `name` (scale companion `scale`), `None` when absent; with
    /// mlx-lm's naming ([`Checkpoint::mlx_encoding`]) when `mlx`.
    fn encoding_at(
        &self,
        name: &str,
        scale: &str,
        block: (usize, usize),
        mxfp4: bool,
        mlx: bool,
    ) -> Result<Option<Encoding>> {
        if mlx {
            return self.mlx_encoding(name);
        }
        if let Some((shard, info)) = self.info(name) {
            if let Some(d) = dense_of(info.dtype) {
                return Ok(Some(Encoding::Dense(d)));
            }
            if info.dtype == St::F8_E4M3 {
                if self.info(scale).is_none() {
                    return Err(ckpt_error(&shard.path, format!("FP8 tensor {name} has no scales {scale}")));
                }
                return Ok(Some(Encoding::Fp8E4M3 { block }));
            }
            return Err(ckpt_error(&shard.path, format!("tensor {name} is {:?}; supported: {ENCODINGS}", info.dtype)));
        }
        let (b, s) = (format!("{name}_blocks"), format!("{name}_scales"));
        Ok((mxfp4 && self.info(&b).is_some() && self.info(&s).is_some()).then_some(Encoding::Mxfp4))
    }

    /// The encoding of mlx-lm's `.weight` tensor `name`: dense without a `.scales` companion;
    /// else as `config.json`'s `quantization` says for the module (affine with `.biases`, or
    /// mxfp4). `None` when the tensor is absent.
    pub(crate) fn mlx_encoding(&self, name: &str) -> Result<Option<Encoding>> {
        let Some((shard, info)) = self.info(name) else { return Ok(None) };
        let (sname, bname) = (companion(name, "scales"), companion(name, "biases"));
        let Some((_, sinfo)) = self.info(&sname) else {
            let d = dense_of(info.dtype)
                .ok_or_else(|| ckpt_error(&shard.path, format!("tensor {name} is {:?} without {sname}", info.dtype)))?;
            return Ok(Some(Encoding::Dense(d)));
        };
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let q = self.mlx.as_ref().ok_or_else(|| {
            ckpt_error(&self.dir.join("config.json"), format!("{sname} exists but there is no quantization entry"))
        })?;
        let (bits, group, mode) = q.of(stem).ok_or_else(|| {
            ckpt_error(&self.dir.join("config.json"), format!("quantization.{stem} is false but {sname} exists"))
        })?;
        if info.dtype != St::U32 {
            return Err(ckpt_error(&shard.path, format!("quantized tensor {name} is {:?}, not U32", info.dtype)));
        }
        match mode {
            MlxMode::Affine => {
                let dt = dense_of(sinfo.dtype).ok_or_else(|| {
                    ckpt_error(&shard.path, format!("{sname} is {:?}; supported: {DENSE}", sinfo.dtype))
                })?;
                match self.info(&bname) {
                    Some((_, b)) if b.dtype == sinfo.dtype => {}
                    _ => {
                        return Err(ckpt_error(
                            &shard.path,
                            format!("affine {name} needs {bname} of {:?} beside {sname}", sinfo.dtype),
                        ));
                    }
                }
                Ok(Some(Encoding::Affine { bits, group, scales: dt }))
            }
            MlxMode::Mxfp4 if sinfo.dtype == St::U8 => Ok(Some(Encoding::Mxfp4)),
            MlxMode::Mxfp4 => Err(ckpt_error(&shard.path, format!("mxfp4 {sname} is {:?}, not U8", sinfo.dtype))),
        }
    }

    fn expert_encoding(&self, x: &ExpertNames, block: (usize, usize), mlx: bool) -> Result<Option<Encoding>> {
        match x {
            ExpertNames::PerExpert { prefix, proj } => {
                let n = format!("{prefix}0.{}", proj[0]);
                self.encoding_at(&format!("{n}.weight"), &format!("{n}.weight_scale_inv"), block, false, mlx)
            }
            ExpertNames::Fused(f) => {
                let n = match &f.gate_up {
                    GateUp::Joint { name, .. } => name,
                    GateUp::Split { gate, .. } => gate,
                };
                self.encoding_at(n, &format!("{n}_scale_inv"), block, true, mlx)
            }
        }
    }

    /// A replicated linear `[rows, cols]` (router, shared expert gate) as a dense tensor of
    /// `to`, or f32 when the file holds f32; one quantized by mlx-lm is dequantized to f32 (its
    /// values `s * q + b` exactly, rounded once to f32; see [`Checkpoint::router`]).
    pub(crate) fn linear(&self, name: &str, rows: usize, cols: usize, to: DType, mlx: bool) -> Result<Tensor> {
        match if mlx { self.mlx_encoding(name)? } else { None } {
            Some(enc @ (Encoding::Affine { .. } | Encoding::Mxfp4)) => {
                let p = self.whole(name, enc, rows, cols, true)?;
                let m = p.packed().map_err(|e| ckpt_error(&self.dir, format!("{name}: {e}")))?;
                self.bytes_read.fetch_add(p.bytes() as u64, Ordering::Relaxed);
                Ok(m.to_tensor(DType::F32))
            }
            _ => {
                let dt = match self.dense_dtype(name)? {
                    DType::F32 => DType::F32,
                    _ => to,
                };
                self.tensor_as(name, &[rows, cols], dt)
            }
        }
    }

    /// The dtype a replicated linear has in the files (a quantized one: its scales').
    fn linear_dtype(&self, name: &str, mlx: bool) -> Result<DType> {
        match if mlx { self.mlx_encoding(name)? } else { None } {
            Some(Encoding::Affine { scales, .. }) => Ok(scales),
            Some(Encoding::Mxfp4) => Ok(DType::BF16),
            _ => self.dense_dtype(name),
        }
    }

    /// Router, bias, every expert's projections, biases and the shared expert against the
    /// config's counts; sets the config's dtypes to what the weights read as.
    fn check_shapes(&self, r: &mut Resolved) -> Result<()> {
        let (e, d, mlx) = (r.cfg.num_experts, r.cfg.hidden, r.names.mlx);
        let router_dt = self.linear_dtype(&r.names.router, mlx)?;
        self.check_linear(&r.names.router, e, d, mlx).map_err(|err| counts(err, &r.cfg))?;
        if let (Some(b), true) = (&r.names.bias, r.cfg.router.uses_bias()) {
            self.dense_dtype(b)?;
            self.bytes_of(b, &[&[e], &[1, e]], &[St::F32, St::F16, St::BF16])?;
        }
        // The router keeps its dtype when it is f32 (transformers keeps DeepSeek-V3's, GLM's and
        // ERNIE's in f32) or the experts'; other mixes widen everything to f32 (exactly).
        let mut dt = if router_dt == DType::F32 { r.enc.decoded() } else { widest(router_dt, r.enc.decoded()) };
        // Every expert's tensors (headers only) and their encodings: each projection as expert
        // 0's (dense dtypes may differ: they widen), expert 0's gate as the layer's.
        let first = self.projections(r, 0).map_err(|err| counts(err, &r.cfg))?.map(|q| q.encoding);
        for x in 0..e {
            let p = self.projections(r, x).map_err(|err| counts(err, &r.cfg))?;
            let same = |a: Encoding, b: Encoding| a == b || (a.format().is_none() && b.format().is_none());
            if let Some((q, want)) = p.iter().zip(first.iter().chain([&r.enc])).find(|(q, w)| !same(q.encoding, **w)) {
                return Err(Error::invalid(format!(
                    "checkpoint {}: expert {x} is {} where expert 0 is {}",
                    self.dir.display(),
                    q.encoding,
                    want
                )));
            }
        }
        if let (ExpertNames::Fused(Fused { biases: Some(b), .. }), true) = (&r.names.experts, r.cfg.expert_bias) {
            let (f, dense) = (r.cfg.intermediate, [St::F32, St::F16, St::BF16]);
            match b {
                BiasNames::Joint(gu, dn) => {
                    self.bytes_of(gu, &[&[e, 2 * f]], &dense)?;
                    self.bytes_of(dn, &[&[e, d]], &dense)?;
                }
                BiasNames::Split([g, u, dn]) => {
                    for (name, len) in [(g, f), (u, f), (dn, d)] {
                        self.bytes_of(name, &[&[e, len]], &dense)?;
                    }
                }
            }
        }
        if let (Some(sc), Some((names, gate))) = (r.cfg.shared_expert, &r.names.shared) {
            for q in self.shared_projections(r, names, sc.intermediate).map_err(|err| counts(err, &r.cfg))? {
                dt = widest(dt, q.encoding.decoded());
            }
            if let (Some(g), true) = (gate, sc.gated) {
                dt = widest(dt, self.linear_dtype(g, mlx)?);
                self.check_linear(g, 1, d, mlx)?;
            }
        }
        r.cfg = r.cfg.clone().with_dtypes(dt, dt);
        Ok(())
    }

    /// A replicated linear's tensors against `[rows, cols]` (headers only).
    fn check_linear(&self, name: &str, rows: usize, cols: usize, mlx: bool) -> Result<()> {
        match if mlx { self.mlx_encoding(name)? } else { None } {
            Some(enc @ (Encoding::Affine { .. } | Encoding::Mxfp4)) => {
                self.whole(name, enc, rows, cols, true).map(|_| ())
            }
            _ => self.bytes_of(name, &[&[rows, cols]], &[St::F32, St::F16, St::BF16]).map(|_| ()),
        }
    }

    /// Gate, up and down of expert `e` as stored (shapes checked, nothing read).
    pub(crate) fn projections(&self, r: &Resolved, e: usize) -> Result<[RawProjection<'_>; 3]> {
        let (d, f, mlx) = (r.cfg.hidden, r.cfg.intermediate, r.names.mlx);
        match &r.names.experts {
            ExpertNames::PerExpert { prefix, proj } => {
                let n = |i: usize| format!("{prefix}{e}.{}.weight", proj[i]);
                let enc = |i: usize| -> Result<Encoding> {
                    if mlx { self.mlx_encoding(&n(i))?.ok_or_else(|| self.missing(&n(i))) } else { Ok(r.enc) }
                };
                Ok([
                    self.whole(&n(0), enc(0)?, f, d, mlx)?,
                    self.whole(&n(1), enc(1)?, f, d, mlx)?,
                    self.whole(&n(2), enc(2)?, d, f, mlx)?,
                ])
            }
            ExpertNames::Fused(fu) => self.fused(r, fu, e),
        }
    }

    /// The shared expert's projections (`[fs, D]`, `[fs, D]`, `[D, fs]`), dense or FP8.
    pub(crate) fn shared_projections(
        &self,
        r: &Resolved,
        names: &[String; 3],
        fs: usize,
    ) -> Result<[RawProjection<'_>; 3]> {
        let d = r.cfg.hidden;
        let mut out = Vec::with_capacity(3);
        for (i, n) in names.iter().enumerate() {
            let scale = format!("{}_scale_inv", n);
            let enc = self
                .encoding_at(n, &scale, fp8_block(&self.config).map_err(Error::invalid)?, false, r.names.mlx)?
                .ok_or_else(|| self.missing(n))?;
            let (o, p) = if i < 2 { (fs, d) } else { (d, fs) };
            out.push(self.whole(n, enc, o, p, r.names.mlx)?);
        }
        Ok([out[0], out[1], out[2]])
    }

    /// A whole `[out, inp]` tensor (per-expert layout, shared experts); FP8 with
    /// `{stem}.weight_scale_inv` `[ceil(out/bn), ceil(inp/bk)]`; mlx-lm's (`mlx`) quantized
    /// ones with `{stem}.scales` (and `.biases`) `[out, inp / group]`.
    fn whole(&self, name: &str, enc: Encoding, out: usize, inp: usize, mlx: bool) -> Result<RawProjection<'_>> {
        let (mut biases, per) = (None, |g: usize| inp / g);
        let (data, scales) = match enc {
            Encoding::Dense(_) => (self.bytes_of(name, &[&[out, inp]], &[St::F32, St::F16, St::BF16])?.0, None),
            Encoding::Fp8E4M3 { block: (bn, bk) } => {
                let scale = format!("{}_scale_inv", name);
                let data = self.bytes_of(name, &[&[out, inp]], &[St::F8_E4M3])?.0;
                (data, Some(self.bytes_of(&scale, &[&[out.div_ceil(bn), inp.div_ceil(bk)]], &[St::F32])?.0))
            }
            Encoding::Mxfp4 if !mlx => {
                return Err(Error::invalid(format!("MXFP4 {name}: only fused tensors are MXFP4")));
            }
            Encoding::Mxfp4 | Encoding::Affine { .. } => {
                let (bits, group, sdt) = mlx_shape(enc, name, inp)?;
                let data = self.bytes_of(name, &[&[out, inp * bits / 32]], &[St::U32])?.0;
                let s = self.bytes_of(&companion(name, "scales"), &[&[out, per(group)]], &[sdt])?.0;
                if let Encoding::Affine { .. } = enc {
                    biases = Some(self.bytes_of(&companion(name, "biases"), &[&[out, per(group)]], &[sdt])?.0);
                }
                (data, Some(s))
            }
        };
        let encoding = match enc {
            Encoding::Dense(_) => Encoding::Dense(self.dense_dtype(name)?),
            other => other,
        };
        Ok(RawProjection {
            encoding,
            out,
            inp,
            data,
            stored: [out, inp],
            scales,
            biases,
            first: 0,
            step: 1,
            in_major: false,
        })
    }

    /// Expert `e`'s `[rows, cols]` matrix (as stored) in fused tensor `name` of `E` experts.
    /// FP8 scales `{name}_scale_inv` must have one of `scale_rows` rows per expert; mlx-lm's
    /// (`mlx`) quantized tensors have `.scales` (and `.biases`) `[E, rows, cols / group]`.
    #[allow(clippy::too_many_arguments)]
    fn slab(
        &self,
        name: &str,
        enc: Encoding,
        e: usize,
        n: usize,
        rows: usize,
        cols: usize,
        scale_rows: &[usize],
        mlx: bool,
    ) -> Result<Slab<'_>> {
        fn pick(bytes: &[u8], k: usize, n: usize) -> &[u8] {
            &bytes[k * bytes.len() / n..(k + 1) * bytes.len() / n]
        }
        let total = n.checked_mul(rows).ok_or_else(|| Error::invalid(format!("{name}: {n} x {rows} overflows")))?;
        match enc {
            Encoding::Dense(_) => {
                let (b, _) = self.bytes_of(name, &[&[n, rows, cols], &[total, cols]], &[St::F32, St::F16, St::BF16])?;
                Ok(Slab { data: pick(b, e, n), scales: None, biases: None })
            }
            Encoding::Fp8E4M3 { block: (_, bk) } => {
                let (b, _) = self.bytes_of(name, &[&[n, rows, cols], &[total, cols]], &[St::F8_E4M3])?;
                let sname = format!("{name}_scale_inv");
                let sc = cols.div_ceil(bk);
                let shapes: Vec<[usize; 3]> = scale_rows.iter().map(|&sr| [n, sr, sc]).collect();
                let refs: Vec<&[usize]> = shapes.iter().map(|s| &s[..]).collect();
                let (s, _) = self.bytes_of(&sname, &refs, &[St::F32])?;
                Ok(Slab { data: pick(b, e, n), scales: Some(pick(s, e, n)), biases: None })
            }
            Encoding::Mxfp4 | Encoding::Affine { .. } if mlx => {
                let (bits, group, sdt) = mlx_shape(enc, name, cols)?;
                let w = cols * bits / 32;
                let (b, _) = self.bytes_of(name, &[&[n, rows, w], &[total, w]], &[St::U32])?;
                let g = cols / group;
                let shapes: [&[usize]; 2] = [&[n, rows, g], &[total, g]];
                let (s, _) = self.bytes_of(&companion(name, "scales"), &shapes, &[sdt])?;
                let biases = match enc {
                    Encoding::Affine { .. } => {
                        Some(pick(self.bytes_of(&companion(name, "biases"), &shapes, &[sdt])?.0, e, n))
                    }
                    _ => None,
                };
                Ok(Slab { data: pick(b, e, n), scales: Some(pick(s, e, n)), biases })
            }
            Encoding::Affine { .. } => Err(Error::invalid(format!("{name}: affine tensors come in mlx-lm's names"))),
            Encoding::Mxfp4 => {
                if !cols.is_multiple_of(32) {
                    return Err(Error::invalid(format!("MXFP4 {name}: {cols} inputs are not blocks of 32")));
                }
                let (b, _) = self.bytes_of(&format!("{name}_blocks"), &[&[n, rows, cols / 32, 16]], &[St::U8])?;
                let (s, _) = self.bytes_of(&format!("{name}_scales"), &[&[n, rows, cols / 32]], &[St::U8])?;
                Ok(Slab { data: pick(b, e, n), scales: Some(pick(s, e, n)), biases: None })
            }
        }
    }

    /// Gate, up, down of expert `e` from fused tensors.
    fn fused(&self, r: &Resolved, fu: &Fused, e: usize) -> Result<[RawProjection<'_>; 3]> {
        let (n, d, f, enc, mlx) = (r.cfg.num_experts, r.cfg.hidden, r.cfg.intermediate, r.enc, r.names.mlx);
        // mlx-lm's projections each have their own encoding (one left dense when its inputs
        // are not whole groups).
        let dense_enc = |name: &str| -> Result<Encoding> {
            if mlx {
                return self.mlx_encoding(name)?.ok_or_else(|| self.missing(name));
            }
            Ok(match enc {
                Encoding::Dense(_) => Encoding::Dense(self.dense_dtype(name)?),
                other => other,
            })
        };
        let in_major = |m: bool| m && matches!(enc, Encoding::Dense(_));
        let (gate, up) = match &fu.gate_up {
            GateUp::Joint { name, interleaved } => {
                let im = in_major(fu.gate_up_in_major);
                let enc = dense_enc(name)?;
                if *interleaved && matches!(enc, Encoding::Fp8E4M3 { .. }) {
                    return Err(Error::invalid(format!("{name}: FP8 with interleaved gate and up is not supported")));
                }
                let bn = match enc {
                    Encoding::Fp8E4M3 { block } => block.0,
                    _ => 1,
                };
                let (rows, cols) = if im { (d, 2 * f) } else { (2 * f, d) };
                // FP8 scales per half: gate's rows then up's, as transformers concatenates them.
                let halves = 2 * f.div_ceil(bn);
                let s = self.slab(name, enc, e, n, rows, cols, &[halves], mlx)?;
                let stored = [rows, cols];
                let (gf, uf, step) = if *interleaved { (0, 1, 2) } else { (0, f, 1) };
                let g = raw(&s, enc, f, d, stored, gf, step, im);
                let mut u = raw(&s, enc, f, d, stored, uf, step, im);
                if let Encoding::Fp8E4M3 { .. } = enc {
                    // Up is its own matrix with its own scale rows.
                    let sc = s.scales.expect("fp8 scales");
                    u.data = &s.data[f * d..];
                    u.stored = [f, d];
                    u.first = 0;
                    u.scales = Some(&sc[sc.len() / 2..]);
                }
                (g, u)
            }
            GateUp::Split { gate, up } => {
                let im = in_major(fu.gate_up_in_major);
                let (rows, cols) = if im { (d, f) } else { (f, d) };
                let mut v = Vec::new();
                for name in [gate, up] {
                    let enc = dense_enc(name)?;
                    let bn = if let Encoding::Fp8E4M3 { block } = enc { block.0 } else { 1 };
                    let s = self.slab(name, enc, e, n, rows, cols, &[f.div_ceil(bn)], mlx)?;
                    v.push(raw(&s, enc, f, d, [rows, cols], 0, 1, im));
                }
                (v[0], v[1])
            }
        };
        let im = in_major(fu.down_in_major);
        let denc = dense_enc(&fu.down)?;
        let bn = if let Encoding::Fp8E4M3 { block } = denc { block.0 } else { 1 };
        let (rows, cols) = if im { (f, d) } else { (d, f) };
        let s = self.slab(&fu.down, denc, e, n, rows, cols, &[d.div_ceil(bn)], mlx)?;
        Ok([gate, up, raw(&s, denc, d, f, [rows, cols], 0, 1, im)])
    }
}

/// A projection of `out x inp` from slab `s` (stored `[rows, cols]`): outputs `first`,
/// `first + step`, ... along rows, or along columns when `im`.
#[allow(clippy::too_many_arguments)]
fn raw<'a>(
    s: &Slab<'a>,
    encoding: Encoding,
    out: usize,
    inp: usize,
    stored: [usize; 2],
    first: usize,
    step: usize,
    in_major: bool,
) -> RawProjection<'a> {
    RawProjection {
        encoding,
        out,
        inp,
        data: s.data,
        stored,
        scales: s.scales,
        biases: s.biases,
        first,
        step,
        in_major,
    }
}

/// Bits a value, group and scale dtype of mlx-lm's quantized `encoding` over `inp` inputs;
/// an error naming `name` when the inputs are not whole groups.
fn mlx_shape(encoding: Encoding, name: &str, inp: usize) -> Result<(usize, usize, St)> {
    let (bits, group, sdt) = match encoding {
        Encoding::Affine { bits, group, scales } => (bits as usize, group as usize, st_of(scales)),
        _ => (4, 32, St::U8),
    };
    if !inp.is_multiple_of(group) {
        return Err(Error::invalid(format!("{name}: {inp} inputs are not whole quantization groups of {group}")));
    }
    Ok((bits, group, sdt))
}

/// Adds the config's counts to a shape error.
fn counts(err: Error, cfg: &MoeConfig) -> Error {
    Error::invalid(format!(
        "{err}; config.json gives E = {} experts, D = {} (hidden_size), F = {} (the experts' intermediate size)",
        cfg.num_experts, cfg.hidden, cfg.intermediate
    ))
}

/// Expert `e`'s projection biases (gpt-oss's `gate_up_proj_bias` `[E, 2F]`, split as the
/// weights are, and `down_proj_bias` `[E, D]`), as f32; `None` for families without.
pub(crate) fn expert_bias(c: &Checkpoint, r: &Resolved, e: usize) -> Result<Option<ExpertBias>> {
    let ExpertNames::Fused(Fused { biases: Some(names), gate_up, .. }) = &r.names.experts else {
        return Ok(None);
    };
    if !r.cfg.expert_bias {
        return Ok(None);
    }
    let (n, d, f) = (r.cfg.num_experts, r.cfg.hidden, r.cfg.intermediate);
    let row = |name: &str, len: usize| -> Result<Vec<f32>> {
        let dt = c.dense_dtype(name)?;
        let (b, _) = c.bytes_of(name, &[&[n, len]], &[St::F32, St::F16, St::BF16])?;
        let part = &b[e * len * dt.size()..(e + 1) * len * dt.size()];
        let mut t = Tensor::zeros(dt, 1, len);
        t.as_bytes_mut().copy_from_slice(part);
        c.bytes_read.fetch_add(part.len() as u64, Ordering::Relaxed);
        Ok(t.to_f32_vec())
    };
    let (gu, dn) = match names {
        BiasNames::Joint(gu, dn) => (gu, dn),
        BiasNames::Split([g, u, dn]) => {
            return Ok(Some(ExpertBias { gate: row(g, f)?, up: row(u, f)?, down: row(dn, d)? }));
        }
    };
    let both = row(gu, 2 * f)?;
    let interleaved = matches!(gate_up, GateUp::Joint { interleaved: true, .. });
    let (gate, up) = if interleaved {
        (both.iter().step_by(2).copied().collect(), both.iter().skip(1).step_by(2).copied().collect())
    } else {
        (both[..f].to_vec(), both[f..].to_vec())
    };
    Ok(Some(ExpertBias { gate, up, down: row(dn, d)? }))
}

/// FP8 block size from `quantization_config` (`weight_block_size`, default 128 x 128), after
/// checking that its `quant_method` is one this library decodes.
pub(crate) fn fp8_block(config: &serde_json::Value) -> std::result::Result<(usize, usize), String> {
    let top = Keys::new(config, "");
    let Some(q) = top.object("quantization_config", "quantization_config.")? else {
        return Ok((128, 128));
    };
    q.only(&["quant_method"], &["fp8", "mxfp4"], "FP8 block-scaled and MXFP4 weights")?;
    let b = q.usize_list(&["weight_block_size"])?.unwrap_or(vec![128, 128]);
    match b[..] {
        [bn, bk] if bn > 0 && bk > 0 => Ok((bn, bk)),
        _ => Err(format!("quantization_config.weight_block_size = {b:?} is not two positive sizes")),
    }
}
