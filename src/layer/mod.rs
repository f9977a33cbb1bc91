//! Layers built from the model, the exchange and the compute engines: [`moe::MoeLayer`]
//! (expert parallelism) and [`tp::TpLayer`] (tensor parallelism, for comparison).

pub(crate) mod forward;
pub mod moe;
pub mod tp;
