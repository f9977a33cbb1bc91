//! Seeded random tensors and layer weights for tests, benches and tools.
//!
//! Expert `e`'s weights depend only on `(seed, e)`, so each rank can make just its own experts
//! and every rank agrees on them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dtype::DType;
use crate::model::config::MoeConfig;
use crate::model::placement::Placement;
use crate::model::quant::{PackedMatrix, QuantFormat, Scales};
use crate::model::weights::{ExpertBias, ExpertWeights, LayerWeights, SharedExpert};
use crate::tensor::Tensor;

fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// `[rows, cols]` uniform in `(-scale, scale)`, rounded to `dtype`.
pub fn uniform(dtype: DType, rows: usize, cols: usize, scale: f32, seed: u64, stream: u64) -> Tensor {
    // Rows in parallel, each from its own word position, so the result does not depend on threads.
    let mut v = vec![0f32; rows * cols];
    if cols > 0 {
        v.par_chunks_mut(cols.max(1) * 64).enumerate().for_each(|(i, chunk)| {
            let mut r = rng(seed, stream);
            r.set_word_pos((i * cols * 64) as u128);
            for x in chunk {
                *x = r.random_range(-scale..scale);
            }
        });
    }
    Tensor::from_f32(dtype, rows, cols, &v).expect("shape matches")
}

/// Tokens `[n, D]` for `rank` (its own stream), uniform in (-1, 1).
pub fn input(cfg: &MoeConfig, n: usize, seed: u64, rank: usize) -> Tensor {
    uniform(cfg.act_dtype, n, cfg.hidden, 1.0, seed, 1_000_000 + rank as u64)
}

/// Router weight `[E, D]`, scaled so logits have unit-order spread.
pub fn gate(cfg: &MoeConfig, seed: u64) -> Tensor {
    uniform(cfg.weight_dtype, cfg.num_experts, cfg.hidden, 3.0 / (cfg.hidden as f32).sqrt(), seed, 0)
}

/// Expert `e`'s weights, scaled so outputs stay of unit order.
/// With `cfg.expert_bias`, biases uniform in (-0.5, 0.5) (of the order of the projections'
/// outputs, so they matter).
pub fn expert(cfg: &MoeConfig, seed: u64, e: usize) -> ExpertWeights {
    let w = swiglu(cfg.weight_dtype, cfg.hidden, cfg.intermediate, seed, 3 * e as u64 + 1);
    if !cfg.expert_bias {
        return w;
    }
    let (d, f) = (cfg.hidden, cfg.intermediate);
    let b = uniform(DType::F32, 1, 2 * f + d, 0.5, seed, 3_000_000 + e as u64).to_f32_vec();
    w.with_bias(ExpertBias { gate: b[..f].to_vec(), up: b[f..2 * f].to_vec(), down: b[2 * f..].to_vec() })
}

/// A SwiGLU MLP `[f, d]`, `[f, d]`, `[d, f]` from streams `stream..stream + 3`, scaled so
/// outputs stay of unit order.
fn swiglu(dt: DType, d: usize, f: usize, seed: u64, stream: u64) -> ExpertWeights {
    ExpertWeights::new(
        uniform(dt, f, d, 2.0 / (d as f32).sqrt(), seed, stream),
        uniform(dt, f, d, 2.0 / (d as f32).sqrt(), seed, stream + 1),
        uniform(dt, d, f, 2.0 / (f as f32).sqrt(), seed, stream + 2),
    )
}

/// The weights of the listed experts, in the order given.
pub fn experts(cfg: &MoeConfig, seed: u64, ids: &[usize]) -> Vec<ExpertWeights> {
    ids.iter().map(|&e| expert(cfg, seed, e)).collect()
}

/// The router's bias vector `[E]` when `cfg`'s routing uses one, else `None`: for selection,
/// uniform in (-0.2, 0.2) (of the order of the gaps between sigmoid scores, so it changes some
/// choices); on the logits (gpt-oss), uniform in (-1, 1) (of the order of the logits' spread).
pub fn selection_bias(cfg: &MoeConfig, seed: u64) -> Option<Vec<f32>> {
    let scale = if cfg.router.logit_bias { 1.0 } else { 0.2 };
    cfg.router.uses_bias().then(|| uniform(DType::F32, 1, cfg.num_experts, scale, seed, 2_000_000).to_f32_vec())
}

/// The shared expert when `cfg` has one (its gate too when gated), else `None`.
pub fn shared_expert(cfg: &MoeConfig, seed: u64) -> Option<SharedExpert> {
    let sc = cfg.shared_expert?;
    let (d, f, dt) = (cfg.hidden, sc.intermediate, cfg.weight_dtype);
    let s = 2_000_001;
    Some(SharedExpert {
        weights: swiglu(dt, d, f, seed, s),
        gate: sc.gated.then(|| uniform(dt, 1, d, 3.0 / (d as f32).sqrt(), seed, s + 3)),
    })
}

