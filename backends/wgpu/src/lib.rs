//! The GPU engine of moe-ep: the data path of an expert-parallel MoE layer (pack, scatter,
//! gather back, weighted combine) as WGSL kernels run through `wgpu`, so on Metal, Vulkan and
//! DX12 alike.
//!
//! - [`GpuContext`]: one device, its adapter's own limits, cached pipelines, pooled buffers;
//!   the adapter is chosen by [`context::ADAPTER_ENV`] and `WGPU_BACKEND`.
//! - [`ops`]: kernel launches on device buffers ([`ops::Gather`], [`ops::Combine`]).
//! - [`GpuEngine`]: the core crate's [`moe_ep::Engine`] on a context; give it to
//!   [`moe_ep::MoeLayer::with_engine`] or to [`moe_ep::dispatch`] / [`moe_ep::combine`].
//! - [`timing`]: GPU timestamps for benchmarks.
//!
//! Every kernel's source lives in `wgsl/` at the repository root ([`kernels`]). Data movement
//! is bitwise; the combine performs the CPU engine's operations in its order, so the GPU path
//! equals the CPU path bit for bit.

pub mod context;
pub mod engine;
pub mod ffn;
pub mod kernels;
pub mod ops;
pub mod pipelines;
pub mod pool;
pub mod session;
pub mod timing;

pub use context::{ContextOptions, GpuContext, list_adapters};
pub use engine::GpuEngine;
pub use session::GpuTensor;
pub use wgpu;
