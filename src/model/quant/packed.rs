//! A weight matrix kept in its packed form: the value bytes as little-endian words and the
//! scales beside them, checked once at construction so that every value decodes to a finite
//! f32.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::checkpoint::dequant::{e2m1_value, e4m3_value, e8m0_exponent};
use crate::model::quant::format::QuantFormat;
use crate::tensor::Tensor;

/// The scales of a [`PackedMatrix`], by format.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// Affine: a scale and a bias per `(row, group)`, both `[rows, cols / group]` tensors of
    /// the format's scale dtype.
    Affine { scales: Tensor, biases: Tensor },
    /// MXFP4: one E8M0 byte per `(row, block of 32)`, `[rows, cols / 32]`.
    E8m0(Vec<u8>),
    /// FP8: one f32 per `block_rows x block_cols` block, `[ceil(rows / bn), ceil(cols / bk)]`.
    Block(Vec<f32>),
}

/// A `[rows, cols]` weight matrix (rows are outputs) in a packed [`QuantFormat`]: the byte
/// stream of its values (row after row, `format.row_bytes(cols)` bytes a row) in
/// little-endian 32-bit words, zero-padded to a whole word, and its [`Scales`].
///
/// Every constructor checks sizes and values: scales must be finite (MXFP4: not `0xFF`),
/// FP8 codes must not be NaN, and no value may decode to more than `f32::MAX`, so that
/// [`PackedMatrix::decode_row`] always gives finite values.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    words: Vec<u32>,
    scales: Scales,
}

/// Little-endian words of a byte stream, the last one zero-padded.
pub fn words_of_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

impl PackedMatrix {
    /// A matrix of `format` from its words and scales; errors (naming the element) for sizes
    /// that do not match `[rows, cols]` or values that do not decode to finite f32.
    pub fn new(format: QuantFormat, rows: usize, cols: usize, words: Vec<u32>, scales: Scales) -> Result<Self> {
        format.check_shape(rows, cols)?;
        let want = (rows * format.row_bytes(cols)).div_ceil(4);
        if words.len() != want {
            return Err(Error::invalid(format!(
                "a [{rows}, {cols}] {format} matrix needs {want} words of values, got {}",
                words.len()
            )));
        }
        let m = PackedMatrix { format, rows, cols, words, scales };
        match (format, &m.scales) {
            (QuantFormat::Affine { .. }, Scales::Affine { .. }) => m.check_affine()?,
            (QuantFormat::Mxfp4, Scales::E8m0(_)) => m.check_mxfp4()?,
            (QuantFormat::Fp8 { .. }, Scales::Block(_)) => m.check_fp8()?,
            _ => return Err(Error::invalid(format!("{format} values with scales of another format"))),
        }
        Ok(m)
    }

    /// MLX affine: `words` as MLX's `uint32` `weight` `[rows, cols * bits / 32]`, `scales`
    /// and `biases` `[rows, cols / group]` (f32, f16 or bf16, both the same dtype).
    pub fn affine(
        rows: usize,
        cols: usize,
        bits: u32,
        group: u32,
        words: Vec<u32>,
        scales: Tensor,
        biases: Tensor,
    ) -> Result<Self> {
        let format = QuantFormat::affine(bits, group, scales.dtype())?;
        Self::new(format, rows, cols, words, Scales::Affine { scales, biases })
    }

    /// MXFP4: `values` the `rows * cols / 2` bytes of the blocks, `scales` the
    /// `rows * cols / 32` E8M0 bytes.
    pub fn mxfp4(rows: usize, cols: usize, values: &[u8], scales: Vec<u8>) -> Result<Self> {
        Self::new(QuantFormat::Mxfp4, rows, cols, words_of_bytes(values), Scales::E8m0(scales))
    }

