//! The cooperative-matrix FFN path (`wgsl/ffn_mma.wgsl`): the adapter's matrix shape, the
//! tile of each bucket of rows per expert, and the launches of one chunk of rows.

use moe_ep::{DType, Result};

use super::portable::{self, Io, Part, ShardTiles};
use super::{Chunk, DeviceExperts, MmaPlan, Projection, Run, encode_pass, grid};
use crate::context::{GpuContext, backend_error};
use crate::kernels::{MmaProbe, MmaTile, Variant};
use crate::ops::Launch;

/// Matrix units the FFN kernel can use: `size x size x size` f16 products with f32
/// accumulators, on subgroups of exactly `subgroup` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixUnits {
    pub size: u32,
    pub subgroup: u32,
}

/// The matrix units of `adapter` for the FFN kernel, if it has some (and `fast` is on):
/// cooperative matrices and f16 shaders, a fixed subgroup size, and among the offered
/// properties a square shape the kernel is written for (16, else 8) with f16 inputs and f32
/// accumulators. Never assumed: a shader with an unoffered shape may compile, run and compute
/// zeros.
pub fn matrix_units(adapter: &wgpu::Adapter, fast: bool) -> Option<MatrixUnits> {
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
    let info = adapter.get_info();
    if !fast || !adapter.features().contains(needed) || info.subgroup_min_size != info.subgroup_max_size {
        return None;
    }
    let offered = adapter.cooperative_matrix_properties();
    [16, 8].into_iter().find_map(|s| {
        offered
            .iter()
            .any(|p| {
                (p.m_size, p.n_size, p.k_size) == (s, s, s)
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            })
            .then_some(MatrixUnits { size: s, subgroup: info.subgroup_min_size })
    })
}

/// The tiles of each projection (up, down), smallest first, for `units` and `limit` bytes
/// of workgroup memory (a tile that does not fit takes one staging buffer, then halves its
/// `bk`); [`bucket_tiles`] splits each expert's rows over them.
/// Chosen from sweeps on the H200 (BENCHMARKS.md, every tile forced on every expert): for the
/// up projection 16-row tiles of eight subgroups (16 x 16 outputs each, gate and up) stream
/// the weights of experts with a few rows (Mixtral-8x7B N=16: 755 us against 892 with four
/// subgroups, 1.30 ms with the 32-row tile; DeepSeek-V3 N=512, at most 27 rows: 8.35 ms
/// against 10.5 with 32-row tiles), the 128-row ones with eight subgroups of 64 x 32 outputs
/// everything larger (the kernel is limited by its fragment loads, so wasted rows cost
/// little); for the down projection the 32-row tile (16 rows: 1.7-2x slower) and for prefill a
/// 128-row one that stages 64 of the reduction a step (Mixtral-8x7B N=2048: 3.80 ms against
/// 5.14 with 32; DeepSeek-V3 N=4096: 10.8 against 14.0).
pub fn default_tiles(units: MatrixUnits, limit: u32) -> [Vec<MmaTile>; 2] {
    let (s, sg) = (units.size, units.subgroup);
    // vec4 staging where the backend takes vector pointers for cooperative loads (Vulkan);
    // Metal's simdgroup loads take scalar ones (its matrices are 8x8).
    let sv = if s == 16 { 4 } else { 1 };
    let t = |bm, bn, bk, wm, wn, nbuf| MmaTile { s, bm, bn, bk, wm, wn, sg, nbuf, sv, probe: MmaProbe::Whole };
    let (up, down) = if s == 16 {
        (
            vec![t(16, 128, 64, 1, 8, 1), t(128, 128, 32, 2, 4, 1)],
            vec![t(32, 128, 32, 2, 4, 1), t(128, 128, 64, 2, 4, 1)],
        )
    } else {
        (vec![t(16, 32, 32, 2, 2, 2), t(64, 64, 32, 2, 2, 1)], vec![t(16, 32, 32, 2, 2, 2), t(64, 64, 32, 2, 2, 1)])
    };
    let fit = |v: Vec<MmaTile>, is_up: bool| -> Vec<MmaTile> {
        v.into_iter()
            .filter_map(|mut t| {
                if t.workgroup_bytes(is_up) > limit {
                    t.nbuf = 1;
                }
                while t.workgroup_bytes(is_up) > limit && t.bk > t.s && (t.bk / 2).is_multiple_of(t.s) {
                    t.bk /= 2;
                }
                (t.workgroup_bytes(is_up) <= limit).then_some(t)
            })
            .collect()
    };
    [fit(up, true), fit(down, false)]
}

