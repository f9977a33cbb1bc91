//! Sessions: the buffers and the recorded work of one call on one engine.
//!
//! A layer's forward is a few stretches of engine work separated by host points (the routing
//! result the plan needs, the two exchanges, the output). Each stretch is recorded into a
//! [`Session`] and runs at [`Session::sync`]: one submit and one wait on a GPU, nothing to
//! wait for on the CPU. Rows stay in the session's buffers ([`Buf`]) from one stretch to the
//! next, so that on a GPU they never cross to the host unless the layer asks for them
//! ([`Session::download`], [`Session::exchange`], [`Session::routing`]). [`HostTraffic`]
//! counts what did cross.

use std::any::Any;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::MoeConfig;
use crate::model::router::Routing;
use crate::model::weights::ExpertSet;
use crate::tensor::Tensor;

/// Rows a session holds: `[rows, cols]` of `dtype` in the session's slot `slot`. Copyable
/// and meaningful only in the session that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    slot: u32,
    rows: usize,
    cols: usize,
    dtype: DType,
}

impl Buf {
    /// A handle to slot `slot` (for engine implementations).
    pub fn new(slot: u32, dtype: DType, rows: usize, cols: usize) -> Self {
        Buf { slot, rows, cols, dtype }
    }
    pub fn slot(&self) -> u32 {
        self.slot
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }
    /// Bytes of all rows.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }
}

/// A routing a session computed: `[n, k]` expert ids and weights, on the host after the next
/// [`Session::sync`] ([`Session::routing`]) and usable as combine weights ([`Weights::Routed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    slot: u32,
    n: usize,
    k: usize,
}

impl Routed {
    /// A handle to slot `slot` (for engine implementations).
    pub fn new(slot: u32, n: usize, k: usize) -> Self {
        Routed { slot, n, k }
    }
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// Tokens.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Slots per token.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// The weights of a combine of `k` slots per output row.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// `rows * k` values from the host (a device engine uploads them).
    Host(&'a [f32]),
    /// Every slot weighs 1.
    Ones,
    /// The routing weights of `routed` for slots `0..routed.k()`; with `k = routed.k() + 1`,
    /// slot `k - 1` weighs `extra`.
    Routed { routed: Routed, extra: Extra },
}

/// The weight of the extra slot of a [`Weights::Routed`] combine (the shared expert's).
#[derive(Debug, Clone, Copy)]
pub enum Extra {
    /// No extra slot: the combine has `routed.k()` slots.
    None,
    /// An extra slot of weight 1.
    One,
    /// An extra slot weighted per row by a `[rows, 1]` f32 buffer (a gate's sigmoid).
    Scale(Buf),
}

/// A replicated `[rows, D]` weight a session computes with (the router, a shared expert's
/// gate), identified like an [`ExpertSet`] so that device engines keep one copy of it.
#[derive(Debug)]
pub struct Matrix {
    id: u64,
    weight: Tensor,
}

impl Matrix {
    /// Wrap `weight` under a fresh id, never reused in the process.
    pub fn new(weight: Tensor) -> Self {
        Matrix { id: crate::model::weights::fresh_id(), weight }
    }
    /// The id engines key their copies by.
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// What a session routes with: the router weight `[E, D]` and, when the config's routing has
/// one, the per-expert selection bias `[E]`.
#[derive(Debug)]
pub struct RouterSet {
    pub gate: Matrix,
    pub selection_bias: Option<Vec<f32>>,
}

/// What crossed between host and device in a session, and how often the host waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTraffic {
    /// Rows uploaded: the input, received exchange blocks.
    pub upload_bytes: u64,
    /// Plan indices, host weights and kernel parameters of the data-path kernels uploaded (the
    /// FFN's own tile tables and parameters are not counted).
    pub index_bytes: u64,
    /// Bytes read back: routing ids and weights, exchange send blocks, the output.
    pub readback_bytes: u64,
    /// Command submissions.
    pub submits: u64,
    /// Host waits for the device.
    pub waits: u64,
}

impl HostTraffic {
    /// `self + other`, field by field.
    pub fn plus(self, o: HostTraffic) -> HostTraffic {
        HostTraffic {
            upload_bytes: self.upload_bytes + o.upload_bytes,
            index_bytes: self.index_bytes + o.index_bytes,
            readback_bytes: self.readback_bytes + o.readback_bytes,
            submits: self.submits + o.submits,
            waits: self.waits + o.waits,
        }
    }
}

/// A tensor held by an engine, in and out of a layer without crossing to the host
/// ([`crate::MoeLayer::forward_device`]). Made by [`crate::Engine::to_device`]; the GPU engine
/// lends its wgpu buffer to callers that encode their own work around the layer.
#[derive(Clone)]
pub struct DeviceTensor {
    owner: u64,
    dtype: DType,
    rows: usize,
    cols: usize,
    inner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTensor([{}, {}] {}, engine {})", self.rows, self.cols, self.dtype, self.owner)
    }
}

