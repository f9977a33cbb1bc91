//! [`GpuEngine`]: the [`Engine`] of a layer on one wgpu device.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use moe_ep::compute::engine::{ZERO_ROW, check_ffn, even_offsets};
use moe_ep::compute::session::{Matrix, RouterSet, Session};
use moe_ep::{DType, Engine, ExpertSet, Result, Tensor};

use crate::context::{ContextOptions, GpuContext};
use crate::ffn::{DeviceExperts, FfnKernels};
use crate::session::GpuSession;

/// Runs every compute stage on the GPU, rows kept on the device between stages: its
/// [`Session`] records each stage into one command encoder and submits it at the host points
/// only (see `session.rs`). Expert weights, router weights and gates are uploaded once per
/// set (at warm-up or on first use) and stay on the device until the set is released.
///
/// Data movement is bitwise that of [`moe_ep::CpuEngine`], and so is the combine; the FFN
/// differs from the CPU's by rounding only (in deterministic mode its portable kernels sum in
/// one fixed order; outside it the matrix-unit kernels sum in the hardware's order).
#[derive(Debug, Clone)]
pub struct GpuEngine {
    ctx: Arc<GpuContext>,
    id: u64,
    experts: Arc<RwLock<HashMap<u64, Arc<DeviceExperts>>>>,
    /// Replicated matrices (router, shared expert gate) and selection biases on the device.
    matrices: Arc<RwLock<HashMap<u64, wgpu::Buffer>>>,
    /// FFN calls still to fail with a device error (a test hook: [`GpuEngine::fail_next_ffns`]).
    failures: Arc<std::sync::atomic::AtomicUsize>,
    /// Timestamp query sets and their resolve buffers, reused by sessions.
    stamp_sets: Arc<std::sync::Mutex<Vec<(wgpu::QuerySet, wgpu::Buffer)>>>,
}

impl GpuEngine {
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
            stamp_sets: Arc::default(),
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

    /// A timestamp query set and its resolve buffer (`count` queries), reused across sessions.
    pub(crate) fn take_stamp_set(&self, count: u32) -> (wgpu::QuerySet, wgpu::Buffer) {
        if let Some(s) = self.stamp_sets.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return s;
        }
        let set = self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("session timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("session timestamps"),
            size: 8 * u64::from(count),
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        (set, resolve)
    }

    /// Give a [`GpuEngine::take_stamp_set`] set back.
    pub(crate) fn give_stamp_set(&self, s: (wgpu::QuerySet, wgpu::Buffer)) {
        self.stamp_sets.lock().unwrap_or_else(|p| p.into_inner()).push(s);
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
        if batch.rows() == 0 || experts.is_empty() || batch.cols() == 0 {
            return Ok(());
        }
        let _span = tracing::trace_span!("gpu_ffn", rows = batch.rows(), experts = experts.len()).entered();
        let dev = self.resident(experts)?;
        self.ctx.ffn_host(&dev, batch, offsets, FfnKernels::Auto { deterministic }, out)
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
