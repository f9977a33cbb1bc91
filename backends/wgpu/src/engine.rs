//! [`GpuEngine`]: the [`Engine`] of a layer on one wgpu device.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use moe_ep::compute::engine::{ZERO_ROW, check_ffn, even_offsets};
use moe_ep::compute::session::{Buf, Matrix, RouterSet, Session};
use moe_ep::{DType, Engine, ExpertSet, Result, Tensor};

use crate::context::{ContextOptions, GpuContext};
use crate::ffn::{DeviceExperts, check_shape, choose_tile};
use crate::kernels::Tile;
use crate::session::GpuSession;

/// Runs every compute stage on the GPU, rows kept on the device between stages: its
/// [`Session`] records each stage into one command encoder and submits it at the host points
/// only (see `session.rs`). Expert weights, router weights and gates are uploaded once per
/// set (at warm-up or on first use) and stay on the device until the set is released.
///
/// Data movement is bitwise that of [`moe_ep::CpuEngine`], and so is the combine; the FFN
/// sums in f32 in a fixed order (`wgsl/ffn.wgsl`) and differs from the CPU's by rounding only.
#[derive(Debug, Clone)]
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    id: u64,
    experts: Arc<RwLock<HashMap<u64, Arc<DeviceExperts>>>>,
    /// Replicated matrices (router, shared expert gate) and selection biases on the device.
    matrices: Arc<RwLock<HashMap<u64, wgpu::Buffer>>>,
    /// FFN calls still to fail with a device error (a test hook: [`GpuEngine::fail_next_ffns`]).
    failures: Arc<std::sync::atomic::AtomicUsize>,
}

impl GpuEngine {
    /// One FFN call through a session (upload, record, read back).
    fn ffn_session(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        let mut s = self.session()?;
        let b = s.upload(batch)?;
        let o = s.alloc(out.dtype(), out.rows(), out.cols())?;
        s.ffn(b, offsets, experts, deterministic, o)?;
        *out = s.download(o)?;
        Ok(())
    }

    /// An engine on a new device chosen by `opts`.
    pub fn new(opts: &ContextOptions) -> Result<Self> {
        Ok(Self::with_context(Arc::new(GpuContext::new(opts)?)))
    }

    /// An engine on an existing context.
    pub fn with_context(ctx: Arc<GpuContext>) -> Self {
        GpuEngine {
            ctx,
            id: moe_ep::model::weights::fresh_id(),
            experts: Arc::default(),
            matrices: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// Make the next `n` FFN calls of this engine (and its clones) fail with a device error,
    /// as a lost device would: how the tests reach the CPU fallback on a real adapter.
    pub fn fail_next_ffns(&self, n: usize) {
        self.failures.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this FFN call is one [`GpuEngine::fail_next_ffns`] asked to fail.
    pub(crate) fn injected_failure(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let left = self.failures.load(Ordering::Relaxed);
        if left > 0 && self.failures.compare_exchange(left, left - 1, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Err(crate::context::backend_error("injected failure (GpuEngine::fail_next_ffns)"));
        }
        Ok(())
    }

    /// This engine's [`Engine::id`]: the owner of the [`moe_ep::compute::session::DeviceTensor`]s
    /// it makes.
    pub fn engine_id(&self) -> u64 {
        self.id
    }

    /// The device copy of a replicated matrix (uploaded on first use).
    pub(crate) fn resident_matrix(&self, m: &Matrix) -> Result<wgpu::Buffer> {
        self.resident_bytes_of(m.id(), "router weight", m.weight().as_bytes())
    }

    /// The device copies of a router's weight and selection bias.
    pub(crate) fn resident_router(&self, r: &RouterSet) -> Result<(wgpu::Buffer, Option<wgpu::Buffer>)> {
        let w = self.resident_matrix(&r.gate)?;
        // The bias lives under the gate's id, with the top bit set.
        let bias = r
            .selection_bias
            .as_ref()
            .map(|b| self.resident_bytes_of(r.gate.id() | 1 << 63, "selection bias", bytemuck::cast_slice(b)))
            .transpose()?;
        Ok((w, bias))
    }

    fn resident_bytes_of(&self, id: u64, what: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        if let Some(b) = self.matrices.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(b.clone());
        }
        self.ctx.check_binding(what, bytes.len() as u64)?;
        let b = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: (bytes.len() as u64).max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if !bytes.is_empty() {
            self.ctx.queue.write_buffer(&b, 0, bytes);
        }
        self.matrices.write().unwrap_or_else(|p| p.into_inner()).insert(id, b.clone());
        Ok(b)
    }

    /// Record the grouped FFN of `batch`'s rows (device buffer `src`) into `dst` (same shape),
    /// by expert offsets, into `enc`. Returns the bytes of indices and parameters uploaded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_ffn_rows(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        batch: Buf,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<u64> {
        let (rows, d, act) = (batch.rows(), batch.cols(), batch.dtype());
        let (f, wdt) = (experts[0].gate.rows(), experts[0].gate.dtype());
        check_shape(act, wdt, d, f)?;
        let dev = self.resident(experts)?;
        let ctx = &self.ctx;
        let tile = self.tile_for(offsets, d, f, act, wdt, deterministic);
        let bufs = ctx.ffn_scratch(&[], act, rows, d, f, tile)?;
        let bytes = (rows * d * act.size()) as u64;
        let mut tables = Vec::new();
        let launches = ctx.ffn_launches(&dev, act, offsets, tile, &bufs.view(), &mut tables);
        let launches = match launches {
            Ok(l) => l,
            Err(e) => {
                scratch.extend(tables);
                bufs.recycle(ctx);
                return Err(e);
            }
        };
        let index_bytes = tables.iter().map(|t| t.size()).sum::<u64>() + 32 * launches.len() as u64;
        enc.copy_buffer_to_buffer(src, 0, &bufs.batch, 0, bytes);
        {
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("ffn"), timestamp_writes: None });
            for l in &launches {
                l.encode(&mut pass);
            }
        }
        enc.copy_buffer_to_buffer(bufs.output(), 0, dst, 0, bytes);
        scratch.extend(tables);
        scratch.extend([bufs.batch, bufs.inter, bufs.out32].into_iter().chain(bufs.out16).chain(bufs.partial));
        Ok(index_bytes)
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

