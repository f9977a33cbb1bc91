//! Launches of the data-path kernels on device buffers: what the engine runs, and what a
//! caller who keeps rows on the GPU (or a benchmark) encodes directly.
//!
//! Roles of the two kernels in one EP layer (DESIGN.md, steps 3-9):
//!
//! | step | role | kernel | sources |
//! |---|---|---|---|
//! | 3 pack | packet_gather: rows for each peer into its send block | [`Gather`] | `x` |
//! | 5 scatter | dispatch_local + dispatch_scatter_remote (packet_scatter): received and local rows into the expert-major batch, in one pass | [`Gather`] | received, `x` |
//! | 7 gather back | combine_gather_remote: outputs into per-peer blocks in arrival order | [`Gather`] | outputs |
//! | 9 combine | combine_weighted_sum, zero-copy: local outputs and received rows read where they lie | [`Combine`] | outputs, received |

use std::num::NonZeroU64;
use std::sync::Arc;

use moe_ep::{DType, Error, Result};

use crate::context::{GpuContext, backend_error};
use crate::kernels::{MAX_K, Variant, WORKGROUP, Word};
use crate::pipelines::Pipeline;

/// `dst[r] = cat(a, b)[idx[r]]` (or zeros for `ZERO_ROW`) over `rows` rows of `row_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Gather<'a> {
    /// First source; rows `0..a_rows` of the concatenation.
    pub a: &'a wgpu::Buffer,
    /// Rows in `a`.
    pub a_rows: usize,
    /// Second source (rows `a_rows..`), if any.
    pub b: Option<&'a wgpu::Buffer>,
    /// Rows in `b`.
    pub b_rows: usize,
    /// `rows` u32 indices.
    pub idx: &'a wgpu::Buffer,
    /// Destination, `rows * row_bytes` bytes.
    pub dst: &'a wgpu::Buffer,
    /// Destination rows.
    pub rows: usize,
    /// Bytes per row; a multiple of 4.
    pub row_bytes: usize,
}

/// `y[t] = sum_j w[t*k+j] * cat(a, b)[idx[t*k+j]]` over `rows` tokens, f32 accumulation.
#[derive(Clone, Copy, Debug)]
pub struct Combine<'a> {
    /// First source (this rank's expert outputs).
    pub a: &'a wgpu::Buffer,
    /// Rows in `a`.
    pub a_rows: usize,
    /// Second source (rows received back), if any.
    pub b: Option<&'a wgpu::Buffer>,
    /// Rows in `b`.
    pub b_rows: usize,
    /// `rows * k` u32 indices.
    pub idx: &'a wgpu::Buffer,
    /// `rows * k` f32 weights.
    pub weights: &'a wgpu::Buffer,
    /// Output, `rows * row_bytes` bytes.
    pub dst: &'a wgpu::Buffer,
    /// Output rows (tokens).
    pub rows: usize,
    /// Slots per token.
    pub k: usize,
    /// Element type of sources and output.
    pub dtype: DType,
    /// Bytes per row; a multiple of 4.
    pub row_bytes: usize,
}

/// One kernel launch, ready to encode any number of times.
#[derive(Debug)]
pub struct Launch {
    pipeline: Arc<Pipeline>,
    bind: wgpu::BindGroup,
    groups: (u32, u32, u32),
    label: String,
}

impl Launch {
    pub(crate) fn new(pipeline: Arc<Pipeline>, bind: wgpu::BindGroup, groups: (u32, u32, u32), label: String) -> Self {
        Launch { pipeline, bind, groups, label }
    }

    /// Record the launch into `pass`.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        if self.groups.0 == 0 || self.groups.1 == 0 || self.groups.2 == 0 {
            return;
        }
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind, &[]);
        pass.dispatch_workgroups(self.groups.0, self.groups.1, self.groups.2);
    }

    /// Record the launch in a compute pass of its own.
    pub fn encode_pass(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(&self.label), timestamp_writes: None });
        self.encode(&mut pass);
    }

    /// The variant's label, e.g. `gather_rows.vec4`.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// The word a row of `row_bytes` moves in, or an error for rows that are not whole 32-bit words.
