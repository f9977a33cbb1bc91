//! f32 matrix products on the CPU through `matrixmultiply`.
//!
//! `matrixmultiply` was chosen because it is small, pure Rust (no system BLAS to install in CI),
//! takes arbitrary strides (so `[out, in]` weights are used transposed without a copy), picks
//! AVX2/FMA or NEON kernels at run time and accumulates in f32.

/// `c = a · b^T` with `a` `[m, k]`, `b` `[n, k]`, `c` `[m, n]`, all row-major f32.
///
/// Panics only on slice lengths that do not match the dimensions (a bug in the caller).
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "matmul_bt: short slices");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    // SAFETY: the pointers cover m*k, k*n (through strides) and m*n elements, checked above;
    // c does not alias a or b (distinct borrows).
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
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
