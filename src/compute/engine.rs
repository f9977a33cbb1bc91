//! The compute stages of a layer, behind one trait so that the layer never names a backend.
//!
//! Every data-movement step of dispatch and combine is a row gather from the concatenation of
//! a few source tensors; arithmetic is the expert FFN and the weighted combine. The CPU engine
//! is [`crate::compute::cpu::CpuEngine`]; GPU engines live in backend crates.

use crate::compute::session::{DeviceTensor, Session, Weights};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::weights::ExpertSet;
use crate::tensor::Tensor;

/// An index in a row map that writes a row of zeros instead of reading a source row.
pub const ZERO_ROW: u32 = u32::MAX;

/// An index in a gather's row map that leaves the destination row as it is (rows the host
/// writes itself, such as the status rows of an exchange block). Not valid in a combine.
pub const KEEP_ROW: u32 = u32::MAX - 1;

/// Whether `i` is one of the special indices ([`ZERO_ROW`], [`KEEP_ROW`]) rather than a row.
pub fn is_special_row(i: u32) -> bool {
    i >= KEEP_ROW
}

/// Compute stages of an MoE layer, behind one trait so that the layer never names a backend.
///
/// An engine's real interface is its [`Session`]: buffers that stay on the engine between
/// stages and work recorded until a sync. The host-tensor methods ([`Engine::gather_rows`],
/// [`Engine::ffn`], [`Engine::weighted_sum`]) are conveniences over one session each (upload, run,
/// read back) for callers who keep their rows on the host; the CPU engine implements them
/// directly. Implementations must be deterministic: the same inputs give bitwise the same
/// outputs.
pub trait Engine: Send + Sync {
    /// Short name for stats and logs (`cpu`, `wgpu:<adapter>`).
    fn name(&self) -> String;

    /// An id of this engine instance, unique in the process: the owner of its
    /// [`DeviceTensor`]s.
    fn id(&self) -> u64;

    /// A new session (the buffers and recorded work of one call).
    fn session(&self) -> Result<Box<dyn Session<'_> + '_>>;

