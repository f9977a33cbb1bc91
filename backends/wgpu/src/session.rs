//! The GPU engine's [`Session`]: rows live in device buffers from one stage to the next, every
//! operation is recorded into one command encoder, and [`Session::sync`] submits it once and
//! waits once. What the host must see (routing results, exchange send blocks, the output) is
//! copied to mapped staging buffers in that submit; on unified memory (an integrated GPU, or a
//! CPU driver) with `MAPPABLE_PRIMARY_BUFFERS`, exchange blocks are the device buffers
//! themselves, read and written in place.

use std::marker::PhantomData;
use std::sync::Arc;

use moe_ep::compute::engine::{KEEP_ROW, check_ffn_shapes};
use moe_ep::compute::session::{
    Buf, DeviceTensor, ExchangeFn, Extra, HostTraffic, Matrix, Routed, RouterSet, Session, Weights, check_indices,
    check_sources, check_sum_weights,
};
use moe_ep::model::config::{GroupScore, MoeConfig, Scoring};
use moe_ep::model::router::Routing;
use moe_ep::{DType, Error, ExpertSet, Result, Tensor};

use crate::context::{GpuContext, READBACK, STORAGE, backend_error};
use crate::engine::GpuEngine;
use crate::ops::{Combine, CombineWeights, Gather, Launch, TopKRules, word_for};

/// A tensor the GPU engine holds ([`DeviceTensor`]'s representation): one device buffer.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    pub buffer: wgpu::Buffer,
}

/// Rows in a device buffer.
struct Rows {
    buf: wgpu::Buffer,
    /// Taken from the pool (given back on drop); shared buffers (adopted, exported) are not.
    pooled: bool,
    bytes: u64,
    /// After a sync that read it: the mapped buffer holding its bytes (a staging buffer, or
    /// `buf` itself for an in-place send block).
    mapped: Option<wgpu::Buffer>,
    /// The bytes the host wrote into it (a received block through host memory): kept so that a
    /// CPU fallback can take the call over without the device.
    host: Option<Vec<u8>>,
    /// A receive buffer mapped for writing (in-place exchange), until the exchange.
    map_write: bool,
}

enum Slot {
    Rows(Rows),
    Routing { ids: wgpu::Buffer, weights: wgpu::Buffer, n: usize, k: usize, host: Option<Routing> },
    Gone,
}

/// What a timed stretch of work was, for [`moe_ep::GpuTimes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Router,
    Gather,
    Ffn,
    Combine,
}

/// GPU timestamps of one session: pairs around each recorded stretch, resolved at each sync.
struct Stamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    /// Kinds of the pairs written since the last sync.
    pending: Vec<Kind>,
    period_ns: f64,
    totals: moe_ep::GpuTimes,
}

/// Timestamp pairs a session can write between two syncs; stretches past it go untimed.
const MAX_STAMPS: u32 = 64;

impl Stamps {
    fn new(eng: &GpuEngine) -> Self {
        let (set, resolve) = eng.take_stamp_set(2 * MAX_STAMPS);
        let period_ns = f64::from(eng.context().queue.get_timestamp_period());
        Stamps { set, resolve, pending: Vec::new(), period_ns, totals: Default::default() }
    }

    fn add(&mut self, kind: Kind, seconds: f64) {
        let t = &mut self.totals;
        match kind {
            Kind::Router => t.router += seconds,
            Kind::Gather => t.gather += seconds,
            Kind::Ffn => t.ffn += seconds,
            Kind::Combine => t.combine += seconds,
        }
    }
}

/// A GPU session (see the module docs).
pub(crate) struct GpuSession<'a> {
    eng: &'a GpuEngine,
    ctx: &'a GpuContext,
    slots: Vec<Slot>,
    enc: Option<wgpu::CommandEncoder>,
    /// Buffers the recorded work uses, given back to the pool after the next sync.
    scratch: Vec<wgpu::Buffer>,
    /// Slots to read back at the next sync.
    reads: Vec<u32>,
    /// Upload staging buffers the recorded work copies from, mapped again after the sync.
    staged: Vec<wgpu::Buffer>,
    traffic: HostTraffic,
    stamps: Option<Stamps>,
    _inputs: PhantomData<&'a Tensor>,
}

