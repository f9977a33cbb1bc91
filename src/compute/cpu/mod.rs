//! The CPU engine: rayon over rows and experts; row kernels picked at run time from the
//! CPU's features ([`gemv`]) for few rows an expert, `gemmkit` ([`gemm`]) for many.

pub mod ffn;
pub mod gemm;
pub mod gemv;
pub mod packed;
pub mod panels;
pub mod rows;
mod session;

use crate::compute::engine::Engine;
use crate::compute::session::Session;
use crate::error::Result;
use crate::model::weights::ExpertSet;
use crate::tensor::Tensor;

/// Runs every stage on the CPU (the rayon global pool).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuEngine;

/// The [`Engine::id`] of every CPU engine: they all hold their tensors in host memory, so a
/// tensor one made is every CPU engine's.
pub const CPU_ENGINE_ID: u64 = 0;

impl Engine for CpuEngine {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn id(&self) -> u64 {
        CPU_ENGINE_ID
    }
    fn session(&self) -> Result<Box<dyn Session<'_> + '_>> {
        Ok(Box::new(session::CpuSession::new(CPU_ENGINE_ID)))
    }
    fn gather_rows(&self, srcs: &[&Tensor], idx: &[u32], dst: &mut Tensor) -> Result<()> {
        rows::gather_rows(srcs, idx, dst)
    }
    fn ffn(
        &self,
        batch: &Tensor,
        offsets: &[usize],
        experts: &ExpertSet,
        deterministic: bool,
        out: &mut Tensor,
    ) -> Result<()> {
        ffn::ffn(batch, offsets, experts, deterministic, out)
    }
    fn weighted_sum(&self, srcs: &[&Tensor], idx: &[u32], weights: &[f32], k: usize, y: &mut Tensor) -> Result<()> {
        rows::weighted_sum(srcs, idx, weights, k, y)
    }
}
