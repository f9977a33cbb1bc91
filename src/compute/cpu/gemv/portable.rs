//! The portable kernel: plain Rust over 16-lane arrays that the compiler vectorises for
//! the target it is built for (NEON on aarch64; AVX2 + FMA through
//! [`super::x86::portable_avx2`]). Weights are widened one 16-element chunk at a time, in
//! registers.

use half::{bf16, f16};

/// Lanes of one step (the f32 partial sums kept per output).
const L: usize = 16;

/// Whether `mul_add` is one instruction on the target this is compiled for (everywhere but
/// x86-64 builds without FMA, where it would be a library call).
const FUSED: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// A weight element widened exactly to f32.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F { a.mul_add(b, c) } else { c + a * b }
}

/// The lanes summed in a fixed tree (halves, then quarters, ...).
#[inline(always)]
fn reduce(v: &[f32; L]) -> f32 {
    let mut s = *v;
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            s[i] += s[i + w];
        }
        w /= 2;
    }
    s[0]
}

/// `out[r * ldo + j] = x_r · w_j` for the `M` rows of `x` (`[M, k]`) and every weight row
/// `w_j` of `w` (`[n, k]`).
#[inline(always)]
fn block<W: Widen, const M: usize, const F: bool>(x: &[f32], k: usize, w: &[W], out: &mut [f32], ldo: usize) {
    let main = k / L * L;
    for (j, wr) in w.chunks_exact(k).enumerate() {
        let mut acc = [[0f32; L]; M];
        for c in (0..main).step_by(L) {
            let wc: &[W; L] = wr[c..c + L].try_into().unwrap();
            let wv: [f32; L] = std::array::from_fn(|l| wc[l].widen());
            for (r, a) in acc.iter_mut().enumerate() {
                let xc: &[f32; L] = x[r * k + c..r * k + c + L].try_into().unwrap();
                for l in 0..L {
                    a[l] = madd::<F>(xc[l], wv[l], a[l]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let mut tail = 0f32;
            for c in main..k {
                tail = madd::<F>(x[r * k + c], wr[c].widen(), tail);
            }
            out[r * ldo + j] = reduce(a) + tail;
        }
    }
}

/// `out[r * n + j] = x_r · w_j` for the `m` rows of `x` (`[m, k]`) and the `n` rows of `w`
/// (`[n, k]`); `out` is `[m, n]`. `F`: use fused multiply-adds.
#[inline(always)]
pub(super) fn rows_with<W: Widen, const F: bool>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    let n = w.len() / k;
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(super::ROW_BLOCK);
        let (x, o) = (&x[r * k..], &mut out[r * n..]);
        match rows {
            4 => block::<W, 4, F>(x, k, w, o, n),
            3 => block::<W, 3, F>(x, k, w, o, n),
            2 => block::<W, 2, F>(x, k, w, o, n),
            _ => block::<W, 1, F>(x, k, w, o, n),
        }
        r += rows;
    }
}

/// [`rows_with`] compiled for this build's own target features.
pub(super) fn rows<W: Widen>(x: &[f32], m: usize, w: &[W], k: usize, out: &mut [f32]) {
    rows_with::<W, FUSED>(x, m, w, k, out);
}
