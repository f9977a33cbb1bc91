//! The grouped SwiGLU experts on the GPU: weights resident on the device, one up launch
//! (gate and up in one pass, SwiGLU fused) and one down launch per weight shard, and a narrow
//! to 16-bit activations, all in one submit.

use moe_ep::{DType, Error, ExpertWeights, Result};

use crate::context::{GpuContext, backend_error};
use crate::kernels::{Tile, Variant, WORKGROUP};
use crate::ops::{Launch, binding, u32_of};

/// Rows per expert up to which the decode kernel runs; above it, the tiled one.
pub const SKINNY_MAX_ROWS: usize = 8;

/// Rows of padding the cooperative kernel may read past the batch and the intermediate.
pub const COOP_PAD_ROWS: usize = 64;

/// Some local experts' three matrices, each kind concatenated in one buffer.
#[derive(Debug)]
pub struct Shard {
    /// First local expert in the shard, and how many.
    pub first: usize,
    pub count: usize,
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    pub down: wgpu::Buffer,
}

/// One expert set's weights on the device, in shards that each fit one binding.
#[derive(Debug)]
pub struct DeviceExperts {
    pub dtype: DType,
    /// Hidden (`D`) and intermediate (`F`) sizes.
    pub hidden: usize,
    pub intermediate: usize,
    pub shards: Vec<Shard>,
    /// Bytes on the device.
    pub bytes: u64,
}

/// The GPU kernels' shape rules for an FFN of `d x f` with these dtypes, as a device error
/// (so that a layer's policy runs such a layer on the CPU).
pub fn check_shape(act: DType, weights: DType, d: usize, f: usize) -> Result<()> {
    let sixteen = act.size() == 2 || weights.size() == 2;
    if sixteen && (d % 2 != 0 || f % 2 != 0) {
        return Err(backend_error(format!(
            "the GPU FFN reads 16-bit values in pairs: hidden {d} and intermediate {f} must be even \
             ({act} activations, {weights} weights)"
        )));
    }
    Ok(())
}

impl DeviceExperts {
    /// Upload `experts` (all `[F, D]`, `[F, D]`, `[D, F]` in one dtype, at least one),
    /// sharded so that no binding exceeds the device's limit. Errors when one expert's matrix
    /// alone exceeds it, or for shapes the kernels do not take ([`check_shape`]).
    pub fn upload(ctx: &GpuContext, experts: &[ExpertWeights]) -> Result<Self> {
        let first = experts.first().ok_or_else(|| Error::invalid("no experts to upload"))?;
        let (dtype, f, d) = (first.gate.dtype(), first.gate.rows(), first.gate.cols());
        check_shape(dtype, dtype, d, f)?;
        let matrix = (f * d * dtype.size()) as u64;
        // f16 weights may feed the cooperative kernel, whose fragments of a partial tile read
        // up to 64 rows past the last expert: pad each buffer by that much.
        let pad = if dtype == DType::F16 { (64 * d.max(f) * 2) as u64 } else { 0 };
        let per_shard = (ctx.max_binding_bytes().saturating_sub(pad) / matrix.max(1)) as usize;
        if per_shard == 0 {
            return Err(backend_error(format!(
                "one expert matrix of {matrix} bytes exceeds the {} byte binding limit of {}",
                ctx.max_binding_bytes(),
                ctx.adapter_info().name
            )));
        }
        let _span =
            tracing::debug_span!("upload_experts", experts = experts.len(), bytes = 3 * matrix * experts.len() as u64)
                .entered();
        let mut shards = Vec::new();
        let mut bytes = 0;
        for (s, chunk) in experts.chunks(per_shard).enumerate() {
            let size = (matrix * chunk.len() as u64 + pad).max(16);
            let make = |what: &str, pick: fn(&ExpertWeights) -> &moe_ep::Tensor| {
                let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                for (i, w) in chunk.iter().enumerate() {
                    let data = pick(w).as_bytes();
                    if !data.is_empty() {
                        ctx.queue.write_buffer(&b, i as u64 * matrix, data);
                    }
                }
                b
            };
            shards.push(Shard {
                first: s * per_shard,
                count: chunk.len(),
                gate: make("expert gate", |w| &w.gate),
                up: make("expert up", |w| &w.up),
                down: make("expert down", |w| &w.down),
            });
            bytes += 3 * size;
        }
        ctx.check_errors()?;
        Ok(DeviceExperts { dtype, hidden: d, intermediate: f, shards, bytes })
    }
}

