//! Packed (quantized) experts on the device: each projection's packed words as the files have
//! them (never widened), one expert after another, and their scales beside them in the layout
//! `wgsl/ffn_quant.wgsl` reads; the kernels dequantize inside their tile loops.

use moe_ep::model::quant::{PackedMatrix, QuantFormat, Scales};
use moe_ep::model::weights::Weight;
use moe_ep::{DType, Error, ExpertWeights, Result};

use crate::context::{GpuContext, backend_error};
use crate::ffn::upload::{DeviceExperts, Shard};

/// Words of one matrix's scales on the device (`wgsl/ffn_quant.wgsl`'s layout).
pub fn scale_words(f: QuantFormat, rows: usize, cols: usize) -> usize {
    match f {
        QuantFormat::Affine { group, scales, .. } => {
            rows * (cols / group as usize) * if scales == DType::F32 { 2 } else { 1 }
        }
        QuantFormat::Mxfp4 => (rows * cols / 32).div_ceil(4),
        QuantFormat::Fp8 { block_rows, block_cols } => {
            rows.div_ceil(block_rows as usize) * cols.div_ceil(block_cols as usize)
        }
    }
}

/// Words of one matrix's values on the device: a whole number of 16-byte words, so that every
/// expert's matrix starts on one.
pub fn value_words(f: QuantFormat, rows: usize, cols: usize) -> usize {
    (rows * f.row_bytes(cols)).div_ceil(4).next_multiple_of(4)
}

/// A matrix's scales as device words.
fn scale_words_of(m: &PackedMatrix) -> Vec<u32> {
    match m.scales() {
        Scales::Affine { scales, biases } if scales.dtype() == DType::F32 => {
            let (s, b) = (scales.to_f32_vec(), biases.to_f32_vec());
            s.iter().zip(&b).flat_map(|(s, b)| [s.to_bits(), b.to_bits()]).collect()
        }
        Scales::Affine { scales, biases } => {
            let half = |t: &moe_ep::Tensor| -> Vec<u32> {
                t.as_bytes().chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect()
            };
            half(scales).iter().zip(half(biases)).map(|(s, b)| s | b << 16).collect()
        }
        Scales::E8m0(bytes) => moe_ep::model::quant::words_of_bytes(bytes),
        Scales::Block(s) => s.iter().map(|v| v.to_bits()).collect(),
    }
}

/// A bound on `|w|` over the matrix's values: affine `max |s| * (2^bits - 1) + |b|` over its
/// groups, MXFP4 `6 * 2^e`, FP8 `448 * |scale|` over its blocks.
pub fn max_abs_bound(m: &PackedMatrix) -> f64 {
    match (m.scales(), m.format()) {
        (Scales::Affine { scales, biases }, QuantFormat::Affine { bits, .. }) => {
            let qmax = ((1u32 << bits) - 1) as f64;
            let (s, b) = (scales.to_f64_vec(), biases.to_f64_vec());
            s.iter().zip(&b).map(|(s, b)| s.abs() * qmax + b.abs()).fold(0.0, f64::max)
        }
        (Scales::E8m0(e), _) => e.iter().map(|&e| 6.0 * 2f64.powi(e as i32 - 127)).fold(0.0, f64::max),
        (Scales::Block(s), _) => s.iter().map(|&v| 448.0 * (v as f64).abs()).fold(0.0, f64::max),
        _ => f64::INFINITY,
    }
}

/// The shape rules of the packed kernels, as device errors: every projection of every expert
/// packed in one format, rows of whole words, scale groups that tile the kernels' steps.
pub fn check_packed(experts: &[&ExpertWeights], d: usize, f: usize) -> Result<QuantFormat> {
    let fmt = |w: &Weight| w.packed().map(PackedMatrix::format);
    let first = fmt(&experts[0].gate);
    let Some(q) = first.filter(|_| experts.iter().all(|w| w.projections().iter().all(|p| fmt(p) == first))) else {
        return Err(backend_error(
            "the GPU FFN takes packed experts whose three projections share one packed format \
             (a projection left dense beside packed ones runs on the CPU)"
                .to_string(),
        ));
    };
    for (e, w) in experts.iter().enumerate() {
        for (m, rows, cols, what) in [(&w.gate, f, d, "gate"), (&w.up, f, d, "up"), (&w.down, d, f, "down")] {
            if m.rows() != rows || m.cols() != cols {
                return Err(Error::invalid(format!(
                    "expert {e}: {what} is [{}, {}], expected [{rows}, {cols}] like expert 0's",
                    m.rows(),
                    m.cols()
                )));
            }
        }
    }
    if let QuantFormat::Fp8 { block_cols, .. } = q
        && (!d.is_multiple_of(4) || !f.is_multiple_of(4) || !(block_cols % 32 == 0 || 32 % block_cols == 0))
    {
        return Err(backend_error(format!(
            "the GPU FFN reads FP8 rows of whole words and scale blocks that tile 32 inputs; not {d} x {f} \
                 with blocks of {block_cols} inputs"
        )));
    }
    Ok(q)
}

impl DeviceExperts {
    /// The kernels' view of the packed format ([`crate::kernels::Packed::NONE`] for dense sets).
    pub(crate) fn kernel_quant(&self) -> crate::kernels::Packed {
        self.packed.map_or(crate::kernels::Packed::NONE, crate::kernels::Packed::of)
    }

    /// Words of one expert's matrix in the bound weight buffers.
    pub fn matrix_words(&self) -> usize {
        let (f, d) = (self.intermediate, self.hidden);
        match self.packed {
            Some(q) => value_words(q, f, d).max(value_words(q, d, f)),
            None => f * d * self.dtype.size() / 4,
        }
    }

    /// Words of one expert's scales of one projection (the larger of gate's and down's).
    pub fn scale_stride(&self) -> usize {
        let (f, d) = (self.intermediate, self.hidden);
        self.packed.map_or(0, |q| scale_words(q, f, d).max(scale_words(q, d, f)).max(1))
    }

    /// Upload a shard of packed experts: values and scales at a fixed stride an expert.
    pub(crate) fn upload_packed_shard(
        &self,
        ctx: &GpuContext,
        first: usize,
        chunk: &[&ExpertWeights],
        vecs: wgpu::Buffer,
        host_vecs: &[f32],
    ) -> Result<Shard> {
        let (mw, sw, n) = (self.matrix_words() as u64, self.scale_stride() as u64, chunk.len() as u64);
        let make = |what: &str, words: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: (4 * words).max(16).next_multiple_of(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let values = [make("expert gate", mw * n), make("expert up", mw * n), make("expert down", mw * n)];
        let scales = [make("gate scales", sw * n), make("up scales", sw * n), make("down scales", sw * n)];
        for (l, w) in chunk.iter().enumerate() {
            for (i, m) in w.projections().iter().enumerate() {
                let m = m.packed().ok_or_else(|| backend_error("a dense projection in a packed set".to_string()))?;
                ctx.queue.write_buffer(&values[i], 4 * l as u64 * mw, bytemuck::cast_slice(m.words()));
                let s = scale_words_of(m);
                if !s.is_empty() {
                    ctx.queue.write_buffer(&scales[i], 4 * l as u64 * sw, bytemuck::cast_slice(&s));
                }
            }
        }
        if !host_vecs.is_empty() {
            ctx.queue.write_buffer(&vecs, 0, bytemuck::cast_slice(host_vecs));
        }
        let [gate, up, down] = values;
        Ok(Shard { first, count: chunk.len(), gate, up, down, vecs, scales: Some(scales) })
    }
}
