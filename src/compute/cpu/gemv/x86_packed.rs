//! Packed weights times f32 rows on AVX-512: MLX affine (4 and 8 bits), MXFP4 and FP8 E4M3
//! rows decoded 16 values at a time in registers, straight from the packed bytes, then the
//! AVX-512F kernel's FMA steps and lane reduction.
//!
//! Each decoded value is exactly [`PackedMatrix::decode_row`]'s (affine `fma(s, q, b)`,
//! MXFP4 `e2m1 * 2^e`, FP8 `e4m3 * scale`) and the sums run in the f32 kernel's order (16
//! lanes a step, [`super::x86::store_sums`]) over the values in the order they are decoded:
//! in column order for 8-bit formats; for 4-bit ones, per 32 columns the even columns (low
//! nibbles) then the odd ones (pair order, which saves the interleaving shuffles; the rows
//! of `x` come in the same order). So a product here has the same bits as the weight rows
//! decoded to f32, put in the same order, and multiplied by [`super::rows_times_rows_f32`]:
//! which of the two paths takes an expert is free, also in deterministic mode. What changes
//! is the memory traffic: the packed bytes (and the scales) stream once per call, nothing is
//! written.

use std::arch::x86_64::*;

use super::portable::Widen;
use super::x86::{Block, PREFETCH_BLOCKS, drive, has_avx512, prefetch, store_sums};
use crate::model::checkpoint::dequant::{E2M1, e8m0_exponent};
use crate::model::quant::{PackedMatrix, QuantFormat, Scales};
use crate::tensor::Storage;

/// One packed matrix's rows, 32 columns at a time (as two registers of 16), in spans of
/// columns that share a scale.
trait Decode: Sync {
    /// Columns that share one scale (a multiple of 32).
    fn span(&self) -> usize;

    /// The first byte of row `j`'s values at column `c` (wrapping arithmetic: also used for
    /// prefetch hints past the end).
    fn ptr(&self, j: usize, c: usize) -> *const u8;

    /// Row `j`'s decoding constants for its columns `g * span..`: its scale and bias (or 0)
    /// broadcast; for 4-bit affine groups the group's 16 values by code (lane `n`: the value
    /// of nibble `n`, computed as [`PackedMatrix::decode_row`] computes it) and 0.
    ///
    /// # Safety
    /// `j` is a row and `g` a span of the matrix; AVX-512F.
    unsafe fn scale(&self, j: usize, g: usize) -> (__m512, __m512);

    /// Row `j`'s values at columns `c..c + 32` (`c` a multiple of 32) as f32, exactly
    /// [`PackedMatrix::decode_row`]'s, given their span's [`Decode::scale`]: columns
    /// `c..c + 16` and `c + 16..c + 32`, or for 4-bit formats the even columns and the odd
    /// ones (pair order), looked up by nibble. Formats whose spans may end inside a step
    /// (FP8) honour `mask` (bit `i`: the `i`-th value of the 32): lanes outside it are 0 and
    /// their bytes not read; affine and MXFP4 rows are whole steps and ignore it.
    ///
    /// # Safety
    /// `j` is a row of the matrix and the masked columns lie inside it; AVX-512 F, BW, VL.
    unsafe fn load32(&self, j: usize, c: usize, mask: __mmask32, scale: (__m512, __m512)) -> [__m512; 2];
}

/// The 32 nibbles of 16 bytes at `p` looked up in `table` (lane `n`: the value of nibble
/// `n`): the low nibbles' values (even columns), then the high ones' (odd columns). The
/// lookup reads only an index's low 4 bits, so the low nibbles need no mask.
///
/// # Safety
/// 16 readable bytes at `p`; AVX-512F.
#[inline(always)]
unsafe fn lookup32(p: *const u8, table: __m512) -> [__m512; 2] {
    // SAFETY: 16 readable bytes at p (caller); the rest is register-only AVX-512F.
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
        [_mm512_permutexvar_ps(bytes, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table)]
    }
}

/// The 32 nibbles of 16 bytes at `p` as i32 lanes: the low nibbles (even values) and the
/// high ones (odd values).
///
/// # Safety
/// 16 readable bytes at `p`; AVX-512F.
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> [__m512i; 2] {
    // SAFETY: 16 readable bytes at p (caller); the rest is register-only AVX-512F.
    unsafe {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
        [_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), _mm512_srli_epi32::<4>(bytes)]
    }
}

