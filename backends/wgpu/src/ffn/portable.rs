//! The portable FFN path: per expert, the decode kernel (`wgsl/ffn_gemv.wgsl`, then
//! `wgsl/ffn_reduce.wgsl`) for a few rows, the tiled kernel (`wgsl/ffn.wgsl`) for more. All
//! sum in one order and share the epilogue, so a row's bits do not depend on the choice.

use moe_ep::{DType, Result};

use super::{Chunk, DeviceExperts, FfnParams, Projection, encode_pass, grid};
use crate::context::GpuContext;
use crate::kernels::{CHUNK, Epilogue, Packed, Tile, Variant, WORKGROUP};
use crate::ops::Launch;

/// Row tiles of one shard: decode buckets (tile, tiles), the tiled kernel's tiles, and every
/// decode tile again for the reduction.
pub(super) struct ShardTiles {
    pub shard: usize,
    pub decode: Vec<(Tile, Vec<[u32; 4]>)>,
    pub tiled: Vec<[u32; 4]>,
    pub reduce: Vec<[u32; 4]>,
    /// Rows of this shard's partial sums (its decode rows, numbered from 0): each shard has
    /// a partial-sum buffer of its own, so that its decode launches need not wait for
    /// another shard's.
    pub prows: usize,
}

/// Which launches of a shard's projection [`GpuContext::portable_launches`] records: the
/// decode kernel's (into the shard's partial sums), or the tiled kernel's and the reduction.
/// A call records every shard's decode launches first, so that they can overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    Decode,
    Finish,
}

pub(super) fn chunks(k: usize) -> usize {
    k.div_ceil(CHUNK as usize)
}

/// Values of the decode kernel's partial sums per row (the larger projection's).
pub(super) fn partial_per_row(d: usize, f: usize) -> usize {
    (2 * chunks(d) * f).max(chunks(f) * d)
}

/// The decode tile for an expert of `m` (1..=16) rows.
fn decode_tile(m: usize, prefetch: bool) -> Tile {
    let t = Tile::gemv(m.next_power_of_two() as u32);
    if prefetch { t } else { Tile { bkw: 0, ..t } }
}

/// The FFN kernel of `dev`'s weights (dense or packed) for `up`, `act`, `tile`, `epi`.
pub(super) fn ffn_variant(
    dev: &DeviceExperts,
    up: bool,
    act: DType,
    tile: Tile,
    unpack: bool,
    epi: Epilogue,
) -> Variant {
    match dev.packed {
        Some(q) => Variant::ffn_packed(up, act, Packed::of(q), tile, unpack, epi),
        None => Variant::ffn(up, act, dev.dtype, tile, unpack, epi),
    }
}

/// Every pipeline the portable path may use for `dev` and `act`.
pub(super) fn variants(ctx: &GpuContext, dev: &DeviceExperts, act: DType) -> Vec<Variant> {
    let epi = dev.epilogue();
    let unpack = ctx.unpack_f16();
    let mut v = Vec::new();
    for up in [true, false] {
        v.push(ffn_variant(dev, up, act, Tile::SQUARE, unpack, epi));
        if decode_ok(ctx, dev) {
            // Larger tiles (up to DECODE_TILE_MAX_ROWS) compile when a call first asks for them.
            for m in [1, 2, 4, 8].into_iter().filter(|&m| m <= super::DECODE_MAX_ROWS) {
                v.push(ffn_variant(dev, up, act, decode_tile(m, true), unpack, Epilogue::PLAIN));
            }
            v.push(Variant::ffn_reduce(up, epi, DType::F32));
            if !up && act != DType::F32 {
                v.push(Variant::ffn_reduce(up, epi, act));
            }
        }
    }
    if act != DType::F32 {
        v.push(Variant::narrow(act));
    }
    v
}

/// The most rows an expert may have for the decode kernel on this device: the largest decode
/// tile (up to [`super::DECODE_TILE_MAX_ROWS`]) whose workgroup memory fits, 0 if none does.
pub(super) fn decode_limit(ctx: &GpuContext) -> usize {
    let limit = ctx.limits().max_compute_workgroup_storage_size;
    [super::DECODE_TILE_MAX_ROWS, super::DECODE_MAX_ROWS]
        .into_iter()
        .find(|&m| Tile::gemv(m as u32).workgroup_bytes() <= limit)
        .unwrap_or(0)
}

