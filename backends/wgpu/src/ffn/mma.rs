//! The cooperative-matrix FFN path (`wgsl/ffn_mma.wgsl`): the adapter's matrix shape, the
//! tile of each bucket of rows per expert, and the launches of one chunk of rows.

use moe_ep::{DType, Result};

use super::{Chunk, DeviceExperts, MmaPlan, Projection, Run, encode_pass, grid};
use crate::context::{GpuContext, backend_error};
use crate::kernels::{MmaTile, Variant};

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

/// The buckets of rows per expert and their tiles (up, down), smallest first, for `units`
/// and `limit` bytes of workgroup memory: an expert of `m` rows takes `m / 128` (or the largest
/// bucket's) full tiles and its remainder goes to the first bucket that holds it.
pub fn default_tiles(units: MatrixUnits, limit: u32) -> Vec<(usize, MmaTile, MmaTile)> {
    let (s, sg) = (units.size, units.subgroup);
    let t = |bm, bn, bk, wm, wn| MmaTile { s, bm, bn, bk, wm, wn, sg, nbuf: 2, sv: 1 };
    let fit = |mut t: MmaTile, up: bool| {
        if t.workgroup_bytes(up) > limit {
            t.nbuf = 1;
        }
        t
    };
    let rows: &[(u32, MmaTile, MmaTile)] = if s == 16 {
        &[
            (16, t(16, 64, 64, 1, 4), t(16, 64, 64, 1, 4)),
            (32, t(32, 64, 64, 1, 4), t(32, 64, 64, 1, 4)),
            (64, t(64, 64, 32, 2, 2), t(64, 64, 32, 2, 2)),
            (128, t(128, 64, 32, 2, 2), t(128, 128, 32, 2, 2)),
        ]
    } else {
        &[
            (16, t(16, 32, 32, 2, 2), t(16, 32, 32, 2, 2)),
            (32, t(32, 32, 32, 2, 2), t(32, 32, 32, 2, 2)),
            (64, t(64, 32, 32, 2, 2), t(64, 64, 32, 2, 2)),
        ]
    };
    rows.iter()
        .map(|&(m, u, d)| (m as usize, fit(u, true), fit(d, false)))
        .filter(|(_, u, d)| u.workgroup_bytes(true) <= limit && d.workgroup_bytes(false) <= limit)
        .collect()
}

/// Tiles the naga test validates: each default tile of both shapes, and the variants a
/// benchmark sweeps (vec4 staging, one staging buffer).
pub fn mma_tiles_for_validation() -> Vec<MmaTile> {
    let mut v = Vec::new();
    for units in [MatrixUnits { size: 16, subgroup: 32 }, MatrixUnits { size: 8, subgroup: 32 }] {
        for (_, u, d) in default_tiles(units, u32::MAX) {
            v.push(u);
            v.push(d);
            if units.size == 16 {
                v.push(MmaTile { sv: 4, ..u });
                v.push(MmaTile { nbuf: 1, ..d });
            }
        }
    }
    v
}

/// Row tiles of one shard for one projection: (tile, entries) per bucket.
type Buckets = Vec<(MmaTile, Vec<[u32; 4]>)>;

/// Split every expert of shard `s` into row tiles: forced tile `force`, or the buckets'.
fn bucket_tiles(dev: &DeviceExperts, s: usize, c: &Chunk<'_>, buckets: &[(usize, MmaTile)]) -> Buckets {
    let shard = &dev.shards[s];
    let mut out: Buckets = Vec::new();
    let mut push = |t: MmaTile, e: usize, r0: usize, r1: usize| {
        let entry = [e as u32, r0 as u32, r1 as u32, 0];
        match out.iter_mut().find(|(k, _)| *k == t) {
            Some((_, v)) => v.push(entry),
            None => out.push((t, vec![entry])),
        }
    };
    let (_, big) = *buckets.last().expect("at least one bucket");
    for l in shard.first..shard.first + shard.count {
        let (mut r0, r1) = (c.offs[l], c.offs[l + 1]);
        let e = l - shard.first;
        let bm = big.bm as usize;
        while r1 - r0 >= bm {
            push(big, e, r0, r0 + bm);
            r0 += bm;
        }
        if r1 > r0 {
            let t = buckets.iter().find(|(m, _)| *m >= r1 - r0).map_or(big, |&(_, t)| t);
            push(t, e, r0, r1);
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
        let MmaPlan { units, tiles: force, run } = plan;
        let (d, f) = (dev.hidden, dev.intermediate);
        let n = c.len();
        let limit = self.limits().max_compute_workgroup_storage_size;
        let table = default_tiles(units, limit);
        if table.is_empty() {
            return Err(backend_error(format!("no FFN tile fits the {limit} bytes of workgroup memory")));
        }
        let inter = self.ffn_scratch("ffn intermediate", (n * f * 4) as u64, scratch)?;
        let hmax = self.ffn_scratch("ffn intermediate maxima", (n * 4) as u64, scratch)?;
        let dummy_r = self.ffn_scratch("ffn unused", 16, scratch)?;
        let dummy_w = self.ffn_scratch("ffn unused", 16, scratch)?;
        enc.clear_buffer(&hmax, 0, Some((n * 4) as u64));
        let mut launches = Vec::new();
        let xmax = if c.act == DType::BF16 && run != Run::Down {
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
            Some(xmax)
        } else {
            None
        };
        for up in [true, false] {
            if (up && run == Run::Down) || (!up && run == Run::Up) {
                continue;
            }
            let (k, nn) = if up { (d, f) } else { (f, d) };
            let proj = Projection { up, k, n: nn };
            let buckets: Vec<(usize, MmaTile)> = match force[usize::from(!up)] {
                Some(t) => vec![(usize::MAX, t)],
                None => table.iter().map(|&(m, u, dn)| (m, if up { u } else { dn })).collect(),
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
            for s in 0..dev.shards.len() {
                for (tile, tiles) in bucket_tiles(dev, s, c, &buckets) {
                    launches.push(self.mma_launch(dev, s, c, &proj, tile, &tiles, &bufs, scratch)?);
                }
            }
        }
        encode_pass(enc, &launches);
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
        let wb = shard.count as u64 * (dev.intermediate * dev.hidden * 2) as u64;
        let v = Variant::ffn_mma(proj.up, c.act, tile, dev.epilogue());
        // SAFETY: row tiles come from validated offsets: rows within the chunk (A, out, the
        // maxima at row - base), experts below the shard's count (weights at expert * matrix);
        // the kernel reads A and weights only below K and N (zeros past them), writes only rows
        // below the tile's end and columns below N, vectors at expert * vec_stride + offset + n.
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
