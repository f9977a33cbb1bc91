// Router logits: logits[t, e] = sum_d x[t, d] * w[e, d], f32 accumulation; with SIGMOID the
// kernel writes sigmoid(logit) instead (a shared expert's gate: w is [1, D]).
//
// Workgroup (wid.x, wid.y) takes TE experts from wid.x * TE and TT tokens from wid.y * TT (a
// 2-D grid: wid.y + wid.z * groups_y). Each expert's dot products are split over SPLIT
// threads, each summing its slice of D (in order) for all TT tokens; the SPLIT partials are
// then added in order through workgroup memory. So the sum for one (token, expert) depends on
// D only, never on which other tokens share the call.
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

const TE: u32 = 16u;
const TT: u32 = 8u;
const SPLIT: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

var<workgroup> part: array<f32, TT * TE * SPLIT>;

fn widen(word: u32, h: u32, dt: u32) -> f32 {
    if dt == 2u {
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, h == 1u));
    }
    return widen_f16(word, h);
}

// Element i of an array of dtype dt.
fn load(buf: u32, i: u32) -> f32 {
    if buf == 0u {
        if XT == 0u {
            return bitcast<f32>(x[i]);
        }
        return widen(x[i >> 1u], i & 1u, XT);
    }
    if WT == 0u {
        return bitcast<f32>(w[i]);
    }
    return widen(w[i >> 1u], i & 1u, WT);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let el = lid / SPLIT;
    let s = lid % SPLIT;
    let e = wid.x * TE + el;
    let t0 = (wid.y + wid.z * p.groups_y) * TT;
    let slice = (p.d + SPLIT - 1u) / SPLIT;
    let d0 = min(p.d, s * slice);
    let d1 = min(p.d, d0 + slice);
    let z = bitcast<f32>(p.zero);
    var acc: array<f32, TT>;
    for (var t = 0u; t < TT; t++) {
        acc[t] = z;
    }
    if e < p.e {
        for (var dd = d0; dd < d1; dd++) {
            let wv = load(1u, e * p.d + dd);
            for (var t = 0u; t < TT; t++) {
                if t0 + t < p.n {
                    acc[t] = fma(load(0u, (t0 + t) * p.d + dd), wv, acc[t]);
                }
            }
        }
    }
    for (var t = 0u; t < TT; t++) {
        part[(t * TE + el) * SPLIT + s] = acc[t];
    }
    workgroupBarrier();
    if lid < TT * TE {
        let t = lid / TE;
        let ee = wid.x * TE + lid % TE;
        if t0 + t < p.n && ee < p.e {
            var sum = z;
            for (var q = 0u; q < SPLIT; q++) {
                sum = sum + part[lid * SPLIT + q];
            }
            if SIGMOID {
                sum = 1.0 / (1.0 + exp(-sum));
            }
            logits[(t0 + t) * p.e + ee] = sum;
        }
    }
}