/// Tiles the naga test validates: each default tile of both shapes, also as fitted to 16,
/// 32 and 48 KB of workgroup memory (fewer staging buffers, smaller `bk`), and the variants a
/// benchmark sweeps (vec4 staging, one staging buffer, the timing probes).
pub fn mma_tiles_for_validation() -> Vec<MmaTile> {
    let mut v = Vec::new();
    for units in [MatrixUnits { size: 16, subgroup: 32 }, MatrixUnits { size: 8, subgroup: 32 }] {
        for limit in [u32::MAX, 49152, 32768, 16384] {
            for t in default_tiles(units, limit).into_iter().flatten() {
                let mut add = vec![t];
                if units.size == 16 && limit == u32::MAX {
                    add.extend([MmaTile { sv: 1, ..t }, MmaTile { nbuf: 3 - t.nbuf, ..t }]);
                    add.extend([MmaProbe::NoProducts, MmaProbe::NoLoads].map(|probe| MmaTile { probe, ..t }));
                }
                for t in add {
                    if !v.contains(&t) {
                        v.push(t);
                    }
                }
            }
        }
    }
    v
}

/// Row tiles of one shard for one projection: (tile, entries) per bucket.
type Buckets = Vec<(MmaTile, Vec<[u32; 4]>)>;

/// A remainder of at most this many times a tile's rows takes several tiles of it rather
/// than one larger tile: two 16-row tiles stream an expert's weights twice, faster than one
/// 32-row tile streams them once (Mixtral-8x7B N=64, 9-20 rows an expert: up 1.16 ms against
/// 1.30, H200).
const REPEAT: usize = 2;

/// Split every expert of shard `s` with more than `skip` rows into row tiles of `tiles`
/// (smallest first; each takes up to its `bm` rows): whole tiles of the largest, then the
/// remainder `r` in `ceil(r / bm)` tiles of the first tile with `r <= REPEAT * bm` (or one
/// of the largest).
fn bucket_tiles(dev: &DeviceExperts, s: usize, c: &Chunk<'_>, tiles: &[MmaTile], skip: usize) -> Buckets {
    let shard = &dev.shards[s];
    let mut out: Buckets = Vec::new();
    let mut push = |t: MmaTile, e: usize, r0: usize, r1: usize| {
        let entry = [e as u32, r0 as u32, r1 as u32, 0];
        match out.iter_mut().find(|(k, _)| *k == t) {
            Some((_, v)) => v.push(entry),
            None => out.push((t, vec![entry])),
        }
    };
    let big = *tiles.last().expect("at least one tile");
    let bm = big.bm as usize;
    for l in shard.first..shard.first + shard.count {
        let (mut r0, r1) = (c.offs[l], c.offs[l + 1]);
        if r1 - r0 <= skip {
            continue;
        }
        let e = l - shard.first;
        while r1 - r0 >= bm {
            push(big, e, r0, r0 + bm);
            r0 += bm;
        }
        if r1 > r0 {
            let t = tiles.iter().copied().find(|t| r1 - r0 <= REPEAT * t.bm as usize).unwrap_or(big);
            let step = t.bm as usize;
            for r in (r0..r1).step_by(step) {
                push(t, e, r, (r + step).min(r1));
            }
        }
    }
    out
}

