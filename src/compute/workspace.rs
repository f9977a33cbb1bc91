//! Host buffers reused across calls, so that a steady stream of forwards allocates (and
//! page-faults) nothing after the first.

use std::sync::Mutex;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Most buffers a workspace keeps by default; more are dropped when returned.
const KEEP: usize = 16;

/// A pool of host tensors. Cheap to create; share one per layer (it is `Sync`).
#[derive(Debug)]
pub struct Workspace {
    free: Mutex<Vec<Tensor>>,
    keep: usize,
}

impl Default for Workspace {
    fn default() -> Self {
        Self::with_capacity(KEEP)
    }
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A workspace that keeps at most `keep` buffers (the largest ones).
    pub fn with_capacity(keep: usize) -> Self {
        Workspace { free: Mutex::new(Vec::new()), keep }
    }

    /// A `[rows, cols]` tensor of `dtype` whose contents are unspecified (stale data from an
    /// earlier call, or zeros). Callers must overwrite every element. Errors (never an abort)
    /// when the shape is too large for any allocation or the allocation fails.
    pub fn take(&self, dtype: DType, rows: usize, cols: usize) -> Result<Tensor> {
        let n = rows
            .checked_mul(cols)
            .filter(|n| n.checked_mul(dtype.size()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| Error::invalid(format!("[{rows}, {cols}] {dtype} does not fit in memory")))?;
        if n == 0 {
            return Tensor::try_zeros(dtype, rows, cols);
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        // Smallest buffer already that long (no writes), else the smallest whose allocation
        // fits (it is reshaped in place); else a new one.
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, t)| t.dtype() == dtype && t.len() >= n)
            .min_by_key(|(_, t)| t.len())
            .or_else(|| {
                free.iter()
                    .enumerate()
                    .filter(|(_, t)| t.dtype() == dtype && t.capacity() >= n)
                    .min_by_key(|(_, t)| t.capacity())
            })
            .map(|(i, _)| i);
        match fit {
            Some(i) => Ok(free.swap_remove(i).reshaped(rows, cols)),
            None => {
                drop(free);
                Tensor::try_zeros(dtype, rows, cols)
            }
        }
    }

    /// Give a tensor back for later calls.
    pub fn recycle(&self, t: Tensor) {
        if t.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(t);
        } else if let Some(i) = (0..free.len()).min_by_key(|&i| free[i].capacity()) {
            // Keep the larger buffers.
            if free[i].capacity() < t.capacity() {
                free[i] = t;
            }
        }
    }
}