/// The codes 0..16 as f32 lanes.
#[inline(always)]
fn codes16() -> __m512 {
    // SAFETY: register-only AVX-512F; callers run with AVX-512F.
    unsafe { _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.) }
}

/// MLX affine groups of `BITS` (4 or 8), scales and biases of `S`.
struct Affine<'a, S, const BITS: usize> {
    bytes: &'a [u8],
    row_bytes: usize,
    group: usize,
    groups: usize,
    scales: &'a [S],
    biases: &'a [S],
}

impl<S: Widen, const BITS: usize> Decode for Affine<'_, S, BITS> {
    #[inline(always)]
    fn span(&self) -> usize {
        self.group
    }

    #[inline(always)]
    fn ptr(&self, j: usize, c: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(j * self.row_bytes + c * BITS / 8)
    }

    #[inline(always)]
    unsafe fn scale(&self, j: usize, g: usize) -> (__m512, __m512) {
        let i = j * self.groups + g;
        // SAFETY: AVX-512F (caller).
        unsafe {
            let (s, b) = (_mm512_set1_ps(self.scales[i].widen()), _mm512_set1_ps(self.biases[i].widen()));
            // 4 bits: the group's 16 values, decode_row's fma(s, q, b) for each code q.
            if BITS == 4 { (_mm512_fmadd_ps(codes16(), s, b), _mm512_setzero_ps()) } else { (s, b) }
        }
    }

    #[inline(always)]
    unsafe fn load32(&self, j: usize, c: usize, _mask: __mmask32, (s, b): (__m512, __m512)) -> [__m512; 2] {
        // Affine rows are whole groups of at least 32 values: every step is full.
        // SAFETY: columns c..c + 32 of row j lie inside the matrix (caller), so do their
        // bytes; AVX-512F (caller).
        unsafe {
            let p = self.ptr(j, c);
            if BITS == 4 {
                // s is the group's table (Decode::scale).
                return lookup32(p, s);
            }
            let q = [
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16).cast())),
            ];
            // decode_row: fma(s, q, b) (with a 16-bit scale s * q is exact, s * q + b the one rounding).
            // (No closures here: a closure does not inherit the caller's target features.)
            [_mm512_fmadd_ps(_mm512_cvtepi32_ps(q[0]), s, b), _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[1]), s, b)]
        }
    }
}

/// MXFP4: E2M1 nibbles in blocks of 32 with an E8M0 scale a block.
struct Mxfp4<'a> {
    bytes: &'a [u8],
    cols: usize,
    scales: &'a [u8],
}

impl Decode for Mxfp4<'_> {
    #[inline(always)]
    fn span(&self) -> usize {
        32
    }

    #[inline(always)]
    fn ptr(&self, j: usize, c: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add((j * self.cols + c) / 2)
    }

    #[inline(always)]
    unsafe fn scale(&self, j: usize, g: usize) -> (__m512, __m512) {
        let e = e8m0_exponent(self.scales[j * (self.cols / 32) + g]).expect("checked at construction");
        // SAFETY: AVX-512F (caller).
        unsafe { (_mm512_set1_ps(pow2_f32(e)), _mm512_setzero_ps()) }
    }

    #[inline(always)]
    unsafe fn load32(&self, j: usize, c: usize, _mask: __mmask32, (s, _): (__m512, __m512)) -> [__m512; 2] {
        // MXFP4 rows are whole blocks of 32 values: every step is full.
        // SAFETY: as in Affine::load32; E2M1 holds the 16 values by nibble. (Neither a table
        // of the block's values, e2m1 * 2^e, which saves the products, nor lookups by the
        // unmasked bytes (as the affine groups') were faster on an Ice Lake:
        // `benches/packed_rows.rs`.)
        unsafe {
            let table = _mm512_loadu_ps(E2M1.as_ptr());
            let [lo, hi] = nibbles32(self.ptr(j, c));
            [_mm512_mul_ps(_mm512_permutexvar_ps(lo, table), s), _mm512_mul_ps(_mm512_permutexvar_ps(hi, table), s)]
        }
    }
}

