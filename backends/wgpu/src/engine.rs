//! [`GpuEngine`]: the [`Engine`] of a layer on one wgpu device.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use moe_ep::compute::engine::{ZERO_ROW, check_combine, check_ffn, check_gather, even_offsets};
use moe_ep::{DType, Engine, ExpertSet, Result, Tensor};

use crate::context::{ContextOptions, GpuContext};
use crate::ffn::{DeviceExperts, FfnKernels};
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
        check_ffn(batch, offsets, experts, out)?;
        if batch.rows() == 0 || experts.is_empty() || batch.cols() == 0 {
            return Ok(());
        }
        let _span = tracing::trace_span!("gpu_ffn", rows = batch.rows(), experts = experts.len()).entered();
        let dev = self.resident(experts)?;
        self.ctx.ffn_host(&dev, batch, offsets, FfnKernels::Auto { deterministic }, out)
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
        let dev = self.resident(experts)?;
        self.ctx.prepare_ffn(&dev, act)?;
        let (d, l) = (experts[0].gate.cols(), experts.len());
        // Every decode tile (1, 2, 4, 8 rows an expert), then the square one.
        let mut sizes: Vec<usize> = [1, 2, 4, 8].iter().map(|r| r * l).collect();
        sizes.push(max_rows.max(l * (crate::ffn::DECODE_MAX_ROWS + 1)));
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
