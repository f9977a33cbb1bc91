// Row maxima for the cooperative FFN kernel's row scales (`wgsl/ffn_mma.wgsl`, AT = 2):
// amax[i] = the f32 bits of max |x| over row row0 + i of the bf16 batch (two values a 32-bit
// word; |x| as f32 bits is the bf16 bits without the sign, shifted: integer order is float
// order for non-negative values), for i < rows. Workgroup (wid.x, wid.y) takes row
// wid.y * groups_x + wid.x.

struct Params {
    row0: u32,     // first row of the batch
    rows: u32,     // rows to take
    words: u32,    // 32-bit words a row
    groups_x: u32, // workgroups along x
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> amax: array<u32>;

var<workgroup> m_s: array<u32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.y * p.groups_x + wid.x;
    if i >= p.rows {
        return;
    }
    let base = (p.row0 + i) * p.words;
    var m = 0u;
    for (var w = lid; w < p.words; w += WG) {
        let v = x[base + w];
        m = max(m, max(v & 0x7fff0000u, (v << 16u) & 0x7fff0000u));
    }
    m_s[lid] = m;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        if lid < h {
            m_s[lid] = max(m_s[lid], m_s[lid + h]);
        }
        workgroupBarrier();
    }
    if lid == 0u {
        amax[i] = m_s[0];
    }
}
