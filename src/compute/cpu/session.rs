//! The CPU engine's [`Session`]: buffers are host tensors (the inputs borrowed, the rest from a
//! process-wide pool), every operation runs when it is recorded, and nothing crosses a bus.

use std::sync::{Arc, OnceLock};

use super::{ffn, rows};
use crate::compute::engine::{KEEP_ROW, check_ffn_shapes};
use crate::compute::session::{
    Buf, DeviceTensor, ExchangeFn, Extra, HostTraffic, Matrix, Routed, RouterSet, Session, Weights, check_indices,
    check_sources, check_sum_weights,
};
use crate::compute::workspace::Workspace;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::config::MoeConfig;
use crate::model::router::{self, Routing};
use crate::model::weights::ExpertSet;
use crate::tensor::Tensor;

/// Host tensors reused by every CPU session of the process (ranks as threads share it).
fn pool() -> &'static Workspace {
    static POOL: OnceLock<Workspace> = OnceLock::new();
    POOL.get_or_init(|| Workspace::with_capacity(64))
}

enum Slot<'a> {
    Borrowed(&'a Tensor),
    Shared(Arc<Tensor>),
    Owned(Tensor),
    Routing(Routing),
    /// Downloaded or exported: moved out of the session.
    Gone,
}

/// A CPU session (see [`crate::compute::cpu::CpuEngine`]).
pub(crate) struct CpuSession<'a> {
    engine_id: u64,
    slots: Vec<Slot<'a>>,
}

impl<'a> CpuSession<'a> {
    pub(crate) fn new(engine_id: u64) -> Self {
        CpuSession { engine_id, slots: Vec::new() }
    }

    fn push(&mut self, slot: Slot<'a>, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        let id = u32::try_from(self.slots.len()).map_err(|_| Error::invalid("too many buffers in one session"))?;
        self.slots.push(slot);
        Ok(Buf::new(id, dtype, rows, cols))
    }

    fn tensor(&self, b: Buf) -> Result<&Tensor> {
        match self.slots.get(b.slot() as usize) {
            Some(Slot::Borrowed(t)) => Ok(t),
            Some(Slot::Shared(t)) => Ok(t),
            Some(Slot::Owned(t)) => Ok(t),
            Some(Slot::Gone) => Err(Error::invalid("buffer used after it was downloaded or exported")),
            _ => Err(Error::invalid(format!("buffer {} is not rows of this session", b.slot()))),
        }
    }

    /// Take `b`'s tensor out for writing (put it back with [`CpuSession::put`]). Only buffers
    /// the session allocated can be written.
    fn take(&mut self, b: Buf) -> Result<Tensor> {
        match self.slots.get_mut(b.slot() as usize) {
            Some(s @ Slot::Owned(_)) => match std::mem::replace(s, Slot::Gone) {
                Slot::Owned(t) => Ok(t),
                _ => unreachable!("matched Owned"),
            },
            Some(Slot::Borrowed(_) | Slot::Shared(_)) => Err(Error::invalid("an input buffer cannot be written")),
            _ => Err(Error::invalid(format!("buffer {} is not writable rows of this session", b.slot()))),
        }
    }

    fn put(&mut self, b: Buf, t: Tensor) {
        self.slots[b.slot() as usize] = Slot::Owned(t);
    }

    /// Run `op` with the sources' tensors and `dst`'s taken out for writing.
    fn with_dst<T>(
        &mut self,
        srcs: &[Buf],
        dst: Buf,
        op: impl FnOnce(&[&Tensor], &mut Tensor) -> Result<T>,
    ) -> Result<T> {
        if srcs.iter().any(|s| s.slot() == dst.slot()) {
            return Err(Error::invalid("a buffer cannot be both a source and the destination"));
        }
        let mut d = self.take(dst)?;
        let r = srcs.iter().map(|&s| self.tensor(s)).collect::<Result<Vec<_>>>().and_then(|refs| op(&refs, &mut d));
        self.put(dst, d);
        r
    }

