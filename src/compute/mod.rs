//! Where rows are computed: the [`engine::Engine`] trait, the CPU engine ([`cpu`]), the
//! backend policy between CPU and GPU ([`policy`]), the warm-up that measures the crossover
//! ([`warmup`]) and reusable host buffers ([`workspace`]).

pub mod cpu;
pub mod engine;
pub mod policy;
pub mod session;
pub mod warmup;
pub mod workspace;