impl<'a> GpuSession<'a> {
    pub(crate) fn new(eng: &'a GpuEngine) -> Self {
        GpuSession {
            eng,
            ctx: eng.context(),
            slots: Vec::new(),
            enc: None,
            scratch: Vec::new(),
            reads: Vec::new(),
            staged: Vec::new(),
            traffic: HostTraffic::default(),
            stamps: eng.context().session_timestamps().then(|| Stamps::new(eng)),
            _inputs: PhantomData,
        }
    }

    fn push(&mut self, slot: Slot) -> Result<u32> {
        let id = u32::try_from(self.slots.len()).map_err(|_| Error::invalid("too many buffers in one session"))?;
        self.slots.push(slot);
        Ok(id)
    }

    fn push_rows(&mut self, buf: wgpu::Buffer, pooled: bool, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        let bytes = (rows * cols * dtype.size()) as u64;
        let id = self.push(Slot::Rows(Rows { buf, pooled, bytes, mapped: None, host: None, map_write: false }))?;
        Ok(Buf::new(id, dtype, rows, cols))
    }

    fn rows(&self, b: Buf) -> Result<&Rows> {
        match self.slots.get(b.slot() as usize) {
            Some(Slot::Rows(r)) => Ok(r),
            Some(Slot::Gone) => Err(Error::invalid("buffer used after it was exported")),
            _ => Err(Error::invalid(format!("buffer {} is not rows of this session", b.slot()))),
        }
    }

    fn rows_mut(&mut self, b: Buf) -> Result<&mut Rows> {
        match self.slots.get_mut(b.slot() as usize) {
            Some(Slot::Rows(r)) => Ok(r),
            _ => Err(Error::invalid(format!("buffer {} is not rows of this session", b.slot()))),
        }
    }

    /// The device buffer of `b`, ready for kernels (not mapped).
    fn buffer(&self, b: Buf) -> Result<&wgpu::Buffer> {
        let r = self.rows(b)?;
        if r.map_write || r.mapped.as_ref().is_some_and(|m| m == &r.buf) {
            return Err(Error::invalid("a buffer is used on the GPU while the host holds it mapped"));
        }
        Ok(&r.buf)
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        let ctx = self.ctx;
        self.enc.get_or_insert_with(|| ctx.encoder("moe-ep session"))
    }

    /// Record `launches` of `kind` in one compute pass.
    fn record(&mut self, kind: Kind, launches: &[Launch]) {
        let stamp = self.stamp_begin();
        {
            let enc = self.encoder();
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for l in launches {
                l.encode(&mut pass);
            }
        }
        self.stamp_end(stamp, kind);
    }

    /// Write the first timestamp of a timed stretch (when timing and room is left).
    fn stamp_begin(&mut self) -> Option<u32> {
        let i = self.stamps.as_ref().map(|s| s.pending.len() as u32).filter(|&i| i < MAX_STAMPS)?;
        let set = self.stamps.as_ref().map(|s| s.set.clone())?;
        self.encoder().write_timestamp(&set, 2 * i);
        Some(i)
    }

    /// Write the closing timestamp of the stretch `begin` opened.
    fn stamp_end(&mut self, begin: Option<u32>, kind: Kind) {
        let (Some(i), Some(set)) = (begin, self.stamps.as_ref().map(|s| s.set.clone())) else {
            return;
        };
        self.encoder().write_timestamp(&set, 2 * i + 1);
        if let Some(s) = self.stamps.as_mut() {
            s.pending.push(kind);
        }
    }

    /// Resolve this sync's timestamps into a staging buffer (mapped with the reads).
    fn stage_stamps(&mut self) -> Option<(wgpu::Buffer, Vec<Kind>)> {
        let (set, resolve, kinds) = {
            let s = self.stamps.as_mut()?;
            if s.pending.is_empty() {
                return None;
            }
            (s.set.clone(), s.resolve.clone(), std::mem::take(&mut s.pending))
        };
        let n = 2 * kinds.len() as u32;
        let staging = self.ctx.take(READBACK, 8 * u64::from(n), "timestamps");
        let enc = self.encoder();
        enc.resolve_query_set(&set, 0..n, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, 8 * u64::from(n));
        Some((staging, kinds))
    }

    /// Add a mapped timestamp buffer's pairs to the totals.
    fn finish_stamps(&mut self, staged: Option<(wgpu::Buffer, Vec<Kind>)>) -> Result<()> {
        let (Some((buf, kinds)), Some(s)) = (staged, self.stamps.as_mut()) else {
            return Ok(());
        };
        {
            let view = buf.slice(..).get_mapped_range().map_err(map_error)?;
            let ticks: &[u64] = bytemuck::cast_slice(&view[..16 * kinds.len()]);
            for (k, pair) in kinds.iter().zip(ticks.chunks(2)) {
                s.add(*k, pair[1].wrapping_sub(pair[0]) as f64 * s.period_ns * 1e-9);
            }
        }
        buf.unmap();
        self.ctx.recycle(buf);
        Ok(())
    }

