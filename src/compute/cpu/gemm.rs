//! Matrix products on the CPU through `gemmkit`.
//!
//! `gemmkit` was chosen by measurement (BENCHMARKS.md, "CPU expert FFN against transformers"):
//! on the development machine's AVX-512 BF16 cores its bf16 GEMM runs on `vdpbf16ps` (bf16
//! operands, f32 sums, one rounding of the result) at 490-760 GFLOP/s for 128-512 rows an
//! expert, and its f32 GEMM beats `matrixmultiply` and the `gemm` crate from 64 rows on.
//! Below a few hundred rows an expert its per-call packing of the weights costs more than the
//! product; [`super::gemv`]'s row kernels take those sizes.
//! It is pure Rust (no system BLAS to install), picks its kernels at run time from the CPU's
//! features (AVX2/FMA, AVX-512F, AVX-512 BF16 on x86-64, NEON on aarch64), takes arbitrary
//! strides (so `[out, in]` weights are used transposed without a copy) and accumulates in f32
//! for every element type.

pub use half::{bf16, f16};

use super::panels::{ExpertPanels, SetPanels};
use crate::dtype::Element;

/// An element type of a product: f32, bf16 or f16 operands and result, f32 sums.
pub trait GemmElement: Element + gemmkit::FusedScalar {
    /// A set's panels if they hold this type.
    fn panels_of(p: &SetPanels) -> Option<&[ExpertPanels<Self>]>;
}
impl GemmElement for f32 {
    fn panels_of(p: &SetPanels) -> Option<&[ExpertPanels<Self>]> {
        if let SetPanels::F32(v) = p { Some(v) } else { None }
    }
}
impl GemmElement for bf16 {
    fn panels_of(p: &SetPanels) -> Option<&[ExpertPanels<Self>]> {
        if let SetPanels::BF16(v) = p { Some(v) } else { None }
    }
}
impl GemmElement for f16 {
    fn panels_of(p: &SetPanels) -> Option<&[ExpertPanels<Self>]> {
        if let SetPanels::F16(v) = p { Some(v) } else { None }
    }
}

/// `c = a · b^T` with `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]`, all row-major f32, on the
/// calling thread, through the row kernels ([`super::gemv`]): a row of `c` is the same bits
/// whatever `m` is (the router's logits in deterministic mode rely on it). For products of
/// many rows where that does not matter, [`gemm_bt`] is faster.
///
/// Panics only on slice lengths that do not match the dimensions (a bug in the caller).
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "matmul_bt: short slices");
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    super::gemv::rows_times_rows_f32(a, m, &b[..n * k], k, c);
}

/// `c = a · b^T + bias` with `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]` row-major `T` and
/// `bias` (`[n]`, added to every row) optional: sums and the bias in f32, one rounding to
/// `T`. With `parallel` the product is split over the rayon pool, else it runs on the
/// calling thread.
///
/// Panics only on slice lengths that do not match the dimensions (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bt<T: GemmElement>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[T]>,
    parallel: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= n * k && c.len() >= m * n && bias.is_none_or(|v| v.len() >= n),
        "gemm_bt: short slices"
    );
    if m == 0 || n == 0 {
        return;
    }
    let c = &mut c[..m * n];
    if k == 0 {
        match bias {
            Some(v) => c.chunks_mut(n).for_each(|row| row.copy_from_slice(&v[..n])),
            None => c.fill(T::default()),
        }
        return;
    }
    let par = if parallel { gemmkit::Parallelism::Rayon(0) } else { gemmkit::Parallelism::Serial };
    gemmkit::gemm_fused(
        T::from_f32(1.0),
        gemmkit::MatRef::from_row_major(&a[..m * k], m, k),
        // b^T: element (i, j) is b[j * k + i].
        gemmkit::MatRef::new(&b[..n * k], k, n, 1, k as isize),
        T::from_f32(0.0),
        gemmkit::MatMut::from_row_major(c, m, n),
        bias.map(|v| gemmkit::Bias::PerCol(&v[..n])),
        None,
        par,
    );
}
