//! Expert weights on the device: each kind of matrix concatenated over experts in shards that
//! fit one binding, with each shard's row scales and biases; bf16 checkpoints converted to f16
//! with a power-of-two scale per weight row where the matrix units need f16.

use moe_ep::model::config::Activation;
use moe_ep::{DType, Error, ExpertSet, ExpertWeights, Result, Tensor};

use crate::context::{GpuContext, backend_error};

/// How [`DeviceExperts::upload_weights`] stores the matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// As the checkpoint has them (f32, f16 or bf16).
    Native,
    /// bf16 converted to f16 with a power-of-two scale per weight row (the matrix units take
    /// f16 only): row n is stored as `w * 2^(14 - e_n)` with `e_n = floor(log2(max |w|))`, so
    /// its largest value lies in [2^14, 2^15) and none overflows f16 (65504); a bf16 value
    /// converts exactly unless it is below `2^-28` times its row's largest (then it becomes an
    /// f16 subnormal, rounded); the kernels multiply each sum by `2^(e_n - 14)`, exactly.
    /// Other dtypes are stored natively.
    F16Scaled,
}

/// Some local experts' three matrices, each kind concatenated in one buffer.
#[derive(Debug)]
pub struct Shard {
    /// First local expert in the shard, and how many.
    pub first: usize,
    pub count: usize,
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    pub down: wgpu::Buffer,
    /// f32: the row scales of the shard's experts (if scaled), `count` blocks of
    /// [`DeviceExperts::vec_stride`] values (gate `[F]`, up `[F]`, down `[D]`), then their
    /// biases (if any) in the same layout.
    pub vecs: wgpu::Buffer,
    /// Packed experts: the quantization scales of gate, up and down, one block of
    /// [`DeviceExperts::scale_stride`] words an expert (`wgsl/ffn_quant.wgsl`).
    pub scales: Option<[wgpu::Buffer; 3]>,
}

/// One expert set's weights on the device, in shards that each fit one binding.
#[derive(Debug)]
pub struct DeviceExperts {
    /// The checkpoint's weight dtype, and the dtype stored on the device.
    pub source: DType,
    pub dtype: DType,
    /// Whether rows carry power-of-two scales ([`WeightFormat::F16Scaled`] of bf16).
    pub scaled: bool,
    /// Whether the experts have biases (all of them, or none).
    pub biased: bool,
    /// The experts' activation.
    pub activation: Activation,
    /// Hidden (`D`) and intermediate (`F`) sizes, and the number of experts.
    pub hidden: usize,
    pub intermediate: usize,
    pub experts: usize,
    pub shards: Vec<Shard>,
    /// Bytes on the device.
    pub bytes: u64,
    /// The experts' packed format (values streamed as packed words, dequantized inside the
    /// kernels; `source` and `dtype` are then f32, unused), `None` for dense weights.
    pub packed: Option<moe_ep::QuantFormat>,
    /// Packed experts: whether every matrix's values fit f16 well enough for the cooperative
    /// kernel to stage them as f16 ([`fits_f16`]); always false for dense sets.
    pub packed_f16: bool,
}

/// Whether a packed matrix's values may be staged as f16: its bound on `|w|`
/// ([`crate::ffn::packed::max_abs_bound`]) at most f16's largest value, and at least 2^-8, so
/// that values near the top keep f16's relative precision: a matrix whose values all lie near
/// f16's subnormals (below 2^-14) would lose it (bf16 weights get a power-of-two scale per row
/// instead; packed ones stay on the portable kernels).
fn fits_f16(m: &moe_ep::model::quant::PackedMatrix) -> bool {
    let b = crate::ffn::packed::max_abs_bound(m);
    (2f64.powi(-8)..=65504.0).contains(&b)
}

/// The GPU kernels' shape rules for an FFN of `d x f` with these dtypes, as a device error
/// (so that a layer's policy runs such a layer on the CPU).
pub fn check_shape(act: DType, weights: DType, d: usize, f: usize) -> Result<()> {
    let sixteen = act.size() == 2 || weights.size() == 2;
    if sixteen && (!d.is_multiple_of(2) || !f.is_multiple_of(2)) {
        return Err(backend_error(format!(
            "the GPU FFN reads 16-bit values in pairs: hidden {d} and intermediate {f} must be even \
             ({act} activations, {weights} weights)"
        )));
    }
    Ok(())
}