    /// `srcs` as one buffer: the first itself, several concatenated by device copies into a
    /// scratch buffer. Returns it and its rows.
    fn concat(&mut self, srcs: &[Buf]) -> Result<(wgpu::Buffer, usize)> {
        if let [one] = srcs {
            return Ok((self.buffer(*one)?.clone(), one.rows()));
        }
        let bytes: u64 = srcs.iter().map(|s| s.bytes() as u64).sum();
        let all = self.scratch_storage("concatenated sources", bytes)?;
        let mut at = 0u64;
        for &s in srcs {
            let b = self.buffer(s)?.clone();
            if s.bytes() > 0 {
                self.encoder().copy_buffer_to_buffer(&b, 0, &all, at, s.bytes() as u64);
            }
            at += s.bytes() as u64;
        }
        Ok((all, srcs.iter().map(|s| s.rows()).sum()))
    }

    /// Rows of host bytes into a new device buffer: small ones through the queue, large ones
    /// through a reused mapped staging buffer and a copy in the recorded work (no allocation
    /// or page faults per call). Counted as upload bytes.
    fn upload_rows(&mut self, bytes: &[u8]) -> Result<wgpu::Buffer> {
        const STAGED_FROM: usize = 1 << 18;
        self.traffic.upload_bytes += bytes.len() as u64;
        if bytes.len() < STAGED_FROM {
            return self.ctx.upload("rows", bytes);
        }
        let dst = self.ctx.storage("rows", bytes.len() as u64)?;
        self.copy_in(&dst, bytes)?;
        Ok(dst)
    }

    /// Copy host `bytes` (a multiple of 4) into `dst` from offset 0 through a staging buffer,
    /// in the recorded work.
    fn copy_in(&mut self, dst: &wgpu::Buffer, bytes: &[u8]) -> Result<()> {
        let st = self.ctx.take_staging(bytes.len() as u64)?;
        {
            let mut view = st.slice(..bytes.len() as u64).get_mapped_range_mut().map_err(map_error)?;
            view.copy_from_slice(bytes);
        }
        st.unmap();
        self.encoder().copy_buffer_to_buffer(&st, 0, dst, 0, bytes.len() as u64);
        self.staged.push(st);
        Ok(())
    }

    /// An index or weight array for the recorded work (counted as index bytes).
    fn upload_index(&mut self, what: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let b = self.ctx.upload(what, data)?;
        self.traffic.index_bytes += data.len() as u64;
        self.scratch.push(b.clone());
        Ok(b)
    }

    fn scratch_storage(&mut self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let b = self.ctx.storage(what, bytes)?;
        self.scratch.push(b.clone());
        Ok(b)
    }

    /// Copy each read slot to a mapped staging buffer (or map it in place), after the submit.
    fn stage_reads(&mut self) -> Result<Vec<(u32, wgpu::Buffer, u64)>> {
        let mut maps = Vec::new();
        for id in std::mem::take(&mut self.reads) {
            let (src, bytes, in_place) = match &self.slots[id as usize] {
                Slot::Rows(r) => (r.buf.clone(), r.bytes, r.buf.usage().contains(wgpu::BufferUsages::MAP_READ)),
                Slot::Routing { ids, weights, n, k, .. } => {
                    let half = (n * k * 4) as u64;
                    let (ids, weights) = (ids.clone(), weights.clone());
                    let staging = self.ctx.take(READBACK, (2 * half).max(16), "routing readback");
                    if half > 0 {
                        let enc = self.encoder();
                        enc.copy_buffer_to_buffer(&ids, 0, &staging, 0, half);
                        enc.copy_buffer_to_buffer(&weights, 0, &staging, half, half);
                    }
                    maps.push((id, staging, 2 * half));
                    continue;
                }
                Slot::Gone => continue,
            };
            if in_place {
                maps.push((id, src, bytes));
            } else {
                let staging = self.ctx.take(READBACK, bytes.max(16), "readback");
                if bytes > 0 {
                    self.encoder().copy_buffer_to_buffer(&src, 0, &staging, 0, bytes);
                }
                maps.push((id, staging, bytes));
            }
        }
        Ok(maps)
    }

