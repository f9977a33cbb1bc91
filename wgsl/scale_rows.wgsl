// Rows scaled by their routing weight: out[t * K + j] = x[t] * w[t * K + j], the product in f32
// and rounded once to the rows' dtype (`wgsl/convert.wgsl`, added by the loader with `DT`:
// 0 = f32, 1 = f16, 2 = bf16). The inputs of experts whose weight scales their input (Llama 4).
// One thread per 32-bit word of the output; 16-bit rows hold two values a word.

struct Params {
    words: u32,      // 32-bit words of the output
    row_words: u32,  // words per row
    k: u32,          // slots per token
    groups_x: u32,   // workgroups along x
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * p.groups_x + wid.x) * WG + lid;
    if i >= p.words {
        return;
    }
    let slot = i / p.row_words;
    let c = i % p.row_words;
    let src = x[(slot / p.k) * p.row_words + c];
    let s = w[slot];
    if DT == 0u {
        out[i] = bitcast<u32>(bitcast<f32>(src) * s);
        return;
    }
    var lo: f32;
    var hi: f32;
    if DT == 2u {
        lo = bitcast<f32>(src << 16u);
        hi = bitcast<f32>(src & 0xffff0000u);
    } else {
        lo = f16_to_f32(src & 0xffffu);
        hi = f16_to_f32(src >> 16u);
    }
    out[i] = narrow_pair(lo * s, hi * s, DT);
}