    /// FP8 E4M3: `values` the `rows * cols` bytes, `scales` the block grid of `block`.
    pub fn fp8(rows: usize, cols: usize, block: (usize, usize), values: &[u8], scales: Vec<f32>) -> Result<Self> {
        Self::new(QuantFormat::fp8(block)?, rows, cols, words_of_bytes(values), Scales::Block(scales))
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The value bytes as little-endian words.
    pub fn words(&self) -> &[u32] {
        &self.words
    }
    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    /// Byte `i` of the value stream.
    #[inline]
    pub fn byte(&self, i: usize) -> u8 {
        (self.words[i / 4] >> (8 * (i % 4))) as u8
    }

    /// Bytes of the values alone (what a kernel streams besides the scales).
    pub fn value_bytes(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }

    /// Bytes of the scales (and biases).
    pub fn scale_bytes(&self) -> usize {
        match &self.scales {
            Scales::Affine { scales, biases } => scales.as_bytes().len() + biases.as_bytes().len(),
            Scales::E8m0(s) => s.len(),
            Scales::Block(s) => 4 * s.len(),
        }
    }

    /// Bytes of values and scales.
    pub fn bytes(&self) -> usize {
        self.value_bytes() + self.scale_bytes()
    }

    /// Row `r`'s values as f32 into `out` (`cols` long): affine `s * q + b` rounded once
    /// (exactly `fma(s, q, b)`), MXFP4 `e2m1 * 2^(e - 127)` (exact), FP8 `e4m3 * scale`
    /// rounded once. Panics when `r >= rows` or `out` is not `cols` long.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "decode_row: row {r} of {} into {}", self.rows, out.len());
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: this CPU has AVX2 and FMA.
            return unsafe { self.decode_row_avx2(r, out) };
        }
        self.decode_row_any(r, out)
    }

    /// [`PackedMatrix::decode_row`] compiled for AVX2 and FMA (the same operations: Rust
    /// never fuses `s * q + b` on its own, so the values are the same bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_row_avx2(&self, r: usize, out: &mut [f32]) {
        self.decode_row_any(r, out)
    }

    #[inline(always)]
    fn decode_row_any(&self, r: usize, out: &mut [f32]) {
        match (&self.scales, self.format) {
            (Scales::Affine { scales, biases }, QuantFormat::Affine { bits, group, .. }) => {
                self.affine_row(r, bits, group as usize, scales, biases, out)
            }
            (Scales::E8m0(s), _) => self.mxfp4_row(r, s, out),
            (Scales::Block(s), QuantFormat::Fp8 { block_rows, block_cols }) => {
                self.fp8_row(r, (block_rows as usize, block_cols as usize), s, out)
            }
            _ => unreachable!("checked at construction"),
        }
    }

    #[inline(always)]
    fn affine_row(&self, r: usize, bits: u32, group: usize, scales: &Tensor, biases: &Tensor, out: &mut [f32]) {
        let per_word = (32 / bits) as usize;
        let row_words = self.cols / per_word;
        let words = &self.words[r * row_words..(r + 1) * row_words];
        let fused = scales.dtype() == DType::F32;
        for (g, (o, w)) in out.chunks_exact_mut(group).zip(words.chunks_exact(group / per_word)).enumerate() {
            let s = scales.get_f32(r, g).expect("in range");
            let b = biases.get_f32(r, g).expect("in range");
            // A 16-bit scale times q (at most 19 significant bits) is exact in f32, so the
            // sum is the one rounding; an f32 scale needs the fused form.
            match (bits, fused) {
                (4, false) => affine_words::<8, 4>(w, s, b, o, |s, q, b| s * q + b),
                (8, false) => affine_words::<4, 8>(w, s, b, o, |s, q, b| s * q + b),
                (4, true) => affine_words::<8, 4>(w, s, b, o, f32::mul_add),
                _ => affine_words::<4, 8>(w, s, b, o, f32::mul_add),
            }
        }
    }

    /// The value stream's bytes from `start`, `len` of them.
    #[inline(always)]
    fn bytes_at(&self, start: usize, len: usize) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(&bytemuck::cast_slice::<u32, u8>(&self.words)[start..start + len])
        } else {
            std::borrow::Cow::Owned((start..start + len).map(|i| self.byte(i)).collect())
        }
    }

    #[inline(always)]
    fn mxfp4_row(&self, r: usize, scales: &[u8], out: &mut [f32]) {
        let blocks = self.cols / 32;
        let bytes = self.bytes_at(r * self.cols / 2, self.cols / 2);
        for (b, (o, blk)) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(16)).enumerate() {
            let e = e8m0_exponent(scales[r * blocks + b]).expect("checked at construction");
            let scale = pow2_f32(e);
            for (pair, &byte) in o.chunks_exact_mut(2).zip(blk) {
                pair[0] = E2M1_F32[(byte & 0x0F) as usize] * scale;
                pair[1] = E2M1_F32[(byte >> 4) as usize] * scale;
            }
        }
    }

    #[inline(always)]
    fn fp8_row(&self, r: usize, (bn, bk): (usize, usize), scales: &[f32], out: &mut [f32]) {
        let srow = &scales[(r / bn) * self.cols.div_ceil(bk)..];
        let bytes = self.bytes_at(r * self.cols, self.cols);
        for ((o, blk), &scale) in out.chunks_mut(bk).zip(bytes.chunks(bk)).zip(srow) {
            for (v, &b) in o.iter_mut().zip(blk) {
                *v = E4M3_F32[b as usize] * scale;
            }
        }
    }

    /// The whole matrix decoded ([`PackedMatrix::decode_row`]), rounded to `dtype`.
    pub fn to_tensor(&self, dtype: DType) -> Tensor {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, row) in v.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.decode_row(r, row);
        }
        Tensor::from_f32(dtype, self.rows, self.cols, &v).expect("shape from a valid matrix")
    }

    /// Rows `r0..r1` as a matrix of their own (FP8: `r0` on a scale block's first row, `r1`
    /// on a block boundary or the end).
    pub fn slice_rows(&self, r0: usize, r1: usize) -> Result<PackedMatrix> {
        if r0 > r1 || r1 > self.rows {
            return Err(Error::invalid(format!("row range {r0}..{r1} outside a packed matrix of {} rows", self.rows)));
        }
        let rb = self.format.row_bytes(self.cols);
        let bytes: Vec<u8> = (r0 * rb..r1 * rb).map(|i| self.byte(i)).collect();
        let words = words_of_bytes(&bytes);
        let scales = match &self.scales {
            Scales::Affine { scales, biases } => {
                Scales::Affine { scales: scales.slice_rows(r0, r1)?, biases: biases.slice_rows(r0, r1)? }
            }
            Scales::E8m0(s) => {
                let per = self.cols / 32;
                Scales::E8m0(s[r0 * per..r1 * per].to_vec())
            }
            Scales::Block(s) => {
                let QuantFormat::Fp8 { block_rows, block_cols } = self.format else { unreachable!() };
                let (bn, sc) = (block_rows as usize, self.cols.div_ceil(block_cols as usize));
                if !r0.is_multiple_of(bn) || (!r1.is_multiple_of(bn) && r1 != self.rows) {
                    return Err(Error::invalid(format!("rows {r0}..{r1} of FP8 scale blocks of {bn} rows")));
                }
                Scales::Block(s[r0 / bn * sc..r1.div_ceil(bn) * sc].to_vec())
            }
        };
        PackedMatrix::new(self.format, r1 - r0, self.cols, words, scales)
    }

    fn check_affine(&self) -> Result<()> {
        let (Scales::Affine { scales, biases }, QuantFormat::Affine { bits, group, scales: sdt }) =
            (&self.scales, self.format)
        else {
            unreachable!()
        };
        let groups = self.cols / group as usize;
        for (t, what) in [(scales, "scales"), (biases, "biases")] {
            t.expect(&format!("affine {what}"), sdt, Some(self.rows), groups)?;
        }
        let qmax = ((1u32 << bits) - 1) as f64;
        for r in 0..self.rows {
            for g in 0..groups {
                let (s, b) = (scales.get_f32(r, g).expect("in range"), biases.get_f32(r, g).expect("in range"));
                if !s.is_finite() || !b.is_finite() || (s as f64).abs() * qmax + (b as f64).abs() > f32::MAX as f64 {
                    return Err(Error::invalid(format!(
                        "affine group [{r}, {g}]: scale {s} and bias {b} do not give finite f32 weights"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_mxfp4(&self) -> Result<()> {
        let Scales::E8m0(s) = &self.scales else { unreachable!() };
        let blocks = self.cols / 32;
        if s.len() != self.rows * blocks {
            return Err(Error::invalid(format!(
                "MXFP4 [{}, {}] needs {} scale bytes, got {}",
                self.rows,
                self.cols,
                self.rows * blocks,
                s.len()
            )));
        }
        for (i, &e) in s.iter().enumerate() {
            let (r, b) = (i / blocks.max(1), i % blocks.max(1));
            let exp = e8m0_exponent(e)
                .ok_or_else(|| Error::invalid(format!("MXFP4 element [{r}, {}]: its E8M0 scale is NaN", b * 32)))?;
            let top = (0..16)
                .map(|j| self.byte((r * blocks + b) * 16 + j))
                .map(|x| e2m1_value(x & 0x0F).abs().max(e2m1_value(x >> 4).abs()))
                .fold(0f32, f32::max);
            if top as f64 * 2f64.powi(exp) > f32::MAX as f64 {
                return Err(Error::invalid(format!("MXFP4 element [{r}, {}]: 2^{exp} * {top} overflows f32", b * 32)));
            }
        }
        Ok(())
    }

    fn check_fp8(&self) -> Result<()> {
        let (Scales::Block(s), QuantFormat::Fp8 { block_rows, block_cols }) = (&self.scales, self.format) else {
            unreachable!()
        };
        let (bn, bk) = (block_rows as usize, block_cols as usize);
        let sc = self.cols.div_ceil(bk);
        if s.len() != self.rows.div_ceil(bn) * sc {
            return Err(Error::invalid(format!(
                "FP8 [{}, {}] with {bn}x{bk} blocks needs {} scales, got {}",
                self.rows,
                self.cols,
                self.rows.div_ceil(bn) * sc,
                s.len()
            )));
        }
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = self.byte(r * self.cols + c);
                let scale = s[(r / bn) * sc + c / bk];
                let v = e4m3_value(b)
                    .ok_or_else(|| Error::invalid(format!("FP8 element [{r}, {c}]: byte {b:#04x} is NaN")))?;
                if !scale.is_finite() || !(v * scale).is_finite() {
                    return Err(Error::invalid(format!("FP8 element [{r}, {c}]: {v} * {scale} is not a finite f32")));
                }
            }
        }
        Ok(())
    }
}

/// Values of one group's words (`P` values of `B` bits a word, low bits first) as `op(s, q, b)`.
#[inline(always)]
fn affine_words<const P: usize, const B: u32>(
    w: &[u32],
    s: f32,
    b: f32,
    out: &mut [f32],
    op: impl Fn(f32, f32, f32) -> f32,
) {
    let mask = (1u32 << B) - 1;
    for (o, &word) in out.chunks_exact_mut(P).zip(w) {
        for (j, v) in o.iter_mut().enumerate() {
            *v = op(s, ((word >> (B as usize * j)) & mask) as f32, b);
        }
    }
}

/// E2M1 values by nibble (the library's table, as f32).
const E2M1_F32: [f32; 16] = {
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = crate::model::checkpoint::dequant::E2M1[i];
        i += 1;
    }
    t
};

/// E4M3 values by byte, NaN for the two NaN codes (which no checked matrix holds).
const E4M3_F32: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = match crate::model::checkpoint::dequant::E4M3[i] {
            Some(v) => v,
            None => f32::NAN,
        };
        i += 1;
    }
    t
};

/// `2^e` as f32 for `-127 <= e <= 127` (2^-127 is subnormal, exact).
fn pow2_f32(e: i32) -> f32 {
    if e >= -126 { f32::from_bits(((e + 127) as u32) << 23) } else { f32::from_bits(1 << (149 + e)) }
}