/// Bytes written between flushes of the queue's staging memory during an upload.
const FLUSH_BYTES: u64 = 1 << 30;

impl DeviceExperts {
    /// Upload `experts` (all `[F, D]`, `[F, D]`, `[D, F]` in one dtype, at least one), bf16 as
    /// [`WeightFormat::F16Scaled`] where the context has matrix units for the FFN, else
    /// natively. Errors as [`DeviceExperts::upload_weights`].
    pub fn upload(ctx: &GpuContext, experts: &ExpertSet) -> Result<Self> {
        let format = if ctx.ffn_matrix().is_some() { WeightFormat::F16Scaled } else { WeightFormat::Native };
        let refs: Vec<&ExpertWeights> = experts.iter().collect();
        Self::upload_weights(ctx, &refs, experts.activation(), format)
    }

    /// Upload `experts` in `format`, sharded so that no binding exceeds the device's limit.
    /// Errors when the experts differ in shape or dtype, or some but not all have biases,
    /// when a bf16 weight to convert is infinite or NaN (naming expert, matrix and row), when
    /// one expert's matrix alone exceeds the binding limit, or for shapes the kernels do not
    /// take ([`check_shape`]).
    pub fn upload_weights(
        ctx: &GpuContext,
        experts: &[&ExpertWeights],
        activation: Activation,
        format: WeightFormat,
    ) -> Result<Self> {
        let first = experts.first().ok_or_else(|| Error::invalid("no experts to upload"))?;
        if experts.iter().any(|w| w.is_packed()) {
            return Self::upload_packed(ctx, experts, activation);
        }
        let source = first.gate.dense_or_err("expert gate").map_err(|e| backend_error(e.to_string()))?.dtype();
        let (f, d) = (first.gate.rows(), first.gate.cols());
        check_experts(experts, source, d, f)?;
        check_shape(source, source, d, f)?;
        let scaled = format == WeightFormat::F16Scaled && source == DType::BF16;
        let dtype = if scaled { DType::F16 } else { source };
        let biased = first.bias.is_some();
        let matrix = (f * d * dtype.size()) as u64;
        let per_shard = (ctx.max_binding_bytes() / matrix.max(1)) as usize;
        if per_shard == 0 {
            return Err(backend_error(format!(
                "one expert matrix of {matrix} bytes exceeds the {} byte binding limit of {}",
                ctx.max_binding_bytes(),
                ctx.adapter_info().name
            )));
        }
        let _span =
            tracing::debug_span!("upload_experts", experts = experts.len(), bytes = 3 * matrix * experts.len() as u64)
                .entered();
        let mut dev = DeviceExperts {
            source,
            dtype,
            scaled,
            biased,
            activation,
            hidden: d,
            intermediate: f,
            experts: experts.len(),
            shards: Vec::new(),
            bytes: 0,
            packed: None,
            packed_f16: false,
        };
        let mut pending = 0u64;
        for (s, chunk) in experts.chunks(per_shard).enumerate() {
            let shard = dev.upload_shard(ctx, s * per_shard, chunk, &mut pending)?;
            dev.bytes += shard.gate.size() + shard.up.size() + shard.down.size() + shard.vecs.size();
            dev.shards.push(shard);
        }
        ctx.check_errors()?;
        Ok(dev)
    }

    /// f32 values per expert in a shard's `vecs`: gate `[F]`, up `[F]`, down `[D]`.
    pub fn vec_stride(&self) -> usize {
        2 * self.intermediate + self.hidden
    }

