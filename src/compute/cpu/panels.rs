//! Expert weights packed once into gemmkit's panel layout, for the CPU FFN's GEMM path.
//!
//! [`super::gemm::gemm_bt`] packs its `b` operand (a weight matrix) into gemmkit's
//! micro-panels on every call. At a few dozen rows an expert that packing costs about as much
//! as the product itself. [`SetPanels`] holds every expert's gate, up and down matrices packed
//! once (`ExpertSet::with_cpu_gemm_panels`), as much memory again as the dense weights; the
//! FFN then multiplies straight from the panels ([`gemm_bt_panels`]) and takes the GEMM from
//! fewer rows an expert ([`crate::compute::cpu::ffn::Plan::with_panels`]). Measured in
//! BENCHMARKS.md ("CPU expert FFN against transformers": `cpu-ffn-bench`'s
//! `gemmkit-prepacked`).

use rayon::prelude::*;

use super::gemm::{GemmElement, gemm_bt};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::weights::{ExpertWeights, Weight};
use crate::tensor::Tensor;

/// A weight matrix `[n, k]` (the `b` of `c = a · b^T`) in gemmkit's panels.
pub struct Panels<T> {
    packed: gemmkit::PackedRhs<T>,
}

impl<T: GemmElement> Panels<T> {
    /// Pack `b` (`[n, k]` row-major; [`SetPanels::new`] calls it on checked tensors).
    fn new(b: &[T], n: usize, k: usize) -> Self {
        // b^T: element (i, j) is b[j * k + i].
        Panels { packed: gemmkit::prepack_rhs(gemmkit::MatRef::new(&b[..n * k], k, n, 1, k as isize)) }
    }
    /// Rows of the original matrix (`n`, the product's output columns).
    pub fn out_features(&self) -> usize {
        self.packed.cols()
    }
    /// Columns of the original matrix (`k`, the product's inputs).
    pub fn in_features(&self) -> usize {
        self.packed.rows()
    }
}

/// `c = a · b^T + bias` with `b` from [`Panels`] (`[n, k]`): `a` `[m, k]`, `c` `[m, n]`, both
/// row-major, `bias` (`[n]`) optional; sums and the bias in f32, one rounding to `T`, as
/// [`gemm_bt`] computes it (its summation order may differ). `scratch` is resized to `m * n`
/// (the product is written column-major there, as gemmkit requires with a packed `b`, then
/// transposed into `c`). With `parallel` the product is split over the rayon pool. An error
/// (nothing written) when `a`, `c` or `bias` is shorter than the dimensions need.
pub fn gemm_bt_panels<T: GemmElement>(
    a: &[T],
    b: &Panels<T>,
    c: &mut [T],
    m: usize,
    bias: Option<&[T]>,
    parallel: bool,
    scratch: &mut Vec<T>,
) -> Result<()> {
    let (n, k) = (b.out_features(), b.in_features());
    let short = |what: &str, len: usize, need: usize| {
        Error::invalid(format!("gemm_bt_panels: {what} has {len} elements, [{m}, {k}] x [{n}, {k}]^T needs {need}"))
    };
    if a.len() < m * k {
        return Err(short("a", a.len(), m * k));
    }
    if c.len() < m * n {
        return Err(short("c", c.len(), m * n));
    }
    if let Some(v) = bias.filter(|v| v.len() < n) {
        return Err(short("bias", v.len(), n));
    }
    if m == 0 || n == 0 || k == 0 {
        gemm_bt(a, &[], c, m, 0, n, bias, parallel);
        return Ok(());
    }
    scratch.clear();
    scratch.resize(m * n, T::default());
    let par = if parallel { gemmkit::Parallelism::Rayon(0) } else { gemmkit::Parallelism::Serial };
    gemmkit::gemm_packed_b_fused(
        T::from_f32(1.0),
        gemmkit::MatRef::from_row_major(&a[..m * k], m, k),
        &b.packed,
        T::from_f32(0.0),
        gemmkit::MatMut::new(scratch, m, n, 1, m as isize),
        bias.map(|v| gemmkit::Bias::PerCol(&v[..n])),
        None,
        par,
    );
    for (j, col) in scratch.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            c[i * n + j] = v;
        }
    }
    Ok(())
}

/// One expert's three projections in panels.
pub struct ExpertPanels<T> {
    pub gate: Panels<T>,
    pub up: Panels<T>,
    pub down: Panels<T>,
}

/// Every expert of a set in panels, in the weights' dtype.
pub enum SetPanels {
    F32(Vec<ExpertPanels<f32>>),
    F16(Vec<ExpertPanels<half::f16>>),
    BF16(Vec<ExpertPanels<half::bf16>>),
}

impl std::fmt::Debug for SetPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SetPanels({}, {} experts)", self.dtype(), self.len())
    }
}

impl SetPanels {
    /// Panels of every expert, when all their projections are dense in one dtype; `None`
    /// otherwise (packed experts take the row kernels, which never use panels).
    pub fn new(experts: &[ExpertWeights]) -> Option<SetPanels> {
        let dtype = experts.first()?.gate.dense()?.dtype();
        let dense = |w: &Weight| w.dense().is_some_and(|t| t.dtype() == dtype);
        if !experts.iter().all(|e| [&e.gate, &e.up, &e.down].into_iter().all(dense)) {
            return None;
        }
        fn pack<T: GemmElement>(experts: &[ExpertWeights]) -> Vec<ExpertPanels<T>> {
            let one = |w: &Weight| {
                let t: &Tensor = w.dense().expect("checked dense");
                Panels::new(t.as_slice::<T>().expect("checked dtype"), t.rows(), t.cols())
            };
            experts
                .par_iter()
                .map(|e| ExpertPanels { gate: one(&e.gate), up: one(&e.up), down: one(&e.down) })
                .collect()
        }
        Some(match dtype {
            DType::F32 => SetPanels::F32(pack(experts)),
            DType::F16 => SetPanels::F16(pack(experts)),
            DType::BF16 => SetPanels::BF16(pack(experts)),
        })
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        match self {
            SetPanels::F32(_) => DType::F32,
            SetPanels::F16(_) => DType::F16,
            SetPanels::BF16(_) => DType::BF16,
        }
    }

    /// Experts held.
    pub fn len(&self) -> usize {
        match self {
            SetPanels::F32(v) => v.len(),
            SetPanels::F16(v) => v.len(),
            SetPanels::BF16(v) => v.len(),
        }
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `l`'s panels if they are in `T`.
    pub fn get<T: GemmElement>(&self, l: usize) -> Option<&ExpertPanels<T>> {
        T::panels_of(self)?.get(l)
    }
}
