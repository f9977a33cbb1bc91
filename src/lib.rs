//! Expert-parallel Mixture-of-Experts layers.
//!
//! Each rank of a [`Group`] owns some experts ([`Placement`]); tokens are routed
//! ([`model::router`]), planned ([`RoutePlan`]), dispatched to the ranks owning their experts
//! ([`dispatch()`]), computed there and combined back ([`combine()`]). [`MoeLayer`] does all of
//! it in one call. See `DESIGN.md` in the repository for the data flow and the semantics.
//!
//! ```
//! use moe_ep::{LocalGroup, MoeConfig, MoeLayer, Placement, testing::random};
//! use std::time::Duration;
//!
//! let cfg = MoeConfig::new(8, 16, 32, 2);
//! let outs = LocalGroup::run(2, Duration::from_secs(10), |g| {
//!     let rank = moe_ep::Group::rank(&g);
//!     let placement = Placement::contiguous(8, 2)?;
//!     let mine = random::experts(&cfg, 7, placement.experts_of(rank));
//!     let layer = MoeLayer::new(g, cfg.clone(), placement, random::gate(&cfg, 7), mine)?;
//!     let x = random::input(&cfg, 5 + rank, 7, rank);
//!     layer.forward(&x)
//! }).unwrap();
//! for out in outs {
//!     let y = out.expect("no panic").expect("forward ok");
//!     assert_eq!(y.cols(), 16);
//! }
//! ```

pub mod compute;
pub mod dtype;
pub mod error;
pub mod exchange;
pub mod layer;
pub mod model;
mod segments;
pub mod stats;
pub mod tensor;
#[cfg(feature = "testing")]
pub mod testing;

pub use compute::cpu::CpuEngine;
pub use compute::engine::Engine;
pub use compute::policy::{BackendChoice, LayerOptions, OnGpuError};
pub use compute::warmup::{CrossoverPoint, WarmUpReport};
pub use compute::workspace::Workspace;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use exchange::dispatch::{CombineHandle, Dispatched, combine, combine_in, dispatch, dispatch_in};
pub use exchange::group::{Group, LocalGroup};
pub use exchange::plan::RoutePlan;
pub use layer::moe::MoeLayer;
pub use layer::tp::TpLayer;
pub use model::checkpoint::{Checkpoint, Family, LoadOptions};
pub use model::config::{Activation, Capacity, GroupScore, MoeConfig, RouterConfig, Scoring, SharedExpertConfig};
pub use model::placement::Placement;
pub use model::quant::{PackedMatrix, QuantFormat, Quantize, WeightKind};
pub use model::router::Routing;
pub use model::weights::{ExpertBias, ExpertSet, ExpertWeights, LayerWeights, SharedExpert, Weight};
pub use stats::{ForwardStats, GpuTimes, LayerMetrics, StageTimes};
pub use tensor::Tensor;
#[cfg(feature = "testing")]
pub use testing::random;
