//! The x86-64 kernels: AVX-512 BF16 (`vdpbf16ps`), AVX-512F (FMA over weights widened in
//! registers) and the portable kernel compiled for AVX2 + FMA. Each is compiled with its own
//! target features and called only after the CPU reported them.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::ROW_BLOCK;
use super::portable::{self, Widen};

/// AVX-512 F, BW and VL (masked 16-bit loads).
pub(super) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

/// AVX-512 BF16 on top of [`has_avx512`].
pub(super) fn has_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

pub(super) fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// A weight element that AVX-512F loads 16 at a time as f32.
pub(crate) trait WideLoad: Widen {
    /// The 16 elements at `p` whose bits are set in `mask`, widened exactly; the others 0.
    ///
    /// # Safety
    /// The masked elements are readable; the CPU has AVX-512 F, BW and VL.
    unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
}

impl WideLoad for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

impl WideLoad for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const bf16, mask: __mmask16) -> __m512 {
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                mask,
                p.cast(),
            ))))
        }
    }
}

impl WideLoad for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const f16, mask: __mmask16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// One register block of a product: `out[r * ldo + q] = x_r · w_{j + q}` for `M` rows of `x`
/// (`k` apart) and `Q` weight rows from row `j` of the kernel's weights.
pub(super) trait Block {
    type X;
    /// # Safety
    /// `M` rows of `k` at `x` readable; weight rows `j..j + Q` exist (`k` columns);
    /// `out[r * ldo + q]` writable; the CPU has the kernel's features.
    unsafe fn block<const M: usize, const Q: usize>(
        &self,
        x: *const Self::X,
        k: usize,
        j: usize,
        out: *mut f32,
        ldo: usize,
    );
}

/// Every `(row block, weight block)` of `m` rows of `x` (`[m, k]`) times the `n` weight rows
/// of `b` into `out` (`[m, n]`), weight blocks outermost so that the weights stream from
/// memory once. Blocks of 4 weight rows (1 for the last few) and up to [`ROW_BLOCK`] rows: a
/// row's sums do not depend on the blocking (see [`store_sums`]).
///
/// # Safety
/// `b` has `n` weight rows of `k` columns; the CPU has `b`'s features.
pub(super) unsafe fn drive<B: Block>(b: &B, x: &[B::X], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && out.len() >= m * n, "gemv: short slices");
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let mut j = 0;
    while j < n {
        let q = if n - j >= 4 { 4 } else { 1 };
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(ROW_BLOCK);
            // SAFETY: rows r..r + rows of x and outputs (r.., j..) lie inside the slices
            // (checked above); weight rows j..j + q exist and the features are there (caller).
            unsafe {
                let (x, o) = (xp.add(r * k), op.add(r * n + j));
                match (rows, q) {
                    (4, 4) => b.block::<4, 4>(x, k, j, o, n),
                    (3, 4) => b.block::<3, 4>(x, k, j, o, n),
                    (2, 4) => b.block::<2, 4>(x, k, j, o, n),
                    (1, 4) => b.block::<1, 4>(x, k, j, o, n),
                    (4, _) => b.block::<4, 1>(x, k, j, o, n),
                    (3, _) => b.block::<3, 1>(x, k, j, o, n),
                    (2, _) => b.block::<2, 1>(x, k, j, o, n),
                    _ => b.block::<1, 1>(x, k, j, o, n),
                }
            }
            r += rows;
        }
        j += q;
    }
}

/// bf16 pairs on `vdpbf16ps`: 32 products per step into 16 f32 lanes; weight rows at `w`.
struct Bf16Dot {
    w: *const bf16,
}

impl Block for Bf16Dot {
    type X = bf16;
    unsafe fn block<const M: usize, const Q: usize>(
        &self,
        x: *const bf16,
        k: usize,
        j: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: weight rows j..j + Q exist (caller), so w + j * k is inside them.
        unsafe { bf16_block::<M, Q>(x, k, self.w.add(j * k), out, ldo) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_block<const M: usize, const Q: usize>(
    x: *const bf16,
    k: usize,
    w: *const bf16,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); Q]; M];
    let mut c = 0;
    while c < k {
        let mask: __mmask32 = if k - c >= 32 { u32::MAX } else { (1u32 << (k - c)) - 1 };
        let mut wv = [bh(_mm512_setzero_si512()); Q];
        for (q, v) in wv.iter_mut().enumerate() {
            // SAFETY: the masked elements of weight row q lie inside it (caller).
            *v = bh(unsafe { _mm512_maskz_loadu_epi16(mask, w.add(q * k + c).cast()) });
            prefetch(w.wrapping_add((q + PREFETCH_BLOCKS * Q) * k + c));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for row r of x.
            let xv = bh(unsafe { _mm512_maskz_loadu_epi16(mask, x.add(r * k + c).cast()) });
            for q in 0..Q {
                a[q] = _mm512_dpbf16_ps(a[q], xv, wv[q]);
            }
        }
        c += 32;
    }
    // SAFETY: out[r * ldo + q] is writable for r < M, q < Q (caller).
    unsafe { store_sums::<M, Q>(&acc, out, ldo) };
}

/// `out[r * ldo + q] = sum of the lanes of acc[r][q]`, every sum in the one fixed order of
/// [`reduce16`] (accumulator r * 4 + q of 16; the unused ones are zeros that mix with no sum),
/// so an output's bits do not depend on the block's shape.
///
/// # Safety
/// `out[r * ldo + q]` writable for `r < M`, `q < Q`; `M, Q <= 4`; AVX-512F.
#[inline(always)]
pub(super) unsafe fn store_sums<const M: usize, const Q: usize>(acc: &[[__m512; Q]; M], out: *mut f32, ldo: usize) {
    // SAFETY: AVX-512F (caller).
    let mut v = [unsafe { _mm512_setzero_ps() }; 16];
    for (r, a) in acc.iter().enumerate() {
        for (q, x) in a.iter().enumerate() {
            v[r * 4 + q] = *x;
        }
    }
    let mut sums = [0f32; 16];
    // SAFETY: sums holds 16 f32.
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&v)) };
    for r in 0..M {
        for q in 0..Q {
            // SAFETY: in bounds (caller).
            unsafe { *out.add(r * ldo + q) = sums[r * 4 + q] };
        }
    }
}

/// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: pairs of lanes within each
/// 128-bit quarter, then the pairs' sums, then across the quarters (a transpose-and-add tree:
/// about 45 instructions for 16 sums, where 16 separate reductions take about 130).
#[inline(always)]
fn reduce16(v: &[__m512; 16]) -> __m512 {
    // SAFETY (whole body): register-only AVX-512F operations; callers run with AVX-512F.
    unsafe {
        let t: [__m512; 8] = std::array::from_fn(|i| {
            _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
        });
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        });
        let half = |x: __m512, y: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
        };
        let (s01, s23) = (half(u[0], u[1]), half(u[2], u[3]));
        half(s01, s23)
    }
}

/// A hint to fetch the cache line at `p` (the next weight block's): the weight rows of a block
/// are short streams (one row of K), so the hardware prefetchers alone leave bandwidth unused
/// (at N=1 on dev-2c this halved the experts' time). Never faults, whatever `p` is.
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    // SAFETY: a prefetch is a hint; it reads nothing architecturally and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
}
/// How many weight blocks ahead [`prefetch`] reaches.
pub(super) const PREFETCH_BLOCKS: usize = 1;

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain lanes; __m512bh is 32 bf16 bit patterns.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// f32 rows, weights of type `W` (rows at `w`) widened in registers, FMA: 16 products per step.
struct Fma<W> {
    w: *const W,
}

impl<W: WideLoad> Block for Fma<W> {
    type X = f32;
    unsafe fn block<const M: usize, const Q: usize>(
        &self,
        x: *const f32,
        k: usize,
        j: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: weight rows j..j + Q exist (caller), so w + j * k is inside them.
        unsafe { fma_block::<W, M, Q>(x, k, self.w.add(j * k), out, ldo) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fma_block<W: WideLoad, const M: usize, const Q: usize>(
    x: *const f32,
    k: usize,
    w: *const W,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); Q]; M];
    let mut c = 0;
    while c < k {
        let mask: __mmask16 = if k - c >= 16 { u16::MAX } else { (1u16 << (k - c)) - 1 };
        let mut wv = [_mm512_setzero_ps(); Q];
        for (q, v) in wv.iter_mut().enumerate() {
            // SAFETY: the masked elements of weight row q lie inside it (caller).
            *v = unsafe { W::load16(w.add(q * k + c), mask) };
            prefetch(w.wrapping_add((q + PREFETCH_BLOCKS * Q) * k + c));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for row r of x.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add(r * k + c)) };
            for q in 0..Q {
                a[q] = _mm512_fmadd_ps(xv, wv[q], a[q]);
            }
        }
        c += 16;
    }
    // SAFETY: out[r * ldo + q] is writable for r < M, q < Q (caller).
    unsafe { store_sums::<M, Q>(&acc, out, ldo) };
}

/// bf16 rows times bf16 weight rows (`[n, k]`) into `out` (`[m, n]`) on `vdpbf16ps`.
/// Panics if the CPU lacks AVX-512 BF16 (callers check [`has_bf16`]).
pub(super) fn bf16_rows(x: &[bf16], m: usize, w: &[bf16], k: usize, out: &mut [f32]) {
    assert!(has_bf16(), "gemv: no AVX-512 BF16 on this CPU");
    // SAFETY: the features were just checked.
    // SAFETY: the features were just checked; Bf16Dot's rows are w's `w.len() / k` rows.
    unsafe { drive(&Bf16Dot { w: w.as_ptr() }, x, m, k, w.len() / k, out) }
}

/// f32 rows times weight rows of `W` with AVX-512F. Panics without it.
pub(super) fn f32_rows<W: WideLoad>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    assert!(has_avx512(), "gemv: no AVX-512 on this CPU");
    // SAFETY: the features were just checked.
    // SAFETY: the features were just checked; Fma's rows are w's `w.len() / k` rows.
    unsafe { drive(&Fma { w: w.as_ptr() }, x, m, k, w.len() / k, out) }
}

/// The portable kernel compiled for AVX2 + FMA. Panics without them.
pub(super) fn portable_avx2<W: Widen>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    assert!(has_avx2_fma(), "gemv: no AVX2 + FMA on this CPU");
    // SAFETY: the features were just checked.
    unsafe { portable_avx2_inner(x, m, w, k, out) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn portable_avx2_inner<W: Widen>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    portable::rows_with::<W, true>(x, m, w, k, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Small integers: every partial sum exact, so the tree must give the plain sums.
    #[test]
    fn reduce16_sums_each_vector() {
        if !has_avx512() {
            std::io::Write::write_all(&mut std::io::stderr(), b"SKIPPED reduce16: no AVX-512F on this CPU\n").unwrap();
            return;
        }
        let vals: Vec<[f32; 16]> = (0..16).map(|i| std::array::from_fn(|l| (i * 100 + l) as f32)).collect();
        // SAFETY: AVX-512F was just checked; each load and the store cover 16 f32.
        let v: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(vals[i].as_ptr()) });
        let mut out = [0f32; 16];
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&v)) };
        let want: Vec<f32> = vals.iter().map(|a| a.iter().sum()).collect();
        assert_eq!(out.to_vec(), want);
    }
}
