//! Quantized weight formats read at load, decoded to bf16 with one rounding:
//!
//! - **FP8 E4M3** with block scales (DeepSeek-V3, Kimi-K2 and MiniMax-M2 releases: a weight
//!   `[out, in]` in `F8_E4M3` and `weight_scale_inv` `[ceil(out/bn), ceil(in/bk)]` in f32, with
//!   `(bn, bk)` the `weight_block_size`, 128 x 128): `w[r][c] = fp8[r][c] * scale_inv[r/bn][c/bk]`,
//!   the last block row and column partial when `out` or `in` is not a multiple. E4M3 as the OCP
//!   8-bit floating point spec defines it: bias 7, subnormals, no infinities, `S.1111.111` NaN,
//!   largest 448.
//! - **MXFP4** (gpt-oss releases: `*_blocks` `[.., rows, in/32, 16]` `U8` and `*_scales`
//!   `[.., rows, in/32]` `U8`): blocks of 32 E2M1 values sharing one E8M0 scale, as the OCP
//!   Microscaling spec defines them; two values a byte, element `2i` in the low nibble and
//!   `2i + 1` in the high nibble (transformers' `integrations/mxfp4.py`); E8M0 `0xFF` is NaN.
//!
//! Each value is computed exactly in f64 (an E4M3 value times an f32 scale has at most 28
//! significant bits; an E2M1 value times a power of two is exact) and rounded to bf16 once, to
//! nearest even. NaN inputs, NaN or infinite scales and values that overflow bf16 are errors
//! naming the element: a checkpoint that decodes to them is corrupt.
//!
//! The decoders work on one expert's rows at a time (the caller's slice of the memory map), so a
//! layer never holds more than one expert's decoded projection beyond what it keeps.

use half::bf16;

/// The value of an E4M3 byte, exact in f32; `None` for the NaN encodings (`0x7F`, `0xFF`).
#[inline]
pub fn e4m3_value(b: u8) -> Option<f32> {
    E4M3[b as usize]
}

/// The value of an E2M1 nibble (the low four bits of `n`).
#[inline]
pub fn e2m1_value(n: u8) -> f32 {
    E2M1[(n & 0x0F) as usize]
}

/// The power of two an E8M0 scale byte stands for (`2^(b - 127)`); `None` for NaN (`0xFF`).
#[inline]
pub fn e8m0_exponent(b: u8) -> Option<i32> {
    (b != 0xFF).then(|| b as i32 - 127)
}

/// `x` rounded once to bf16, to nearest with ties to even; overflow goes to infinity and NaN
/// stays NaN. Exact for every f64 (not through f32, which would round twice): the f64
/// significand is cut at bf16's last place with the bits below deciding the rounding.
pub fn bf16_round(x: f64) -> bf16 {
    let bits = x.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let exp = ((bits >> 52) & 0x7FF) as i32;
    if exp == 0x7FF {
        return if x.is_nan() { bf16::NAN } else { bf16::from_bits(sign | 0x7F80) };
    }
    if exp == 0 {
        return bf16::from_bits(sign); // f64 subnormals are far below bf16's smallest value
    }
    let e = exp - 1023;
    if e > 127 {
        return bf16::from_bits(sign | 0x7F80);
    }
    // value = m * 2^(e - 52) with a 53-bit significand m; bf16's last place is 2^(e - 7) for
    // normals and 2^-133 below 2^-126.
    let m = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    let shift = if e >= -126 { 45 } else { -81 - e };
    if shift >= 54 {
        return bf16::from_bits(sign);
    }
    let (q, rem, half) = (m >> shift, m & ((1u64 << shift) - 1), 1u64 << (shift - 1));
    let q = q + u64::from(rem > half || (rem == half && q & 1 == 1));
    // Normals: exponent field (e + 127) and the 7 bits below the leading one, a carry out of q
    // moving into the exponent (up to infinity); subnormals: q itself.
    let mag = if e >= -126 { (((e + 127) as u64) << 7) + q - 128 } else { q };
    bf16::from_bits(sign | mag as u16)
}