    /// After the wait: routings to the host, rows left mapped for their reader.
    fn finish_reads(&mut self, maps: Vec<(u32, wgpu::Buffer, u64)>) -> Result<()> {
        for (id, buf, bytes) in maps {
            self.traffic.readback_bytes += bytes;
            match &mut self.slots[id as usize] {
                Slot::Routing { n, k, host, .. } => {
                    let (ids, weights) = {
                        let view = buf.slice(..).get_mapped_range().map_err(map_error)?;
                        let half = *n * *k * 4;
                        (
                            bytemuck::pod_collect_to_vec(&view[..half]),
                            bytemuck::pod_collect_to_vec(&view[half..2 * half]),
                        )
                    };
                    buf.unmap();
                    self.ctx.recycle(buf);
                    *host = Some(Routing::new(*n, *k, ids, weights)?);
                }
                Slot::Rows(r) => r.mapped = Some(buf),
                Slot::Gone => {}
            }
        }
        Ok(())
    }

    /// Unmap `b`'s mapped bytes (and give a staging buffer back).
    fn release_mapping(&mut self, b: Buf) -> Result<()> {
        let ctx = self.ctx;
        let r = self.rows_mut(b)?;
        if let Some(m) = r.mapped.take() {
            m.unmap();
            if m != r.buf {
                ctx.recycle(m);
            }
        }
        Ok(())
    }

    /// The GPU's routing rules for `cfg` (see `wgsl/router_topk.wgsl`).
    fn rules(cfg: &MoeConfig) -> TopKRules {
        let r = &cfg.router;
        let softmax_topk = r.scoring == Scoring::SoftmaxTopK;
        TopKRules {
            sigmoid: r.scoring == Scoring::Sigmoid,
            softmax_topk,
            top_two: r.n_group > 1 && r.group_score == GroupScore::TopTwoSum,
            bias: r.selection_bias,
            logit_bias: r.logit_bias,
            renormalize: cfg.norm_topk_prob,
            by_logit: !r.selection_bias && (softmax_topk || r.n_group == 1 || r.group_score == GroupScore::Max),
            n_group: r.n_group,
            topk_group: r.topk_group,
            scale: r.routed_scaling_factor,
            norm_p: r.norm_p,
            norm_eps: r.norm_eps,
            norm_min: r.norm_min,
        }
    }
}

fn map_error(e: impl std::fmt::Display) -> Error {
    backend_error(format!("reading a mapped buffer failed: {e}"))
}

impl Drop for GpuSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stamps.take() {
            self.eng.give_stamp_set((s.set, s.resolve));
        }
        for s in self.slots.drain(..) {
            if let Slot::Rows(r) = s {
                if let Some(m) = r.mapped {
                    m.unmap();
                    if m != r.buf {
                        self.ctx.recycle(m);
                    }
                }
                if r.map_write {
                    r.buf.unmap();
                }
                if r.pooled {
                    self.ctx.recycle(r.buf);
                }
            } else if let Slot::Routing { ids, weights, .. } = s {
                self.ctx.recycle(ids);
                self.ctx.recycle(weights);
            }
        }
        // Work recorded but never synced is dropped with its encoder; the buffers it named are
        // not in use by the GPU, so they can go back.
        for b in self.scratch.drain(..) {
            self.ctx.recycle(b);
        }
    }
}