/// Rank `rank`'s [`LayerWeights`] under `placement`: the router, the selection bias and the
/// shared expert when `cfg` has them, and its own experts.
pub fn layer_weights(cfg: &MoeConfig, seed: u64, placement: &Placement, rank: usize) -> LayerWeights {
    LayerWeights {
        router: gate(cfg, seed),
        selection_bias: selection_bias(cfg, seed),
        experts: experts(cfg, seed, placement.experts_of(rank)),
        shared: shared_expert(cfg, seed),
    }
}

/// Make expert 0 every token's first choice: its router row gets weight 40 on feature 0
/// (pair with [`skewed_input`], which sets feature 0 of every token to 1). For load-imbalance
/// tests and benchmarks.
pub fn skewed_gate(gate: &Tensor) -> Tensor {
    let mut v = gate.to_f32_vec();
    if let Some(w) = v.first_mut() {
        *w = 40.0;
    }
    Tensor::from_f32(gate.dtype(), gate.rows(), gate.cols(), &v).expect("shape preserved")
}

/// `x` with feature 0 of every token set to 1; see [`skewed_gate`].
pub fn skewed_input(x: &Tensor) -> Tensor {
    let mut v = x.to_f32_vec();
    if x.cols() > 0 {
        v.iter_mut().step_by(x.cols()).for_each(|f| *f = 1.0);
    }
    Tensor::from_f32(x.dtype(), x.rows(), x.cols(), &v).expect("shape preserved")
}

/// A random `[rows, cols]` matrix in `format`, its values of the order of
/// `2 / sqrt(cols)` (as [`expert`]'s): every value code drawn uniformly (FP8's two NaN codes
/// replaced by zero), affine scales of both signs with biases that centre the range, MXFP4
/// scales a power of two apart around the values' order, FP8 block scales positive.
pub fn packed(format: QuantFormat, rows: usize, cols: usize, seed: u64, stream: u64) -> PackedMatrix {
    let mut r = rng(seed, 4_000_000 + stream);
    let amp = 2.0 / (cols.max(1) as f32).sqrt();
    let nbytes = rows * format.row_bytes(cols);
    let mut bytes: Vec<u8> = (0..nbytes).map(|_| r.random::<u8>()).collect();
    let groups = rows * cols / format.group().max(1);
    let scales = match format {
        QuantFormat::Affine { bits, scales: dt, .. } => {
            let qmid = ((1u32 << bits) - 1) as f32 / 2.0;
            let (mut s, mut b) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
            for _ in 0..groups {
                let sign = if r.random::<bool>() { 1.0 } else { -1.0 };
                let sc = sign * amp / qmid * r.random_range(0.5f32..1.5);
                s.push(sc);
                b.push(-sc * qmid + amp * r.random_range(-0.2f32..0.2));
            }
            let g = cols / format.group();
            let t = |v: &[f32]| Tensor::from_f32(dt, rows, g, v).expect("shape");
            Scales::Affine { scales: t(&s), biases: t(&b) }
        }
        QuantFormat::Mxfp4 => {
            let e0 = 127 + (amp / 6.0).log2().round() as i32;
            Scales::E8m0((0..groups).map(|_| (e0 + r.random_range(-1..=1)).clamp(0, 254) as u8).collect())
        }
        QuantFormat::Fp8 { block_rows, block_cols } => {
            bytes.iter_mut().filter(|b| **b & 0x7F == 0x7F).for_each(|b| *b = 0);
            let n = rows.div_ceil(block_rows as usize) * cols.div_ceil(block_cols as usize);
            Scales::Block((0..n).map(|_| amp / 448.0 * r.random_range(0.5f32..1.5)).collect())
        }
    };
    let words = crate::model::quant::words_of_bytes(&bytes);
    PackedMatrix::new(format, rows, cols, words, scales).expect("random packed matrix is valid")
}

/// Expert `e`'s weights with every projection a random [`packed`] matrix of `format` (its
/// biases as [`expert`]'s when `cfg.expert_bias`); `e` picks the streams, so every rank agrees.
pub fn packed_expert(cfg: &MoeConfig, format: QuantFormat, seed: u64, e: usize) -> ExpertWeights {
    let (d, f) = (cfg.hidden, cfg.intermediate);
    let s = 3 * e as u64;
    let w = ExpertWeights::new(
        packed(format, f, d, seed, s),
        packed(format, f, d, seed, s + 1),
        packed(format, d, f, seed, s + 2),
    );
    match expert(cfg, seed, e).bias {
        Some(b) => w.with_bias(b),
        None => w,
    }
}

/// [`packed_expert`] of each listed expert, in the order given.
pub fn packed_experts(cfg: &MoeConfig, format: QuantFormat, seed: u64, ids: &[usize]) -> Vec<ExpertWeights> {
    ids.iter().map(|&e| packed_expert(cfg, format, seed, e)).collect()
}