/// `2^e` as f64, exact for `-1022 <= e <= 1023`.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Why an element could not be decoded; the caller adds the tensor's name.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// Row and column of the element in the decoded `[rows, cols]` matrix.
    pub row: usize,
    pub col: usize,
    pub what: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "element [{}, {}]: {}", self.row, self.col, self.what)
    }
}

/// Block scales of an FP8 matrix: `scale_inv` is `[.., cols.div_ceil(bk)]` f32 values (little
/// endian bytes); row `r` of the decoded slab uses scale row `(row0 + r) / bn` of it.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Scales<'a> {
    /// Little-endian f32 scales, row-major, `cols.div_ceil(block.1)` per row.
    pub scale_inv: &'a [u8],
    /// `(bn, bk)`: rows and columns a scale covers.
    pub block: (usize, usize),
    /// The row, within the matrix the scale grid was made for, of the slab's first row.
    pub row0: usize,
}

/// Decode an FP8 E4M3 slab `data` (`rows x cols` bytes) with its block scales to bf16.
pub fn fp8_to_bf16(data: &[u8], rows: usize, cols: usize, s: Fp8Scales<'_>) -> Result<Vec<bf16>, DecodeError> {
    let (bn, bk) = s.block;
    let scols = cols.div_ceil(bk);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = (s.row0 + r) / bn;
        let scales = &s.scale_inv[srow * scols * 4..(srow + 1) * scols * 4];
        for (c, &b) in data[r * cols..(r + 1) * cols].iter().enumerate() {
            let o = (c / bk) * 4;
            let scale = f32::from_le_bytes([scales[o], scales[o + 1], scales[o + 2], scales[o + 3]]);
            let err = |what: String| DecodeError { row: r, col: c, what };
            let v = e4m3_value(b).ok_or_else(|| err(format!("FP8 byte {b:#04x} is NaN")))?;
            if !scale.is_finite() {
                return Err(err(format!("its block scale is {scale}")));
            }
            let w = bf16_round(v as f64 * scale as f64);
            if w.is_infinite() {
                return Err(err(format!("{v} * {scale} overflows bf16")));
            }
            out.push(w);
        }
    }
    Ok(out)
}

/// Decode an MXFP4 slab to bf16: `blocks` holds `rows x cols / 2` bytes (`cols / 32` blocks of
/// 16 bytes a row), `scales` `rows x cols / 32` E8M0 bytes. `cols` is a multiple of 32.
pub fn mxfp4_to_bf16(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Result<Vec<bf16>, DecodeError> {
    let g = cols / 32;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for b in 0..g {
            let s = scales[r * g + b];
            let exp =
                e8m0_exponent(s).ok_or(DecodeError { row: r, col: b * 32, what: "its E8M0 scale is NaN".into() })?;
            let scale = pow2(exp);
            for (i, &byte) in blocks[(r * g + b) * 16..(r * g + b + 1) * 16].iter().enumerate() {
                for (j, nib) in [byte & 0x0F, byte >> 4].into_iter().enumerate() {
                    let w = bf16_round(e2m1_value(nib) as f64 * scale);
                    if w.is_infinite() {
                        let col = b * 32 + 2 * i + j;
                        return Err(DecodeError { row: r, col, what: format!("2^{exp} * E2M1 overflows bf16") });
                    }
                    out.push(w);
                }
            }
        }
    }
    Ok(out)
}

/// E4M3 values by byte: `(-1)^s * 2^(e-7) * (1 + m/8)`, subnormal `2^-6 * m/8`, NaN at e=15, m=7.
pub(crate) const E4M3: [Option<f32>; 256] = {
    let mut t = [None; 256];
    let mut b = 0;
    while b < 256 {
        let (s, e, m) = ((b >> 7) & 1, (b >> 3) & 0xF, b & 7);
        if !(e == 15 && m == 7) {
            // value * 2^10 is an integer: (8 + m) * 2^e for normals, 2 * m for subnormals.
            let scaled = if e == 0 { (2 * m) as f32 } else { ((8 + m) << e) as f32 };
            let v = scaled / 1024.0;
            t[b] = Some(if s == 1 { -v } else { v });
        }
        b += 1;
    }
    t
};

/// E2M1 values by nibble (OCP MX: bias 1, one mantissa bit, subnormal 0.5).
pub(crate) const E2M1: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
