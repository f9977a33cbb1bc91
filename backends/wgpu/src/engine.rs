//! [`GpuEngine`]: the [`Engine`] of a layer on one wgpu device.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use moe_ep::compute::engine::{ZERO_ROW, check_combine, check_ffn, check_gather, even_offsets};
use moe_ep::{DType, Engine, ExpertSet, Result, Tensor};

use crate::context::{ContextOptions, GpuContext};
use crate::ffn::{DeviceExperts, check_shape, choose_tile};
use crate::kernels::Tile;
use crate::ops::{Combine, Gather, word_for};

/// Runs every compute stage on the GPU: each stage uploads its host rows, runs its kernels
/// and reads the result back, in one submit. Expert weights are uploaded once per expert set
/// (at warm-up or on first use) and stay on the device until the set is released.
///
/// Data movement is bitwise that of [`moe_ep::CpuEngine`], and so is the combine; the FFN
/// sums in f32 in a fixed order (`wgsl/ffn.wgsl`) and differs from the CPU's by rounding only.
#[derive(Debug, Clone)]
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    experts: Arc<RwLock<HashMap<u64, Arc<DeviceExperts>>>>,
}

impl GpuEngine {
    /// An engine on a new device chosen by `opts`.
    pub fn new(opts: &ContextOptions) -> Result<Self> {
        Ok(Self::with_context(Arc::new(GpuContext::new(opts)?)))
    }

    /// An engine on an existing context.
    pub fn with_context(ctx: Arc<GpuContext>) -> Self {
        GpuEngine { ctx, experts: Arc::default() }
    }

    /// The device copy of `experts`, uploaded on first use.
    pub fn resident(&self, experts: &ExpertSet) -> Result<Arc<DeviceExperts>> {
        if let Some(d) = self.experts.read().unwrap_or_else(|p| p.into_inner()).get(&experts.id()) {
            return Ok(d.clone());
        }
        let dev = Arc::new(DeviceExperts::upload(&self.ctx, experts)?);
        self.experts.write().unwrap_or_else(|p| p.into_inner()).insert(experts.id(), dev.clone());
        Ok(dev)
    }

    /// Bytes of expert weights held on the device.
    pub fn resident_bytes(&self) -> u64 {
        self.experts.read().unwrap_or_else(|p| p.into_inner()).values().map(|d| d.bytes).sum()
    }

    /// The FFN kernel [`Engine::ffn`] runs for these expert offsets over a `d x f` FFN: the
    /// decode kernel for a few rows an expert, else the tiled one, or its cooperative-matrix
    /// variant for f16 activations and weights where the adapter offers it and `deterministic`
    /// is off. The portable shapes all sum in one order, so the choice keeps the
    /// deterministic mode's guarantee.
    pub fn tile_for(
        &self,
        offsets: &[usize],
        d: usize,
        f: usize,
        act: DType,
        weights: DType,
        deterministic: bool,
    ) -> Tile {
        let limit = self.ctx.limits().max_compute_workgroup_storage_size;
        let mut tile = choose_tile(offsets, d, f);
        if tile.workgroup_bytes() > limit {
            tile = Tile::SQUARE;
        }
        let f16 = act == DType::F16 && weights == DType::F16 && d % 16 == 0 && f % 16 == 0;
        if tile == Tile::SQUARE && !deterministic && f16 && self.ctx.coop_f16() && Tile::COOP.workgroup_bytes() <= limit
        {
            tile = Tile::COOP;
        }
        tile
    }

