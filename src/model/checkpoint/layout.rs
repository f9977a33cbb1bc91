//! Tensor layouts and encodings of expert weights, and one expert projection as stored: the
//! raw bytes of its slice of the file and its scales ([`RawProjection`]), decoded on demand.
//! A quantized-experts path can take the raw slice as it is; the dense path decodes it.

use half::bf16;

use crate::dtype::DType;
use crate::model::checkpoint::dequant::{self, Fp8Scales};
use crate::model::quant::{PackedMatrix, QuantFormat, Scales, words_of_bytes};
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
    /// MLX affine: `bits`-bit integers in `uint32` words, a scale and a bias of dtype
    /// `scales` per `group` inputs (mlx-lm's `.weight`, `.scales`, `.biases`).
    Affine { bits: u32, group: u32, scales: DType },
}

impl Encoding {
    /// The dtype the weights have once read (FP8 and MXFP4 decode to bf16, MLX affine to its
    /// scales' dtype, as MLX's `dequantize` gives).
    pub fn decoded(self) -> DType {
        match self {
            Encoding::Dense(d) => d,
            Encoding::Affine { scales, .. } => scales,
            _ => DType::BF16,
        }
    }

    /// The packed format of a quantized encoding, `None` for dense values.
    pub fn format(self) -> Option<QuantFormat> {
        match self {
            Encoding::Dense(_) => None,
            Encoding::Fp8E4M3 { block } => {
                Some(QuantFormat::Fp8 { block_rows: block.0 as u32, block_cols: block.1 as u32 })
            }
            Encoding::Mxfp4 => Some(QuantFormat::Mxfp4),
            Encoding::Affine { bits, group, scales } => Some(QuantFormat::Affine { bits, group, scales }),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Dense(d) => write!(f, "{d}"),
            Encoding::Fp8E4M3 { block } => write!(f, "fp8-e4m3 ({}x{} block scales)", block.0, block.1),
            Encoding::Mxfp4 => f.write_str("mxfp4 (e2m1, e8m0 scales per 32)"),
            Encoding::Affine { bits, group, scales } => {
                write!(f, "mlx affine {bits}-bit, groups of {group}, {scales} scales and biases")
            }
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
    /// row `r / bn`; MXFP4: E8M0 `[rows, cols / 32]`; affine: `[rows, cols / group]` of the
    /// scale dtype.
    pub scales: Option<&'a [u8]>,
    /// Affine: the biases, shaped as the scales.
    pub biases: Option<&'a [u8]>,
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
            Encoding::Affine { .. } => self.packed()?.to_tensor(to),
        };
        Ok(if t.dtype() == to { t } else { t.to_dtype(to) })
    }

    /// The stored row of output `j` (`in_major` projections are dense only).
    fn row_of(&self, j: usize) -> usize {
        self.first + j * self.step
    }

    /// The projection kept packed (quantized encodings): its rows' value bytes and scales
    /// copied out of the map. Errors for dense values, and for values that do not decode
    /// (NaN codes or scales, overflows), naming the element.
    pub fn packed(&self) -> Result<PackedMatrix, String> {
        let format = self.encoding.format().ok_or("dense values are not packed")?;
        let cols = self.stored[1];
        let scales = self.scales.ok_or("quantized values without their scales")?;
        let rb = format.row_bytes(cols);
        let mut values = Vec::with_capacity(self.out * rb);
        for j in 0..self.out {
            let r = self.row_of(j);
            values.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        let per_row = |bytes: &[u8], n: usize| -> Vec<u8> {
            (0..self.out).flat_map(|j| bytes[self.row_of(j) * n..(self.row_of(j) + 1) * n].iter().copied()).collect()
        };
        let sc = match format {
            QuantFormat::Affine { group, scales: dt, .. } => {
                let n = cols / group as usize * dt.size();
                let biases = self.biases.ok_or("affine values without their biases")?;
                let t =
                    |b: Vec<u8>| Tensor::from_bytes(dt, self.out, cols / group as usize, &b).map_err(|e| e.to_string());
                Scales::Affine { scales: t(per_row(scales, n))?, biases: t(per_row(biases, n))? }
            }
            QuantFormat::Mxfp4 => Scales::E8m0(per_row(scales, cols / 32)),
            QuantFormat::Fp8 { block_rows, .. } => {
                if self.step != 1 || !self.first.is_multiple_of(block_rows as usize) {
                    return Err("FP8 rows that do not start a scale block".into());
                }
                let sc = cols.div_ceil(format.group());
                let r0 = self.first / block_rows as usize;
                let srows = self.out.div_ceil(block_rows as usize);
                Scales::Block(
                    scales[r0 * sc * 4..(r0 + srows) * sc * 4]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
        };
        PackedMatrix::new(format, self.out, self.inp, words_of_bytes(&values), sc).map_err(|e| e.to_string())
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
        self.data.len() + self.scales.map_or(0, <[u8]>::len) + self.biases.map_or(0, <[u8]>::len)
    }
}

fn tensor_bf16(rows: usize, cols: usize, v: Vec<bf16>) -> Result<Tensor, String> {
    Tensor::from_vec(rows, cols, v).map_err(|e| e.to_string())
}
