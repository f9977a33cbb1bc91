//! A 2-D row-major host tensor whose element type is chosen at run time.

use half::{bf16, f16};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// The three element types of a tensor, each holding a `F32`, `F16` or `BF16` payload: owned
/// vectors in [`Storage`], a mutable view in [`StorageMut`].
#[derive(Debug, Clone, PartialEq)]
pub enum Typed<F32, F16, BF16> {
    F32(F32),
    F16(F16),
    BF16(BF16),
}

/// Typed storage of a [`Tensor`]. Kept typed (not `Vec<u8>`) so that every view is aligned.
/// Its length is always the tensor's `rows * cols`.
pub type Storage = Typed<Vec<f32>, Vec<f16>, Vec<bf16>>;

/// The elements of a [`Tensor`], writable in place: slices, so the length (`rows * cols`)
/// cannot change. From [`Tensor::storage_mut`].
pub type StorageMut<'a> = Typed<&'a mut [f32], &'a mut [f16], &'a mut [bf16]>;

/// Run `$body` with `$v` bound to the typed payload of a [`Typed`]: a `&Vec<T>` for
/// `&Storage`, a `&mut [T]` for a [`StorageMut`].
#[macro_export]
#[doc(hidden)]
macro_rules! with_storage {
    ($storage:expr, $v:ident => $body:expr) => {
        match $storage {
            $crate::tensor::Typed::F32($v) => $body,
            $crate::tensor::Typed::F16($v) => $body,
            $crate::tensor::Typed::BF16($v) => $body,
        }
    };
}

/// `rows * cols`, or an error naming the shape when that many elements, or one row, of
/// `elem` bytes each would exceed `isize::MAX` bytes (the most any allocation holds). So every
/// tensor's element count and row bytes are representable.
fn checked_len(rows: usize, cols: usize, elem: usize) -> Result<usize> {
    let max = isize::MAX as usize / elem;
    match rows.checked_mul(cols) {
        Some(n) if n <= max && cols <= max => Ok(n),
        _ => Err(Error::invalid(format!(
            "tensor shape [{rows}, {cols}] of {elem}-byte elements exceeds the {} bytes an allocation can hold",
            isize::MAX
        ))),
    }
}

/// A vector of `n` copies of `v`, or an error when it would exceed `isize::MAX` bytes or the
/// allocation fails.
fn try_filled<T: Copy>(n: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|e| {
        Error::invalid(format!("cannot allocate {n} elements of {} bytes: {e}", std::mem::size_of::<T>()))
    })?;
    out.resize(n, v);
    Ok(out)
}