/// `2^e` as f32 for `-127 <= e <= 127` (2^-127 is subnormal, exact).
#[inline(always)]
fn pow2_f32(e: i32) -> f32 {
    if e >= -126 { f32::from_bits(((e + 127) as u32) << 23) } else { f32::from_bits(1 << (149 + e)) }
}

/// FP8 E4M3 bytes with one f32 scale a `bn x bk` block (`bk` a multiple of 32).
struct Fp8<'a> {
    bytes: &'a [u8],
    cols: usize,
    bn: usize,
    bk: usize,
    scales: &'a [f32],
}

/// 16 E4M3 codes (`i32` lanes, `0..=255`, no NaN code) as their exact f32 values: a normal
/// `S.EEEE.MMM` is the f32 with exponent `E + 120` and the mantissa's top bits `MMM`; a
/// subnormal (`E = 0`) is `MMM * 2^-9`.
#[inline(always)]
fn e4m3_to_f32(b: __m512i) -> __m512 {
    // SAFETY (whole body): register-only AVX-512F operations; callers run with AVX-512F.
    unsafe {
        let em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
        let normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32::<20>(em), _mm512_set1_epi32(120 << 23)));
        let sub = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(1.0 / 512.0));
        let mag = _mm512_mask_blend_ps(_mm512_cmplt_epu32_mask(em, _mm512_set1_epi32(8)), normal, sub);
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80)));
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign))
    }
}

impl Decode for Fp8<'_> {
    #[inline(always)]
    fn span(&self) -> usize {
        self.bk
    }

    #[inline(always)]
    fn ptr(&self, j: usize, c: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(j * self.cols + c)
    }

    #[inline(always)]
    unsafe fn scale(&self, j: usize, g: usize) -> (__m512, __m512) {
        let s = self.scales[(j / self.bn) * self.cols.div_ceil(self.bk) + g];
        // SAFETY: AVX-512F (caller).
        unsafe { (_mm512_set1_ps(s), _mm512_setzero_ps()) }
    }

    #[inline(always)]
    unsafe fn load32(&self, j: usize, c: usize, mask: __mmask32, (s, _): (__m512, __m512)) -> [__m512; 2] {
        // SAFETY: the masked columns of row j lie inside the matrix (caller); AVX-512 F, BW, VL.
        unsafe {
            let p = self.ptr(j, c);
            let lo = _mm_maskz_loadu_epi8(mask as __mmask16, p.cast());
            let hi = _mm_maskz_loadu_epi8((mask >> 16) as __mmask16, p.wrapping_add(16).cast());
            [
                _mm512_mul_ps(e4m3_to_f32(_mm512_cvtepu8_epi32(lo)), s),
                _mm512_mul_ps(e4m3_to_f32(_mm512_cvtepu8_epi32(hi)), s),
            ]
        }
    }
}

/// `out[r * ldo + q] = x_r · w_{j + q}` for `M` rows of `x` (`k` apart, in the order
/// [`Decode::load32`] gives the values) and `Q` weight rows from `j`, summed as the f32 kernel
/// sums 16-column steps.
///
/// # Safety
/// `M` rows of `k` at `x`; rows `j..j + Q` of `d`; `out[r * ldo + q]` writable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block<D: Decode, const M: usize, const Q: usize>(
    d: &D,
    x: *const f32,
    k: usize,
    j: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); Q]; M];
    let span = d.span();
    for g in 0..k.div_ceil(span) {
        let mut sb = [(_mm512_setzero_ps(), _mm512_setzero_ps()); Q];
        for (q, v) in sb.iter_mut().enumerate() {
            // SAFETY: rows j..j + Q and span g exist (caller).
            *v = unsafe { d.scale(j + q, g) };
        }
        let mut c = g * span;
        while c < k.min((g + 1) * span) {
            let mask: __mmask32 = if k - c >= 32 { u32::MAX } else { (1u32 << (k - c)) - 1 };
            let halves = [mask as __mmask16, (mask >> 16) as __mmask16];
            let mut wv = [[_mm512_setzero_ps(); 2]; Q];
            for (q, v) in wv.iter_mut().enumerate() {
                // SAFETY: row j + q and the masked columns lie inside the matrix (caller).
                *v = unsafe { d.load32(j + q, c, mask, sb[q]) };
                prefetch(d.ptr(j + q + PREFETCH_BLOCKS * Q, c));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                for (h, &hm) in halves.iter().enumerate() {
                    // SAFETY: the masked elements of row r of x lie inside it (caller); the
                    // address wraps (a fully masked half of the last row's last step points
                    // past the end, and is never read).
                    let xv = unsafe { _mm512_maskz_loadu_ps(hm, x.wrapping_add(r * k + c + 16 * h)) };
                    for q in 0..Q {
                        a[q] = _mm512_fmadd_ps(xv, wv[q][h], a[q]);
                    }
                }
            }
            c += 32;
        }
    }
    // SAFETY: out[r * ldo + q] is writable for r < M, q < Q (caller).
    unsafe { store_sums::<M, Q>(&acc, out, ldo) };
}

