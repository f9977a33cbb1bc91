//! Grouped SwiGLU experts on the CPU.

use std::borrow::Cow;

use rayon::prelude::*;

use super::gemm::matmul_bt;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};
use crate::weights::ExpertWeights;
use crate::with_storage;

/// Rows of one expert processed together by one task: bounds the f32 scratch to
/// `ROW_BLOCK * (D + 2F)` floats while keeping the GEMMs large enough to run at speed.
const ROW_BLOCK: usize = 128;

/// `x` as f32, borrowed when it already is.
fn widen(t: &Tensor) -> Cow<'_, [f32]> {
    match t.storage() {
        Storage::F32(v) => Cow::Borrowed(v.as_slice()),
        _ => Cow::Owned(t.to_f32_vec()),
    }
}

/// `silu(g) * u`, element-wise, into `g`.
#[inline]
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        let s = *a / (1.0 + (-*a).exp());
        *a = s * b;
    }
}

/// See [`crate::Engine::ffn`].
pub fn ffn(batch: &Tensor, offsets: &[usize], experts: &[ExpertWeights], out: &mut Tensor) -> Result<()> {
    if offsets.len() != experts.len() + 1 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::invalid(format!(
            "ffn: {} offsets for {} experts (need experts + 1, non-decreasing)",
            offsets.len(),
            experts.len()
        )));
    }
    let rows = batch.rows();
    if offsets.first() != Some(&0) || offsets.last() != Some(&rows) {
        return Err(Error::invalid(format!(
            "ffn: offsets span {:?}..{:?} but the batch has {rows} rows",
            offsets.first(),
            offsets.last()
        )));
    }
    if out.rows() != rows || out.cols() != batch.cols() || out.dtype() != batch.dtype() {
        return Err(Error::invalid("ffn: output shape or dtype differs from the batch"));
    }
    let d = batch.cols();
    for (l, w) in experts.iter().enumerate() {
        let f = w.gate.rows();
        if w.gate.cols() != d || w.up.rows() != f || w.up.cols() != d || w.down.rows() != d || w.down.cols() != f {
            return Err(Error::invalid(format!(
                "ffn: local expert {l} has gate {:?}, up {:?}, down {:?}; batch rows have {d} features",
                (w.gate.rows(), w.gate.cols()),
                (w.up.rows(), w.up.cols()),
                (w.down.rows(), w.down.cols())
            )));
        }
    }

    // Tasks: (expert, row range), each writing its own rows of `out`.
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for l in 0..experts.len() {
        let (a, b) = (offsets[l], offsets[l + 1]);
        let mut s = a;
        while s < b {
            let e = (s + ROW_BLOCK).min(b);
            tasks.push((l, s, e));
            s = e;
        }
    }
    // Widen each active expert's weights once, shared by its row blocks.
    let active: Vec<usize> = (0..experts.len()).filter(|&l| offsets[l + 1] > offsets[l]).collect();
    let mut wide: Vec<Option<[Cow<'_, [f32]>; 3]>> = (0..experts.len()).map(|_| None).collect();
    let widened: Vec<(usize, [Cow<'_, [f32]>; 3])> = active
        .par_iter()
        .map(|&l| (l, [widen(&experts[l].gate), widen(&experts[l].up), widen(&experts[l].down)]))
        .collect();
    for (l, w) in widened {
        wide[l] = Some(w);
    }

    with_storage!(out.storage_mut(), o => {
        // Split the output into one slice per task.
        let mut rest: &mut [_] = o.as_mut_slice();
        let mut chunks = Vec::with_capacity(tasks.len());
        for &(_, s, e) in &tasks {
            let (head, tail) = rest.split_at_mut((e - s) * d);
            chunks.push(head);
            rest = tail;
        }
        tasks.par_iter().zip(chunks).for_each(|(&(l, s, e), dst)| {
            let [wg, wu, wd] = wide[l].as_ref().expect("active expert widened");
            let m = e - s;
            let f = experts[l].gate.rows();
            let h = batch.slice_rows(s, e).expect("task rows inside batch").to_f32_vec();
            let mut g = vec![0f32; m * f];
            let mut u = vec![0f32; m * f];
            matmul_bt(&h, wg, &mut g, m, d, f);
            matmul_bt(&h, wu, &mut u, m, d, f);
            silu_mul(&mut g, &u);
            let mut y = vec![0f32; m * d];
            matmul_bt(&g, wd, &mut y, m, f, d);
            for (dv, &yv) in dst.iter_mut().zip(&y) {
                *dv = Element::from_f32(yv);
            }
        });
    });
    Ok(())
}