    fn release_buffers(&self, bufs: impl IntoIterator<Item = wgpu::Buffer>) {
        for b in bufs {
            self.ctx.recycle(b);
        }
    }
}

/// The GPU kernels compute SwiGLU without biases; other expert semantics are a device error
/// (so that a layer's policy runs such calls on the CPU) until they have kernels.
pub(crate) fn check_semantics(experts: &ExpertSet) -> Result<()> {
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

    fn id(&self) -> u64 {
        self.id
    }

    fn session(&self) -> Result<Box<dyn Session<'_> + '_>> {
        Ok(Box::new(GpuSession::new(self)))
    }

    /// [`Engine::ffn`] on host tensors; calls whose f32 intermediates or outputs would not
    /// fit one buffer binding run in row chunks that do (each row's result does not depend on
    /// the others in its call).
    fn ffn(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        check_ffn(batch, offsets, experts, out)?;
        let f = experts.first().map_or(0, |w| w.gate.rows());
        let rows = batch.rows();
        let widest = 4 * batch.cols().max(f).max(1) as u64;
        let per_call = ((self.ctx.max_binding_bytes() / widest) as usize).saturating_sub(crate::ffn::COOP_PAD_ROWS);
        if rows <= per_call || per_call == 0 {
            return self.ffn_session(batch, offsets, experts, deterministic, out);
        }
        let rb = out.row_bytes();
        for r0 in (0..rows).step_by(per_call) {
            let r1 = (r0 + per_call).min(rows);
            let part: Vec<usize> = offsets.iter().map(|&o| o.clamp(r0, r1) - r0).collect();
            let chunk = batch.slice_rows(r0, r1)?;
            let mut y = Tensor::zeros(out.dtype(), r1 - r0, out.cols());
            self.ffn_session(&chunk, &part, experts, deterministic, &mut y)?;
            out.as_bytes_mut()[r0 * rb..r1 * rb].copy_from_slice(y.as_bytes());
        }
        Ok(())
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
            self.weighted_sum(&[&moved], &idx1, &w, 1, &mut y)?;
        }
        Ok(())
    }

    fn release(&self, id: u64) {
        self.experts.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let mut m = self.matrices.write().unwrap_or_else(|p| p.into_inner());
        m.remove(&id);
        m.remove(&(id | 1 << 63));
    }
}