impl<'a> Session<'a> for GpuSession<'a> {
    fn upload(&mut self, t: &'a Tensor) -> Result<Buf> {
        self.upload_ref(t)
    }

    fn upload_owned(&mut self, t: Tensor) -> Result<Buf> {
        let b = self.upload_ref(&t)?;
        Ok(b)
    }

    fn adopt(&mut self, t: &DeviceTensor) -> Result<Buf> {
        let held = t.inner::<GpuTensor>().filter(|_| t.owner() == self.eng.engine_id());
        let Some(g) = held else {
            return Err(Error::invalid(format!("{t:?} is not held by this GPU engine")));
        };
        let buf = g.buffer.clone();
        self.push_rows(buf, false, t.dtype(), t.rows(), t.cols())
    }

    fn adopt_routing(&mut self, r: Routing) -> Result<Routed> {
        let (n, k) = (r.n, r.k);
        let ids = self.ctx.upload("routing ids", bytemuck::cast_slice(&r.ids))?;
        let weights = self.ctx.upload("routing weights", bytemuck::cast_slice(&r.weights))?;
        self.traffic.index_bytes += (8 * n * k) as u64;
        let id = self.push(Slot::Routing { ids, weights, n, k, host: Some(r) })?;
        Ok(Routed::new(id, n, k))
    }

    fn alloc(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| Error::invalid(format!("[{rows}, {cols}] {dtype} does not fit in memory")))?;
        let buf = self.ctx.storage("rows", bytes as u64)?;
        self.push_rows(buf, true, dtype, rows, cols)
    }

    /// A send block is read back at the next sync: mapped in place on unified memory, else
    /// copied to a staging buffer in the same submit.
    fn alloc_send(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        let b = if self.ctx.mapped_exchange() {
            let bytes = (rows * cols * dtype.size()) as u64;
            self.ctx.check_binding("send block", bytes)?;
            let buf = self.ctx.take(STORAGE | wgpu::BufferUsages::MAP_READ, bytes, "send block");
            self.push_rows(buf, true, dtype, rows, cols)?
        } else {
            self.alloc(dtype, rows, cols)?
        };
        self.reads.push(b.slot());
        Ok(b)
    }

    fn alloc_recv(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        if !self.ctx.mapped_exchange() {
            return self.alloc(dtype, rows, cols);
        }
        let bytes = (rows * cols * dtype.size()) as u64;
        self.ctx.check_binding("receive block", bytes)?;
        let buf = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("receive block"),
            size: bytes.max(16).next_multiple_of(16),
            usage: STORAGE | wgpu::BufferUsages::MAP_WRITE,
            mapped_at_creation: true,
        });
        let b = self.push_rows(buf, false, dtype, rows, cols)?;
        self.rows_mut(b)?.map_write = true;
        Ok(b)
    }

    fn route(&mut self, x: Buf, router: &RouterSet, cfg: &MoeConfig) -> Result<Routed> {
        let gate = router.gate.weight();
        let (n, d, e, k) = (x.rows(), x.cols(), gate.rows(), cfg.top_k);
        if gate.cols() != d || e != cfg.num_experts {
            return Err(Error::invalid(format!(
                "router: tokens have {d} features but the gate weight is [{e}, {}] for {} experts",
                gate.cols(),
                cfg.num_experts
            )));
        }
        cfg.router.validate(e, k)?;
        if router.selection_bias.is_some() != cfg.router.uses_bias() {
            return Err(Error::invalid("the router's bias does not match the config's routing rules"));
        }
        let (w, bias) = self.eng.resident_router(router)?;
        let logits = self.scratch_storage("router logits", (n * e * 4) as u64)?;
        let ids = self.ctx.storage("routing ids", (n * k * 4) as u64)?;
        let weights = self.ctx.storage("routing weights", (n * k * 4) as u64)?;
        let rules = Self::rules(cfg);
        let launches = (|| {
            let xb = self.buffer(x)?;
            Ok([
                self.ctx.router_logits((xb, x.dtype()), (&w, gate.dtype()), &logits, (n, d, e), false)?,
                self.ctx.router_topk(&logits, bias.as_ref().unwrap_or(&logits), &ids, &weights, (n, e, k), &rules)?,
            ])
        })();
        let launches = match launches {
            Ok(l) => l,
            Err(e) => {
                self.ctx.recycle(ids);
                self.ctx.recycle(weights);
                return Err(e);
            }
        };
        self.traffic.index_bytes += 64;
        self.record(Kind::Router, &launches);
        let id = self.push(Slot::Routing { ids, weights, n, k, host: None })?;
        self.reads.push(id);
        Ok(Routed::new(id, n, k))
    }

    fn scale_rows(&mut self, x: Buf, routed: Routed) -> Result<Buf> {
        let Some(Slot::Routing { weights, n, k, .. }) = self.slots.get(routed.slot() as usize) else {
            return Err(Error::invalid("scale_rows: the routing is not of this session"));
        };
        let (w, n, k) = (weights.clone(), *n, *k);
        if (n, k) != (routed.n(), routed.k()) || n != x.rows() {
            return Err(Error::invalid(format!("scale_rows: a routing of {n} tokens for {} rows", x.rows())));
        }
        let out = self.alloc(x.dtype(), n * k, x.cols())?;
        if n * k * x.cols() == 0 {
            return Ok(out);
        }
        let launch = self.ctx.scale_rows(self.buffer(x)?, &w, self.buffer(out)?, (n, k, x.row_bytes()), x.dtype())?;
        self.traffic.index_bytes += 16;
        self.record(Kind::Gather, &[launch]);
        Ok(out)
    }

    fn gate_scale(&mut self, x: Buf, gate: &Matrix) -> Result<Buf> {
        let g = gate.weight();
        if g.rows() != 1 || g.cols() != x.cols() {
            return Err(Error::invalid(format!(
                "a gate weight is [1, {}], not [{}, {}]",
                x.cols(),
                g.rows(),
                g.cols()
            )));
        }
        let w = self.eng.resident_matrix(gate)?;
        let out = self.alloc(DType::F32, x.rows(), 1)?;
        let launch = self.ctx.router_logits(
            (self.buffer(x)?, x.dtype()),
            (&w, g.dtype()),
            self.buffer(out)?,
            (x.rows(), x.cols(), 1),
            true,
        )?;
        self.traffic.index_bytes += 32;
        self.record(Kind::Router, &[launch]);
        Ok(out)
    }

    fn gather_rows(&mut self, srcs: &[Buf], idx: &[u32], dst: Buf) -> Result<()> {
        check_sources("gather_rows", srcs, dst)?;
        check_indices("gather_rows", srcs, idx)?;
        let rb = dst.row_bytes();
        if idx.is_empty() || rb == 0 {
            return Ok(());
        }
        word_for("gather_rows", rb)?;
        let idx_buf = self.upload_index("gather indices", bytemuck::cast_slice(idx))?;
        let empty;
        let (a, a_rows) = match srcs.first() {
            Some(&s) => (self.buffer(s)?.clone(), s.rows()),
            None => {
                empty = self.scratch_storage("empty source", 16)?;
                (empty, 0)
            }
        };
        let b = match srcs.len() {
            0 | 1 => None,
            _ => Some(self.concat(&srcs[1..])?),
        };
        let g = Gather {
            a: &a,
            a_rows,
            b: b.as_ref().map(|(b, _)| b),
            b_rows: b.as_ref().map_or(0, |(_, r)| *r),
            idx: &idx_buf,
            dst: self.buffer(dst)?,
            rows: idx.len(),
            row_bytes: rb,
        };
        // SAFETY: check_indices verified every index against the sources' rows (or is special).
        let launch = unsafe { self.ctx.gather_unchecked(&g) }?;
        self.traffic.index_bytes += 32;
        self.record(Kind::Gather, &[launch]);
        Ok(())
    }

    fn ffn(&mut self, batch: Buf, offsets: &[usize], experts: &ExpertSet, deterministic: bool, out: Buf) -> Result<()> {
        let shape = |b: Buf| (b.rows(), b.cols(), b.dtype());
        check_ffn_shapes(shape(batch), offsets, experts, shape(out))?;
        self.eng.injected_failure()?;
        if batch.rows() == 0 || experts.is_empty() {
            return Ok(());
        }
        let (src, dst) = (self.buffer(batch)?.clone(), self.buffer(out)?.clone());
        let dev = self.eng.resident(experts)?;
        let mut scratch = Vec::new();
        let stamp = self.stamp_begin();
        let ctx = self.ctx;
        let r = ctx.encode_ffn(self.encoder(), &dev, batch.dtype(), offsets, deterministic, &src, &dst, &mut scratch);
        self.stamp_end(stamp, Kind::Ffn);
        self.scratch.extend(scratch);
        r
    }

    fn weighted_sum(&mut self, srcs: &[Buf], idx: &[u32], weights: Weights<'_>, k: usize, y: Buf) -> Result<()> {
        check_sources("combine", srcs, y)?;
        check_sum_weights(&weights, idx, k, y)?;
        if idx.contains(&KEEP_ROW) || srcs.is_empty() {
            return Err(Error::invalid("combine: at least one source, and no KEEP_ROW indices"));
        }
        check_indices("combine", srcs, idx)?;
        let rb = y.row_bytes();
        if y.rows() == 0 || rb == 0 {
            return Ok(());
        }
        word_for("combine", rb)?;
        let idx_buf = self.upload_index("combine indices", bytemuck::cast_slice(idx))?;
        let mut src: Vec<wgpu::Buffer> =
            srcs.iter().take(2).map(|&s| self.buffer(s).cloned()).collect::<Result<_>>()?;
        let mut rows: Vec<usize> = srcs.iter().take(2).map(|s| s.rows()).collect();
        if srcs.len() > 2 {
            let (c, r) = self.concat(&srcs[2..])?;
            src.push(c);
            rows.push(r);
        }
        let host_w = match weights {
            Weights::Host(w) => Some(self.upload_index("combine weights", bytemuck::cast_slice(w))?),
            _ => None,
        };
        let (routed_w, scale) = match weights {
            Weights::Routed { routed, extra } => {
                let Some(Slot::Routing { weights: w, n, k: rk, .. }) = self.slots.get(routed.slot() as usize) else {
                    return Err(Error::invalid("combine: the routing is not of this session"));
                };
                if (*n, *rk) != (routed.n(), routed.k()) {
                    return Err(Error::invalid("combine: the routing is not of this session"));
                }
                let scale = match extra {
                    Extra::Scale(s) => Some(self.buffer(s)?.clone()),
                    _ => None,
                };
                (Some((w.clone(), routed.k())), scale)
            }
            _ => (None, None),
        };
        let cw = match (&host_w, &routed_w) {
            (Some(w), _) => CombineWeights::PerSlot(w),
            (_, Some((w, stride))) => CombineWeights::Routed { weights: w, stride: *stride, scale: scale.as_ref() },
            _ => CombineWeights::Ones,
        };
        let c = Combine {
            a: &src[0],
            a_rows: rows[0],
            b: src.get(1),
            b_rows: rows.get(1).copied().unwrap_or(0),
            c: src.get(2),
            c_rows: rows.get(2).copied().unwrap_or(0),
            idx: &idx_buf,
            weights: cw,
            dst: self.buffer(y)?,
            rows: y.rows(),
            k,
            dtype: y.dtype(),
            row_bytes: rb,
        };
        // SAFETY: check_indices verified every index against the sources' rows (or ZERO_ROW).
        let launch = unsafe { self.ctx.combine_unchecked(&c) }?;
        self.traffic.index_bytes += 48;
        self.record(Kind::Combine, &[launch]);
        Ok(())
    }

    fn write_rows(&mut self, dst: Buf, first: usize, bytes: &[u8]) -> Result<()> {
        let rb = dst.row_bytes();
        let fits = rb > 0 && bytes.len().is_multiple_of(rb) && first + bytes.len() / rb <= dst.rows();
        if !fits || !bytes.len().is_multiple_of(4) || !(first * rb).is_multiple_of(4) {
            return Err(Error::invalid(format!(
                "write_rows: {} bytes at row {first} are not whole 4-byte-aligned rows of a [{}, {}] buffer",
                bytes.len(),
                dst.rows(),
                dst.cols()
            )));
        }
        let buf = self.buffer(dst)?;
        self.ctx.queue.write_buffer(buf, (first * rb) as u64, bytes);
        self.traffic.index_bytes += bytes.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        if self.enc.is_none() && self.reads.is_empty() {
            return Ok(());
        }
        let _span = tracing::debug_span!("gpu_sync", reads = self.reads.len()).entered();
        let maps = self.stage_reads()?;
        let stamps = self.stage_stamps();
        let enc = self.enc.take().unwrap_or_else(|| self.ctx.encoder("moe-ep session"));
        self.ctx.queue.submit([enc.finish()]);
        self.traffic.submits += 1;
        let (tx, rx) = std::sync::mpsc::channel();
        let stamp_buf = stamps.as_ref().map(|(b, _)| b);
        for (i, buf) in maps.iter().map(|(_, b, _)| b).chain(stamp_buf).enumerate() {
            let tx = tx.clone();
            buf.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        let waited = {
            let _w = tracing::debug_span!("gpu_wait").entered();
            self.ctx.wait()
        };
        self.traffic.waits += 1;
        for st in self.staged.drain(..) {
            self.ctx.restage(st);
        }
        for b in self.scratch.drain(..) {
            self.ctx.recycle(b);
        }
        waited?;
        for (_, r) in self.ctx.mapped(&rx, maps.len() + usize::from(stamps.is_some()))? {
            r.map_err(|e| backend_error(format!("mapping a readback buffer failed: {e}")))?;
        }
        self.finish_stamps(stamps)?;
        self.finish_reads(maps)
    }

    fn routing(&mut self, r: Routed) -> Result<Routing> {
        match self.slots.get(r.slot() as usize) {
            Some(Slot::Routing { host: Some(h), .. }) if h.n == r.n() && h.k == r.k() => Ok(h.clone()),
            Some(Slot::Routing { host: None, .. }) => Err(Error::invalid("the routing is read after the next sync")),
            _ => Err(Error::invalid(format!("routing {} is not a routing of this session", r.slot()))),
        }
    }

    fn exchange(&mut self, send: Buf, recv: Buf, f: &mut ExchangeFn<'_>) -> Result<()> {
        let (sbytes, rbytes) = (send.bytes(), recv.bytes());
        let smapped = self.rows(send)?.mapped.clone();
        let Some(sm) =
            smapped.filter(|_| sbytes > 0).or(if sbytes == 0 { Some(self.rows(send)?.buf.clone()) } else { None })
        else {
            return Err(Error::invalid("exchange: the send block was not read back at the last sync"));
        };
        let in_place = self.rows(recv)?.map_write;
        let result = {
            let sview =
                if sbytes > 0 { Some(sm.slice(..sbytes as u64).get_mapped_range().map_err(map_error)?) } else { None };
            let s: &[u8] = sview.as_deref().unwrap_or(&[]);
            if in_place {
                let rbuf = self.rows(recv)?.buf.clone();
                let mut rview = if rbytes > 0 {
                    Some(rbuf.slice(..rbytes as u64).get_mapped_range_mut().map_err(map_error)?)
                } else {
                    None
                };
                let r: &mut [u8] = match rview.as_mut() {
                    // SAFETY: the view maps `rbytes` bytes of a buffer created mapped (wgpu zeroes
                    // it, so the bytes are initialised), held exclusively by this session until
                    // it is unmapped below, after the view is dropped; the exchange only copies
                    // bytes in and reads its status blocks (no atomics).
                    Some(v) => unsafe { v.slice(..).as_raw_ptr().as_mut() },
                    None => &mut [],
                };
                f(s, r)
            } else {
                let mut host = vec![0u8; rbytes];
                let r = f(s, &mut host);
                if r.is_ok() {
                    let rows = self.rows_mut(recv)?;
                    rows.host = Some(host);
                }
                r
            }
        };
        self.release_mapping(send)?;
        let ctx = self.ctx;
        let rows = self.rows_mut(recv)?;
        if in_place {
            rows.buf.unmap();
            rows.map_write = false;
            self.traffic.upload_bytes += rbytes as u64;
        } else if let Some(h) = rows.host.clone() {
            let dst = rows.buf.clone();
            if h.len() >= 1 << 18 {
                self.copy_in(&dst, &h)?;
            } else if !h.is_empty() {
                ctx.queue.write_buffer(&dst, 0, &h);
            }
            self.traffic.upload_bytes += rbytes as u64;
        }
        result
    }

    fn download(&mut self, b: Buf) -> Result<Tensor> {
        if let Some(h) = self.rows(b)?.host.clone() {
            return Tensor::from_bytes(b.dtype(), b.rows(), b.cols(), &h);
        }
        if self.rows(b)?.mapped.is_none() {
            if b.bytes() == 0 {
                return Ok(Tensor::zeros(b.dtype(), b.rows(), b.cols()));
            }
            self.reads.push(b.slot());
            self.sync()?;
        }
        let t = {
            let r = self.rows(b)?;
            let m = r.mapped.as_ref().ok_or_else(|| backend_error("a downloaded buffer was not mapped"))?;
            let view = m.slice(..b.bytes() as u64).get_mapped_range().map_err(map_error)?;
            Tensor::from_bytes(b.dtype(), b.rows(), b.cols(), &view)?
        };
        self.release_mapping(b)?;
        Ok(t)
    }

    fn export(&mut self, b: Buf) -> Result<DeviceTensor> {
        if self.enc.is_some() {
            self.sync()?;
        }
        let slot = std::mem::replace(&mut self.slots[b.slot() as usize], Slot::Gone);
        let Slot::Rows(r) = slot else {
            return Err(Error::invalid("only rows can be exported"));
        };
        if let Some(m) = r.mapped {
            m.unmap();
            if m != r.buf {
                self.ctx.recycle(m);
            }
        }
        let g = GpuTensor { buffer: r.buf };
        Ok(DeviceTensor::new(self.eng.engine_id(), b.dtype(), b.rows(), b.cols(), Arc::new(g)))
    }

    fn traffic(&self) -> HostTraffic {
        self.traffic
    }

    fn gpu_times(&self) -> Option<moe_ep::GpuTimes> {
        self.stamps.as_ref().map(|s| s.totals)
    }
}

impl GpuSession<'_> {
    fn upload_ref(&mut self, t: &Tensor) -> Result<Buf> {
        let buf = self.upload_rows(t.as_bytes())?;
        self.push_rows(buf, true, t.dtype(), t.rows(), t.cols())
    }
}
