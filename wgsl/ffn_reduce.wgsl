// The end of the decode kernel's launches (`wgsl/ffn_gemv.wgsl`): for each row of a row tile,
// the sum over chunks, in order, of the partials [chunk][q][n] (q = tiles[.].w plus the row's
// place in its tile), starting from zero: the additions the tiled kernel makes; then the
// tiled kernel's epilogue (`wgsl/ffn_epi.wgsl`: scales, biases and, for UP, act(gate, up) of
// the two sums, the gate's partials first, the up's `chunks * prows * N` values later).
// Writes out[(r - o_base) * N + n]: f32 (OT = 0), or (the down projection) pairs of outputs
// narrowed to f16 (OT = 1) or bf16 (OT = 2) in one 32-bit word, as `wgsl/narrow.wgsl` would.
//
// Workgroup (wid.x, wid.y): columns (OT = 0) or column pairs wid.x * 256 .., row tile
// tiles[wid.y] (at most 8 rows).
//
// Prelude (added by the loader): UP, OT, WS, BIAS, ACT; `wgsl/convert.wgsl`, `wgsl/ffn_act.wgsl`
// and `wgsl/ffn_epi.wgsl` precede this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read> vecs: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

// The sum of the partials of row q, column n, from partial set `which` (0 gate or down, 1 up).
fn total(which: u32, q: u32, n: u32) -> f32 {
    var s = bitcast<f32>(p.zero);
    for (var c = 0u; c < p.chunks; c++) {
        s = s + part[((which * p.chunks + c) * p.prows + q) * p.n_len + n];
    }
    return s;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if p.zero != 0u {
        out[0] = bitcast<u32>(vecs[0]);
    }
    let tile = tiles[wid.y];
    let per = select(1u, 2u, OT != 0u);
    let n = (wid.x * WG + lid) * per;
    if n >= p.n_len {
        return;
    }
    for (var r = tile.y; r < tile.z; r++) {
        let q = tile.w + r - tile.y;
        let o = (r - p.o_base) * p.n_len + n;
        if UP {
            out[o] = bitcast<u32>(up_value(total(0u, q, n), total(1u, q, n), tile.x, n));
        } else if OT == 0u {
            out[o] = bitcast<u32>(down_value(total(0u, q, n), tile.x, n));
        } else {
            let v0 = down_value(total(0u, q, n), tile.x, n);
            let v1 = down_value(total(0u, q, n + 1u), tile.x, n + 1u);
            out[o / 2u] = narrow_pair(v0, v1, OT);
        }
    }
}