    fn routing_of(&self, r: Routed) -> Result<&Routing> {
        match self.slots.get(r.slot() as usize) {
            Some(Slot::Routing(x)) if x.n == r.n() && x.k == r.k() => Ok(x),
            _ => Err(Error::invalid(format!("routing {} is not a routing of this session", r.slot()))),
        }
    }

    /// The weights of a combine, `rows * k` values on the host.
    fn host_weights(&self, w: Weights<'_>, rows: usize, k: usize) -> Result<Vec<f32>> {
        Ok(match w {
            Weights::Host(w) => w.to_vec(),
            Weights::Ones => vec![1.0; rows * k],
            Weights::Routed { routed, extra } => {
                let r = self.routing_of(routed)?;
                let scale = match extra {
                    Extra::Scale(s) => Some(self.tensor(s)?.to_f32_vec()),
                    _ => None,
                };
                let mut out = Vec::with_capacity(rows * k);
                for t in 0..rows {
                    out.extend_from_slice(&r.weights[t * r.k..(t + 1) * r.k]);
                    match (&extra, &scale) {
                        (Extra::None, _) => {}
                        (_, Some(s)) => out.push(s[t]),
                        (_, None) => out.push(1.0),
                    }
                }
                out
            }
        })
    }
}

impl Drop for CpuSession<'_> {
    fn drop(&mut self) {
        for s in self.slots.drain(..) {
            if let Slot::Owned(t) = s {
                pool().recycle(t);
            }
        }
    }
}

