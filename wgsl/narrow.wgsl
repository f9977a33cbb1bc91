// Narrow f32 values to a 16-bit dtype, two per 32-bit word: dst[dst_at + i] =
// narrow(src[2i]) | narrow(src[2i + 1]) << 16, rounding to nearest even (`wgsl/convert.wgsl`, added by the
// loader with `DT`: 1 = f16, 2 = bf16). The expert FFN's last step for 16-bit activations.

struct Params {
    words: u32,    // 32-bit words to write
    groups_x: u32, // workgroups along x
    dst_at: u32,   // first word of dst written
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * p.groups_x + wid.x) * WG + lid;
    if i < p.words {
        dst[p.dst_at + i] = narrow_pair(src[2u * i], src[2u * i + 1u], DT);
    }
}