    fn upload_shard(
        &self,
        ctx: &GpuContext,
        first: usize,
        chunk: &[&ExpertWeights],
        pending: &mut u64,
    ) -> Result<Shard> {
        let (f, d) = (self.intermediate, self.hidden);
        let matrix = (f * d * self.dtype.size()) as u64;
        let make = |what: &str, bytes: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: bytes.max(16).next_multiple_of(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let n = chunk.len() as u64;
        let (gate, up, down) =
            (make("expert gate", matrix * n), make("expert up", matrix * n), make("expert down", matrix * n));
        let vs = self.vec_stride();
        let vec_values = chunk.len() * vs * (usize::from(self.scaled) + usize::from(self.biased));
        let vecs = make("expert vectors", 4 * vec_values as u64);
        let mut host_vecs = vec![0f32; vec_values];
        let bias_at = if self.scaled { chunk.len() * vs } else { 0 };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
        for (b, batch) in chunk.chunks(threads).enumerate() {
            let converted: Vec<Result<[Stored; 3]>> = std::thread::scope(|scope| {
                let handles: Vec<_> = batch
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let e = first + b * threads + i;
                        scope.spawn(move || self.store(w, e))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("weight conversion panicked"))))
                    .collect()
            });
            for (i, (res, w)) in converted.into_iter().zip(batch).enumerate() {
                let l = b * threads + i;
                let [g, u, dn] = res?;
                for (buf, st, at) in [(&gate, &g, 0), (&up, &u, f), (&down, &dn, 2 * f)] {
                    if !st.bytes.is_empty() {
                        ctx.queue.write_buffer(buf, l as u64 * matrix, &st.bytes);
                    }
                    if self.scaled {
                        host_vecs[l * vs + at..l * vs + at + st.scales.len()].copy_from_slice(&st.scales);
                    }
                }
                if let Some(bias) = &w.bias {
                    let o = bias_at + l * vs;
                    host_vecs[o..o + f].copy_from_slice(&bias.gate);
                    host_vecs[o + f..o + 2 * f].copy_from_slice(&bias.up);
                    host_vecs[o + 2 * f..o + vs].copy_from_slice(&bias.down);
                }
                *pending += 3 * matrix;
                if *pending >= FLUSH_BYTES {
                    // Hand the queued writes to the GPU and let their staging memory go.
                    ctx.queue.submit([]);
                    ctx.wait()?;
                    *pending = 0;
                }
            }
        }
        if !host_vecs.is_empty() {
            ctx.queue.write_buffer(&vecs, 0, bytemuck::cast_slice(&host_vecs));
        }
        Ok(Shard { first, count: chunk.len(), gate, up, down, vecs, scales: None })
    }

    /// Packed experts ([`crate::ffn::packed`]), sharded as dense ones are.
    fn upload_packed(ctx: &GpuContext, experts: &[&ExpertWeights], activation: Activation) -> Result<Self> {
        let first = experts[0];
        let (f, d) = (first.gate.rows(), first.gate.cols());
        let q = crate::ffn::packed::check_packed(experts, d, f)?;
        let biased = first.bias.is_some();
        check_biases(experts, biased, d, f)?;
        let mut dev = DeviceExperts {
            source: DType::F32,
            dtype: DType::F32,
            scaled: false,
            biased,
            activation,
            hidden: d,
            intermediate: f,
            experts: experts.len(),
            shards: Vec::new(),
            bytes: 0,
            packed: Some(q),
            packed_f16: experts.iter().all(|w| w.projections().iter().filter_map(|m| m.packed()).all(fits_f16)),
        };
        let per_expert = 4 * dev.matrix_words().max(dev.scale_stride()) as u64;
        let per_shard = (ctx.max_binding_bytes() / per_expert.max(1)) as usize;
        if per_shard == 0 {
            return Err(backend_error(format!(
                "one packed expert matrix of {per_expert} bytes exceeds the binding limit"
            )));
        }
        let vs = dev.vec_stride();
        for (s, chunk) in experts.chunks(per_shard).enumerate() {
            let mut host = vec![0f32; if biased { chunk.len() * vs } else { 0 }];
            for (l, w) in chunk.iter().enumerate() {
                if let Some(b) = &w.bias {
                    host[l * vs..l * vs + f].copy_from_slice(&b.gate);
                    host[l * vs + f..l * vs + 2 * f].copy_from_slice(&b.up);
                    host[l * vs + 2 * f..(l + 1) * vs].copy_from_slice(&b.down);
                }
            }
            let vecs = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("expert vectors"),
                size: (4 * host.len() as u64).max(16).next_multiple_of(16),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let shard = dev.upload_packed_shard(ctx, s * per_shard, chunk, vecs, &host)?;
            let sc = shard.scales.as_ref().map_or(0, |s| s.iter().map(wgpu::Buffer::size).sum::<u64>());
            dev.bytes += shard.gate.size() + shard.up.size() + shard.down.size() + shard.vecs.size() + sc;
            dev.shards.push(shard);
            ctx.queue.submit([]);
        }
        ctx.check_errors()?;
        Ok(dev)
    }

    /// The bytes of expert `e`'s three matrices as stored, with their row scales.
    fn store(&self, w: &ExpertWeights, e: usize) -> Result<[Stored; 3]> {
        let one = |m: &moe_ep::model::weights::Weight, what: &str| -> Result<Stored> {
            let m = m.dense_or_err(what)?;
            if self.scaled {
                to_f16_scaled(m, e, what)
            } else {
                Ok(Stored { bytes: m.as_bytes().to_vec(), scales: Vec::new() })
            }
        };
        Ok([one(&w.gate, "gate")?, one(&w.up, "up")?, one(&w.down, "down")?])
    }
}

