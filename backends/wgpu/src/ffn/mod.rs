//! The grouped expert FFN on the GPU, recorded into a caller's encoder on device buffers:
//! [`GpuContext::encode_ffn`]. Weights stay resident ([`DeviceExperts`]); each call picks its
//! kernels by the experts' row counts (per expert, per bucket of alike counts, or per row
//! chunk):
//!
//! - on adapters with matrix units (cooperative matrices offered in a shape the kernel has,
//!   [`MatrixUnits`]), for 16-bit activations and weights outside the deterministic mode: the
//!   cooperative-matrix kernel (`wgsl/ffn_mma.wgsl`) with a tile per bucket of rows per
//!   expert, from 16-row tiles that stream the weights once (decode) to 128-row ones (prefill);
//!   gate and up in one pass with the activation fused, the down projection after it; a row
//!   chunk (the whole call, unless it exceeds a binding) whose experts all have at most
//!   [`MMA_DECODE_MAX_ROWS`] rows (packed weights: each expert of at most
//!   [`DECODE_MAX_ROWS`]) runs the decode kernel instead;
//! - else the portable kernels, which all sum in one fixed order (the deterministic mode's):
//!   the decode kernel (`wgsl/ffn_gemv.wgsl`, weights streamed once, the reduction split over
//!   workgroups) for experts of at most [`DECODE_MAX_ROWS`] rows, the tiled one
//!   (`wgsl/ffn.wgsl`) for the others.
//!
//! Every launch of a call is recorded in one compute pass per row chunk (a call whose f32
//! intermediate would exceed one binding runs in chunks of rows), so one submit runs it all.

pub(crate) mod gemv_source;
mod mma;
pub(crate) mod mma_source;
pub mod packed;
mod portable;
mod upload;

pub use mma::{MatrixUnits, default_tiles, matrix_units, mma_tiles_for_validation};
pub use upload::{DeviceExperts, Shard, WeightFormat, check_shape, pow2, row_exp};

use moe_ep::{DType, Error, Result, Tensor};

use crate::context::{GpuContext, STORAGE, backend_error};
use crate::kernels::{Epilogue, MmaProbe, MmaTile, Variant};
use crate::ops::{Launch, binding, u32_of};

/// Rows per expert up to which the portable path (and the cooperative path for packed
/// weights) uses the decode kernel for an expert.
pub const DECODE_MAX_ROWS: usize = 8;
/// Dense (f16 or converted bf16) weights on matrix units: a call (each row chunk of one that
/// exceeds a binding) whose every expert has at most this many rows runs the decode kernel,
/// any other runs every expert on the matrix units. Measured on the H200 (BENCHMARKS.md): the cooperative kernel's 16-row tile streams
/// the weights of 3-16 rows as fast as the decode kernel or faster (DeepSeek-V3 N=128, at most
/// 9 rows an expert: 10.4 ms against 13.7 with the decode kernel up to 8 rows; Mixtral-8x7B
/// N=16, at most 7: 1.31 ms against 1.66), and a call that mixes both kernels pays for the
/// decode kernel's own launches and reductions beside the cooperative ones (Qwen3-30B-A3B
/// N=128: 670 us with the decode kernel up to 2 rows, 609 without); where every expert has
/// a few rows the decode kernel is as fast or faster (DeepSeek-V3 N=16, at most 3 rows:
/// 3.52 ms against 4.37).
pub const MMA_DECODE_MAX_ROWS: usize = 4;
/// The largest decode tile: rows per expert up to which [`FfnKernels::Portable`] and
/// [`FfnKernels::Mixed`] may be asked to use the decode kernel.
pub const DECODE_TILE_MAX_ROWS: usize = 16;

