// Weighted combine: y[t] = sum_j w(t, j) * cat(src_a, src_b, src_c)[idx[t*k + j]].
//
// Zero-copy: src_a holds this rank's expert outputs, src_b the rows received back from peers
// and src_c the shared expert's outputs; each is read where it lies. The weights w(t, j):
// wmode 0: weights[t*K + j]; 1 and 2: the routing's weights[t*w_stride + j] for j < w_stride
// and, for the extra slot j = K - 1, 1 (wmode 1) or extra[t] (wmode 2, a gate's sigmoid);
// 3: every slot 1. Slots are summed in order j = 0..k in f32 and cast once:
// acc = acc + w * v, the product rounded, then the sum, as the CPU combine does (`axpy` in
// src/cpu/rows.rs), so the two agree bit for bit. Shader compilers may fuse a multiply into a
// following add, or factor a*b + a*c, unless told not to, and WGSL cannot tell them: so each
// product passes through `opaque`, an integer no-op they cannot see through (XOR with a
// runtime zero). ZERO_ROW slots (dropped) contribute nothing.
//
// The prelude (added by the loader) defines `Word`, `LANES` (u32 words in a Word),
// `word_lane(w, l)`, `make_word(a)`, `DT` (0 = f32, 1 = f16, 2 = bf16), `K`, the slots per
// token (a constant, so that the loops over slots unroll and keep their loads in flight), and
// `widen_f16(word, h)`: `unpack2x16float` where the adapter has SHADER_F16_IN_F32 (every
// Vulkan, Metal and DX12 one), else the integer `f16_to_f32`. Both are exact. Conversions are
// done with integer operations (no SHADER_F16 needed; `wgsl/convert.wgsl`, also added by the
// loader) and round to nearest even, exactly as the `half` crate does on the CPU.

struct Params {
    rows: u32,       // output rows (tokens)
    row_words: u32,  // Words per row
    a_rows: u32,     // rows of src_a; larger indices read src_b
    tpr_shift: u32,  // log2(threads per row)
    groups_x: u32,   // workgroups along x
    k: u32,          // slots per token (the kernel is compiled for it: K)
    zero: u32,       // always 0, unknown to the compiler (see `opaque`)
    ab_rows: u32,    // rows of src_a and src_b; larger indices read src_c
    wmode: u32,      // how the weights are given (see above)
    w_stride: u32,   // weights per row of `weights` in wmodes 1 and 2
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;
const ZERO_ROW: u32 = 0xffffffffu;
// Values per 32-bit word.
const PER: u32 = select(2u, 1u, DT == 0u);

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src_a: array<Word>;
@group(0) @binding(2) var<storage, read> src_b: array<Word>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;
@group(0) @binding(4) var<storage, read> weights: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst: array<Word>;
@group(0) @binding(6) var<storage, read> src_c: array<Word>;
@group(0) @binding(7) var<storage, read> extra: array<f32>;

// The weight of slot j of row `row`.
fn weight(row: u32, j: u32) -> f32 {
    switch p.wmode {
        case 0u: {
            return weights[row * K + j];
        }
        case 3u: {
            return 1.0;
        }
        default: {
            if j < p.w_stride {
                return weights[row * p.w_stride + j];
            }
            if p.wmode == 2u {
                return extra[row];
            }
            return 1.0;
        }
    }
}

// x, through an integer operation the compiler cannot fold: a product passed through it is
// rounded on its own and never fused into the add that follows.
fn opaque(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ p.zero);
}

// Value h (0 or 1) of a 32-bit word.
fn widen(word: u32, h: u32) -> f32 {
    if DT == 0u {
        return bitcast<f32>(word);
    }
    let bits = (word >> (16u * h)) & 0xffffu;
    if DT == 2u {
        return bitcast<f32>(bits << 16u);
    }
    return widen_f16(word, h);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tpr = 1u << p.tpr_shift;
    let row = (wid.y * p.groups_x + wid.x) * (WG >> p.tpr_shift) + (lid >> p.tpr_shift);
    if row >= p.rows {
        return;
    }
    let lane = lid & (tpr - 1u);
    let n = p.row_words;
    // K (the prelude's constant) slots: their rows and weights once per thread.
    var ids: array<u32, K>;
    var wts: array<f32, K>;
    for (var j = 0u; j < K; j++) {
        ids[j] = idx[row * K + j];
        // A dropped slot adds +0 * +0: nothing, whatever the compiler assumes about zeros.
        wts[j] = select(weight(row, j), 0.0, ids[j] == ZERO_ROW);
    }
    for (var w = lane; w < n; w += tpr) {
        // All K loads first, so that they are in flight together.
        var words: array<Word, K>;
        for (var j = 0u; j < K; j++) {
            let i = ids[j];
            if i == ZERO_ROW {
                words[j] = word_zero();
            } else if i < p.a_rows {
                words[j] = src_a[i * n + w];
            } else if i < p.ab_rows {
                words[j] = src_b[(i - p.a_rows) * n + w];
            } else {
                words[j] = src_c[(i - p.ab_rows) * n + w];
            }
        }
        // Start from a zero the compiler cannot see, so that it cannot fold 0 + x into x
        // (which turns +0 into -0 where x is -0).
        var acc: array<f32, LANES * PER>;
        for (var a = 0u; a < LANES * PER; a++) {
            acc[a] = bitcast<f32>(p.zero);
        }
        for (var j = 0u; j < K; j++) {
            for (var l = 0u; l < LANES; l++) {
                let u = word_lane(words[j], l);
                for (var h = 0u; h < PER; h++) {
                    acc[l * PER + h] = acc[l * PER + h] + opaque(wts[j] * widen(u, h));
                }
            }
        }
        var o: array<u32, LANES>;
        for (var l = 0u; l < LANES; l++) {
            if DT == 0u {
                o[l] = bitcast<u32>(acc[l]);
            } else {
                o[l] = narrow_pair(acc[l * PER], acc[l * PER + 1u], DT);
            }
        }
        dst[row * n + w] = make_word(o);
    }
}
