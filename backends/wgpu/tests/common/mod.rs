//! Shared by the GPU tests: a device or a clear failure, seeded data.
#![allow(dead_code)]

use moe_ep::compute::engine::ZERO_ROW;
use moe_ep::{DType, Tensor, random};
use moe_ep_wgpu::{ContextOptions, GpuContext};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A device on the adapter the environment names (or the best one); fails the test, saying
/// how to get an adapter, when there is none. Prints the adapter, as wgpu's own tests do.
pub fn context_with(opts: &ContextOptions) -> GpuContext {
    match GpuContext::new(opts) {
        Ok(c) => {
            eprintln!("adapter: {}", c.describe());
            c
        }
        Err(e) => panic!("GPU test needs a wgpu adapter: {e}"),
    }
}

pub fn context() -> GpuContext {
    context_with(&ContextOptions::from_env())
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Fresh random rows (never zeros).
pub fn rows(dtype: DType, rows: usize, cols: usize, seed: u64) -> Tensor {
    random::uniform(dtype, rows, cols, 2.0, seed, 7)
}

/// `n` indices into `total` rows, about one in `zero_every` of them ZERO_ROW (none if 0).
pub fn indices(n: usize, total: usize, zero_every: u32, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            if total == 0 || (zero_every > 0 && r.random_range(0..zero_every) == 0) {
                ZERO_ROW
            } else {
                r.random_range(0..total as u32)
            }
        })
        .collect()
}
