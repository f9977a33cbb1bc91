// Router logits: logits[t, e] = sum_d x[t, d] * w[e, d], f32 accumulation; with SIGMOID the
// kernel writes sigmoid(logit) instead (a shared expert's gate: w is [1, D]).
//
// Workgroup (wid.x, wid.y) takes TE experts from wid.x * TE and TT tokens from
// (wid.y + wid.z * groups_y) * TT. Its WGS threads walk the features in pairs, thread l taking
// pairs l, l + WGS, ... (so a warp's loads of a weight row are contiguous), each summing its
// pairs in order for every (expert, token); the WGS partial sums of an output are then added
// in thread order by one thread, through workgroup memory. So an output's sum depends on D
// only, never on which other tokens share the call.
//
// Prelude (added by the loader): XT and WT, the dtypes of x and w (0 = f32, 1 = f16,
// 2 = bf16); SIGMOID; widen_f16(word, h); `wgsl/convert.wgsl` precedes this file.

struct Params {
    n: u32,         // tokens
    d: u32,         // features (even for 16-bit dtypes)
    e: u32,         // experts (rows of w)
    groups_y: u32,  // workgroups along y
    zero: u32,      // always 0, unknown to the compiler: the sums' start
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const TE: u32 = 4u;
const TT: u32 = 8u;
const WGS: u32 = 128u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

var<workgroup> red: array<f32, TE * TT * WGS>;

fn widen(word: u32, h: u32, dt: u32) -> f32 {
    if dt == 2u {
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, h == 1u));
    }
    return widen_f16(word, h);
}

// Elements 2q and 2q + 1 of row r of x (0 past the row's end).
fn x_pair(r: u32, q: u32) -> vec2<f32> {
    if XT == 0u {
        let i = r * p.d + 2u * q;
        let hi = select(0.0, bitcast<f32>(x[i + 1u]), 2u * q + 1u < p.d);
        return vec2<f32>(bitcast<f32>(x[i]), hi);
    }
    let word = x[(r * p.d) / 2u + q];
    return vec2<f32>(widen(word, 0u, XT), widen(word, 1u, XT));
}

fn w_pair(r: u32, q: u32) -> vec2<f32> {
    if WT == 0u {
        let i = r * p.d + 2u * q;
        let hi = select(0.0, bitcast<f32>(w[i + 1u]), 2u * q + 1u < p.d);
        return vec2<f32>(bitcast<f32>(w[i]), hi);
    }
    let word = w[(r * p.d) / 2u + q];
    return vec2<f32>(widen(word, 0u, WT), widen(word, 1u, WT));
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e0 = wid.x * TE;
    let t0 = (wid.y + wid.z * p.groups_y) * TT;
    let pairs = (p.d + 1u) / 2u;
    let z = bitcast<f32>(p.zero);
    var acc: array<f32, 32>;
    for (var a = 0u; a < TE * TT; a++) {
        acc[a] = z;
    }
    for (var q = lid; q < pairs; q += WGS) {
        var wv: array<vec2<f32>, TE>;
        for (var j = 0u; j < TE; j++) {
            wv[j] = vec2<f32>(0.0);
            if e0 + j < p.e {
                wv[j] = w_pair(e0 + j, q);
            }
        }
        for (var t = 0u; t < TT; t++) {
            if t0 + t < p.n {
                let xv = x_pair(t0 + t, q);
                for (var j = 0u; j < TE; j++) {
                    acc[j * TT + t] = fma(xv.y, wv[j].y, fma(xv.x, wv[j].x, acc[j * TT + t]));
                }
            }
        }
    }
    for (var a = 0u; a < TE * TT; a++) {
        red[a * WGS + lid] = acc[a];
    }
    workgroupBarrier();
    if lid < TE * TT {
        let j = lid / TT;
        let t = lid % TT;
        if e0 + j < p.e && t0 + t < p.n {
            var sum = z;
            for (var q = 0u; q < WGS; q++) {
                sum = sum + red[lid * WGS + q];
            }
            if SIGMOID {
                sum = 1.0 / (1.0 + exp(-sum));
            }
            logits[(t0 + t) * p.e + e0 + j] = sum;
        }
    }
}