/// Rows `n0..` of a packed matrix as [`Block`]s of the f32 kernel's driver.
struct Rows<'a, D> {
    d: &'a D,
    n0: usize,
}

impl<D: Decode> Block for Rows<'_, D> {
    type X = f32;
    unsafe fn block<const M: usize, const Q: usize>(
        &self,
        x: *const f32,
        k: usize,
        j: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: the caller's promises, for the matrix's rows n0 + j..
        unsafe { block::<D, M, Q>(self.d, x, k, self.n0 + j, out, ldo) }
    }
}

/// See [`super::packed_rows`]: `false` without AVX-512 or for FP8 blocks whose width is not a
/// multiple of 32.
pub(super) fn packed_rows(x: &[f32], m: usize, p: &PackedMatrix, n0: usize, n1: usize, out: &mut [f32]) -> bool {
    if !has_avx512() || !cfg!(target_endian = "little") {
        return false;
    }
    let (k, bytes) = (p.cols(), bytemuck::cast_slice::<u32, u8>(p.words()));
    assert!(n0 <= n1 && n1 <= p.rows(), "packed gemv: rows {n0}..{n1} of {}", p.rows());
    // SAFETY (each arm): rows n0..n1 of p have k columns (checked above and by PackedMatrix's
    // constructor, which sized the bytes and the scales); AVX-512 F, BW, VL were checked.
    match (p.format(), p.scales()) {
        (QuantFormat::Affine { bits, group, .. }, Scales::Affine { scales, biases }) => {
            let (row_bytes, group) = (p.format().row_bytes(k), group as usize);
            macro_rules! affine {
                ($s:expr, $b:expr, $bits:literal) => {{
                    let a = Affine::<_, $bits> { bytes, row_bytes, group, groups: k / group, scales: $s, biases: $b };
                    unsafe { drive(&Rows { d: &a, n0 }, x, m, k, n1 - n0, out) }
                }};
            }
            match (scales.storage(), biases.storage(), bits) {
                (Storage::F32(s), Storage::F32(b), 4) => affine!(s, b, 4),
                (Storage::F32(s), Storage::F32(b), _) => affine!(s, b, 8),
                (Storage::BF16(s), Storage::BF16(b), 4) => affine!(s, b, 4),
                (Storage::BF16(s), Storage::BF16(b), _) => affine!(s, b, 8),
                (Storage::F16(s), Storage::F16(b), 4) => affine!(s, b, 4),
                (Storage::F16(s), Storage::F16(b), _) => affine!(s, b, 8),
                _ => return false,
            }
        }
        (QuantFormat::Mxfp4, Scales::E8m0(scales)) => {
            let d = Mxfp4 { bytes, cols: k, scales };
            unsafe { drive(&Rows { d: &d, n0 }, x, m, k, n1 - n0, out) }
        }
        (QuantFormat::Fp8 { block_rows, block_cols }, Scales::Block(scales)) if block_cols % 32 == 0 => {
            let f = Fp8 { bytes, cols: k, bn: block_rows as usize, bk: block_cols as usize, scales };
            unsafe { drive(&Rows { d: &f, n0 }, x, m, k, n1 - n0, out) }
        }
        _ => return false,
    }
    true
}