/// The tile shape for a call with these expert offsets over a `d x f` FFN: the decode kernel
/// ([`Tile::gemv`], as many rows as the busiest expert's, rounded up to a power of two) while
/// no expert has more than [`SKINNY_MAX_ROWS`] rows and both sizes are multiples of 8 (its
/// 16-byte loads), else the square tile. All give the same bits.
pub fn choose_tile(offsets: &[usize], d: usize, f: usize) -> Tile {
    let most = offsets.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    if most <= SKINNY_MAX_ROWS && d % 8 == 0 && f % 8 == 0 {
        Tile::gemv(most.max(1).next_power_of_two() as u32)
    } else {
        Tile::SQUARE
    }
}

/// Device buffers of one FFN call.
pub struct FfnBuffers<'a> {
    /// The batch, `[rows, D]` in `act` (for the cooperative tile, [`COOP_PAD_ROWS`] more rows).
    pub batch: &'a wgpu::Buffer,
    /// `[rows, F]` scratch: f32 (f16 and [`COOP_PAD_ROWS`] more rows for the cooperative tile).
    pub inter: &'a wgpu::Buffer,
    /// f32 `[rows, D]`: the output for f32 activations, else scratch.
    pub out32: &'a wgpu::Buffer,
    /// `[rows, D]` 16-bit output, for 16-bit activations.
    pub out16: Option<&'a wgpu::Buffer>,
    /// Partial sums of a split tile, [`partial_bytes`] bytes (unused by unsplit tiles).
    pub partial: Option<&'a wgpu::Buffer>,
}

/// Pool buffers sized for one FFN call (see [`GpuContext::ffn_scratch`]); [`FfnScratch::view`]
/// lends them as [`FfnBuffers`], [`FfnScratch::recycle`] gives them back.
#[derive(Debug)]
pub struct FfnScratch {
    pub batch: wgpu::Buffer,
    pub inter: wgpu::Buffer,
    pub out32: wgpu::Buffer,
    pub out16: Option<wgpu::Buffer>,
    pub partial: Option<wgpu::Buffer>,
}

impl FfnScratch {
    /// The buffers as a launch takes them.
    pub fn view(&self) -> FfnBuffers<'_> {
        FfnBuffers {
            batch: &self.batch,
            inter: &self.inter,
            out32: &self.out32,
            out16: self.out16.as_ref(),
            partial: self.partial.as_ref(),
        }
    }

    /// The buffer holding the call's output: `out16` for 16-bit activations, else `out32`.
    pub fn output(&self) -> &wgpu::Buffer {
        self.out16.as_ref().unwrap_or(&self.out32)
    }

    /// Give every buffer back to `ctx`'s pool.
    pub fn recycle(self, ctx: &GpuContext) {
        for b in [self.batch, self.inter, self.out32].into_iter().chain(self.out16).chain(self.partial) {
            ctx.recycle(b);
        }
    }
}

/// Bytes of the partial sums a `tile` launch of `rows` rows needs (0 for unsplit tiles).
pub fn partial_bytes(tile: Tile, rows: usize, d: usize, f: usize) -> u64 {
    if !tile.split {
        return 0;
    }
    let chunks = |k: usize| k.div_ceil(crate::kernels::CHUNK as usize);
    (4 * rows * (2 * chunks(d) * f).max(chunks(f) * d)) as u64
}

impl GpuContext {
    /// Buffers from the pool for one FFN call of `rows` rows of `act` over a `d x f` FFN with
    /// `tile`, with `batch` (its bytes, `rows * d` values) written into the batch buffer: the
    /// cooperative tile's padding and f16 intermediate, the split tiles' partial sums, a
    /// 16-bit output for 16-bit activations. Errors when a buffer exceeds the binding limit.
    pub fn ffn_scratch(
        &self,
        batch: &[u8],
        act: DType,
        rows: usize,
        d: usize,
        f: usize,
        tile: Tile,
    ) -> Result<FfnScratch> {
        // The cooperative kernel may read COOP_PAD_ROWS rows past its inputs.
        let pad = if tile.coop { COOP_PAD_ROWS } else { 0 };
        let batch_buf = self.storage("ffn batch", ((rows + pad) * d * act.size()) as u64)?;
        if !batch.is_empty() {
            self.queue.write_buffer(&batch_buf, 0, batch);
        }
        let pbytes = partial_bytes(tile, rows, d, f);
        Ok(FfnScratch {
            batch: batch_buf,
            inter: self.storage("ffn intermediate", ((rows + pad) * f * if tile.coop { 2 } else { 4 }) as u64)?,
            out32: self.storage("ffn output", (rows * d * 4) as u64)?,
            out16: if act == DType::F32 { None } else { Some(self.storage("ffn output", (rows * d * 2) as u64)?) },
            partial: if pbytes > 0 { Some(self.storage("ffn partial sums", pbytes)?) } else { None },
        })
    }

