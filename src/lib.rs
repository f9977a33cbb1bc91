//! Expert-parallel Mixture-of-Experts layers.
//!
//! Each rank of a [`Group`] owns some experts ([`Placement`]); tokens are routed
//! ([`router`]), planned ([`RoutePlan`]), dispatched to the ranks owning their experts
//! ([`dispatch()`]), computed there and combined back ([`combine()`]). [`MoeLayer`] does all of
//! it in one call. See `DESIGN.md` in the repository for the data flow and the semantics.
//!
//! ```
//! use moe_ep::{LocalGroup, MoeConfig, MoeLayer, Placement, random};
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

mod agree;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod dispatch;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod floor;
pub mod group;
pub mod layer;
pub mod placement;
pub mod plan;
pub mod policy;
pub mod random;
pub mod reference;
pub mod router;
mod segments;
pub mod stats;
pub mod tensor;
pub mod tp;
pub mod warmup;
pub mod weights;
pub mod workspace;

pub use checkpoint::{Checkpoint, Family};
pub use config::{Capacity, GroupScore, MoeConfig, RouterConfig, Scoring, SharedExpertConfig};
pub use cpu::CpuEngine;
pub use dispatch::{CombineHandle, Dispatched, combine, combine_in, dispatch, dispatch_in};
pub use dtype::{DType, Element};
pub use engine::Engine;
pub use error::{Error, Result};
pub use group::{Group, LocalGroup};
pub use layer::MoeLayer;
pub use placement::Placement;
pub use plan::RoutePlan;
pub use policy::{BackendChoice, LayerOptions, OnGpuError};
pub use router::Routing;
pub use stats::{ForwardStats, LayerMetrics, StageTimes};
pub use tensor::Tensor;
pub use tp::TpLayer;
pub use warmup::{CrossoverPoint, WarmUpReport};
pub use weights::{ExpertSet, ExpertWeights, LayerWeights, SharedExpert};
pub use workspace::Workspace;