/// Which kernels a call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKernels {
    /// The fastest the adapter has: the cooperative-matrix kernel where it applies (matrix
    /// units offered, 16-bit activations, 16-bit weights, sizes multiples of 8), else the
    /// portable kernels; `deterministic` keeps to the portable kernels (fixed summation order,
    /// a row's bits independent of its batch).
    Auto { deterministic: bool },
    /// The portable kernels: the decode kernel for experts with at most `decode_max` rows
    /// (0: never; at most [`DECODE_TILE_MAX_ROWS`]), with or without its prefetch, the tiled
    /// kernel for the others. Every choice gives the same bits.
    Portable { decode_max: usize, prefetch: bool },
    /// What `Auto { deterministic: false }` runs on matrix units, with the decode kernel for
    /// each expert of at most `decode_max` rows (at most [`DECODE_TILE_MAX_ROWS`]) instead of
    /// Auto's split (dense weights: the decode kernel for a call whose experts all have at most
    /// [`MMA_DECODE_MAX_ROWS`] rows, else none; packed: each expert of at most
    /// [`DECODE_MAX_ROWS`]): the cooperative kernel for the others. Errors where the
    /// cooperative kernel does not apply. For tuning the split.
    Mixed { decode_max: usize },
    /// The cooperative-matrix kernel with every row tile of the up (or down) projection in the
    /// given tile (`None`: the default tile of each bucket), running `run`. Errors where it
    /// does not apply, and for a timing-probe tile ([`crate::kernels::MmaProbe`]) unless one
    /// projection runs alone.
    Mma { up: Option<MmaTile>, down: Option<MmaTile>, run: Run },
}

/// Which projections a cooperative call runs: both (the FFN), or one alone (benchmarks time
/// each; the output is then not the FFN's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    Both,
    Up,
    Down,
}

impl FfnKernels {
    /// The cooperative-matrix kernel with its default tiles, both projections.
    pub const MMA: FfnKernels = FfnKernels::Mma { up: None, down: None, run: Run::Both };
}

/// The kernels a call runs, once checked against the adapter, dtypes and shapes.
#[derive(Clone, Copy, Debug)]
enum Path {
    Portable { decode_max: usize, prefetch: bool },
    Mma(MmaPlan),
}

/// The cooperative path of a call: matrix units, forced tiles (up, down), projections run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MmaPlan {
    pub units: MatrixUnits,
    pub tiles: [Option<MmaTile>; 2],
    pub run: Run,
    /// Experts of at most this many rows run the portable decode kernel in the same pass.
    pub decode_max: usize,
    /// The decode kernel only where every expert of the row chunk has at most `decode_max`
    /// rows (else every expert on the matrix units); per expert otherwise.
    pub whole: bool,
}

/// The launch parameters every FFN kernel reads (`struct Params`, `wgsl/ffn_params.wgsl`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FfnParams {
    pub k: u32,
    pub n: u32,
    pub expert_words: u32,
    pub a_base: u32,
    pub o_base: u32,
    pub m_base: u32,
    pub chunks: u32,
    pub prows: u32,
    pub vec_stride: u32,
    pub wscale_at: u32,
    pub bias_at: u32,
    pub up_off: u32,
    pub alpha: f32,
    pub limit: f32,
    /// Packed experts: words of one expert's scales in the bound scale buffers.
    pub scale_words: u32,
}

impl FfnParams {
    fn words(&self) -> [u32; 16] {
        [
            self.k,
            self.n,
            self.expert_words,
            0,
            self.a_base,
            self.o_base,
            self.m_base,
            self.chunks,
            self.prows,
            self.vec_stride,
            self.wscale_at,
            self.bias_at,
            self.up_off,
            self.alpha.to_bits(),
            self.limit.to_bits(),
            self.scale_words,
        ]
    }
}

/// One projection of a call: K and N, the weights, and where the vectors sit.
pub(crate) struct Projection {
    pub up: bool,
    pub k: usize,
    pub n: usize,
}

impl DeviceExperts {
    /// The epilogue every kernel of these experts applies.
    pub fn epilogue(&self) -> Epilogue {
        let act = match self.activation {
            moe_ep::model::config::Activation::Silu => 0,
            moe_ep::model::config::Activation::ClampedSwiglu { .. } => 1,
        };
        Epilogue { act, bias: self.biased, wscale: self.scaled }
    }

