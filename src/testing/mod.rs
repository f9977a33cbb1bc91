//! Test and benchmark support, behind the `testing` feature: random data ([`random`]), the
//! f64 reference MoE ([`reference`]), a checkpoint writer ([`checkpoint_writer`]) and the
//! hardware floors benchmarks print beside their figures ([`floor`]).

pub mod checkpoint_fuzz;
pub mod checkpoint_writer;
pub mod floor;
pub mod random;
pub mod reference;