pub fn word_for(what: &str, row_bytes: usize) -> Result<Word> {
    Word::for_row(row_bytes).ok_or_else(|| {
        Error::invalid(format!(
            "{what}: rows of {row_bytes} bytes are not a multiple of 4; the GPU kernels move 32-bit words, \
             so 16-bit dtypes need an even number of columns (use the CPU engine for odd ones)"
        ))
    })
}

/// Workgroup grid for `rows` rows of `words` words: threads per row (log2), and the grid.
fn geometry(ctx: &GpuContext, rows: usize, words: usize) -> Result<(u32, u32, u32)> {
    let tpr = words.next_power_of_two().clamp(1, WORKGROUP as usize);
    let shift = tpr.trailing_zeros();
    let per_group = WORKGROUP as usize / tpr;
    let groups = rows.div_ceil(per_group);
    let max_dim = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let gx = groups.min(max_dim);
    let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
    if gy > max_dim {
        return Err(backend_error(format!("{rows} rows need {groups} workgroups, over {max_dim}^2")));
    }
    Ok((shift, gx as u32, gy as u32))
}

pub(crate) fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} does not fit the kernels' 32-bit indices")))
}

pub(crate) fn binding(b: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    // A binding may not be empty; 16 bytes is one vec4 word and every pool buffer's minimum.
    let size = NonZeroU64::new(bytes.max(16)).expect("non-zero");
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: b, offset: 0, size: Some(size) })
}

impl GpuContext {
    fn check_holds(&self, what: &str, b: &wgpu::Buffer, bytes: u64) -> Result<()> {
        self.check_binding(what, bytes)?;
        if b.size() < bytes.max(16) {
            return Err(Error::invalid(format!("{what}: buffer of {} bytes for {bytes} bytes of data", b.size())));
        }
        Ok(())
    }

    fn pipeline(&self, v: Variant, checked: bool) -> Arc<Pipeline> {
        if checked {
            self.pipelines.get(&self.device, v)
        } else {
            // SAFETY: only reached from the `_unchecked` launchers, whose callers promise
            // in-range indices; sizes and the grid are checked here on the host.
            unsafe { self.pipelines.get_unchecked(&self.device, v) }
        }
    }

    pub(crate) fn params(&self, words: [u32; 8]) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// Prepare a row gather, with wgpu's bounds checks in the kernel (an index out of range
    /// reads clamped or zero rows, never outside a buffer). Errors when a size exceeds the
    /// device's limits, a buffer is too small for its rows, or rows are not whole 32-bit words.
    pub fn gather(&self, g: &Gather<'_>) -> Result<Launch> {
        self.gather_impl(g, true)
    }

    /// [`GpuContext::gather`] compiled without runtime bounds checks.
    ///
    /// # Safety
    /// Every index in `g.idx` is `ZERO_ROW` or below `a_rows + b_rows` (the engine checks this
    /// on the host before it uploads them).
    pub unsafe fn gather_unchecked(&self, g: &Gather<'_>) -> Result<Launch> {
        self.gather_impl(g, false)
    }

