//! Few rows times weight rows: the expert products of decode and the mid range (below 256 rows
//! an expert for bf16 on the bf16 dot product, below 96 otherwise; `ffn::Plan`), and every
//! product of the deterministic mode.
//!
//! Each weight element is read from memory once per call, in its own dtype, and multiplied
//! into up to four activation rows at once in registers: no packing, no widened copy of the
//! weights. A GEMM library packs its operands, which for an expert of a few rows costs more
//! than the product itself (BENCHMARKS.md, "CPU expert FFN against transformers"); above
//! [`super::ffn`]'s crossover the GEMM path ([`super::gemm`]) takes over.
//!
//! Every output is `x_r · w_j` summed in f32 in one fixed order that depends only on `K`: 16
//! (f32 lanes) or 32 (bf16 pairs) products per step, lane-wise across the steps, then a fixed
//! reduction over the lanes. The order does not depend on the number of rows, on which rows
//! share a register block or on the weight-row block, so a row's result is the same bits in
//! any batch (the deterministic mode's batch invariance).
//!
//! Kernels, picked at run time from the CPU's features (a generic build runs everywhere):
//! - x86-64 with AVX-512 BF16: bf16 rows times bf16 weights with `vdpbf16ps` (products of
//!   bf16 pairs, f32 sums) — [`Lhs::Bf16`];
//! - x86-64 with AVX-512F: f32 rows times f32, bf16 or f16 weights widened in registers, FMA;
//! - x86-64 with AVX2 + FMA, aarch64 (NEON), anything else: the portable kernel
//!   (`portable`), vectorised by the compiler for the features it is built for.

mod portable;
// The AVX-512 intrinsics are stable from Rust 1.89, the crate's rust-version (see clippy.toml).
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86_packed;

use half::bf16;

use crate::dtype::Element;
use crate::model::quant::PackedMatrix;
#[cfg(target_arch = "x86_64")]
use crate::tensor::Storage;
use crate::tensor::Tensor;
use crate::with_storage;

