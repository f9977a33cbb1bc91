// The end of a split FFN launch (`wgsl/ffn_gemv.wgsl`): out[r, n] = the sum over chunks,
// in order, of the partials [chunk][r][n], starting from zero, the same additions the unsplit
// kernel makes; then, for UP, silu(gate) * up of the two sums (the gate's partials first, then
// the up's, `chunks * rows * N` values apart). With DT = 1 or 2 (the down projection of 16-bit
// activations) it writes pairs of outputs narrowed to f16 / bf16 in one 32-bit word instead,
// as `wgsl/narrow.wgsl` would.
//
// Prelude (added by the loader): UP, DT; `wgsl/convert.wgsl` and `wgsl/silu.wgsl` precede
// this file.

struct Params {
    count: u32,    // rows * N outputs (DT != 0: an even number)
    chunks: u32,   // partials per output
    groups_x: u32, // workgroups along x
    zero: u32,     // always 0, unknown to the compiler
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

fn total(i: u32) -> f32 {
    var g = bitcast<f32>(p.zero);
    for (var c = 0u; c < p.chunks; c++) {
        g = g + part[c * p.count + i];
    }
    return g;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * p.groups_x + wid.x) * WG + lid;
    if DT != 0u {
        if 2u * i < p.count {
            out[i] = narrow_pair(total(2u * i), total(2u * i + 1u), DT);
        }
        return;
    }
    if i >= p.count {
        return;
    }
    if UP {
        let z = bitcast<f32>(p.zero);
        var g = z;
        var u = z;
        for (var c = 0u; c < p.chunks; c++) {
            g = g + part[c * p.count + i];
            u = u + part[(p.chunks + c) * p.count + i];
        }
        out[i] = bitcast<u32>(silu_mul(g, u));
    } else {
        out[i] = bitcast<u32>(total(i));
    }
}
