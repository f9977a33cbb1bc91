//! [`GpuEngine`]: the [`Engine`] of a layer on one wgpu device.

use std::sync::Arc;

use moe_ep::engine::{check_combine, check_gather};
use moe_ep::{CpuEngine, Engine, ExpertWeights, Result, Tensor};

use crate::context::{ContextOptions, GpuContext};
use crate::ops::{Combine, Gather, word_for};

/// Runs the data path (pack, scatter, gather back, combine) on the GPU: each stage uploads
/// its host rows, runs one kernel and reads the result back, in one submit. The expert FFN
/// runs on the CPU until the GPU FFN exists. Results are bitwise those of [`CpuEngine`].
#[derive(Debug, Clone)]
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
}

impl GpuEngine {
    /// An engine on a new device chosen by `opts`.
    pub fn new(opts: &ContextOptions) -> Result<Self> {
        Ok(GpuEngine { ctx: Arc::new(GpuContext::new(opts)?) })
    }

    /// An engine on an existing context.
    pub fn with_context(ctx: Arc<GpuContext>) -> Self {
        GpuEngine { ctx }
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

    fn release(&self, bufs: impl IntoIterator<Item = wgpu::Buffer>) {
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
        self.release(sources.into_iter().map(|(b, _)| b).chain([idx_buf, out]));
        res
    }

    fn ffn(&self, batch: &Tensor, offsets: &[usize], experts: &[ExpertWeights], out: &mut Tensor) -> Result<()> {
        CpuEngine.ffn(batch, offsets, experts, out)
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
        self.release(sources.into_iter().map(|(b, _)| b).chain([idx_buf, w_buf, out]));
        res
    }
}
