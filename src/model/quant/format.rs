//! The packed weight formats and their bit layouts.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// How the values of a packed weight matrix `[rows, cols]` (rows are outputs, columns inputs,
/// as Hugging Face and MLX store a linear layer) are stored. Every format packs the values
/// of a row in input order into a stream of bytes, rows one after another, and that stream
/// into little-endian 32-bit words (byte `i` of the stream is bits `8 (i % 4) ..` of word
/// `i / 4`); the scales are kept beside it ([`crate::model::quant::Scales`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QuantFormat {
    /// MLX's affine quantization (`mx.quantize(w, group_size, bits)`, mode `affine`):
    /// `bits` = 4 or 8, `group` = 32, 64 or 128 consecutive inputs of a row share a scale `s`
    /// and a bias `b` (both of dtype `scales`, f32, f16 or bf16; `s` may be negative), and
    /// `w = s * q + b` with `q` an unsigned `bits`-bit integer. Value `j` of a row is bits
    /// `bits * (j % (32 / bits)) ..` of the row's word `j / (32 / bits)`: MLX's `uint32`
    /// `weight` `[rows, cols * bits / 32]`, low bits first. Scales and biases are
    /// `[rows, cols / group]`.
    Affine { bits: u32, group: u32, scales: DType },
    /// MXFP4 (OCP Microscaling): blocks of 32 consecutive inputs share one E8M0 scale byte
    /// `e` (`2^(e - 127)`; `0xFF` is NaN); each value is an E2M1 nibble (sign, two exponent
    /// bits of bias 1, one mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6), element `2i` in the low
    /// nibble of byte `i`, `2i + 1` in its high nibble (gpt-oss's `_blocks`, and MLX's
    /// `mxfp4` mode, whose `uint32` words hold the same bytes). Scales `[rows, cols / 32]`.
    Mxfp4,
    /// FP8 E4M3 (OCP 8-bit floating point: bias 7, subnormals, no infinities, `S.1111.111`
    /// NaN, largest 448), one byte a value, times an f32 scale per block of
    /// `block_rows x block_cols` (DeepSeek-V3's `weight_scale_inv`
    /// `[ceil(rows / bn), ceil(cols / bk)]`, partial blocks at the edges).
    Fp8 { block_rows: u32, block_cols: u32 },
}

impl QuantFormat {
    /// MLX affine with `bits` and `group`, scales and biases of `scales`; errors for values
    /// MLX does not make (bits other than 4 and 8, groups other than 32, 64, 128).
    pub fn affine(bits: u32, group: u32, scales: DType) -> Result<Self> {
        if !matches!(bits, 4 | 8) {
            return Err(Error::invalid(format!("affine quantization with {bits} bits: 4 and 8 are supported")));
        }
        if !matches!(group, 32 | 64 | 128) {
            return Err(Error::invalid(format!("affine quantization groups of {group}: 32, 64 and 128 are supported")));
        }
        Ok(QuantFormat::Affine { bits, group, scales })
    }

    /// FP8 E4M3 with scale blocks of `(rows, cols)`; errors for a zero size.
    pub fn fp8(block: (usize, usize)) -> Result<Self> {
        let ok = |v: usize| v > 0 && v <= u32::MAX as usize;
        if !ok(block.0) || !ok(block.1) {
            return Err(Error::invalid(format!("FP8 scale blocks of {block:?}: both sizes must be positive")));
        }
        Ok(QuantFormat::Fp8 { block_rows: block.0 as u32, block_cols: block.1 as u32 })
    }

    /// Bits of one value.
    pub fn bits(self) -> u32 {
        match self {
            QuantFormat::Affine { bits, .. } => bits,
            QuantFormat::Mxfp4 => 4,
            QuantFormat::Fp8 { .. } => 8,
        }
    }

    /// Inputs that share a scale along a row (FP8: a block's columns).
    pub fn group(self) -> usize {
        match self {
            QuantFormat::Affine { group, .. } => group as usize,
            QuantFormat::Mxfp4 => 32,
            QuantFormat::Fp8 { block_cols, .. } => block_cols as usize,
        }
    }

    /// Short name for tables and logs: `q4g64-bf16`, `mxfp4`, `fp8-128x128`.
    pub fn name(self) -> String {
        match self {
            QuantFormat::Affine { bits, group, scales } => format!("q{bits}g{group}-{scales}"),
            QuantFormat::Mxfp4 => "mxfp4".into(),
            QuantFormat::Fp8 { block_rows, block_cols } => format!("fp8-{block_rows}x{block_cols}"),
        }
    }

    /// Bytes of one row's values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols * self.bits() as usize / 8
    }

    /// Checks that a `[rows, cols]` matrix can be stored in this format: affine and MXFP4 need
    /// whole groups along each row (MLX leaves a matrix dense otherwise).
    pub fn check_shape(self, rows: usize, cols: usize) -> Result<()> {
        let g = self.group();
        if !matches!(self, QuantFormat::Fp8 { .. }) && !cols.is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "a [{rows}, {cols}] matrix cannot be stored as {}: its {cols} inputs are not groups of {g}",
                self.name()
            )));
        }
        if rows.checked_mul(cols).and_then(|n| n.checked_mul(4)).is_none() {
            return Err(Error::invalid(format!("a [{rows}, {cols}] matrix overflows the address space")));
        }
        Ok(())
    }

    /// Bytes of a `[rows, cols]` matrix in this format: the values, and the scales (and
    /// biases) beside them.
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        let values = rows * self.row_bytes(cols);
        values
            + match self {
                QuantFormat::Affine { group, scales, .. } => 2 * rows * (cols / group as usize) * scales.size(),
                QuantFormat::Mxfp4 => rows * cols / 32,
                QuantFormat::Fp8 { block_rows, block_cols } => {
                    4 * rows.div_ceil(block_rows as usize) * cols.div_ceil(block_cols as usize)
                }
            }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The kind of a weight matrix: plain values of a dtype, or a packed format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightKind {
    Dense(DType),
    Packed(QuantFormat),
}

impl std::fmt::Display for WeightKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightKind::Dense(d) => write!(f, "{d}"),
            WeightKind::Packed(q) => write!(f, "{q}"),
        }
    }
}