impl<'a> Session<'a> for CpuSession<'a> {
    fn upload(&mut self, t: &'a Tensor) -> Result<Buf> {
        self.push(Slot::Borrowed(t), t.dtype(), t.rows(), t.cols())
    }

    fn upload_owned(&mut self, t: Tensor) -> Result<Buf> {
        let (dtype, rows, cols) = (t.dtype(), t.rows(), t.cols());
        self.push(Slot::Owned(t), dtype, rows, cols)
    }

    fn adopt_routing(&mut self, r: Routing) -> Result<Routed> {
        let (n, k) = (r.n, r.k);
        let id = u32::try_from(self.slots.len()).map_err(|_| Error::invalid("too many buffers in one session"))?;
        self.slots.push(Slot::Routing(r));
        Ok(Routed::new(id, n, k))
    }

    fn adopt(&mut self, t: &DeviceTensor) -> Result<Buf> {
        let held = (t.owner() == self.engine_id).then(|| t.inner_arc().clone().downcast::<Tensor>().ok()).flatten();
        let Some(tensor) = held else {
            return Err(Error::invalid(format!("{t:?} is not held by the CPU engine")));
        };
        let (dtype, rows, cols) = (tensor.dtype(), tensor.rows(), tensor.cols());
        self.push(Slot::Shared(tensor), dtype, rows, cols)
    }

    fn alloc(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        let t = pool().take(dtype, rows, cols)?;
        self.push(Slot::Owned(t), dtype, rows, cols)
    }

    fn alloc_send(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        self.alloc(dtype, rows, cols)
    }

    fn alloc_recv(&mut self, dtype: DType, rows: usize, cols: usize) -> Result<Buf> {
        self.alloc(dtype, rows, cols)
    }

    fn route(&mut self, x: Buf, router: &RouterSet, cfg: &MoeConfig) -> Result<Routed> {
        let routing =
            router::route_config(self.tensor(x)?, router.gate.weight(), router.selection_bias.as_deref(), cfg)?;
        self.adopt_routing(routing)
    }

    fn scale_rows(&mut self, x: Buf, routed: Routed) -> Result<Buf> {
        let r = self.routing_of(routed)?;
        if r.n != x.rows() {
            return Err(Error::invalid(format!("scale_rows: a routing of {} tokens for {} rows", r.n, x.rows())));
        }
        let (k, d) = (r.k, x.cols());
        let xf = self.tensor(x)?.to_f32_vec();
        let mut out = vec![0f32; r.n * k * d];
        for (i, row) in out.chunks_mut(d.max(1)).enumerate().take(r.n * k) {
            let (t, w) = (i / k, r.weights[i]);
            for (o, &v) in row.iter_mut().zip(&xf[t * d..(t + 1) * d]) {
                *o = v * w;
            }
        }
        let t = Tensor::from_f32(x.dtype(), r.n * k, d, &out)?;
        self.upload_owned(t)
    }

    fn gate_scale(&mut self, x: Buf, gate: &Matrix) -> Result<Buf> {
        let z = router::router_logits(self.tensor(x)?, gate.weight())?;
        if gate.weight().rows() != 1 {
            return Err(Error::invalid(format!("a gate weight is [1, D], not [{}, D]", gate.weight().rows())));
        }
        let s: Vec<f32> = z.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
        let rows = s.len();
        self.push(Slot::Owned(Tensor::from_vec(rows, 1, s)?), DType::F32, rows, 1)
    }

    fn gather_rows(&mut self, srcs: &[Buf], idx: &[u32], dst: Buf) -> Result<()> {
        check_sources("gather_rows", srcs, dst)?;
        check_indices("gather_rows", srcs, idx)?;
        self.with_dst(srcs, dst, |s, d| rows::gather_rows(s, idx, d))
    }

    fn ffn(&mut self, batch: Buf, offsets: &[usize], experts: &ExpertSet, deterministic: bool, out: Buf) -> Result<()> {
        let shape = |b: Buf| (b.rows(), b.cols(), b.dtype());
        check_ffn_shapes(shape(batch), offsets, experts, shape(out))?;
        self.with_dst(&[batch], out, |s, o| ffn::ffn(s[0], offsets, experts, deterministic, o))
    }

    fn weighted_sum(&mut self, srcs: &[Buf], idx: &[u32], weights: Weights<'_>, k: usize, y: Buf) -> Result<()> {
        check_sources("combine", srcs, y)?;
        check_sum_weights(&weights, idx, k, y)?;
        if idx.contains(&KEEP_ROW) {
            return Err(Error::invalid("combine: KEEP_ROW is not a combine index"));
        }
        check_indices("combine", srcs, idx)?;
        let w = self.host_weights(weights, y.rows(), k)?;
        self.with_dst(srcs, y, |s, d| rows::weighted_sum(s, idx, &w, k, d))
    }

    fn write_rows(&mut self, dst: Buf, first: usize, bytes: &[u8]) -> Result<()> {
        let rb = dst.row_bytes();
        let fits = rb > 0 && bytes.len().is_multiple_of(rb) && first + bytes.len() / rb <= dst.rows();
        if !fits {
            return Err(Error::invalid(format!(
                "write_rows: {} bytes at row {first} do not fit whole rows of a [{}, {}] buffer",
                bytes.len(),
                dst.rows(),
                dst.cols()
            )));
        }
        let mut t = self.take(dst)?;
        t.as_bytes_mut()[first * rb..first * rb + bytes.len()].copy_from_slice(bytes);
        self.put(dst, t);
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn routing(&mut self, r: Routed) -> Result<Routing> {
        self.routing_of(r).cloned()
    }

    fn exchange(&mut self, send: Buf, recv: Buf, f: &mut ExchangeFn<'_>) -> Result<()> {
        self.with_dst(&[send], recv, |s, r| f(s[0].as_bytes(), r.as_bytes_mut()))
    }

    fn download(&mut self, b: Buf) -> Result<Tensor> {
        match self.slots.get_mut(b.slot() as usize) {
            Some(s @ Slot::Owned(_)) => match std::mem::replace(s, Slot::Gone) {
                Slot::Owned(t) => Ok(t),
                _ => unreachable!("matched Owned"),
            },
            _ => self.tensor(b).cloned(),
        }
    }

    fn export(&mut self, b: Buf) -> Result<DeviceTensor> {
        let t = self.download(b)?;
        let (dtype, rows, cols) = (t.dtype(), t.rows(), t.cols());
        Ok(DeviceTensor::new(self.engine_id, dtype, rows, cols, Arc::new(t)))
    }

    fn traffic(&self) -> HostTraffic {
        HostTraffic::default()
    }
}