    /// [`Engine::ffn`] with a given tile shape (benchmarks and tests compare the shapes).
    pub fn ffn_with_tile(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        tile: Tile,
        out: &mut Tensor,
    ) -> Result<()> {
        check_ffn(batch, offsets, experts, out)?;
        check_semantics(experts)?;
        let rows = batch.rows();
        if rows == 0 || experts.is_empty() || batch.cols() == 0 {
            return Ok(());
        }
        let act = batch.dtype();
        let (d, f) = (batch.cols(), experts[0].gate.rows());
        check_shape(act, experts[0].gate.dtype(), d, f)?;
        let _span = tracing::trace_span!("gpu_ffn", rows, experts = experts.len()).entered();
        let dev = self.resident(experts)?;
        let ctx = &self.ctx;
        let bufs = ctx.ffn_scratch(batch.as_bytes(), act, rows, d, f, tile)?;
        let mut scratch = Vec::new();
        let res = ctx.ffn_launches(&dev, act, offsets, tile, &bufs.view(), &mut scratch).and_then(|launches| {
            let mut enc = ctx.encoder("ffn");
            {
                let mut pass =
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("ffn"), timestamp_writes: None });
                for l in &launches {
                    l.encode(&mut pass);
                }
            }
            ctx.submit_and_read(enc, bufs.output(), out.as_bytes_mut())
        });
        self.release_buffers(scratch);
        bufs.recycle(ctx);
        res
    }

    /// The device context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Upload `srcs` as at most two buffers (more are concatenated into the second).
    fn upload_sources(&self, what: &str, srcs: &[&Tensor]) -> Result<Vec<(wgpu::Buffer, usize)>> {
        let ctx = &self.ctx;
        let mut out = Vec::with_capacity(2);
        if let Some(a) = srcs.first() {
            out.push((ctx.upload(what, a.as_bytes())?, a.rows()));
        }
        if srcs.len() == 2 {
            out.push((ctx.upload(what, srcs[1].as_bytes())?, srcs[1].rows()));
        } else if srcs.len() > 2 {
            let bytes: u64 = srcs[1..].iter().map(|s| s.as_bytes().len() as u64).sum();
            let b = ctx.storage(what, bytes)?;
            let mut off = 0u64;
            for s in &srcs[1..] {
                if !s.as_bytes().is_empty() {
                    ctx.queue.write_buffer(&b, off, s.as_bytes());
                }
                off += s.as_bytes().len() as u64;
            }
            out.push((b, srcs[1..].iter().map(|s| s.rows()).sum()));
        }
        Ok(out)
    }

    fn release_buffers(&self, bufs: impl IntoIterator<Item = wgpu::Buffer>) {
        for b in bufs {
            self.ctx.recycle(b);
        }
    }
}

/// The GPU kernels compute SwiGLU without biases; other expert semantics are a device error
/// (so that a layer's policy runs such calls on the CPU) until they have kernels.
fn check_semantics(experts: &ExpertSet) -> Result<()> {
    if experts.activation() != moe_ep::model::config::Activation::Silu || experts.has_bias() {
        return Err(crate::context::backend_error(format!(
            "the GPU FFN kernels compute SwiGLU without biases; this expert set has {:?}{}",
            experts.activation(),
            if experts.has_bias() { " with biases" } else { "" }
        )));
    }
    Ok(())
}

impl Engine for GpuEngine {
    fn name(&self) -> String {
        format!("wgpu:{}", self.ctx.adapter_info().name)
    }

