//! MLX's affine quantization, computed as `mx.quantize` computes it, so that quantizing a
//! bf16 or f16 matrix here gives MLX's bytes.
//!
//! For each group of `group` consecutive inputs of a row, in f32 (the weights widened
//! exactly), with `n = 2^bits - 1` and `eps = 1e-7`:
//!
//! 1. `w_max`, `w_min`: the group's largest and smallest value;
//! 2. `s = max((w_max - w_min) / n, eps)`, negated unless `|w_min| > |w_max|` (so the scale
//!    is negative when the value of largest magnitude is positive);
//! 3. `edge = w_min` if `|w_min| > |w_max|`, else `w_max`; `q0 = round(edge / s)`;
//! 4. if `q0 != 0`: `s = edge / q0` and the bias `b = edge` (zero then maps to the integer
//!    `-q0` exactly); else `b = 0`;
//! 5. every value `q = clamp(round((w - b) / s), 0, n)`, packed low bits first;
//! 6. `s` and `b` stored rounded to the scale dtype (the values were rounded with the f32
//!    ones).
//!
//! MLX has two implementations that differ in two details ([`MlxKernel`]): its CPU one
//! (`fast::Quantize::eval_cpu` in `mlx/backend/cpu/quantized.cpp`) starts `w_max` at `-inf`
//! and rounds half to even (`std::rint`); its Metal (and CUDA) kernel (`affine_quantize` in
//! `mlx/backend/metal/kernels/quantized.h`), which `mlx_lm.convert` runs on a Mac, starts
//! `w_max` at 0 (a group of negative values gets `w_max = 0`) and rounds half away from zero
//! (Metal's `round`).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::quant::format::QuantFormat;
use crate::model::quant::packed::{PackedMatrix, Scales};
use crate::tensor::Tensor;

/// Which of MLX's implementations of `mx.quantize` to reproduce (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlxKernel {
    /// The CPU stream's: `w_max` from `-inf`, ties to even.
    Cpu,
    /// The GPU stream's (Metal, CUDA): `w_max` from 0, ties away from zero. What
    /// `mlx_lm.convert` runs on Apple silicon, so the default.
    #[default]
    Gpu,
}

/// Scale and bias of one group as MLX computes them (f32, before rounding to the scale dtype).
pub fn group_scale_bias(values: &[f32], bits: u32, kernel: MlxKernel) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let eps = 1e-7f32;
    let (mut w_min, mut w_max) = match kernel {
        MlxKernel::Cpu => (f32::INFINITY, f32::NEG_INFINITY),
        MlxKernel::Gpu => (f32::MAX, 0.0),
    };
    for &v in values {
        w_max = w_max.max(v);
        w_min = w_min.min(v);
    }
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(eps);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = round(edge / scale, kernel);
    if q0 != 0.0 { (edge / q0, edge) } else { (scale, 0.0) }
}

/// The integer of value `v` in a group of scale `s` and bias `b`.
pub fn quantize_value(v: f32, s: f32, b: f32, bits: u32, kernel: MlxKernel) -> u32 {
    let n_bins = ((1u32 << bits) - 1) as f32;
    round((v - b) / s, kernel).clamp(0.0, n_bins) as u32
}

fn round(x: f32, kernel: MlxKernel) -> f32 {
    match kernel {
        MlxKernel::Cpu => x.round_ties_even(),
        MlxKernel::Gpu => x.round(),
    }
}

/// Quantize `values` (`[rows, cols]` row-major f32, e.g. bf16 weights widened) as MLX's
/// `mx.quantize(w, group_size=group, bits=bits)` does with `kernel`, scales and biases stored
/// in `scales`. Errors for formats MLX does not make, a `cols` that is not whole groups, a
/// length that is not `rows * cols`, and non-finite values.
pub fn quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group: u32,
    scales: DType,
    kernel: MlxKernel,
) -> Result<PackedMatrix> {
    let format = QuantFormat::affine(bits, group, scales)?;
    format.check_shape(rows, cols)?;
    if values.len() != rows * cols {
        return Err(Error::invalid(format!("{} values for a [{rows}, {cols}] matrix", values.len())));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("cannot quantize element [{}, {}] = {}", i / cols, i % cols, values[i])));
    }
    let (g, per_word) = (group as usize, (32 / bits) as usize);
    let groups = rows * cols / g;
    let mut words = vec![0u32; rows * cols / per_word];
    let (mut s_all, mut b_all) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    for (gi, chunk) in values.chunks(g).enumerate() {
        let (s, b) = group_scale_bias(chunk, bits, kernel);
        for (j, &v) in chunk.iter().enumerate() {
            let i = gi * g + j;
            words[i / per_word] |= quantize_value(v, s, b, bits, kernel) << (bits as usize * (i % per_word));
        }
        s_all.push(s);
        b_all.push(b);
    }
    let st = |v: &[f32]| Tensor::from_f32(scales, rows, cols / g, v);
    PackedMatrix::new(format, rows, cols, words, Scales::Affine { scales: st(&s_all)?, biases: st(&b_all)? })
}

/// [`quantize`] of a dense tensor (f32, f16 or bf16, widened exactly), scales and biases in
/// the tensor's own dtype (as MLX keeps them).
pub fn quantize_tensor(t: &Tensor, bits: u32, group: u32, kernel: MlxKernel) -> Result<PackedMatrix> {
    quantize(&t.to_f32_vec(), t.rows(), t.cols(), bits, group, t.dtype(), kernel)
}