/// Activation rows handed to [`rows_times_weight_rows`]: `[m, K]` row-major.
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    /// f32 rows: any weight dtype (weights widened in registers).
    F32(&'a [f32]),
    /// bf16 rows against bf16 weights on the bf16 dot-product unit; elsewhere the rows are
    /// widened to f32 first.
    Bf16(&'a [bf16]),
}

/// Rows multiplied at once (register blocking).
pub(crate) const ROW_BLOCK: usize = 4;

/// Whether this CPU multiplies bf16 pairs natively (x86-64 AVX-512 BF16): where true,
/// [`Lhs::Bf16`] rows against bf16 weights run on `vdpbf16ps`.
pub fn native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[r * (n1 - n0) + i] = x_r · w[n0 + i]` for the `m` rows of `x` (`[m, K]`) and weight
/// rows `n0..n1` of `w` (`[N, K]`, any dtype), summed in f32 (see the module doc for the
/// order). `out` is `[m, n1 - n0]` f32.
///
/// Panics only on lengths that do not match the dimensions (a bug in the caller).
pub fn rows_times_weight_rows(x: Lhs<'_>, m: usize, w: &Tensor, n0: usize, n1: usize, out: &mut [f32]) {
    let k = w.cols();
    let n = n1 - n0;
    let x_len = match x {
        Lhs::F32(v) => v.len(),
        Lhs::Bf16(v) => v.len(),
    };
    assert!(x_len >= m * k && out.len() >= m * n && n1 <= w.rows(), "rows_times_weight_rows: short slices");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    match (x, w.storage()) {
        #[cfg(target_arch = "x86_64")]
        (Lhs::Bf16(x), Storage::BF16(wv)) if x86::has_bf16() => x86::bf16_rows(x, m, &wv[n0 * k..n1 * k], k, out),
        (Lhs::Bf16(x), _) => {
            let mut xf = vec![0f32; m * k];
            Element::widen_slice(&x[..m * k], &mut xf);
            rows_times_weight_rows(Lhs::F32(&xf), m, w, n0, n1, out);
        }
        (Lhs::F32(x), s) => with_storage!(s, wv => f32_rows(x, m, &wv[n0 * k..n1 * k], k, out)),
    }
}

/// `out[r * n + j] = x_r · w_j` for the `m` rows of `x` (`[m, k]`) and the `n` rows of `w`
/// (`[n, k]`), all f32; `out` is `[m, n]`. Summed as the module doc says, so a row's result
/// does not depend on `m`.
///
/// Panics only on lengths that do not match the dimensions (a bug in the caller).
pub fn rows_times_rows_f32(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    let n = w.len().checked_div(k).unwrap_or(0);
    assert!(x.len() >= m * k && out.len() >= m * n, "rows_times_rows_f32: short slices");
    if m == 0 || n == 0 {
        return;
    }
    f32_rows(&x[..m * k], m, &w[..n * k], k, out);
}

/// `out[r * (n1 - n0) + i] = x_r · w[n0 + i]` for the `m` rows of `x` (`[m, K]` f32) and
/// weight rows `n0..n1` of the packed `w`, each weight value decoded in registers straight
/// from the packed bytes. For 4-bit formats the columns are taken in pair order (per 32
/// columns the even ones, then the odd ones; [`crate::compute::cpu::packed`]), and `x`'s rows
/// must come in that order. The values are exactly [`PackedMatrix::decode_row`]'s and the
/// sums run in the f32 kernel's order, so the result has the same bits as those rows decoded,
/// put in the same order and passed to [`rows_times_rows_f32`]. Returns `false`, leaving `out` alone, where this CPU or
/// layout has no such kernel (no AVX-512; FP8 blocks not a multiple of 32 columns wide): the
/// caller decodes instead.
///
/// Panics only on lengths that do not match the dimensions (a bug in the caller).
pub fn packed_rows(x: &[f32], m: usize, w: &PackedMatrix, n0: usize, n1: usize, out: &mut [f32]) -> bool {
    if m == 0 || n0 == n1 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if f32_kernel() == Kernel::Avx512 {
            return x86_packed::packed_rows(x, m, w, n0, n1, out);
        }
    }
    let _ = (x, w, out);
    false
}

/// The kernel [`rows_times_rows_f32`] and f32 rows run on this CPU.
fn f32_kernel() -> Kernel {
    static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| Kernel::available().into_iter().find(|&k| k != Kernel::Bf16Dot).unwrap_or(Kernel::Portable))
}

/// f32 rows times weight rows of any dtype: the best kernel this CPU has.
fn f32_rows<W: portable::Widen + WideLoad>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    f32_rows_on(f32_kernel(), x, m, w, k, out);
}

fn f32_rows_on<W: portable::Widen + WideLoad>(kernel: Kernel, x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => x86::f32_rows(x, m, w, k, out),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => x86::portable_avx2(x, m, w, k, out),
        _ => portable::rows(x, m, w, k, out),
    }
}

/// A row kernel (for tests and benchmarks that compare them; the library picks the best).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// bf16 rows and weights on AVX-512 BF16 (`vdpbf16ps`).
    Bf16Dot,
    /// f32 rows, weights widened in registers, AVX-512F.
    Avx512,
    /// The portable kernel compiled for AVX2 + FMA.
    Avx2,
    /// The portable kernel compiled for the build's own target features.
    Portable,
}

impl Kernel {
    /// The kernels this CPU runs, fastest first.
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_bf16() {
                v.push(Kernel::Bf16Dot);
            }
            if x86::has_avx512() {
                v.push(Kernel::Avx512);
            }
            if x86::has_avx2_fma() {
                v.push(Kernel::Avx2);
            }
        }
        v.push(Kernel::Portable);
        v
    }
}

/// [`rows_times_weight_rows`] on a given kernel: [`Kernel::Bf16Dot`] takes [`Lhs::Bf16`] rows
/// and bf16 weights only, the others f32 rows and any weights. `false` (and nothing written)
/// when this CPU lacks the kernel or the operands do not fit it.
pub fn rows_times_weight_rows_on(
    kernel: Kernel,
    x: Lhs<'_>,
    m: usize,
    w: &Tensor,
    n0: usize,
    n1: usize,
    out: &mut [f32],
) -> bool {
    if !Kernel::available().contains(&kernel) || m == 0 || n1 <= n0 || w.cols() == 0 {
        return false;
    }
    let k = w.cols();
    match (kernel, x, w.storage()) {
        #[cfg(target_arch = "x86_64")]
        (Kernel::Bf16Dot, Lhs::Bf16(x), Storage::BF16(wv)) => x86::bf16_rows(x, m, &wv[n0 * k..n1 * k], k, out),
        (Kernel::Bf16Dot, ..) | (_, Lhs::Bf16(_), _) => return false,
        (_, Lhs::F32(x), s) => with_storage!(s, wv => f32_rows_on(kernel, x, m, &wv[n0 * k..n1 * k], k, out)),
    }
    true
}

/// A weight element the AVX-512 kernel widens in registers (f32, bf16, f16).
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::WideLoad;
/// No wide loads off x86-64: every weight element type qualifies.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait WideLoad {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> WideLoad for T {}