    /// `dst[i] = cat(srcs)[idx[i]]`, where `cat(srcs)` is the sources' rows one after another;
    /// [`ZERO_ROW`] writes zeros and [`KEEP_ROW`] leaves the row. All tensors share dtype and
    /// columns; `dst` has `idx.len()` rows. Moves bits, never converts.
    fn gather_rows(&self, srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()> {
        check_gather(srcs, idx, dst)?;
        let mut s = self.session()?;
        let bufs = srcs.iter().map(|t| s.upload(t)).collect::<Result<Vec<_>>>()?;
        let d = s.alloc(dst.dtype(), dst.rows(), dst.cols())?;
        s.gather_rows(&bufs, idx, d)?;
        let got = s.download(d)?;
        copy_rows_except_kept(&got, idx, dst);
        Ok(())
    }

    /// The activation of `experts` (SwiGLU unless the set says otherwise, with its biases) of
    /// each local expert over its rows: rows `offsets[l]..offsets[l+1]` of `batch` (`[rows, D]`)
    /// go through `experts[l]`; `out` is `[rows, D]` in `batch`'s dtype. Sums accumulate in
    /// f32 and each output is cast once; for f16/bf16 rows an engine may round the
    /// intermediate (gate and up results, or the activation between the projections) to the
    /// rows' dtype, as PyTorch's half-precision experts do, and where it does may depend on the
    /// rows an expert (the CPU's GEMM and bf16 dot-product paths round, see `compute::cpu::ffn`;
    /// the GPU's portable kernels keep an f32 intermediate, its matrix-unit kernels an f16 one).
    ///
    /// With `deterministic`, every output row depends only on its own input row and its
    /// expert's weights: bitwise the same whichever other rows share the call (a fixed
    /// reduction order, no shape-dependent kernel that changes it). Without it an engine may
    /// pick faster kernels by shape (cooperative matrices with f16 intermediates, for one);
    /// results are still the same on every run of the same call.
    fn ffn(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        check_ffn(batch, offsets, experts, out)?;
        let mut s = self.session()?;
        let b = s.upload(batch)?;
        let o = s.alloc(out.dtype(), out.rows(), out.cols())?;
        s.ffn(b, offsets, experts, deterministic, o)?;
        *out = s.download(o)?;
        Ok(())
    }

    /// `y[t] = sum_j weights[t*k + j] * cat(srcs)[idx[t*k + j]]` over slots `j` in order, with
    /// f32 accumulation and one cast to `y`'s dtype; [`ZERO_ROW`] slots contribute nothing.
    /// `y` has `idx.len() / k` rows.
    fn weighted_sum(&self, srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()> {
        check_weighted_sum(srcs, idx, weights, k, y)?;
        let mut s = self.session()?;
        let bufs = srcs.iter().map(|t| s.upload(t)).collect::<Result<Vec<_>>>()?;
        let o = s.alloc(y.dtype(), y.rows(), y.cols())?;
        s.weighted_sum(&bufs, idx, Weights::Host(weights), k, o)?;
        *y = s.download(o)?;
        Ok(())
    }

    /// `t` as a tensor this engine holds (a copy on a device engine).
    fn to_device(&self, t: &Tensor) -> Result<DeviceTensor> {
        let mut s = self.session()?;
        let b = s.upload(t)?;
        s.export(b)
    }

    /// A tensor this engine holds, on the host. Errors when another engine holds it.
    fn to_host(&self, t: &DeviceTensor) -> Result<Tensor> {
        let mut s = self.session()?;
        let b = s.adopt(t)?;
        s.download(b)
    }

    /// Whether this engine runs on an accelerator (what the layer's backend policy weighs
    /// against the CPU).
    fn is_accelerator(&self) -> bool {
        false
    }

    /// Get ready for calls on `experts` with `act` activations of up to `max_rows` rows per
    /// call: compile kernels, upload weights, fill buffer pools. Idempotent; cheap once done.
    fn warm_up(&self, experts: &ExpertSet, act: DType, max_rows: usize) -> Result<()> {
        let _ = (experts, act, max_rows);
        Ok(())
    }

    /// Drop any copy of the expert set or matrix `id` ([`ExpertSet::id`],
    /// [`crate::compute::session::Matrix::id`]); called when a layer is dropped.
    fn release(&self, id: u64) {
        let _ = id;
    }
}

/// Rows of `got` into `dst` except where `idx` says [`KEEP_ROW`].
fn copy_rows_except_kept(got: &Tensor, idx: &[u32], dst: &mut Tensor) {
    let rb = dst.row_bytes();
    if rb == 0 {
        return;
    }
    let src = got.as_bytes();
    for (r, row) in dst.as_bytes_mut().chunks_mut(rb).enumerate() {
        if idx[r] != KEEP_ROW {
            row.copy_from_slice(&src[r * rb..(r + 1) * rb]);
        }
    }
}

/// The `offsets` argument of [`Engine::ffn`] for experts of `counts` rows each: 0, then the
/// running sums (`counts.len() + 1` entries).
pub fn ffn_offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = crate::segments::offsets(counts);
    o.push(counts.iter().sum());
    o
}

/// [`ffn_offsets`] for `rows` spread evenly over `experts` (the first `rows % experts` take one
/// more); `[0]` when there are no experts.
pub fn even_offsets(rows: usize, experts: usize) -> Vec<usize> {
    let counts: Vec<usize> = (0..experts).map(|l| rows / experts + usize::from(l < rows % experts)).collect();
    ffn_offsets(&counts)
}

/// Check the arguments of [`Engine::ffn`]: `offsets` has one more entry than `experts`, is
/// non-decreasing from 0 to `batch.rows()`, every expert is `gate [F, D]`, `up [F, D]`,
/// `down [D, F]` with `D = batch.cols()` and the kinds (dtypes or packed formats) of expert
/// 0's, and `out` has `batch`'s shape and dtype.
pub fn check_ffn(batch: &Tensor, offsets: &[usize], experts: &ExpertSet, out: &Tensor) -> Result<()> {
    check_ffn_shapes(
        (batch.rows(), batch.cols(), batch.dtype()),
        offsets,
        experts,
        (out.rows(), out.cols(), out.dtype()),
    )
}

/// [`check_ffn`] on shapes: `batch` and `out` as (rows, cols, dtype).
pub fn check_ffn_shapes(
    batch: (usize, usize, DType),
    offsets: &[usize],
    experts: &ExpertSet,
    out: (usize, usize, DType),
) -> Result<()> {
    let (rows, d, act) = batch;
    if offsets.len() != experts.len() + 1 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::invalid(format!(
            "ffn: {} offsets for {} experts (need experts + 1, non-decreasing)",
            offsets.len(),
            experts.len()
        )));
    }
    if offsets.first() != Some(&0) || offsets.last() != Some(&rows) {
        return Err(Error::invalid(format!(
            "ffn: offsets span {:?}..{:?} but the batch has {rows} rows",
            offsets.first(),
            offsets.last()
        )));
    }
    if out != batch {
        return Err(Error::invalid(format!(
            "ffn: output is [{}, {}] {} but the batch is [{rows}, {d}] {act}",
            out.0, out.1, out.2
        )));
    }
    let kinds = experts.first().map(|w| w.kinds());
    for (l, w) in experts.iter().enumerate() {
        let f = w.gate.rows();
        if w.gate.cols() != d || w.up.rows() != f || w.up.cols() != d || w.down.rows() != d || w.down.cols() != f {
            return Err(Error::invalid(format!(
                "ffn: local expert {l} has gate {:?}, up {:?}, down {:?}; batch rows have {d} features",
                (w.gate.rows(), w.gate.cols()),
                (w.up.rows(), w.up.cols()),
                (w.down.rows(), w.down.cols())
            )));
        }
        if Some(w.kinds()) != kinds {
            return Err(Error::invalid(format!(
                "ffn: local expert {l} has weights {:?}, expert 0 {:?} (every expert of a set has the same kinds)",
                w.kinds(),
                kinds
            )));
        }
    }
    Ok(())
}