    /// Parameters common to both projections' launches of shard `s`, for projection `proj`.
    pub(crate) fn params(&self, s: &Shard, proj: &Projection) -> Result<FfnParams> {
        let f = self.intermediate;
        let vs = self.vec_stride();
        let bias_region = if self.scaled { s.count * vs } else { 0 };
        let at = if proj.up { 0 } else { 2 * f };
        let (alpha, limit) = match self.activation {
            moe_ep::model::config::Activation::Silu => (0.0, 0.0),
            moe_ep::model::config::Activation::ClampedSwiglu { alpha, limit } => (alpha, limit),
        };
        Ok(FfnParams {
            k: proj.k as u32,
            n: proj.n as u32,
            expert_words: u32_of("expert matrix words", self.matrix_words())?,
            scale_words: u32_of("expert scale words", self.scale_stride())?,
            vec_stride: vs as u32,
            wscale_at: at as u32,
            bias_at: u32_of("expert vectors", bias_region + at)?,
            up_off: f as u32,
            alpha,
            limit,
            ..FfnParams::default()
        })
    }
}

impl GpuContext {
    /// Record the grouped expert FFN into `enc`: `batch` holds `rows = offsets.last()` rows
    /// `[rows, D]` of `act` (at least `rows * D * act.size()` bytes, no padding needed), and
    /// `out` receives `[rows, D]` of `act`; rows `offsets[l]..offsets[l + 1]` go through local
    /// expert `l` of `dev`. With `deterministic`, only the portable kernels run (a row's bits
    /// do not depend on the rest of its batch, nor on the adapter's matrix units). Nothing is
    /// submitted or waited for; scratch buffers taken from the pool are pushed on `scratch`
    /// (give them back with [`GpuContext::recycle`] once the work is submitted).
    ///
    /// Checks everything the kernels will index by before recording any launch: errors when
    /// `offsets` does not have `experts + 1` non-decreasing entries from 0, when a buffer is
    /// smaller than its rows or lacks STORAGE usage, when a size exceeds the device's limits
    /// or the kernels' 32-bit indices, or for shapes the kernels do not take (device errors,
    /// see [`check_shape`]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_ffn(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dev: &DeviceExperts,
        act: DType,
        offsets: &[usize],
        deterministic: bool,
        batch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<()> {
        self.encode_ffn_with(enc, dev, act, offsets, FfnKernels::Auto { deterministic }, batch, out, scratch)
    }

    /// [`GpuContext::encode_ffn`] with the kernels chosen by `kernels` (tests and benchmarks
    /// compare them). Errors as `encode_ffn` does, and when `kernels` asks for a kernel that
    /// does not apply (no matrix units, dtypes or sizes it does not take, a tile that does
    /// not fit the device).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_ffn_with(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dev: &DeviceExperts,
        act: DType,
        offsets: &[usize],
        kernels: FfnKernels,
        batch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<()> {
        let rows = self.check_ffn_call(dev, act, offsets, batch, out)?;
        let path = self.ffn_path(dev, act, kernels)?;
        if rows == 0 || dev.hidden == 0 {
            return Ok(());
        }
        let _span = tracing::trace_span!("gpu_ffn", rows, experts = dev.experts).entered();
        let (d, f) = (dev.hidden, dev.intermediate);
        let per_chunk = (self.max_binding_bytes() / (4 * d.max(f)) as u64) as usize;
        if per_chunk == 0 {
            return Err(backend_error(format!("one FFN row of {d} x {f} exceeds the binding limit")));
        }
        for c0 in (0..rows).step_by(per_chunk) {
            let c1 = (c0 + per_chunk).min(rows);
            let offs: Vec<usize> = offsets.iter().map(|&o| o.clamp(c0, c1)).collect();
            let chunk = Chunk { c0, c1, offs: &offs, rows, act, batch, out };
            match path {
                Path::Portable { decode_max, prefetch } => {
                    self.encode_portable(enc, dev, &chunk, decode_max, prefetch, scratch)?
                }
                Path::Mma(plan) => self.encode_mma(enc, dev, &chunk, plan, scratch)?,
            }
        }
        Ok(())
    }