/// A matrix as stored on the device, and its row scales (scaled formats).
struct Stored {
    bytes: Vec<u8>,
    scales: Vec<f32>,
}

fn check_experts(experts: &[&ExpertWeights], dtype: DType, d: usize, f: usize) -> Result<()> {
    let biased = experts[0].bias.is_some();
    for (e, w) in experts.iter().enumerate() {
        let shapes = [(&w.gate, f, d, "gate"), (&w.up, f, d, "up"), (&w.down, d, f, "down")];
        for (m, rows, cols, what) in shapes {
            let m = m.dense_or_err(what)?;
            if m.dtype() != dtype || m.rows() != rows || m.cols() != cols {
                return Err(Error::invalid(format!(
                    "expert {e}: {what} is {} [{}, {}], expected {dtype} [{rows}, {cols}] like expert 0's",
                    m.dtype(),
                    m.rows(),
                    m.cols()
                )));
            }
        }
    }
    check_biases(experts, biased, d, f)
}

/// Biases on every expert or none, each of the right lengths.
fn check_biases(experts: &[&ExpertWeights], biased: bool, d: usize, f: usize) -> Result<()> {
    for (e, w) in experts.iter().enumerate() {
        if w.bias.is_some() != biased {
            return Err(Error::invalid(format!("expert {e}: biases on some experts but not all")));
        }
        if let Some(b) = &w.bias {
            b.validate(d, f, &format!("expert {e}"))?;
        }
    }
    Ok(())
}

/// The exponent `e` of a row whose largest |value| has f32 bits `max_bits`: the row is stored
/// times `2^(14 - e)` (the kernels' `row_exp` in `wgsl/ffn_mma.wgsl`, the same rule).
pub fn row_exp(max_bits: u32) -> i32 {
    ((max_bits >> 23) as i32 - 127).clamp(-100, 127)
}

/// 2^e as f32, for e in [-126, 127].
pub fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// A bf16 matrix `m` (rows of expert `e`'s `what`) as f16 bytes with one power-of-two scale a
/// row ([`WeightFormat::F16Scaled`]). Errors on an infinite or NaN weight.
fn to_f16_scaled(m: &Tensor, e: usize, what: &str) -> Result<Stored> {
    let cols = m.cols();
    let bits: Vec<u16> = m.as_bytes().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    let mut bytes = Vec::with_capacity(bits.len() * 2);
    let mut scales = Vec::with_capacity(m.rows());
    for (r, row) in bits.chunks(cols.max(1)).enumerate().take(m.rows()) {
        let mut top = 0u16;
        for &b in row {
            let a = b & 0x7fff;
            if a >= 0x7f80 {
                return Err(Error::invalid(format!(
                    "expert {e}: {what} row {r} holds a non-finite weight (bf16 bits {b:#06x})"
                )));
            }
            top = top.max(a);
        }
        let ex = row_exp(u32::from(top) << 16);
        let mult = pow2(14 - ex);
        for &b in row {
            let v = f32::from_bits(u32::from(b) << 16) * mult;
            bytes.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        scales.push(pow2(ex - 14));
    }
    Ok(Stored { bytes, scales })
}
