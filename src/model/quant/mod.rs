//! Packed (quantized) weight matrices, kept packed from the files to the kernels:
//! MLX's affine 4- and 8-bit groups, MXFP4 and FP8 E4M3 with block scales
//! ([`QuantFormat`], whose docs give each bit layout), held as a [`PackedMatrix`] (values as
//! little-endian words, scales beside them) inside an expert's [`crate::model::weights::Weight`].
//!
//! [`affine::quantize`] turns dense weights into MLX's affine form with MLX's own rounding
//! (quantize at load); [`PackedMatrix::decode_row`] gives a row's values as f32, exactly
//! as the formats define them.

pub mod affine;
mod format;
mod packed;

pub use affine::MlxKernel;
pub use format::{QuantFormat, WeightKind};
pub use packed::{PackedMatrix, Scales, words_of_bytes};

/// Quantize-at-load settings: MLX affine quantization of a dense checkpoint's routed experts
/// (`quantize: {bits, group_size}`), scales and biases in the weights' dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quantize {
    /// 4 or 8.
    pub bits: u32,
    /// 32, 64 or 128.
    pub group_size: u32,
    /// Which of MLX's implementations' rounding to reproduce.
    #[serde(default)]
    pub kernel: MlxKernel,
}

impl Quantize {
    /// `bits` and `group_size` with MLX's GPU rounding; errors for values MLX does not make.
    pub fn new(bits: u32, group_size: u32) -> crate::Result<Self> {
        QuantFormat::affine(bits, group_size, crate::DType::BF16)?;
        Ok(Quantize { bits, group_size, kernel: MlxKernel::Gpu })
    }
}