impl GpuContext {
    /// Record the cooperative path's launches for one chunk of rows: the bf16 batch's row
    /// maxima, the up projection (gate, up and the activation, with the intermediate's row
    /// maxima), the down projection into the call's output.
    pub(super) fn encode_mma(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dev: &DeviceExperts,
        c: &Chunk<'_>,
        plan: MmaPlan,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<()> {
        let MmaPlan { units, tiles: force, run, decode_max, whole } = plan;
        let over = |w: &[usize]| w[1] - w[0] > decode_max;
        let decode_max = if whole && c.offs.windows(2).any(over) { 0 } else { decode_max };
        let (d, f) = (dev.hidden, dev.intermediate);
        let n = c.len();
        let limit = self.limits().max_compute_workgroup_storage_size;
        let table = default_tiles(units, limit);
        if table.iter().any(Vec::is_empty) {
            return Err(backend_error(format!("no FFN tile fits the {limit} bytes of workgroup memory")));
        }
        let inter = self.ffn_scratch("ffn intermediate", (n * f * 4) as u64, scratch)?;
        let hmax = self.ffn_scratch("ffn intermediate maxima", (n * 4) as u64, scratch)?;
        let dummy_r = self.ffn_scratch("ffn unused", 16, scratch)?;
        let dummy_w = self.ffn_scratch("ffn unused", 16, scratch)?;
        enc.clear_buffer(&hmax, 0, Some((n * 4) as u64));
        let mut launches = Vec::new();
        // Experts of at most `decode_max` rows: the portable decode kernel (weights streamed
        // once, split over the reduction) in the same pass; the others on the matrix units.
        let (mut decode, prows) = portable::plan(dev, c, decode_max, true);
        let part_bytes = 4 * (prows * portable::partial_per_row(d, f)) as u64;
        let decode_max = if prows == 0 || part_bytes > self.max_binding_bytes() { 0 } else { decode_max };
        let parts = if decode_max > 0 {
            decode.iter_mut().for_each(|t| t.tiled.clear());
            self.partial_buffers(&decode, d, f, scratch)?
        } else {
            Vec::new()
        };
        let xmax = if c.act == DType::BF16 && run != Run::Down {
            Some(self.batch_rowmax(c, d, &mut launches, scratch)?)
        } else {
            None
        };
        for up in [true, false] {
            if (up && run == Run::Down) || (!up && run == Run::Up) {
                continue;
            }
            let (k, nn) = if up { (d, f) } else { (f, d) };
            let proj = Projection { up, k, n: nn };
            let tiles: Vec<MmaTile> = match force[usize::from(!up)] {
                Some(t) => vec![t],
                None => table[usize::from(!up)].clone(),
            };
            let bufs = if up {
                MmaIo {
                    a: (c.batch, (c.rows * d * 2) as u64),
                    amax: xmax.as_ref().map_or((&dummy_r, 16), |x| (x, (n * 4) as u64)),
                    out: (&inter, (n * f * 4) as u64),
                    omax: (&hmax, (n * 4) as u64),
                }
            } else {
                MmaIo {
                    a: (&inter, (n * f * 4) as u64),
                    amax: (&hmax, (n * 4) as u64),
                    out: (c.out, (c.rows * d * 2) as u64),
                    omax: (&dummy_w, 16),
                }
            };
            // The decode launches first (each shard into its own partial sums, so they need
            // not wait for each other), then the cooperative ones, then the reductions.
            let io = Io {
                a: bufs.a,
                w: (&dev.shards[0].gate, &dev.shards[0].gate, 0),
                part: (&dummy_w, 16),
                out: bufs.out,
                qs: None,
                reduce_out: if up { DType::F32 } else { c.act },
            };
            let decoded = DecodeRows { tiles: &decode, parts: &parts };
            self.decode_launches(dev, c, &proj, &decoded, &io, Part::Decode, scratch, &mut launches)?;
            for s in 0..dev.shards.len() {
                for (tile, rows) in bucket_tiles(dev, s, c, &tiles, decode_max) {
                    launches.push(self.mma_launch(dev, s, c, &proj, tile, &rows, &bufs, scratch)?);
                }
            }
            self.decode_launches(dev, c, &proj, &decoded, &io, Part::Finish, scratch, &mut launches)?;
        }
        encode_pass(self, enc, &launches);
        Ok(())
    }

    /// The row maxima of the chunk's bf16 batch rows (the activations' per-row scales), as a
    /// launch pushed on `launches`; returns their buffer.
    fn batch_rowmax(
        &self,
        c: &Chunk<'_>,
        d: usize,
        launches: &mut Vec<Launch>,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<wgpu::Buffer> {
        let n = c.len();
        let xmax = self.ffn_scratch("ffn batch maxima", (n * 4) as u64, scratch)?;
        let (gx, gy) = grid(n, 1, self.limits().max_compute_workgroups_per_dimension)?;
        let params = [c.c0 as u32, n as u32, (d / 2) as u32, gx];
        // SAFETY: workgroup i < n reads row c0 + i < rows of the batch (d / 2 words each)
        // and writes maximum i < n.
        launches.push(unsafe {
            self.ffn_launch(
                Variant::ffn_rowmax(),
                &params,
                &[(c.batch, (c.rows * d * 2) as u64), (&xmax, (n * 4) as u64)],
                (gx, gy, 1),
            )
        });
        Ok(xmax)
    }

    /// The decode kernel's launches (`part`: the partial sums or their reductions) of
    /// projection `proj` for the experts of at most `decode_max` rows, in the cooperative
    /// path's pass; none without decode rows.
    #[allow(clippy::too_many_arguments)]
    fn decode_launches(
        &self,
        dev: &DeviceExperts,
        c: &Chunk<'_>,
        proj: &Projection,
        decoded: &DecodeRows<'_>,
        io: &Io<'_>,
        part: Part,
        scratch: &mut Vec<wgpu::Buffer>,
        launches: &mut Vec<Launch>,
    ) -> Result<()> {
        for (t, part_buf) in decoded.tiles.iter().zip(decoded.parts) {
            let shard = &dev.shards[t.shard];
            let mut p = dev.params(shard, proj)?;
            let (a_base, o_base) = if proj.up { (0, c.c0) } else { (c.c0, 0) };
            p.a_base = a_base as u32;
            p.o_base = o_base as u32;
            p.chunks = portable::chunks(proj.k) as u32;
            p.prows = t.prows as u32;
            let (w0, w1) = if proj.up { (&shard.gate, &shard.up) } else { (&shard.down, &shard.down) };
            let qs = shard.scales.as_ref().map(|[g, u, dn]| {
                let b = shard.count as u64 * 4 * dev.scale_stride() as u64;
                if proj.up { (g, u, b) } else { (dn, dn, b) }
            });
            let wb = shard.count as u64 * 4 * dev.matrix_words() as u64;
            let io = Io { w: (w0, w1, wb), qs, part: (part_buf, part_buf.size()), ..*io };
            self.portable_launches(dev, c.act, t, proj, &p, &io, part, scratch, launches)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn mma_launch(
        &self,
        dev: &DeviceExperts,
        s: usize,
        c: &Chunk<'_>,
        proj: &Projection,
        tile: MmaTile,
        tiles: &[[u32; 4]],
        io: &MmaIo<'_>,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<crate::ops::Launch> {
        let max_dim = self.limits().max_compute_workgroups_per_dimension as usize;
        let cols = proj.n.div_ceil(tile.bn as usize);
        if tiles.len() > max_dim || cols > max_dim {
            return Err(backend_error(format!(
                "{} row tiles of {} rows x {cols} column blocks exceed {max_dim} workgroups; split the batch",
                tiles.len(),
                tile.bm
            )));
        }
        let shard = &dev.shards[s];
        let mut p = dev.params(shard, proj)?;
        if proj.up {
            (p.a_base, p.o_base, p.m_base) = (0, c.c0 as u32, c.c0 as u32);
        } else {
            (p.a_base, p.o_base, p.m_base) = (c.c0 as u32, 0, c.c0 as u32);
        }
        let table = self.tile_table(tiles, scratch)?;
        let (w0, w1) = if proj.up { (&shard.gate, &shard.up) } else { (&shard.down, &shard.down) };
        let wb = shard.count as u64 * 4 * dev.matrix_words() as u64;
        // Packed weights' scales (gate's and up's, or down's twice); dense sets bind a small
        // unused buffer there.
        let unused = self.ffn_scratch("ffn unused", 16, scratch)?;
        let (q0, q1, qb) = match &shard.scales {
            Some([g, u, dn]) => {
                let b = shard.count as u64 * 4 * dev.scale_stride() as u64;
                if proj.up { (g, u, b) } else { (dn, dn, b) }
            }
            None => (&unused, &unused, 16),
        };
        let v = Variant::ffn_mma(proj.up, c.act, tile, dev.epilogue(), dev.kernel_quant());
        // SAFETY: row tiles come from validated offsets: rows within the chunk (A, out, the
        // maxima at row - base), experts below the shard's count (weights at expert * matrix,
        // packed scales at expert * scale_words plus a row's group below N x groups); every
        // tile is nonempty (bucket_tiles), K and N are at least 8 (encode_ffn_with returns
        // before a zero size) and multiples of 8, so the kernel's loads, clamped to the tile's
        // last row, row N - 1 and column K - 8, stay below K and N (the values past them
        // replaced by zeros); it writes only rows below the tile's end and columns below N,
        // vectors at expert * vec_stride + offset + n.
        Ok(unsafe {
            self.ffn_launch(
                v,
                &p.words(),
                &[
                    (&table, tiles.len() as u64 * 16),
                    io.a,
                    io.amax,
                    (w0, wb),
                    (w1, wb),
                    (&shard.vecs, shard.vecs.size()),
                    io.out,
                    io.omax,
                    (q0, qb),
                    (q1, qb),
                ],
                (cols as u32, tiles.len() as u32, 1),
            )
        })
    }
}

/// Buffers (and bytes bound) of one projection's cooperative launches.
struct MmaIo<'a> {
    a: (&'a wgpu::Buffer, u64),
    amax: (&'a wgpu::Buffer, u64),
    out: (&'a wgpu::Buffer, u64),
    omax: (&'a wgpu::Buffer, u64),
}

/// The decode kernel's row tiles of a chunk (per shard) and each shard's partial sums (none
/// without decode rows).
struct DecodeRows<'t> {
    tiles: &'t [ShardTiles],
    parts: &'t [wgpu::Buffer],
}