/// Check the arguments of [`Engine::gather_rows`]: `dst` has one row per index, every source
/// has `dst`'s dtype and columns, and every index other than [`ZERO_ROW`] names a source row.
/// Returns the first row of each source in the concatenation, then the total.
pub fn check_gather(srcs: &[&Tensor], idx: &[u32], dst: &Tensor) -> Result<Vec<usize>> {
    if dst.rows() != idx.len() {
        return Err(Error::invalid(format!(
            "gather_rows: destination has {} rows for {} indices",
            dst.rows(),
            idx.len()
        )));
    }
    check_sources(srcs, idx, dst, "gather_rows")
}

/// Check the arguments of [`Engine::weighted_sum`] as [`check_gather`] does, and that there are
/// `k` indices and weights per row of `y`, `k > 0`.
pub fn check_weighted_sum(srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &Tensor) -> Result<Vec<usize>> {
    if idx.contains(&KEEP_ROW) {
        return Err(Error::invalid("combine: KEEP_ROW is not a combine index (use ZERO_ROW for an empty slot)"));
    }
    if k == 0 || idx.len() != weights.len() || idx.len() != y.rows() * k {
        return Err(Error::invalid(format!(
            "combine: {} indices and {} weights for {} output rows of top-{k}",
            idx.len(),
            weights.len(),
            y.rows()
        )));
    }
    check_sources(srcs, idx, y, "combine")
}

fn check_sources(srcs: &[&Tensor], idx: &[u32], dst: &Tensor, what: &str) -> Result<Vec<usize>> {
    let mut starts = Vec::with_capacity(srcs.len() + 1);
    let mut total = 0usize;
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
        starts.push(total);
        total += s.rows();
    }
    starts.push(total);
    if let Some(&bad) = idx.iter().find(|&&i| !is_special_row(i) && i as usize >= total) {
        return Err(Error::invalid(format!("{what}: row index {bad} outside the {total} source rows")));
    }
    Ok(starts)
}