    /// The launches of one FFN call, in order: up then down for each shard, then the narrow.
    /// Tile tables and parameters are uploaded into buffers pushed on `scratch` (give them
    /// back to the pool after the submit). `offsets` are validated by the caller
    /// (`moe_ep::compute::engine::check_ffn`); sizes are checked here against the device's limits.
    pub fn ffn_launches(
        &self,
        dev: &DeviceExperts,
        act: DType,
        offsets: &[usize],
        tile: Tile,
        bufs: &FfnBuffers<'_>,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<Vec<Launch>> {
        let (d, f) = (dev.hidden, dev.intermediate);
        check_shape(act, dev.dtype, d, f)?;
        let rows = *offsets.last().unwrap_or(&0);
        self.check_binding("ffn batch", (rows * d * act.size()) as u64)?;
        self.check_binding("ffn intermediate", (rows * f * 4) as u64)?;
        self.check_binding("ffn output", (rows * d * 4) as u64)?;
        u32_of("ffn rows x intermediate", rows * f)?;
        u32_of("ffn rows x hidden", rows * d)?;
        let max_dim = self.limits().max_compute_workgroups_per_dimension as usize;
        if tile.workgroup_bytes() > self.limits().max_compute_workgroup_storage_size
            || tile.threads() > self.limits().max_compute_invocations_per_workgroup
        {
            return Err(backend_error(format!(
                "FFN tile {tile:?} needs {} bytes of workgroup memory and {} threads; {} allows {} and {}",
                tile.workgroup_bytes(),
                tile.threads(),
                self.adapter_info().name,
                self.limits().max_compute_workgroup_storage_size,
                self.limits().max_compute_invocations_per_workgroup
            )));
        }
        if tile.coop
            && (act != DType::F16
                || dev.dtype != DType::F16
                || !self.coop_f16()
                || bufs.out16.is_none()
                || d % 16 != 0
                || f % 16 != 0)
        {
            return Err(Error::invalid(format!(
                "the cooperative FFN kernel takes f16 activations and weights, sizes that are multiples of 16 \
                 ({d} x {f}), on an adapter that offers it ({act} activations, {} weights, offered: {})",
                dev.dtype,
                self.coop_f16()
            )));
        }
        if tile.split && (d % 8 != 0 || f % 8 != 0) {
            return Err(Error::invalid(format!(
                "the decode FFN kernel needs sizes that are multiples of 8, not {d} x {f}"
            )));
        }
        let unpack = self.unpack_f16();
        let partial = match (tile.split, bufs.partial) {
            (false, _) => None,
            (true, Some(p)) => {
                let bytes = partial_bytes(tile, rows, d, f);
                self.check_binding("ffn partial sums", bytes)?;
                if p.size() < bytes {
                    return Err(Error::invalid(format!("ffn partial sums: {} bytes for {bytes}", p.size())));
                }
                Some((p, bytes))
            }
            (true, None) => return Err(Error::invalid("ffn: a split tile needs a partial-sum buffer")),
        };
        // Row tiles of each shard's experts.
        let mut tables = Vec::new();
        for shard in &dev.shards {
            let mut tiles: Vec<[u32; 4]> = Vec::new();
            for l in shard.first..shard.first + shard.count {
                let (r0, r1) = (offsets[l], offsets[l + 1]);
                for t in (r0..r1).step_by(tile.bm as usize) {
                    tiles.push([(l - shard.first) as u32, t as u32, (t + tile.bm as usize).min(r1) as u32, 0]);
                }
            }
            if tiles.is_empty() {
                continue;
            }
            if tiles.len() > max_dim {
                return Err(backend_error(format!(
                    "{} row tiles of {} rows exceed {max_dim} workgroups; split the batch",
                    tiles.len(),
                    tile.bm
                )));
            }
            let table = self.upload("ffn tiles", bytemuck::cast_slice(&tiles))?;
            tables.push((shard, table, tiles.len()));
        }
        let matrix_words = u32_of("expert matrix words", f * d * dev.dtype.size() / 4)?;
        let mut launches = Vec::new();
        for up in [true, false] {
            let (k, n) = if up { (d, f) } else { (f, d) };
            let chunks = k.div_ceil(crate::kernels::CHUNK as usize);
            // The cooperative kernel keeps the intermediate in f16 and writes f16 outputs.
            let (final_out, out_elem) = match (up, tile.coop, bufs.out16) {
                (true, coop, _) => (bufs.inter, if coop { 2 } else { 4 }),
                (false, true, Some(o16)) => (o16, 2),
                (false, _, _) => (bufs.out32, 4),
            };
            let (out, out_bytes, groups_z) = match partial {
                Some((p, bytes)) => (p, bytes, chunks),
                None => (final_out, (rows * n * out_elem) as u64, 1),
            };
            let v = Variant::ffn(up, act, dev.dtype, tile, unpack);
            for (shard, table, ntiles) in &tables {
                let groups_y = n.div_ceil(tile.bn as usize);
                // SAFETY: every row tile lies within the batch (built above from offsets that
                // end at `rows`), every expert index within its shard, and the kernel keeps
                // its weight, row and column indices below K, N and the tile's end; split
                // partials stay below `partial_bytes`.
                let pipeline = unsafe { self.pipelines.get_unchecked(&self.device, v) };
                let params = self.params([k as u32, n as u32, matrix_words, 0, rows as u32, chunks as u32, 0, 0]);
                let (a, a_bytes) = match (up, tile.coop) {
                    (true, false) => (bufs.batch, (rows * d * act.size()) as u64),
                    (false, false) => (bufs.inter, (rows * f * 4) as u64),
                    (true, true) => (bufs.batch, ((rows + COOP_PAD_ROWS) * d * 2) as u64),
                    (false, true) => (bufs.inter, ((rows + COOP_PAD_ROWS) * f * 2) as u64),
                };
                if a.size() < a_bytes {
                    return Err(Error::invalid(format!("ffn input: {} bytes for {a_bytes}", a.size())));
                }
                // The cooperative kernel reads into the weights' padding: bind all of it.
                let w_bytes = if tile.coop { shard.gate.size() } else { matrix_words as u64 * 4 * shard.count as u64 };
                // The down kernel never reads binding 4, but its layout declares it: bind the
                // down weights again (read-only, so the aliasing is allowed).
                let (w0, w1) = if up { (&shard.gate, &shard.up) } else { (&shard.down, &shard.down) };
                let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("ffn"),
                    layout: &pipeline.layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: binding(table, *ntiles as u64 * 16) },
                        wgpu::BindGroupEntry { binding: 2, resource: binding(a, a_bytes.next_multiple_of(4)) },
                        wgpu::BindGroupEntry { binding: 3, resource: binding(w0, w_bytes) },
                        wgpu::BindGroupEntry { binding: 4, resource: binding(w1, w_bytes) },
                        wgpu::BindGroupEntry { binding: 5, resource: binding(out, out_bytes) },
                    ],
                });
                // The decode kernel takes (chunk, weight rows, row tile); the tiled one (row
                // tile, weight rows).
                let groups = if tile.split {
                    (groups_z as u32, groups_y as u32, *ntiles as u32)
                } else {
                    (*ntiles as u32, groups_y as u32, 1)
                };
                launches.push(Launch::new(pipeline, bind, groups, v.label()));
            }
            if let Some((p, bytes)) = partial {
                // The down projection of 16-bit activations narrows here (no narrow launch).
                let narrowed = !up && bufs.out16.is_some();
                let count = rows * n;
                let threads = if narrowed { count / 2 } else { count };
                let groups = threads.div_ceil(WORKGROUP as usize);
                let gx = groups.min(max_dim);
                let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
                let v = Variant::ffn_reduce(up, if narrowed { act } else { DType::F32 });
                // SAFETY: the kernel reads partials below (chunks * (1 + up)) * count <= bytes / 4
                // and writes outputs below count (narrowed: words below count / 2).
                let pipeline = unsafe { self.pipelines.get_unchecked(&self.device, v) };
                let params = self.params([count as u32, chunks as u32, gx as u32, 0, 0, 0, 0, 0]);
                let (dst, dst_bytes) = match bufs.out16 {
                    Some(o) if narrowed => (o, (count * 2) as u64),
                    _ => (final_out, (count * 4) as u64),
                };
                let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("ffn_reduce"),
                    layout: &pipeline.layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: binding(p, bytes) },
                        wgpu::BindGroupEntry { binding: 2, resource: binding(dst, dst_bytes) },
                    ],
                });
                launches.push(Launch::new(pipeline, bind, (gx as u32, gy as u32, 1), v.label()));
            }
        }
        scratch.extend(tables.into_iter().map(|(_, t, _)| t));
        if let (Some(out16), false) = (bufs.out16, tile.split || tile.coop) {
            let words = rows * d / 2;
            let groups = words.div_ceil(WORKGROUP as usize);
            let gx = groups.min(max_dim);
            let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
            let v = Variant::narrow(act);
            // SAFETY: the kernel writes word i < words and reads values 2i, 2i + 1 < rows * d.
            let pipeline = unsafe { self.pipelines.get_unchecked(&self.device, v) };
            let params = self.params([words as u32, gx as u32, 0, 0, 0, 0, 0, 0]);
            let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("narrow"),
                layout: &pipeline.layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: binding(bufs.out32, (rows * d * 4) as u64) },
                    wgpu::BindGroupEntry { binding: 2, resource: binding(out16, (words * 4) as u64) },
                ],
            });
            launches.push(Launch::new(pipeline, bind, (gx as u32, gy as u32, 1), v.label()));
        }
        Ok(launches)
    }
}