    fn gather_impl(&self, g: &Gather<'_>, checked: bool) -> Result<Launch> {
        let word = word_for("gather_rows", g.row_bytes)?;
        let rb = g.row_bytes as u64;
        self.check_holds("gather_rows source a", g.a, g.a_rows as u64 * rb)?;
        if let Some(b) = g.b {
            self.check_holds("gather_rows source b", b, g.b_rows as u64 * rb)?;
        }
        self.check_holds("gather_rows indices", g.idx, g.rows as u64 * 4)?;
        self.check_holds("gather_rows destination", g.dst, g.rows as u64 * rb)?;
        let words = g.row_bytes / word.bytes();
        let (shift, gx, gy) = geometry(self, g.rows, words)?;
        let v = Variant::gather(word);
        let pipeline = self.pipeline(v, checked);
        let params = self.params([
            u32_of("rows", g.rows)?,
            u32_of("row words", words)?,
            u32_of("source rows", g.a_rows)?,
            shift,
            gx,
            0,
            0,
            0,
        ]);
        let b = g.b.unwrap_or(g.a);
        let b_bytes = if g.b.is_some() { g.b_rows as u64 * rb } else { 16 };
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("gather_rows"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(g.a, g.a_rows as u64 * rb) },
                wgpu::BindGroupEntry { binding: 2, resource: binding(b, b_bytes) },
                wgpu::BindGroupEntry { binding: 3, resource: binding(g.idx, g.rows as u64 * 4) },
                wgpu::BindGroupEntry { binding: 4, resource: binding(g.dst, g.rows as u64 * rb) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx, gy, 1), label: v.label() })
    }

    /// Prepare a weighted combine, with wgpu's bounds checks. Errors as
    /// [`GpuContext::gather`] does, and for `k` outside `1..=MAX_K`.
    ///
    /// The bounds checks cost the combine most of its speed (its per-slot arrays stop living in
    /// registers): see BENCHMARKS.md. The engine uses [`GpuContext::combine_unchecked`].
    pub fn combine(&self, c: &Combine<'_>) -> Result<Launch> {
        self.combine_impl(c, true)
    }

    /// [`GpuContext::combine`] compiled without runtime bounds checks.
    ///
    /// # Safety
    /// Every index in `c.idx` is `ZERO_ROW` or below `a_rows + b_rows`.
    pub unsafe fn combine_unchecked(&self, c: &Combine<'_>) -> Result<Launch> {
        self.combine_impl(c, false)
    }

    fn combine_impl(&self, c: &Combine<'_>, checked: bool) -> Result<Launch> {
        let word = word_for("combine", c.row_bytes)?;
        if c.k == 0 || c.k > MAX_K {
            return Err(Error::invalid(format!(
                "combine: k = {} outside the 1..={MAX_K} the GPU combine supports",
                c.k
            )));
        }
        let rb = c.row_bytes as u64;
        let slots = c.rows as u64 * c.k as u64;
        self.check_holds("combine source a", c.a, c.a_rows as u64 * rb)?;
        if let Some(b) = c.b {
            self.check_holds("combine source b", b, c.b_rows as u64 * rb)?;
        }
        self.check_holds("combine indices", c.idx, slots * 4)?;
        self.check_holds("combine weights", c.weights, slots * 4)?;
        self.check_holds("combine output", c.dst, c.rows as u64 * rb)?;
        let words = c.row_bytes / word.bytes();
        let (shift, gx, gy) = geometry(self, c.rows, words)?;
        let v = Variant::combine(word, c.dtype, c.k as u32, self.unpack_f16());
        let pipeline = self.pipeline(v, checked);
        let params = self.params([
            u32_of("rows", c.rows)?,
            u32_of("row words", words)?,
            u32_of("source rows", c.a_rows)?,
            shift,
            gx,
            u32_of("k", c.k)?,
            0,
            0,
        ]);
        u32_of("slots", slots as usize)?;
        let b = c.b.unwrap_or(c.a);
        let b_bytes = if c.b.is_some() { c.b_rows as u64 * rb } else { 16 };
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("combine"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(c.a, c.a_rows as u64 * rb) },
                wgpu::BindGroupEntry { binding: 2, resource: binding(b, b_bytes) },
                wgpu::BindGroupEntry { binding: 3, resource: binding(c.idx, slots * 4) },
                wgpu::BindGroupEntry { binding: 4, resource: binding(c.weights, slots * 4) },
                wgpu::BindGroupEntry { binding: 5, resource: binding(c.dst, c.rows as u64 * rb) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx, gy, 1), label: v.label() })
    }
}
