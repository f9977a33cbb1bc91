//! The compute stages of a layer, behind one trait so that the layer never names a backend.
//!
//! Every data-movement step of dispatch and combine is a row gather from the concatenation of
//! a few source tensors; arithmetic is the expert FFN and the weighted combine. The CPU engine
//! is [`crate::cpu::CpuEngine`]; GPU engines live in backend crates.

use crate::error::Result;
use crate::tensor::Tensor;
use crate::weights::ExpertWeights;

/// An index in a row map that writes a row of zeros instead of reading a source row.
pub const ZERO_ROW: u32 = u32::MAX;

/// Compute stages of an MoE layer. Implementations must be deterministic: the same inputs give
/// bitwise the same outputs.
pub trait Engine: Send + Sync {
    /// Short name for stats and logs (`cpu`, `wgpu:<adapter>`).
    fn name(&self) -> String;

    /// `dst[i] = cat(srcs)[idx[i]]`, where `cat(srcs)` is the sources' rows one after another
    /// and [`ZERO_ROW`] writes zeros. All tensors share dtype and columns; `dst` has `idx.len()`
    /// rows. Moves bits, never converts.
    fn gather_rows(&self, srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()>;

    /// SwiGLU of each local expert over its rows: rows `offsets[l]..offsets[l+1]` of `batch`
    /// (`[rows, D]`) go through `experts[l]`; `out` is `[rows, D]` in `batch`'s dtype. Sums
    /// accumulate in f32 and are cast once.
    fn ffn(&self, batch: &Tensor, offsets: &[usize], experts: &[ExpertWeights], out: &mut Tensor) -> Result<()>;

    /// `y[t] = sum_j weights[t*k + j] * cat(srcs)[idx[t*k + j]]` over slots `j` in order, with
    /// f32 accumulation and one cast to `y`'s dtype; [`ZERO_ROW`] slots contribute nothing.
    /// `y` has `idx.len() / k` rows.
    fn combine(&self, srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()>;
}