impl DeviceTensor {
    /// A tensor of engine `owner` (its [`crate::Engine::id`]) held in `inner` (for engine
    /// implementations).
    pub fn new(owner: u64, dtype: DType, rows: usize, cols: usize, inner: Arc<dyn Any + Send + Sync>) -> Self {
        DeviceTensor { owner, dtype, rows, cols, inner }
    }
    /// The engine that holds it.
    pub fn owner(&self) -> u64 {
        self.owner
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The engine's own representation, if it is a `T`.
    pub fn inner<T: Any>(&self) -> Option<&T> {
        self.inner.downcast_ref::<T>()
    }
    /// The same representation, shared.
    pub fn inner_arc(&self) -> &Arc<dyn Any + Send + Sync> {
        &self.inner
    }
    /// Check the dtype and width, naming `what`.
    pub fn expect(&self, what: &str, dtype: DType, cols: usize) -> Result<()> {
        if self.dtype != dtype || self.cols != cols {
            return Err(Error::invalid(format!(
                "{what} is [{}, {}] {}, expected [N, {cols}] {dtype}",
                self.rows, self.cols, self.dtype
            )));
        }
        Ok(())
    }
}

/// What [`Session::exchange`] lends the exchange: the send bytes and the receive bytes.
pub type ExchangeFn<'f> = dyn FnMut(&[u8], &mut [u8]) -> Result<()> + 'f;

/// The work of one call on one engine: buffers, recorded operations, host points.
///
/// Operations record; [`Session::sync`] runs what was recorded (one submit and one wait on a
/// GPU). Reads of results ([`Session::routing`], [`Session::download`],
/// [`Session::exchange`]'s send side) see the state after the last sync. Every operation
/// checks its arguments (shapes, dtypes, indices against the sources' rows) and returns an
/// `Error` rather than recording work that could read out of bounds. Index conventions are
/// the engine's: [`crate::compute::engine::ZERO_ROW`] writes zeros and
/// [`crate::compute::engine::KEEP_ROW`] leaves a destination row as it is.
pub trait Session<'a> {
    /// Host rows into the session. A device engine uploads them (counted); the CPU borrows.
    fn upload(&mut self, t: &'a Tensor) -> Result<Buf>;

    /// Host rows the session takes over (a device engine uploads and drops them).
    fn upload_owned(&mut self, t: Tensor) -> Result<Buf>;

    /// A tensor this engine holds, used in place. Errors when another engine holds it.
    fn adopt(&mut self, t: &DeviceTensor) -> Result<Buf>;

    /// A routing computed elsewhere (on the host, by another engine), usable as combine
    /// weights ([`Weights::Routed`]).
    fn adopt_routing(&mut self, r: Routing) -> Result<Routed>;

    /// `[rows, cols]` of `dtype`, contents unspecified.
    fn alloc(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf>;

    /// Like [`Session::alloc`], for rows the host will read in place after the next sync: the
    /// send block of an exchange ([`Session::exchange`]).
    fn alloc_send(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf>;

    /// Rows the host writes in an exchange ([`Session::exchange`]) before any use.
    fn alloc_recv(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf>;

    /// Route the rows of `x` (`[N, D]`) by `router` under `cfg` (scores, selection bias,
    /// group-limited top-k, renormalisation, scaling): the same ids as
    /// [`crate::model::router::route_config`] up to ties, weights up to rounding.
    fn route(&mut self, x: Buf, router: &RouterSet, cfg: &MoeConfig) -> Result<Routed>;

    /// `[N * k, D]` rows `x[t] * w[t, j]` (row `t * k + j`) for the routing `routed` of `x`'s
    /// `N` rows: the product in f32, rounded once to `x`'s dtype. The inputs of experts whose
    /// routing weight scales their input (Llama 4).
    fn scale_rows(&mut self, x: Buf, routed: Routed) -> Result<Buf>;

    /// `sigmoid(x · g)` per row of `x`, `[N, 1]` f32, with `gate` a `[1, D]` weight.
    fn gate_scale(&mut self, x: Buf, gate: &Matrix) -> Result<Buf>;

    /// `dst[i] = cat(srcs)[idx[i]]` (bitwise), as [`crate::Engine::gather_rows`].
    fn gather_rows(&mut self, srcs: &[Buf], idx: &[u32], dst: Buf) -> Result<()>;

    /// The grouped expert FFN, as [`crate::Engine::ffn`]: rows `offsets[l]..offsets[l+1]` of
    /// `batch` through local expert `l` into the same rows of `out`.
    fn ffn(&mut self, batch: Buf, offsets: &[usize], experts: &ExpertSet, deterministic: bool, out: Buf) -> Result<()>;

    /// `y[t] = sum_j w[t, j] * cat(srcs)[idx[t * k + j]]`, slots in order, f32 accumulation,
    /// one cast, as [`crate::Engine::weighted_sum`].
    fn weighted_sum(&mut self, srcs: &[Buf], idx: &[u32], weights: Weights<'_>, k: usize, y: Buf) -> Result<()>;

    /// Host bytes into rows `first..` of `dst` (whole rows), before any work recorded since the
    /// last sync runs; that work must leave those rows alone ([`crate::compute::engine::KEEP_ROW`]).
    fn write_rows(&mut self, dst: Buf, first: usize, bytes: &[u8]) -> Result<()>;

    /// Run everything recorded: one submit and one wait on a GPU (none if nothing was recorded).
    fn sync(&mut self) -> Result<()>;

    /// The ids and weights of `r` (after the sync that computed them).
    fn routing(&mut self, r: Routed) -> Result<Routing>;

    /// Lend the bytes of `send` (an [`Session::alloc_send`] buffer, as of the last sync) and of
    /// `recv` (an [`Session::alloc_recv`] buffer, to be written) to `f`: the exchange reads and
    /// writes them in place where the engine can (unified memory), else through staging.
    fn exchange(&mut self, send: Buf, recv: Buf, f: &mut ExchangeFn<'_>) -> Result<()>;

    /// The rows of `b` on the host (a sync first if work is pending).
    fn download(&mut self, b: Buf) -> Result<Tensor>;

    /// The rows of `b` as a tensor this engine keeps (a sync first if work is pending).
    fn export(&mut self, b: Buf) -> Result<DeviceTensor>;

    /// What crossed between host and device so far.
    fn traffic(&self) -> HostTraffic;

    /// GPU time of the work synced so far, by kind, where the engine records timestamps.
    fn gpu_times(&self) -> Option<crate::stats::GpuTimes> {
        None
    }
}

/// Check that `idx` only names rows of the concatenation of sources of `rows` rows each (or is
/// one of the special indices); returns the concatenation's first row of each source, then the
/// total.
pub fn check_indices(what: &str, srcs: &[Buf], idx: &[u32]) -> Result<Vec<usize>> {
    let mut starts = Vec::with_capacity(srcs.len() + 1);
    let mut total = 0usize;
    for s in srcs {
        starts.push(total);
        total += s.rows();
    }
    starts.push(total);
    if let Some(&bad) = idx.iter().find(|&&i| !crate::compute::engine::is_special_row(i) && i as usize >= total) {
        return Err(Error::invalid(format!("{what}: row index {bad} outside the {total} source rows")));
    }
    Ok(starts)
}

/// Check that every source has `dst`'s dtype and width.
pub fn check_sources(what: &str, srcs: &[Buf], dst: Buf) -> Result<()> {
    for (i, s) in srcs.iter().enumerate() {
        if s.dtype() != dst.dtype() || s.cols() != dst.cols() {
            return Err(Error::invalid(format!(
                "{what}: source {i} is [{}, {}] {} but the destination has {} columns of {}",
                s.rows(),
                s.cols(),
                s.dtype(),
                dst.cols(),
                dst.dtype()
            )));
        }
    }
    Ok(())
}

/// Check a combine's shape: `k > 0`, `k` indices per output row, host weights of that length,
/// routed weights of `y`'s rows and `k` or `k - 1` slots with the extra slot's scale `[rows, 1]`.
pub fn check_sum_weights(weights: &Weights<'_>, idx: &[u32], k: usize, y: Buf) -> Result<()> {
    if k == 0 || idx.len() != y.rows() * k {
        return Err(Error::invalid(format!("combine: {} indices for {} output rows of top-{k}", idx.len(), y.rows())));
    }
    match *weights {
        Weights::Host(w) if w.len() != idx.len() => {
            Err(Error::invalid(format!("combine: {} weights for {} indices", w.len(), idx.len())))
        }
        Weights::Routed { routed, extra } => {
            let slots = routed.k() + usize::from(!matches!(extra, Extra::None));
            if routed.n() != y.rows() || slots != k {
                return Err(Error::invalid(format!(
                    "combine: routed weights of {} tokens x {slots} slots for {} rows of top-{k}",
                    routed.n(),
                    y.rows()
                )));
            }
            match extra {
                Extra::Scale(s) if s.rows() != y.rows() || s.cols() != 1 || s.dtype() != DType::F32 => {
                    Err(Error::invalid(format!(
                        "combine: the extra slot's scale is [{}, {}] {}, expected [{}, 1] f32",
                        s.rows(),
                        s.cols(),
                        s.dtype(),
                        y.rows()
                    )))
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}
