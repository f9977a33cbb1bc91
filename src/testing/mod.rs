//! Test and benchmark support, behind the `testing` feature: random data ([`random`]), the
//! f64 reference MoE ([`reference`](mod@reference)), a checkpoint writer ([`checkpoint_writer`]) and the
//! hardware floors benchmarks print beside their figures ([`floor`]), the failure-injection
//! suite every group engine passes ([`group_suite`]), and [`skip()`], which tells CI's log that
//! a test did not run a variant.

pub mod checkpoint_fuzz;
pub mod checkpoint_writer;
pub mod dequant_ref;
pub mod floor;
pub mod group_suite;
pub mod mlx_writer;
pub mod random;
pub mod reference;
mod skip;

pub use skip::skip;
