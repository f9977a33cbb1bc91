//! Tensor layouts and encodings of expert weights, and one expert projection as stored: the
//! raw bytes of its slice of the file and its scales ([`RawProjection`]), decoded on demand.
//! A quantized-experts path can take the raw slice as it is; the dense path decodes it.

use half::bf16;

use crate::dtype::DType;
use crate::model::checkpoint::dequant::{self, Fp8Scales};
use crate::tensor::Tensor;

/// How the routed experts of a layer are laid out in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// One tensor per expert and projection (`experts.{e}.gate_proj.weight`, Mixtral's `w1`).
    PerExpert,
    /// Tensors holding every expert: `gate_up_proj` `[E, 2F, D]` or `[E, D, 2F]` and `down_proj`
    /// (transformers 5, gpt-oss, Llama 4), or DBRX's `w1`/`v1`/`w2` `[E * F, D]`.
    Fused,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::PerExpert => "per-expert",
            Layout::Fused => "fused",
        })
    }
}

/// How a projection's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Plain values of this dtype.
    Dense(DType),
    /// FP8 E4M3 with f32 block scales (`weight_scale_inv`) of `block` = (rows, cols).
    Fp8E4M3 { block: (usize, usize) },
    /// MXFP4: E2M1 values in blocks of 32 along the input, one E8M0 scale each.
    Mxfp4,
}

impl Encoding {
    /// The dtype the weights have once read (quantized encodings decode to bf16).
    pub fn decoded(self) -> DType {
        match self {
            Encoding::Dense(d) => d,
            _ => DType::BF16,
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Dense(d) => write!(f, "{d}"),
            Encoding::Fp8E4M3 { block } => write!(f, "fp8-e4m3 ({}x{} block scales) -> bf16", block.0, block.1),
            Encoding::Mxfp4 => f.write_str("mxfp4 (e2m1, e8m0 scales per 32) -> bf16"),
        }
    }
}

/// One projection of one expert as the file stores it, borrowed from the memory map.
///
/// The values come from a stored matrix `stored = [rows, cols]` (one expert's part of a fused
/// tensor, or a whole per-expert tensor): output `j` of the projection is stored row
/// `first + j * step` (`in_major = false`: rows are outputs, columns inputs) or stored column
/// `first + j * step` (`in_major = true`: dense only, rows are inputs).
#[derive(Debug, Clone, Copy)]
pub struct RawProjection<'a> {
    pub encoding: Encoding,
    /// Output and input features: the decoded matrix is `[out, inp]`.
    pub out: usize,
    pub inp: usize,
    /// The stored matrix's bytes: dense values, FP8 bytes, or MXFP4 blocks (`cols / 2` bytes a row).
    pub data: &'a [u8],
    pub stored: [usize; 2],
    /// FP8: little-endian f32 `[ceil(rows / bn), ceil(cols / bk)]`, stored row `r` using scale
    /// row `r / bn`; MXFP4: E8M0 `[rows, cols / 32]`.
    pub scales: Option<&'a [u8]>,
    pub first: usize,
    pub step: usize,
    pub in_major: bool,
}

impl RawProjection<'_> {
    /// The projection as a `[out, inp]` tensor of dtype `to` (dense values as stored, then
    /// widened to `to` exactly; quantized ones decoded to bf16 with one rounding). Errors (without
    /// the tensor's name, which the caller adds) for values that do not decode.
    pub fn decode(&self, to: DType) -> Result<Tensor, String> {
        let t = match self.encoding {
            Encoding::Dense(d) => self.dense(d),
            Encoding::Fp8E4M3 { block } => self.fp8(block)?,
            Encoding::Mxfp4 => self.mxfp4()?,
        };
        Ok(if t.dtype() == to { t } else { t.to_dtype(to) })
    }

    fn dense(&self, d: DType) -> Tensor {
        let (es, [_, cols]) = (d.size(), self.stored);
        let mut t = Tensor::zeros(d, self.out, self.inp);
        let dst = t.as_bytes_mut();
        if !self.in_major && self.step == 1 {
            dst.copy_from_slice(&self.data[self.first * cols * es..(self.first + self.out) * cols * es]);
        } else if !self.in_major {
            for j in 0..self.out {
                let r = self.first + j * self.step;
                dst[j * cols * es..(j + 1) * cols * es].copy_from_slice(&self.data[r * cols * es..(r + 1) * cols * es]);
            }
        } else {
            // Stored [inp, cols]: output j is column first + j * step.
            for j in 0..self.out {
                let c = self.first + j * self.step;
                for i in 0..self.inp {
                    let src = (i * cols + c) * es;
                    dst[(j * self.inp + i) * es..(j * self.inp + i + 1) * es]
                        .copy_from_slice(&self.data[src..src + es]);
                }
            }
        }
        t
    }

    fn fp8(&self, block: (usize, usize)) -> Result<Tensor, String> {
        let cols = self.stored[1];
        let scales = self.scales.ok_or("FP8 weights without their scales")?;
        let mut out = Vec::with_capacity(self.out * self.inp);
        for j in 0..self.out {
            let r = self.first + j * self.step;
            let s = Fp8Scales { scale_inv: scales, block, row0: r };
            let row = dequant::fp8_to_bf16(&self.data[r * cols..(r + 1) * cols], 1, cols, s)
                .map_err(|e| format!("element [{r}, {}]: {}", e.col, e.what))?;
            out.extend(row);
        }
        tensor_bf16(self.out, self.inp, out)
    }

    fn mxfp4(&self) -> Result<Tensor, String> {
        let cols = self.stored[1];
        let (g, scales) = (cols / 32, self.scales.ok_or("MXFP4 blocks without their scales")?);
        let mut out = Vec::with_capacity(self.out * self.inp);
        for j in 0..self.out {
            let r = self.first + j * self.step;
            let row = dequant::mxfp4_to_bf16(
                &self.data[r * cols / 2..(r + 1) * cols / 2],
                &scales[r * g..(r + 1) * g],
                1,
                cols,
            )
            .map_err(|e| format!("element [{r}, {}]: {}", e.col, e.what))?;
            out.extend(row);
        }
        tensor_bf16(self.out, self.inp, out)
    }

    /// Bytes of the stored matrix and its scales (what reading it touches).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.map_or(0, <[u8]>::len)
    }
}

fn tensor_bf16(rows: usize, cols: usize, v: Vec<bf16>) -> Result<Tensor, String> {
    Tensor::from_vec(rows, cols, v).map_err(|e| e.to_string())
}
