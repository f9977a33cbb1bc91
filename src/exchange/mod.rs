//! How rows travel between ranks: the [`group::Group`] trait and its thread ranks, the
//! per-call [`plan::RoutePlan`], [`dispatch`] and combine, and the agreement round of
//! collective constructors.

pub(crate) mod agree;
pub mod dispatch;
pub mod group;
pub mod layout;
pub mod plan;