/// Whether the decode kernel takes these sizes (its 16-byte loads; packed: whole 16-byte
/// words a row, each word's values in one scale group) on this device.
pub(super) fn decode_ok(ctx: &GpuContext, dev: &DeviceExperts) -> bool {
    let fits = decode_limit(ctx) > 0;
    let sizes = match dev.packed {
        None => dev.hidden.is_multiple_of(8) && dev.intermediate.is_multiple_of(8),
        Some(q) => {
            let vpw = 4 * Packed::of(q).per_word() as usize;
            dev.hidden.is_multiple_of(vpw) && dev.intermediate.is_multiple_of(vpw) && q.group() % vpw == 0
        }
    };
    fits && sizes
}

impl GpuContext {
    /// Record the portable path's launches for one chunk of rows.
    pub(super) fn encode_portable(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dev: &DeviceExperts,
        c: &Chunk<'_>,
        decode_max: usize,
        prefetch: bool,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<()> {
        let (d, f) = (dev.hidden, dev.intermediate);
        let n = c.len();
        let decode_max = if decode_ok(self, dev) { decode_max } else { 0 };
        let (mut plan, prows) = plan(dev, c, decode_max, prefetch);
        if 4 * (prows * partial_per_row(d, f)) as u64 > self.max_binding_bytes() {
            // Partial sums too large for one binding: the tiled kernel, same bits.
            plan = self::plan(dev, c, 0, prefetch).0;
        }
        let inter = self.ffn_scratch("ffn intermediate", (n * f * 4) as u64, scratch)?;
        let parts = self.partial_buffers(&plan, d, f, scratch)?;
        let out32 = if c.act == DType::F32 {
            None
        } else {
            Some(self.ffn_scratch("ffn f32 output", (n * d * 4) as u64, scratch)?)
        };
        let mut launches = Vec::new();
        for up in [true, false] {
            let (k, nn) = if up { (d, f) } else { (f, d) };
            let proj = Projection { up, k, n: nn };
            // A: the batch (global rows) or the intermediate (chunk rows); out: the
            // intermediate, or the f32 output (chunk rows), or the call's f32 output.
            let (a, a_bytes, a_base) =
                if up { (c.batch, (c.rows * d * c.act.size()) as u64, 0) } else { (&inter, (n * f * 4) as u64, c.c0) };
            let (o, o_bytes, o_base) = match (up, &out32) {
                (true, _) => (&inter, (n * f * 4) as u64, c.c0),
                (false, Some(o)) => (o, (n * d * 4) as u64, c.c0),
                (false, None) => (c.out, (c.rows * d * 4) as u64, 0),
            };
            // Every shard's decode launches, then every shard's tiled and reduce launches.
            let steps =
                [Part::Decode, Part::Finish].into_iter().flat_map(|x| plan.iter().zip(&parts).map(move |t| (x, t)));
            for (part, (t, part_buf)) in steps {
                let shard = &dev.shards[t.shard];
                let mut p = dev.params(shard, &proj)?;
                (p.a_base, p.o_base, p.chunks, p.prows) =
                    (a_base as u32, o_base as u32, chunks(k) as u32, t.prows as u32);
                let (w0, w1) = if up { (&shard.gate, &shard.up) } else { (&shard.down, &shard.down) };
                let w_bytes = shard.count as u64 * 4 * dev.matrix_words() as u64;
                let qs = shard.scales.as_ref().map(|[g, u, dn]| {
                    let b = shard.count as u64 * 4 * dev.scale_stride() as u64;
                    if up { (g, u, b) } else { (dn, dn, b) }
                });
                let io = Io {
                    a: (a, a_bytes),
                    w: (w0, w1, w_bytes),
                    qs,
                    part: (part_buf, part_buf.size()),
                    out: (o, o_bytes),
                    reduce_out: DType::F32,
                };
                self.portable_launches(dev, c.act, t, &proj, &p, &io, part, scratch, &mut launches)?;
            }
        }
        if let Some(o32) = &out32 {
            let words = n * d / 2;
            let (gx, gy) = grid(words, WORKGROUP as usize, self.limits().max_compute_workgroups_per_dimension)?;
            let params = [words as u32, gx, (c.c0 * d / 2) as u32, 0];
            // SAFETY: the kernel writes words dst_at + i for i < words, within the output's
            // rows * D / 2 words, and reads f32 values 2i, 2i + 1 < n * D of the chunk's output.
            launches.push(unsafe {
                self.ffn_launch(
                    Variant::narrow(c.act),
                    &params,
                    &[(o32, (n * d * 4) as u64), (c.out, (c.rows * d * 2) as u64)],
                    (gx, gy, 1),
                )
            });
        }
        encode_pass(self, enc, &launches);
        Ok(())
    }

    /// One partial-sum buffer per shard of `plan` (16 bytes where it has no decode rows).
    pub(super) fn partial_buffers(
        &self,
        plan: &[ShardTiles],
        d: usize,
        f: usize,
        scratch: &mut Vec<wgpu::Buffer>,
    ) -> Result<Vec<wgpu::Buffer>> {
        plan.iter()
            .map(|t| self.ffn_scratch("ffn partial sums", (4 * t.prows * partial_per_row(d, f)) as u64, scratch))
            .collect()
    }

    /// The decode launches (`Part::Decode`), or the tiled and reduce launches
    /// (`Part::Finish`), of one shard for one projection.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn portable_launches(
        &self,
        dev: &DeviceExperts,
        act: DType,
        t: &ShardTiles,
        proj: &Projection,
        p: &FfnParams,
        io: &Io<'_>,
        part: Part,
        scratch: &mut Vec<wgpu::Buffer>,
        launches: &mut Vec<Launch>,
    ) -> Result<()> {
        let words = p.words();
        if part == Part::Finish {
            return self.finish_launches(dev, act, t, proj, &words, io, scratch, launches);
        }
        let max_dim = self.limits().max_compute_workgroups_per_dimension;
        let unpack = self.unpack_f16();
        let (w0, w1, wb) = io.w;
        for (tile, tiles) in &t.decode {
            let table = self.tile_table(tiles, scratch)?;
            check_dim(tiles.len(), max_dim)?;
            let v = ffn_variant(dev, proj.up, act, *tile, unpack, Epilogue::PLAIN);
            let groups = (chunks(proj.k) as u32, proj.n.div_ceil(tile.bn as usize) as u32, tiles.len() as u32);
            let mut bufs = vec![(&table, tiles.len() as u64 * 16), io.a, (w0, wb), (w1, wb), io.part];
            bufs.extend(io.qs.iter().flat_map(|&(q0, q1, b)| [(q0, b), (q1, b)]));
            // SAFETY: row tiles come from validated offsets (rows below the call's and the
            // chunk's), experts below the shard's count; the kernel keeps weight, row and
            // column indices below K, N and the tile's end (a fetch's loads clamped to row
            // N - 1, N >= 1, and to the stage's last word, a stage of at least one word: K a
            // multiple of the 16-byte word, every fetch at k0 < k_end), and its partial rows
            // below prows; packed scales at the expert's block plus a row's group below
            // N x groups.
            launches.push(unsafe { self.ffn_launch(v, &words, &bufs, groups) });
        }
        Ok(())
    }

