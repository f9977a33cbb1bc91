//! Packed weights dequantized in f64 straight from the formats' definitions, for the f64
//! reference: bit fields read from the little-endian value stream by their bit position,
//! E2M1 and E4M3 decoded from sign, exponent and mantissa (OCP Microscaling and OCP 8-bit
//! floating point), MLX affine as `s * q + b`. None of it calls the library's decoders.

use crate::model::quant::{PackedMatrix, QuantFormat, Scales};
use crate::model::weights::Weight;

/// Byte `i` of a little-endian word stream.
fn stream_byte(words: &[u32], i: usize) -> u8 {
    words[i / 4].to_le_bytes()[i % 4]
}

/// `bits` bits of the stream from bit `at` (within one word: the formats never split a value).
fn stream_bits(words: &[u32], at: usize, bits: usize) -> u32 {
    (words[at / 32] >> (at % 32)) & ((1u32 << bits) - 1)
}

/// An E2M1 nibble: `(-1)^s * 2^(e - 1) * (1 + m / 2)`, or `(-1)^s * m / 2` when `e = 0`.
pub fn e2m1_f64(n: u8) -> f64 {
    let (s, e, m) = ((n >> 3) & 1, (n >> 1) & 3, n & 1);
    let mag = if e == 0 { 0.5 * m as f64 } else { 2f64.powi(e as i32 - 1) * (1.0 + 0.5 * m as f64) };
    if s == 1 { -mag } else { mag }
}

/// An E4M3 byte: `(-1)^s * 2^(e - 7) * (1 + m / 8)`, subnormal `(-1)^s * 2^-6 * m / 8`;
/// `None` for `e = 15, m = 7` (NaN).
pub fn e4m3_f64(b: u8) -> Option<f64> {
    let (s, e, m) = ((b >> 7) & 1, (b >> 3) & 15, b & 7);
    if e == 15 && m == 7 {
        return None;
    }
    let mag = if e == 0 { 2f64.powi(-6) * m as f64 / 8.0 } else { 2f64.powi(e as i32 - 7) * (1.0 + m as f64 / 8.0) };
    Some(if s == 1 { -mag } else { mag })
}

/// Every value of `m`, row-major, in f64.
pub fn dequantize_f64(m: &PackedMatrix) -> Vec<f64> {
    let (rows, cols, words) = (m.rows(), m.cols(), m.words());
    let mut out = Vec::with_capacity(rows * cols);
    match (m.format(), m.scales()) {
        (QuantFormat::Affine { bits, group, .. }, Scales::Affine { scales, biases }) => {
            let (s, b) = (scales.to_f64_vec(), biases.to_f64_vec());
            let groups = cols / group as usize;
            for r in 0..rows {
                for c in 0..cols {
                    let q = stream_bits(words, (r * cols + c) * bits as usize, bits as usize) as f64;
                    let g = r * groups + c / group as usize;
                    out.push(s[g] * q + b[g]);
                }
            }
        }
        (QuantFormat::Mxfp4, Scales::E8m0(e)) => {
            for r in 0..rows {
                for c in 0..cols {
                    let byte = stream_byte(words, (r * cols + c) / 2);
                    let nib = if c % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    let scale = 2f64.powi(e[r * cols / 32 + c / 32] as i32 - 127);
                    out.push(e2m1_f64(nib) * scale);
                }
            }
        }
        (QuantFormat::Fp8 { block_rows, block_cols }, Scales::Block(s)) => {
            let sc = cols.div_ceil(block_cols as usize);
            for r in 0..rows {
                for c in 0..cols {
                    let v = e4m3_f64(stream_byte(words, r * cols + c)).expect("a checked matrix has no NaN");
                    out.push(v * s[(r / block_rows as usize) * sc + c / block_cols as usize] as f64);
                }
            }
        }
        (f, _) => panic!("a {f} matrix with another format's scales"),
    }
    out
}

/// A weight's values in f64: dense ones widened, packed ones by [`dequantize_f64`].
pub fn weight_f64(w: &Weight) -> Vec<f64> {
    match w {
        Weight::Dense(t) => t.to_f64_vec(),
        Weight::Packed(p) => dequantize_f64(p),
    }
}
