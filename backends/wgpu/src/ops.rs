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

/// `y[t] = sum_j w(t, j) * cat(a, b, c)[idx[t*k+j]]` over `rows` tokens, f32 accumulation.
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
    /// Third source (the shared expert's outputs), if any.
    pub c: Option<&'a wgpu::Buffer>,
    /// Rows in `c`.
    pub c_rows: usize,
    /// `rows * k` u32 indices.
    pub idx: &'a wgpu::Buffer,
    /// The weights.
    pub weights: CombineWeights<'a>,
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

/// Where a [`Combine`]'s weights come from.
#[derive(Clone, Copy, Debug)]
pub enum CombineWeights<'a> {
    /// `rows * k` f32 values, slot by slot.
    PerSlot(&'a wgpu::Buffer),
    /// A routing's `rows * stride` weights for the first `stride` slots; the last slot (when
    /// `k = stride + 1`) weighs 1, or `scale[t]` (`rows` f32 values) with `scale`.
    Routed { weights: &'a wgpu::Buffer, stride: usize, scale: Option<&'a wgpu::Buffer> },
    /// Every slot weighs 1.
    Ones,
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

    /// The grid: workgroups in x, y, z.
    pub fn groups(&self) -> (u32, u32, u32) {
        self.groups
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
        self.params_n(&words)
    }

    /// A uniform buffer of `words` (a multiple of 4 of them).
    pub(crate) fn params_n(&self, words: &[u32]) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(words),
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
        if let Some(x) = c.c {
            self.check_holds("combine source c", x, c.c_rows as u64 * rb)?;
        }
        self.check_holds("combine indices", c.idx, slots * 4)?;
        let (wmode, w_buf, w_bytes, stride, extra, extra_bytes) = match c.weights {
            CombineWeights::PerSlot(w) => (0u32, Some(w), slots * 4, 0usize, None, 16),
            CombineWeights::Routed { weights, stride, scale } => {
                if stride != c.k && stride + 1 != c.k {
                    return Err(Error::invalid(format!("combine: routed weights of {stride} slots for k = {}", c.k)));
                }
                let mode = if scale.is_some() { 2 } else { 1 };
                (mode, Some(weights), c.rows as u64 * stride as u64 * 4, stride, scale, c.rows as u64 * 4)
            }
            CombineWeights::Ones => (3, None, 16, 0, None, 16),
        };
        if let Some(w) = w_buf {
            self.check_holds("combine weights", w, w_bytes)?;
        }
        if let Some(x) = extra {
            self.check_holds("combine extra-slot scale", x, extra_bytes)?;
        }
        let words = c.row_bytes / word.bytes();
        let (shift, gx, gy) = geometry(self, c.rows, words)?;
        let v = Variant::combine(word, c.dtype, c.k as u32, self.unpack_f16());
        let pipeline = self.pipeline(v, checked);
        let params = self.params_n(&[
            u32_of("rows", c.rows)?,
            u32_of("row words", words)?,
            u32_of("source rows", c.a_rows)?,
            shift,
            gx,
            u32_of("k", c.k)?,
            0,
            u32_of("source rows", c.a_rows + c.b_rows)?,
            wmode,
            u32_of("weight stride", stride)?,
            0,
            0,
        ]);
        u32_of("slots", slots as usize)?;
        u32_of("source rows", c.a_rows + c.b_rows + c.c_rows)?;
        let b = c.b.unwrap_or(c.a);
        let b_bytes = if c.b.is_some() { c.b_rows as u64 * rb } else { 16 };
        let cc = c.c.unwrap_or(c.a);
        let c_bytes = if c.c.is_some() { c.c_rows as u64 * rb } else { 16 };
        let w = w_buf.unwrap_or(c.idx);
        let x = extra.unwrap_or(c.idx);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("combine"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(c.a, c.a_rows as u64 * rb) },
                wgpu::BindGroupEntry { binding: 2, resource: binding(b, b_bytes) },
                wgpu::BindGroupEntry { binding: 3, resource: binding(c.idx, slots * 4) },
                wgpu::BindGroupEntry { binding: 4, resource: binding(w, w_bytes) },
                wgpu::BindGroupEntry { binding: 5, resource: binding(c.dst, c.rows as u64 * rb) },
                wgpu::BindGroupEntry { binding: 6, resource: binding(cc, c_bytes) },
                wgpu::BindGroupEntry { binding: 7, resource: binding(x, extra_bytes) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx, gy, 1), label: v.label() })
    }

    /// Prepare the router logits of `n` rows of `x` (`[n, d]` of `act`) against the `[e, d]`
    /// matrix `w` (of `weights`) into `out` (`[n, e]` f32), or their sigmoid. Bounds-checked
    /// pipeline. Errors when a buffer is smaller than its shape or `d` is odd for 16-bit data.
    #[allow(clippy::too_many_arguments)]
    pub fn router_logits(
        &self,
        x: (&wgpu::Buffer, DType),
        w: (&wgpu::Buffer, DType),
        out: &wgpu::Buffer,
        (n, d, e): (usize, usize, usize),
        sigmoid: bool,
    ) -> Result<Launch> {
        if (x.1.size() == 2 || w.1.size() == 2) && d % 2 != 0 {
            return Err(backend_error(format!("router logits: 16-bit rows need an even width, not {d}")));
        }
        self.check_holds("router input", x.0, (n * d * x.1.size()) as u64)?;
        self.check_holds("router weight", w.0, (e * d * w.1.size()) as u64)?;
        self.check_holds("router logits", out, (n * e * 4) as u64)?;
        let max_dim = self.limits().max_compute_workgroups_per_dimension as usize;
        // Tiles of 4 experts x 8 tokens (`wgsl/router_logits.wgsl`).
        let gx = e.div_ceil(4);
        let tiles = n.div_ceil(8);
        let gy = tiles.min(max_dim);
        let gz = if gy == 0 { 0 } else { tiles.div_ceil(gy) };
        if gx > max_dim || gz > max_dim {
            return Err(backend_error(format!("router logits: {n} tokens x {e} experts exceed the grid limits")));
        }
        let v = Variant::router_logits(x.1, w.1, sigmoid, self.unpack_f16());
        let pipeline = self.pipeline(v, true);
        let params =
            self.params([u32_of("tokens", n)?, u32_of("width", d)?, u32_of("experts", e)?, gy as u32, 0, 0, 0, 0]);
        u32_of("router input elements", n * d)?;
        u32_of("router logits", n * e)?;
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("router_logits"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(x.0, (n * d * x.1.size()) as u64) },
                wgpu::BindGroupEntry { binding: 2, resource: binding(w.0, (e * d * w.1.size()) as u64) },
                wgpu::BindGroupEntry { binding: 3, resource: binding(out, (n * e * 4) as u64) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx as u32, gy as u32, gz as u32), label: v.label() })
    }

    /// Prepare the router's top-k over `[n, e]` f32 `logits` under `rules`: `ids` and
    /// `weights` get `n * k` values. `bias` holds `e` f32 values (any buffer without a bias).
    /// Bounds-checked pipeline.
    #[allow(clippy::too_many_arguments)]
    pub fn router_topk(
        &self,
        logits: &wgpu::Buffer,
        bias: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        (n, e, k): (usize, usize, usize),
        rules: &TopKRules,
    ) -> Result<Launch> {
        if k == 0 || k > 16 || rules.n_group == 0 || rules.n_group > 64 || e % rules.n_group != 0 {
            return Err(Error::invalid(format!(
                "router top-k: k = {k} (1..=16), {} groups (1..=64, dividing {e} experts)",
                rules.n_group
            )));
        }
        self.check_holds("router logits", logits, (n * e * 4) as u64)?;
        if rules.bias || rules.logit_bias {
            self.check_holds("router bias", bias, (e * 4) as u64)?;
        }
        self.check_holds("router ids", ids, (n * k * 4) as u64)?;
        self.check_holds("router weights", weights, (n * k * 4) as u64)?;
        let groups = n.div_ceil(64);
        let max_dim = self.limits().max_compute_workgroups_per_dimension as usize;
        let gx = groups.min(max_dim);
        let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
        let flags = u32::from(rules.sigmoid)
            | (u32::from(rules.top_two) << 1)
            | (u32::from(rules.bias) << 2)
            | (u32::from(rules.renormalize) << 3)
            | (u32::from(rules.by_logit) << 4)
            | (u32::from(rules.logit_bias) << 5)
            | (u32::from(rules.softmax_topk) << 6);
        let v = Variant::router_topk();
        let pipeline = self.pipeline(v, true);
        let params = self.params_n(&[
            u32_of("tokens", n)?,
            e as u32,
            k as u32,
            rules.n_group as u32,
            rules.topk_group as u32,
            flags,
            rules.scale.to_bits(),
            gx as u32,
            rules.norm_p.to_bits(),
            rules.norm_eps.to_bits(),
            rules.norm_min.to_bits(),
            0,
        ]);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("router_topk"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(logits, (n * e * 4) as u64) },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: binding(bias, if rules.bias || rules.logit_bias { (e * 4) as u64 } else { 16 }),
                },
                wgpu::BindGroupEntry { binding: 3, resource: binding(ids, (n * k * 4) as u64) },
                wgpu::BindGroupEntry { binding: 4, resource: binding(weights, (n * k * 4) as u64) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx as u32, gy as u32, 1), label: v.label() })
    }
}