    /// The tiled and reduce launches of one shard for one projection.
    #[allow(clippy::too_many_arguments)]
    fn finish_launches(
        &self,
        dev: &DeviceExperts,
        act: DType,
        t: &ShardTiles,
        proj: &Projection,
        words: &[u32],
        io: &Io<'_>,
        scratch: &mut Vec<wgpu::Buffer>,
        launches: &mut Vec<Launch>,
    ) -> Result<()> {
        let max_dim = self.limits().max_compute_workgroups_per_dimension;
        let unpack = self.unpack_f16();
        let (w0, w1, wb) = io.w;
        if !t.tiled.is_empty() {
            let table = self.tile_table(&t.tiled, scratch)?;
            check_dim(t.tiled.len(), max_dim)?;
            let tile = Tile::SQUARE;
            let v = ffn_variant(dev, proj.up, act, tile, unpack, dev.epilogue());
            let groups = (t.tiled.len() as u32, proj.n.div_ceil(tile.bn as usize) as u32, 1);
            let vecs = &dev.shards[t.shard].vecs;
            let mut bufs =
                vec![(&table, t.tiled.len() as u64 * 16), io.a, (w0, wb), (w1, wb), io.out, (vecs, vecs.size())];
            bufs.extend(io.qs.iter().flat_map(|&(q0, q1, b)| [(q0, b), (q1, b)]));
            // SAFETY: row tiles come from validated offsets (rows below the call's and the
            // chunk's), experts below the shard's count; the kernel keeps weight, row and column
            // indices below K, N and the tile's end; vectors are read at expert * vec_stride +
            // offset + n, within the shard's vecs when the epilogue reads them.
            launches.push(unsafe { self.ffn_launch(v, words, &bufs, groups) });
        }
        if !t.reduce.is_empty() {
            let table = self.tile_table(&t.reduce, scratch)?;
            check_dim(t.reduce.len(), max_dim)?;
            let v = Variant::ffn_reduce(proj.up, dev.epilogue(), io.reduce_out);
            let per = if v.out == DType::F32 { 1 } else { 2 };
            let groups = (proj.n.div_ceil(per * WORKGROUP as usize) as u32, t.reduce.len() as u32, 1);
            let vecs = &dev.shards[t.shard].vecs;
            // SAFETY: partial rows q < prows, chunks and columns below the launch's; outputs
            // at the tiles' rows (within the output's) and columns below N.
            launches.push(unsafe {
                self.ffn_launch(
                    v,
                    words,
                    &[(&table, t.reduce.len() as u64 * 16), io.part, (vecs, vecs.size()), io.out],
                    groups,
                )
            });
        }
        Ok(())
    }
}

