//! Warm-up and the measured CPU/GPU crossover.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::compute::engine::Engine;
use crate::error::Result;
use crate::model::config::MoeConfig;
use crate::model::weights::ExpertSet;

/// One size the crossover was measured at: the local compute of a call with `tokens` tokens
/// on this rank (the expert FFN over `tokens * k` rows spread over the local experts, then
/// the combine of `tokens` rows), on each engine, median of a few runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossoverPoint {
    pub tokens: usize,
    pub rows: usize,
    pub cpu_s: f64,
    pub gpu_s: f64,
}

/// What [`crate::MoeLayer::warm_up`] did on one rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmUpReport {
    pub rank: usize,
    /// Engines of the layer (`cpu`, and the GPU engine's name if it has one).
    pub engines: Vec<String>,
    /// Tokens of a call from which the GPU engine runs it: `Some(0)` always, `None` never.
    pub crossover: Option<usize>,
    /// Where the crossover came from: `measured`, `config`, `env`, `deterministic` or `no gpu`.
    pub crossover_source: String,
    /// The measurement, when there was one.
    pub points: Vec<CrossoverPoint>,
    /// Engine warm-up (compiling, uploading weights, filling pools), seconds.
    pub engine_s: f64,
    /// The small forward call that exercised the exchange, seconds.
    pub exchange_s: f64,
    /// The whole warm-up, seconds (0 when it had been done before: the call was free).
    pub total_s: f64,
    /// Why the GPU engine is out of use, when its warm-up or the measurement failed with a
    /// device error under [`crate::OnGpuError::Fallback`] (the CPU then runs every call).
    pub gpu_error: Option<String>,
}

/// `[rows, cols]` of values spread over (-1, 1), a fixed function of `seed` (splitmix64): the
/// data warm-ups and crossover measurements run on (never zeros, which can run faster than
/// real data). Not for tests: they use the `testing` feature's seeded generators.
pub fn sample_rows(dtype: crate::dtype::DType, rows: usize, cols: usize, seed: u64) -> crate::tensor::Tensor {
    let mut state = seed;
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits to (-1, 1).
            ((z >> 40) as f32 + 0.5) / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    crate::tensor::Tensor::from_f32(dtype, rows, cols, &v).expect("rows * cols values")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time the local compute of a `tokens`-token call on `engine`: median of `reps` runs after one.
fn time_local(engine: &dyn Engine, experts: &ExpertSet, cfg: &MoeConfig, tokens: usize, reps: usize) -> Result<f64> {
    let k = cfg.top_k;
    let rows = if experts.is_empty() { 0 } else { tokens * k };
    let offs = crate::compute::engine::even_offsets(rows, experts.len());
    let batch = sample_rows(cfg.act_dtype, rows, cfg.hidden, 0x5eed ^ tokens as u64);
    let mut out = crate::tensor::Tensor::zeros(cfg.act_dtype, rows, cfg.hidden);
    let idx: Vec<u32> =
        (0..tokens * k).map(|i| if rows == 0 { crate::compute::engine::ZERO_ROW } else { (i % rows) as u32 }).collect();
    let w = vec![1.0 / k as f32; tokens * k];
    let mut y = crate::tensor::Tensor::zeros(cfg.act_dtype, tokens, cfg.hidden);
    let mut once = || -> Result<f64> {
        let t = Instant::now();
        engine.ffn(&batch, &offs, experts, cfg.deterministic, &mut out)?;
        engine.weighted_sum(&[&out], &idx, &w, k, &mut y)?;
        Ok(t.elapsed().as_secs_f64())
    };
    once()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        v.push(once()?);
    }
    Ok(median(v))
}

/// Measure where `gpu` overtakes `cpu` for this layer: token counts 1, 2, 4, ... up to
/// `max_tokens`, stopping at the second size in a row that the GPU wins (the crossover is the
/// first of the two) or once a point takes longer than `budget_s` on either engine. `None`: the GPU never
/// won. A GPU error ends the measurement with the error.
pub(crate) fn measure_crossover(
    cpu: &dyn Engine,
    gpu: &dyn Engine,
    experts: &ExpertSet,
    cfg: &MoeConfig,
    max_tokens: usize,
    budget_s: f64,
) -> Result<(Option<usize>, Vec<CrossoverPoint>)> {
    let _span = tracing::debug_span!("measure_crossover", max_tokens).entered();
    let mut points = Vec::new();
    let mut tokens = 1usize;
    let mut first_win: Option<usize> = None;
    while tokens <= max_tokens.max(1) {
        let reps = if tokens <= 64 { 5 } else { 3 };
        let cpu_s = time_local(cpu, experts, cfg, tokens, reps)?;
        let gpu_s = time_local(gpu, experts, cfg, tokens, reps)?;
        points.push(CrossoverPoint { tokens, rows: tokens * cfg.top_k, cpu_s, gpu_s });
        tracing::debug!(tokens, cpu_s, gpu_s, "crossover point");
        if gpu_s < cpu_s {
            match first_win {
                Some(n) => return Ok((Some(n), points)),
                None => first_win = Some(tokens),
            }
        } else {
            first_win = None;
        }
        if cpu_s > budget_s || gpu_s > budget_s {
            break;
        }
        tokens *= 2;
    }
    Ok((first_win, points))
}