/// A `rows x cols` row-major matrix of one [`DType`].
///
/// Activations are `[tokens, hidden]`; expert weights are stored as Hugging Face does,
/// `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl Tensor {
    /// A tensor of zeros.
    ///
    /// # Panics
    ///
    /// When the tensor (or one of its rows) would exceed `isize::MAX` bytes, as `vec!` does; an allocation that fails aborts, as every `Vec`'s does. Sizes that come from
    /// outside the program should go through [`Tensor::try_zeros`] instead, which returns
    /// those cases as errors.
    pub fn zeros(dtype: DType, rows: usize, cols: usize) -> Self {
        let n = checked_len(rows, cols, dtype.size()).unwrap_or_else(|e| panic!("Tensor::zeros: {e}"));
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Tensor { rows, cols, storage }
    }

    /// A tensor of zeros, or an error (never a panic or an abort) when the tensor or one of its
    /// rows would exceed `isize::MAX` bytes, or the memory cannot be allocated.
    pub fn try_zeros(dtype: DType, rows: usize, cols: usize) -> Result<Self> {
        let n = checked_len(rows, cols, dtype.size())?;
        let storage = match dtype {
            DType::F32 => Storage::F32(try_filled(n, 0.0)?),
            DType::F16 => Storage::F16(try_filled(n, f16::ZERO)?),
            DType::BF16 => Storage::BF16(try_filled(n, bf16::ZERO)?),
        };
        Ok(Tensor { rows, cols, storage })
    }

    /// A `[rows, cols]` tensor of `dtype` from its raw bytes (row-major, native endianness).
    /// Errors when `bytes` is not exactly `rows * cols` values long.
    pub fn from_bytes(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let want = rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size()));
        if want != Some(bytes.len()) {
            return Err(Error::invalid(format!(
                "{} bytes do not hold a [{rows}, {cols}] tensor of {dtype}",
                bytes.len()
            )));
        }
        let mut t = Tensor::try_zeros(dtype, rows, cols)?;
        t.as_bytes_mut().copy_from_slice(bytes);
        Ok(t)
    }

    /// Wrap a typed vector. Errors when `data.len() != rows * cols`, or the shape is too large
    /// for any allocation.
    pub fn from_vec<T: Element>(rows: usize, cols: usize, data: Vec<T>) -> Result<Self> {
        let n = checked_len(rows, cols, T::DTYPE.size())?;
        if data.len() != n {
            return Err(Error::invalid(format!(
                "tensor data has {} elements, shape [{rows}, {cols}] needs {n}",
                data.len()
            )));
        }
        // `Element` is a public trait: a type outside this crate may claim a dtype it is not.
        let foreign =
            || Error::invalid(format!("{} is not the element type of {}", std::any::type_name::<T>(), T::DTYPE));
        let any: Box<dyn std::any::Any> = Box::new(data);
        let storage = match T::DTYPE {
            DType::F32 => Storage::F32(*any.downcast::<Vec<f32>>().map_err(|_| foreign())?),
            DType::F16 => Storage::F16(*any.downcast::<Vec<f16>>().map_err(|_| foreign())?),
            DType::BF16 => Storage::BF16(*any.downcast::<Vec<bf16>>().map_err(|_| foreign())?),
        };
        Ok(Tensor { rows, cols, storage })
    }

    /// Round f32 values to `dtype` (nearest even). Errors when `data.len() != rows * cols`, or
    /// the shape is too large for any allocation.
    pub fn from_f32(dtype: DType, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        let n = checked_len(rows, cols, dtype.size())?;
        if data.len() != n {
            return Err(Error::invalid(format!(
                "tensor data has {} elements, shape [{rows}, {cols}] needs {n}",
                data.len()
            )));
        }
        // `data` already holds `n` elements, so this allocation's size is a valid one.
        let mut t = Tensor::zeros(dtype, rows, cols);
        with_storage!(&mut t.storage, v => Element::narrow_slice(data, v));
        Ok(t)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype().size()
    }
    /// The typed elements, row-major.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The typed elements, writable in place (their number cannot change).
    pub fn storage_mut(&mut self) -> StorageMut<'_> {
        match &mut self.storage {
            Storage::F32(v) => Typed::F32(v.as_mut_slice()),
            Storage::F16(v) => Typed::F16(v.as_mut_slice()),
            Storage::BF16(v) => Typed::BF16(v.as_mut_slice()),
        }
    }

    /// The raw bytes, row-major, native endianness.
    pub fn as_bytes(&self) -> &[u8] {
        with_storage!(&self.storage, v => bytemuck::cast_slice(v.as_slice()))
    }
    /// The raw bytes, writable (used to receive exchanges in place).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        with_storage!(&mut self.storage, v => bytemuck::cast_slice_mut(v.as_mut_slice()))
    }

    /// The typed data when the dtype is `T`, else `None`.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        with_storage!(&self.storage, v => bytemuck::try_cast_slice(v.as_slice()).ok())
            .filter(|_| T::DTYPE == self.dtype())
    }

    /// The typed data, writable in place, when the dtype is `T`, else `None`.
    pub fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        with_storage!(&mut self.storage, v => bytemuck::try_cast_slice_mut(v.as_mut_slice()).ok())
    }

    /// Element `(r, c)` widened to f32; `None` outside the tensor.
    pub fn get_f32(&self, r: usize, c: usize) -> Option<f32> {
        if r >= self.rows || c >= self.cols {
            return None;
        }
        let i = r * self.cols + c;
        Some(with_storage!(&self.storage, v => v[i].to_f32()))
    }

    /// Every element widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let mut out = vec![0f32; self.len()];
        // Large tensors (a prefill batch for the router) widen on every core.
        with_storage!(&self.storage, v => out
            .par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(d, s)| Element::widen_slice(s, d)));
        out
    }

    /// Every element widened to f64 (for references).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_storage!(&self.storage, v => v.iter().map(|x| x.to_f32() as f64).collect())
    }

    /// Convert to another dtype (rounding to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        Tensor::from_f32(dtype, self.rows, self.cols, &self.to_f32_vec()).expect("shape preserved by conversion")
    }

    /// Elements the storage can hold without reallocating.
    pub(crate) fn capacity(&self) -> usize {
        with_storage!(&self.storage, v => v.capacity())
    }

    /// The same allocation viewed as `[rows, cols]`; contents are unspecified (kept where the
    /// storage was already large enough, zeros where it grew). Panics as [`Tensor::zeros`] does.
    pub(crate) fn reshaped(mut self, rows: usize, cols: usize) -> Tensor {
        let n = checked_len(rows, cols, self.dtype().size()).unwrap_or_else(|e| panic!("Tensor::reshaped: {e}"));
        with_storage!(&mut self.storage, v => {
            if v.len() >= n { v.truncate(n) } else { v.resize(n, Default::default()) }
        });
        self.rows = rows;
        self.cols = cols;
        self
    }

    /// Rows `[start, end)` as a new tensor.
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<Tensor> {
        if start > end || end > self.rows {
            return Err(Error::invalid(format!("row range {start}..{end} outside a tensor of {} rows", self.rows)));
        }
        let (a, b) = (start * self.cols, end * self.cols);
        let storage = match &self.storage {
            Storage::F32(v) => Storage::F32(v[a..b].to_vec()),
            Storage::F16(v) => Storage::F16(v[a..b].to_vec()),
            Storage::BF16(v) => Storage::BF16(v[a..b].to_vec()),
        };
        Ok(Tensor { rows: end - start, cols: self.cols, storage })
    }

    /// Check the shape and dtype, with a message naming `what`.
    pub fn expect(&self, what: &str, dtype: DType, rows: Option<usize>, cols: usize) -> Result<()> {
        if self.dtype() != dtype {
            return Err(Error::invalid(format!("{what} has dtype {}, expected {dtype}", self.dtype())));
        }
        if self.cols != cols || rows.is_some_and(|r| r != self.rows) {
            let want_rows = rows.map(|r| r.to_string()).unwrap_or_else(|| "N".into());
            return Err(Error::invalid(format!(
                "{what} has shape [{}, {}], expected [{want_rows}, {cols}]",
                self.rows, self.cols
            )));
        }
        Ok(())
    }
}