impl GpuContext {
    /// Prepare `out = [n * k, D]` rows `x[t] * w[t * k + j]` of `dtype` (`x`: `n` rows of
    /// `row_bytes`, `w`: `n * k` f32). Bounds-checked pipeline.
    pub fn scale_rows(
        &self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        out: &wgpu::Buffer,
        (n, k, row_bytes): (usize, usize, usize),
        dtype: DType,
    ) -> Result<Launch> {
        word_for("scale_rows", row_bytes)?;
        self.check_holds("rows", x, (n * row_bytes) as u64)?;
        self.check_holds("weights", w, (n * k * 4) as u64)?;
        self.check_holds("scaled rows", out, (n * k * row_bytes) as u64)?;
        let row_words = row_bytes / 4;
        let words = u32_of("scaled words", n * k * row_words)? as usize;
        let groups = words.div_ceil(WORKGROUP as usize);
        let max_dim = self.limits().max_compute_workgroups_per_dimension as usize;
        let gx = groups.min(max_dim);
        let gy = if gx == 0 { 0 } else { groups.div_ceil(gx) };
        let v = Variant::scale_rows(dtype);
        let pipeline = self.pipeline(v, true);
        let params = self.params_n(&[words as u32, row_words as u32, k as u32, gx as u32]);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("scale_rows"),
            layout: &pipeline.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: binding(x, (n * row_bytes) as u64) },
                wgpu::BindGroupEntry { binding: 2, resource: binding(w, (n * k * 4) as u64) },
                wgpu::BindGroupEntry { binding: 3, resource: binding(out, (words * 4) as u64) },
            ],
        });
        Ok(Launch { pipeline, bind, groups: (gx as u32, gy as u32, 1), label: v.label() })
    }
}

/// The routing rules of [`GpuContext::router_topk`] (see `wgsl/router_topk.wgsl`, and
/// `moe_ep::RouterConfig` for what each means).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopKRules {
    pub sigmoid: bool,
    /// Softmax over the chosen k (gpt-oss), instead of scores of every expert.
    pub softmax_topk: bool,
    pub top_two: bool,
    /// A selection bias (added to the scores for choosing only).
    pub bias: bool,
    /// A bias added to the logits.
    pub logit_bias: bool,
    pub renormalize: bool,
    /// Rank experts by logit (it ranks as the scores would).
    pub by_logit: bool,
    pub n_group: usize,
    pub topk_group: usize,
    pub scale: f32,
    pub norm_p: f32,
    pub norm_eps: f32,
    pub norm_min: f32,
}