    /// Compile every pipeline an [`GpuContext::encode_ffn`] call over `dev` with `act` rows
    /// may use (both modes), so that no call waits for a compile.
    pub fn prepare_ffn(&self, dev: &DeviceExperts, act: DType) -> Result<usize> {
        let mut vs = Vec::new();
        if let Ok(Path::Mma(MmaPlan { units, .. })) = self.ffn_path(dev, act, FfnKernels::Auto { deterministic: false })
        {
            let [up, down] = default_tiles(units, self.limits().max_compute_workgroup_storage_size);
            let q = dev.kernel_quant();
            vs.extend(up.into_iter().map(|t| Variant::ffn_mma(true, act, t, dev.epilogue(), q)));
            vs.extend(down.into_iter().map(|t| Variant::ffn_mma(false, act, t, dev.epilogue(), q)));
            if act == DType::BF16 {
                vs.push(Variant::ffn_rowmax());
            }
        }
        vs.extend(portable::variants(self, dev, act));
        for &v in &vs {
            // SAFETY: compiling launches nothing; every launch of these pipelines goes through
            // `encode_ffn_with`'s checks.
            unsafe { self.pipelines.get_unchecked(&self.device, v) };
        }
        self.check_errors()?;
        Ok(vs.len())
    }

    /// The FFN of host tensors: upload `batch`, [`GpuContext::encode_ffn_with`], read `out`
    /// back, in one submit (a batch larger than one binding in several, each of whole
    /// bindings). In deterministic mode a row's result does not depend on which call it is
    /// in; the fast kernels' sums depend on the row counts of the call's experts (tiles, and
    /// the decode kernel for a decode-shaped row chunk).
    pub fn ffn_host(
        &self,
        dev: &DeviceExperts,
        batch: &Tensor,
        offsets: &[usize],
        kernels: FfnKernels,
        out: &mut Tensor,
    ) -> Result<()> {
        if out.rows() != batch.rows() || out.cols() != batch.cols() || out.dtype() != batch.dtype() {
            return Err(Error::invalid("ffn: output and batch differ in shape or dtype"));
        }
        if batch.cols() != dev.hidden || offsets.last() != Some(&batch.rows()) {
            return Err(Error::invalid(format!(
                "ffn: {} rows of {} features for offsets ending at {:?} over experts of {}",
                batch.rows(),
                batch.cols(),
                offsets.last(),
                dev.hidden
            )));
        }
        let rows = batch.rows();
        let per_call = ((self.max_binding_bytes() / batch.row_bytes().max(1) as u64) as usize).max(1);
        let rb = batch.row_bytes();
        for r0 in (0..rows.max(1)).step_by(per_call) {
            let r1 = (r0 + per_call).min(rows);
            let part: Vec<usize> = offsets.iter().map(|&o| o.clamp(r0, r1) - r0).collect();
            let bytes = &batch.as_bytes()[r0 * rb..r1 * rb];
            self.ffn_host_part(dev, batch.dtype(), bytes, &part, kernels, &mut out.as_bytes_mut()[r0 * rb..r1 * rb])?;
        }
        Ok(())
    }

    fn ffn_host_part(
        &self,
        dev: &DeviceExperts,
        act: DType,
        batch: &[u8],
        offsets: &[usize],
        kernels: FfnKernels,
        out: &mut [u8],
    ) -> Result<()> {
        let input = self.upload("ffn batch", batch)?;
        let output = self.storage("ffn output", batch.len() as u64)?;
        let mut scratch = Vec::new();
        let mut enc = self.encoder("ffn");
        let res = self
            .encode_ffn_with(&mut enc, dev, act, offsets, kernels, &input, &output, &mut scratch)
            .and_then(|()| self.submit_and_read(enc, &output, out));
        for b in scratch.into_iter().chain([input, output]) {
            self.recycle(b);
        }
        res
    }

