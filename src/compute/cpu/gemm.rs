//! f32 matrix products on the CPU through `matrixmultiply`.
//!
//! `matrixmultiply` was chosen because it is small, pure Rust (no system BLAS to install in CI),
//! takes arbitrary strides (so `[out, in]` weights are used transposed without a copy), picks
//! AVX2/FMA, AVX-512 or NEON kernels at run time and accumulates in f32.

/// `c = a · b^T` with `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]`, all row-major f32.
///
/// Panics only on slice lengths that do not match the dimensions (a bug in the caller).
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_bt_strided(a, b, k, c, m, k, n, false);
}

/// `c (+)= a · b^T` with `a` `[m, k]` and `c` `[m, n]` row-major, and `b` `n` rows of `k`
/// elements spaced `ldb` apart (a column block of a wider row-major matrix). With
/// `accumulate` the product is added to `c`, else it replaces `c`.
///
/// Panics only on slice lengths that do not match the dimensions (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn matmul_bt_strided(
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k && c.len() >= m * n && ldb >= k && (n == 0 || b.len() >= (n - 1) * ldb + k),
        "matmul_bt: short slices"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the pointers cover m*k, (n-1)*ldb+k and m*n elements, checked above; c does not
    // alias a or b (distinct borrows).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            ldb as isize,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