    fn gather_rows(&self, srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()> {
        check_gather(srcs, idx, dst)?;
        let rb = dst.row_bytes();
        if idx.is_empty() || rb == 0 {
            return Ok(());
        }
        word_for("gather_rows", rb)?;
        let _span = tracing::trace_span!("gpu_gather_rows", rows = idx.len(), row_bytes = rb).entered();
        let ctx = &self.ctx;
        let sources = self.upload_sources("gather_rows source", srcs)?;
        let idx_buf = ctx.upload("gather_rows indices", bytemuck::cast_slice(idx))?;
        let out = ctx.storage("gather_rows destination", dst.as_bytes().len() as u64)?;
        let empty;
        let (a, a_rows) = match sources.first() {
            Some((b, r)) => (b, *r),
            None => {
                // Only ZERO_ROW indices (checked above): any buffer will do as the source.
                empty = ctx.storage("gather_rows source", 16)?;
                (&empty, 0)
            }
        };
        // SAFETY: check_gather verified every index against the sources' rows.
        let launch = unsafe {
            ctx.gather_unchecked(&Gather {
                a,
                a_rows,
                b: sources.get(1).map(|(b, _)| b),
                b_rows: sources.get(1).map_or(0, |(_, r)| *r),
                idx: &idx_buf,
                dst: &out,
                rows: idx.len(),
                row_bytes: rb,
            })
        }?;
        let mut enc = ctx.encoder("gather_rows");
        launch.encode_pass(&mut enc);
        let res = ctx.submit_and_read(enc, &out, dst.as_bytes_mut());
        self.release_buffers(sources.into_iter().map(|(b, _)| b).chain([idx_buf, out]));
        res
    }

    fn ffn(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        let f = experts.first().map_or(0, |w| w.gate.rows());
        let wdt = experts.first().map_or(DType::F32, |w| w.gate.dtype());
        // A call whose f32 intermediates or outputs would not fit one buffer binding runs in
        // row chunks that do (each row's result does not depend on the others in its call).
        let rows = batch.rows();
        let widest = 4 * batch.cols().max(f).max(1) as u64;
        let per_call = ((self.ctx.max_binding_bytes() / widest) as usize).saturating_sub(crate::ffn::COOP_PAD_ROWS);
        if rows > per_call && per_call > 0 {
            check_ffn(batch, offsets, experts, out)?;
            let rb = out.row_bytes();
            for r0 in (0..rows).step_by(per_call) {
                let r1 = (r0 + per_call).min(rows);
                let part: Vec<usize> = offsets.iter().map(|&o| o.clamp(r0, r1) - r0).collect();
                let chunk = batch.slice_rows(r0, r1)?;
                let mut y = Tensor::zeros(out.dtype(), r1 - r0, out.cols());
                let tile = self.tile_for(&part, batch.cols(), f, batch.dtype(), wdt, deterministic);
                self.ffn_with_tile(&chunk, &part, experts, tile, &mut y)?;
                out.as_bytes_mut()[r0 * rb..r1 * rb].copy_from_slice(y.as_bytes());
            }
            return Ok(());
        }
        let tile = self.tile_for(offsets, batch.cols(), f, batch.dtype(), wdt, deterministic);
        self.ffn_with_tile(batch, offsets, experts, tile, out)
    }

    fn combine(&self, srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()> {
        check_combine(srcs, idx, weights, k, y)?;
        let rb = y.row_bytes();
        if y.rows() == 0 || rb == 0 {
            return Ok(());
        }
        word_for("combine", rb)?;
        let _span = tracing::trace_span!("gpu_combine", rows = y.rows(), k, row_bytes = rb).entered();
        let ctx = &self.ctx;
        let sources = self.upload_sources("combine source", srcs)?;
        let idx_buf = ctx.upload("combine indices", bytemuck::cast_slice(idx))?;
        let w_buf = ctx.upload("combine weights", bytemuck::cast_slice(weights))?;
        let out = ctx.storage("combine output", y.as_bytes().len() as u64)?;
        let empty;
        let (a, a_rows) = match sources.first() {
            Some((b, r)) => (b, *r),
            None => {
                empty = ctx.storage("combine source", 16)?;
                (&empty, 0)
            }
        };
        // SAFETY: check_combine verified every index against the sources' rows.
        let launch = unsafe {
            ctx.combine_unchecked(&Combine {
                a,
                a_rows,
                b: sources.get(1).map(|(b, _)| b),
                b_rows: sources.get(1).map_or(0, |(_, r)| *r),
                idx: &idx_buf,
                weights: &w_buf,
                dst: &out,
                rows: y.rows(),
                k,
                dtype: y.dtype(),
                row_bytes: rb,
            })
        }?;
        let mut enc = ctx.encoder("combine");
        launch.encode_pass(&mut enc);
        let res = ctx.submit_and_read(enc, &out, y.as_bytes_mut());
        self.release_buffers(sources.into_iter().map(|(b, _)| b).chain([idx_buf, w_buf, out]));
        res
    }

    fn is_accelerator(&self) -> bool {
        self.ctx.adapter_info().device_type != wgpu::DeviceType::Cpu
    }

    /// Upload the weights, then run the FFN at both tile shapes and a combine and a gather at
    /// `max_rows` rows on random data: that compiles every pipeline a call of this layer
    /// uses and leaves buffers of those sizes in the pool.
    fn warm_up(&self, experts: &ExpertSet, act: DType, max_rows: usize) -> Result<()> {
        let _span = tracing::debug_span!("gpu_warm_up", max_rows).entered();
        if experts.is_empty() {
            return Ok(());
        }
        self.resident(experts)?;
        let (d, l) = (experts[0].gate.cols(), experts.len());
        // Every decode tile (1, 2, 4, 8 rows an expert), then the square one.
        let mut sizes: Vec<usize> = [1, 2, 4, 8].iter().map(|r| r * l).collect();
        sizes.push(max_rows.max(l * (crate::ffn::SKINNY_MAX_ROWS + 1)));
        for rows in sizes {
            let batch = moe_ep::compute::warmup::sample_rows(act, rows, d, 0x3a7 ^ rows as u64);
            let offsets = even_offsets(rows, l);
            let mut out = Tensor::zeros(act, rows, d);
            self.ffn(&batch, &offsets, experts, false, &mut out)?;
            let idx: Vec<u32> = (0..rows as u32).collect();
            let mut moved = Tensor::zeros(act, rows, d);
            self.gather_rows(&[&out], &idx, &mut moved)?;
            let mut y = Tensor::zeros(act, rows, d);
            let w = vec![1.0f32; rows];
            let idx1: Vec<u32> = idx.iter().map(|&i| if i % 7 == 6 { ZERO_ROW } else { i }).collect();
            self.combine(&[&moved], &idx1, &w, 1, &mut y)?;
        }
        Ok(())
    }

    fn release(&self, id: u64) {
        self.experts.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}