    /// Checks of [`GpuContext::encode_ffn`]; the batch's rows.
    fn check_ffn_call(
        &self,
        dev: &DeviceExperts,
        act: DType,
        offsets: &[usize],
        batch: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<usize> {
        if offsets.len() != dev.experts + 1 || offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::invalid(format!(
                "ffn: {} offsets for {} experts (need experts + 1, non-decreasing from 0)",
                offsets.len(),
                dev.experts
            )));
        }
        let rows = offsets[dev.experts];
        let (d, f) = (dev.hidden, dev.intermediate);
        check_shape(act, dev.source, d, f)?;
        if f == 0 {
            return Err(Error::invalid("ffn: experts with an intermediate size of 0"));
        }
        let bytes = (rows * d * act.size()) as u64;
        for (what, b) in [("batch", batch), ("output", out)] {
            if !b.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::invalid(format!("ffn {what}: the buffer lacks STORAGE usage")));
            }
            if b.size() < bytes {
                return Err(Error::invalid(format!(
                    "ffn {what}: a buffer of {} bytes for {rows} rows of {d} {act} ({bytes} bytes)",
                    b.size()
                )));
            }
            self.check_binding(&format!("ffn {what}"), bytes)?;
        }
        u32_of("ffn rows x hidden", rows * d)?;
        u32_of("ffn rows x intermediate", rows * f)?;
        Ok(rows)
    }

    /// The kernels `kernels` resolves to for these experts and activations.
    fn ffn_path(&self, dev: &DeviceExperts, act: DType, kernels: FfnKernels) -> Result<Path> {
        let units = self.ffn_matrix();
        let (d, f) = (dev.hidden, dev.intermediate);
        // Packed weights reach the matrix units dequantized to f16: where every value fits f16
        // and a unit of 8 inputs never straddles two scale groups.
        let weights_ok = match dev.packed {
            None => dev.dtype == DType::F16,
            Some(q) => dev.packed_f16 && q.group() % 8 == 0,
        };
        let mma_ok = act != DType::F32 && weights_ok && d % 8 == 0 && f % 8 == 0;
        match kernels {
            FfnKernels::Auto { deterministic } => Ok(match units {
                Some(units) if mma_ok && !deterministic => {
                    // Packed weights keep the per-expert split measured for them (the decode
                    // kernel up to 8 rows); dense ones take one kernel for the call.
                    let (most, whole) =
                        if dev.packed.is_some() { (DECODE_MAX_ROWS, false) } else { (MMA_DECODE_MAX_ROWS, true) };
                    let decode_max = if portable::decode_ok(self, dev) { most } else { 0 };
                    Path::Mma(MmaPlan { units, tiles: [None, None], run: Run::Both, decode_max, whole })
                }
                _ => Path::Portable { decode_max: DECODE_MAX_ROWS, prefetch: true },
            }),
            FfnKernels::Portable { decode_max, prefetch } => {
                Ok(Path::Portable { decode_max: decode_max.min(portable::decode_limit(self)), prefetch })
            }
            FfnKernels::Mixed { decode_max } => match self.ffn_path(dev, act, FfnKernels::MMA)? {
                Path::Mma(plan) => {
                    let decode_max =
                        if portable::decode_ok(self, dev) { decode_max.min(portable::decode_limit(self)) } else { 0 };
                    Ok(Path::Mma(MmaPlan { decode_max, whole: false, ..plan }))
                }
                other => Ok(other),
            },
            FfnKernels::Mma { up, down, run } => {
                let units = units.ok_or_else(|| {
                    backend_error(format!("{} offers no matrix units the FFN kernel takes", self.describe()))
                })?;
                if !mma_ok {
                    let weights = match dev.packed {
                        Some(q) if !dev.packed_f16 => {
                            format!("{q} weights with values f16 cannot hold (past 65504, or all below 2^-8)")
                        }
                        Some(q) => format!("{q} weights (scale groups of {})", q.group()),
                        None => format!("{} weights", dev.dtype),
                    };
                    return Err(Error::invalid(format!(
                        "the cooperative FFN kernel takes 16-bit activations, f16 (or converted bf16) weights or \
                         packed ones whose values fit f16 in scale groups of a multiple of 8, and sizes that are \
                         multiples of 8; not {act} activations, {weights}, {d} x {f}"
                    )));
                }
                let limit = self.limits().max_compute_workgroup_storage_size;
                for (t, is_up) in [(up, true), (down, false)] {
                    let Some(t) = t else { continue };
                    if !t.is_valid() || t.s != units.size || t.sg != units.subgroup || t.workgroup_bytes(is_up) > limit
                    {
                        return Err(Error::invalid(format!(
                            "tile {t:?} does not fit {} (matrices {}x{}, subgroup {}, {limit} bytes of workgroup memory)",
                            self.describe(),
                            units.size,
                            units.size,
                            units.subgroup
                        )));
                    }
                }
                let probe = [up, down].into_iter().flatten().find(|t| t.probe != MmaProbe::Whole);
                if let (Some(t), Run::Both) = (probe, run) {
                    return Err(Error::invalid(format!(
                        "tile {} is a timing probe ({:?}): it computes no FFN, so it runs only with one \
                         projection alone (Run::Up or Run::Down)",
                        t.label(),
                        t.probe
                    )));
                }
                Ok(Path::Mma(MmaPlan { units, tiles: [up, down], run, decode_max: 0, whole: false }))
            }
        }
    }

    /// A launch of pipeline `v` (compiled without bounds checks) with `params` at binding 0
    /// and `bufs` (buffer, bytes bound) at bindings 1.., over `groups`.
    ///
    /// # Safety
    /// Every index the kernel computes from `params`, the grid and the buffers' contents (row
    /// tiles) stays below the bound sizes.
    pub(crate) unsafe fn ffn_launch(
        &self,
        v: Variant,
        params: &[u32],
        bufs: &[(&wgpu::Buffer, u64)],
        groups: (u32, u32, u32),
    ) -> Launch {
        use wgpu::util::DeviceExt;
        // SAFETY: the caller's contract.
        let pipeline = unsafe { self.pipelines.get_unchecked(&self.device, v) };
        let p = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("ffn params"),
            contents: bytemuck::cast_slice(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: p.as_entire_binding() }];
        for (i, (b, bytes)) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: binding(b, (*bytes).next_multiple_of(4)),
            });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("ffn"),
            layout: &pipeline.layout,
            entries: &entries,
        });
        Launch::new(pipeline, bind, groups, v.label())
    }

    /// A storage buffer for a row tile table (at least 16 bytes), pushed on `scratch`.
    pub(crate) fn tile_table(&self, tiles: &[[u32; 4]], scratch: &mut Vec<wgpu::Buffer>) -> Result<wgpu::Buffer> {
        let b = self.upload("ffn tiles", bytemuck::cast_slice(tiles))?;
        scratch.push(b.clone());
        Ok(b)
    }

    /// A pool buffer of at least `bytes` (16 at least), pushed on `scratch`.
    pub(crate) fn ffn_scratch(&self, what: &str, bytes: u64, scratch: &mut Vec<wgpu::Buffer>) -> Result<wgpu::Buffer> {
        let b = self.storage(what, bytes.max(16))?;
        debug_assert!(b.usage().contains(STORAGE));
        scratch.push(b.clone());
        Ok(b)
    }
}