/// Buffers (and bytes bound) of one projection's launches.
pub(super) struct Io<'a> {
    pub a: (&'a wgpu::Buffer, u64),
    pub w: (&'a wgpu::Buffer, &'a wgpu::Buffer, u64),
    pub part: (&'a wgpu::Buffer, u64),
    pub out: (&'a wgpu::Buffer, u64),
    /// Packed weights: their scale buffers (w0's, w1's) and bytes bound.
    pub qs: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer, u64)>,
    /// The reduction's output dtype (the down projection's: f32, or the call's 16-bit one).
    pub reduce_out: DType,
}

fn check_dim(n: usize, max_dim: u32) -> Result<()> {
    if n > max_dim as usize {
        return Err(crate::context::backend_error(format!(
            "{n} row tiles exceed {max_dim} workgroups; split the batch"
        )));
    }
    Ok(())
}

/// Row tiles of every shard for chunk `c`: experts of 1..=decode_max rows in decode buckets
/// (partial rows numbered from 0 in each shard), the others in 64-row tiles. Also the most
/// partial rows of a shard (0: no decode rows).
pub(super) fn plan(dev: &DeviceExperts, c: &Chunk<'_>, decode_max: usize, prefetch: bool) -> (Vec<ShardTiles>, usize) {
    let mut out = Vec::new();
    let mut most = 0usize;
    for (s, shard) in dev.shards.iter().enumerate() {
        let mut prows = 0usize;
        let mut t = ShardTiles { shard: s, decode: Vec::new(), tiled: Vec::new(), reduce: Vec::new(), prows: 0 };
        for l in shard.first..shard.first + shard.count {
            let (r0, r1) = (c.offs[l], c.offs[l + 1]);
            let m = r1 - r0;
            let e = (l - shard.first) as u32;
            if m == 0 {
                continue;
            }
            if m <= decode_max {
                let tile = decode_tile(m, prefetch);
                let entry = [e, r0 as u32, r1 as u32, prows as u32];
                prows += m;
                match t.decode.iter_mut().find(|(k, _)| *k == tile) {
                    Some((_, v)) => v.push(entry),
                    None => t.decode.push((tile, vec![entry])),
                }
                t.reduce.push(entry);
            } else {
                let bm = Tile::SQUARE.bm as usize;
                for r in (r0..r1).step_by(bm) {
                    t.tiled.push([e, r as u32, (r + bm).min(r1) as u32, 0]);
                }
            }
        }
        t.prows = prows;
        most = most.max(prows);
        out.push(t);
    }
    (out, most)
}