/// One chunk of a call's rows, `c0..c1`, with the call's offsets clamped to it.
pub(crate) struct Chunk<'a> {
    pub c0: usize,
    pub c1: usize,
    pub offs: &'a [usize],
    /// The call's rows (the batch's and the output's).
    pub rows: usize,
    pub act: DType,
    pub batch: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
}

impl Chunk<'_> {
    pub fn len(&self) -> usize {
        self.c1 - self.c0
    }
}

/// Record `launches` in one compute pass (each in its own, timed, while `ctx` profiles).
pub(crate) fn encode_pass(ctx: &GpuContext, enc: &mut wgpu::CommandEncoder, launches: &[Launch]) {
    if let Some(p) = ctx.profile.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        for l in launches {
            p.encode(enc, l);
        }
        return;
    }
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("ffn"), timestamp_writes: None });
    for l in launches {
        l.encode(&mut pass);
    }
}

/// Workgroups for `count` items of `per` each, as a 2-D grid within `max_dim`.
pub(crate) fn grid(count: usize, per: usize, max_dim: u32) -> Result<(u32, u32)> {
    let groups = count.div_ceil(per);
    let gx = groups.min(max_dim as usize);
    let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
    if gy > max_dim as usize {
        return Err(backend_error(format!("{count} items need {groups} workgroups, over {max_dim}^2")));
    }
    Ok((gx as u32, gy as u32))
}
