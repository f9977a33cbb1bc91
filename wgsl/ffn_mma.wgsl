// Grouped expert GEMM on cooperative matrices (tensor cores on NVIDIA, simdgroup matrices on
// Apple): the FFN's fast kernel for every row count, from one row an expert (the tile's other
// rows are zeros; the weights are streamed once, which is all decode needs) to prefill.
//
//   up   (UP = true):  out = act(s_x s_g A·Wg^T + b_g, s_x s_u A·Wu^T + b_u), f32 [rows, F]
//                      (chunk-local rows), and omax[r] = max over the row of |out| (atomic);
//   down (UP = false): out = s_h s_d A·Wd^T + b_d, [rows, D] in OT (global rows),
// where A is fed to the matrix units as f16: the f16 batch as it is (AT = 1), or bf16 rows
// (AT = 2) and the f32 intermediate (AT = 0) multiplied by a power of two per row, 2^(14 - E)
// with E = floor(log2(max |row|)) from `amax` (so the largest value lies in [2^14, 2^15) and
// no value overflows f16; bf16 values convert exactly), and s_x, s_h the inverse powers.
// Weights are f16, optionally with per-row power-of-two scales s_g, s_u, s_d (WS: bf16
// checkpoints converted at upload); b_* are the optional biases (BIAS). Scales by powers of
// two are exact, so the result is that of the unscaled product.
//
// Workgroup (wid.x, wid.y) computes columns wid.x * BN .. of row tile tiles[wid.y] (one
// expert's rows, at most BM; column blocks vary fastest so that the workgroups running
// together share the tile's A rows in cache). Its WM x WN subgroups each own a
// (BM / WM) x (BN / WN) block as TM x TN fragments of S x S (twice for up: gate and up).
// K is walked BK at a time: A's BM x BK and the weights' (1 or 2) x BN x BK are loaded from
// memory with 16-byte loads in which consecutive threads read consecutive bytes, converted,
// and staged in workgroup memory (rows padded by 8 halves against bank conflicts); the loads
// of step s + 1 are issued before the products of step s (register prefetch) and land in the
// other of NBUF = 2 staging buffers (one barrier a step), or the same one (NBUF = 1, two).
// The epilogue passes each fragment through workgroup memory (one S x S block a subgroup).
//
// Summation order is the hardware's: the deterministic mode never uses this kernel. K and
// the row lengths must be multiples of 8 (the loader checks), N even for 16-bit outputs.
//
// The staging arrays hold f16 scalars (SV = 1: eight 2-byte stores per 16-byte load; what
// Metal's simdgroup loads take) or vec4<f16> (SV = 4: two 8-byte stores; cooperative loads
// then count offsets and strides in vec4s, as SPV_KHR_cooperative_matrix defines them).
//
// Prelude (added by the loader): `enable` lines, AMat/BMat/CMat aliases of S x S
// cooperative matrices, SVT (the staged element: f16 or vec4<f16>), UP, S, BM, BN, BK, WM,
// WN, SG (subgroup size), NBUF, SV, AT, OT, WS, BIAS, ACT, put_a and put_b; `wgsl/convert.wgsl`,
// `wgsl/ffn_act.wgsl` and `wgsl/ffn_epi.wgsl` precede this file.

struct Params {
    k_len: u32,        // K: elements per A row and per weight row
    n_len: u32,        // N: weight rows, the output columns
    expert_words: u32, // 32-bit words of one expert's matrix in w0 / w1
    never: u32,        // always 0 (keeps every binding in the layout)
    a_base: u32,       // row subtracted from A's row index (the chunk's first row for down)
    o_base: u32,       // row subtracted from out's row index (the chunk's first row for up)
    m_base: u32,       // row subtracted from amax's and omax's row index (the chunk's first row)
    _chunks: u32,
    _prows: u32,
    vec_stride: u32,   // f32 values per expert in `vecs`
    wscale_at: u32,    // offset of this projection's row scales in an expert's vecs (WS)
    bias_at: u32,      // offset of this projection's biases: region start + projection offset
    up_off: u32,       // up: offset of the up projection's vectors after the gate's (F)
    alpha: u32,        // f32 bits of the clamped SwiGLU's alpha (ACT = 1)
    limit: u32,        // f32 bits of its limit
    _pad0: u32,
}

const WARPS: u32 = WM * WN;
const THREADS: u32 = WARPS * SG;
const TM: u32 = BM / WM / S;
const TN: u32 = BN / WN / S;
// Weight rows staged a step: the gate's BN then the up's BN (up), or the down's BN.
const NB: u32 = select(BN, 2u * BN, UP);
const AST: u32 = BK + 8u;
const KV: u32 = BK / 8u;
const A_UNITS: u32 = BM * KV;
const B_UNITS: u32 = NB * KV;
const LA: u32 = (A_UNITS + THREADS - 1u) / THREADS;
const LB: u32 = (B_UNITS + THREADS - 1u) / THREADS;
// 16-byte loads per 8 elements of A: two for f32.
const AW: u32 = select(1u, 2u, AT == 0u);
const SS: u32 = S * S;
// Outputs a lane takes per fragment in the epilogue, and elements per output (16-bit pairs).
const PAIR: u32 = select(1u, 2u, !UP && OT != 0u);
const EPT: u32 = SS / SG / PAIR;

@group(0) @binding(0) var<uniform> p: Params;
// Row tiles: (expert within the bound weights, first row, end row, 0).
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<vec4<u32>>;
// f32 bits of max |row| of A (AT = 0, 2).
@group(0) @binding(3) var<storage, read> amax: array<u32>;
// f16 weights, four a word (8-byte loads, two per 8 elements).
@group(0) @binding(4) var<storage, read> w0: array<vec4<f16>>;
@group(0) @binding(5) var<storage, read> w1: array<vec4<f16>>;
@group(0) @binding(6) var<storage, read> vecs: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<u32>;
@group(0) @binding(8) var<storage, read_write> omax: array<atomic<u32>>;

var<workgroup> a_s: array<SVT, NBUF * BM * AST / SV>;
var<workgroup> b_s: array<SVT, NBUF * NB * AST / SV>;
var<workgroup> c_s: array<f32, WARPS * SS>;
// Per tile row: the power of two A's row was multiplied by, and its inverse.
var<workgroup> mult_s: array<f32, BM>;
var<workgroup> un_s: array<f32, BM>;
var<workgroup> rmax_s: array<atomic<u32>, BM>;

// 2^e for e in [-126, 127].
fn pow2(e: i32) -> f32 {
    return bitcast<f32>(u32(e + 127) << 23u);
}

// The exponent e such that 2^(14 - e) brings a row whose max |x| has f32 bits m to
// [2^14, 2^15) (clamped: zero rows take any factor, infinite ones stay infinite).
fn row_exp(m: u32) -> i32 {
    return clamp(i32(m >> 23u) - 127, -100, 127);
}

fn fetch_a(ra: ptr<function, array<vec4<u32>, LA * AW>>, r0: u32, r1: u32, k0: u32, lid: u32) {
    let K = p.k_len;
    for (var j = 0u; j < LA; j++) {
        let i = lid + j * THREADS;
        let r = r0 + i / KV;
        let k = k0 + (i % KV) * 8u;
        var v0 = vec4<u32>(0u);
        var v1 = vec4<u32>(0u);
        if i < A_UNITS && r < r1 && k < K {
            let e = (r - p.a_base) * K + k;
            if AT == 0u {
                v0 = a[e / 4u];
                v1 = a[e / 4u + 1u];
            } else {
                v0 = a[e / 8u];
            }
        }
        (*ra)[j * AW] = v0;
        if AT == 0u {
            (*ra)[j * AW + 1u] = v1;
        }
    }
}

// put_a(at, h) and put_b(at, v0, v1) (prelude) stage eight values at element `at` (a
// multiple of 8) of a_s and b_s.

fn store_a(ra: ptr<function, array<vec4<u32>, LA * AW>>, buf: u32, lid: u32) {
    for (var j = 0u; j < LA; j++) {
        let i = lid + j * THREADS;
        if i < A_UNITS {
            let m = i / KV;
            let at = buf * BM * AST + m * AST + (i % KV) * 8u;
            let s = mult_s[m];
            let v0 = (*ra)[j * AW];
            var h: array<vec2<f16>, 4>;
            if AT == 1u {
                for (var q = 0u; q < 4u; q++) {
                    h[q] = vec2<f16>(unpack2x16float(v0[q]));
                }
            } else if AT == 2u {
                for (var q = 0u; q < 4u; q++) {
                    let lo = bitcast<f32>(v0[q] << 16u) * s;
                    let hi = bitcast<f32>(v0[q] & 0xffff0000u) * s;
                    h[q] = vec2<f16>(f16(lo), f16(hi));
                }
            } else {
                let v1 = (*ra)[j * AW + 1u];
                let f0 = bitcast<vec4<f32>>(v0) * s;
                let f1 = bitcast<vec4<f32>>(v1) * s;
                h[0] = vec2<f16>(f16(f0.x), f16(f0.y));
                h[1] = vec2<f16>(f16(f0.z), f16(f0.w));
                h[2] = vec2<f16>(f16(f1.x), f16(f1.y));
                h[3] = vec2<f16>(f16(f1.z), f16(f1.w));
            }
            put_a(at, h);
        }
    }
}

fn fetch_b(rb: ptr<function, array<vec4<f16>, 2u * LB>>, expert: u32, n0: u32, k0: u32, lid: u32) {
    let K = p.k_len;
    for (var j = 0u; j < LB; j++) {
        let i = lid + j * THREADS;
        let nn = i / KV;
        let k = k0 + (i % KV) * 8u;
        let second = UP && nn >= BN;
        let n = n0 + select(nn, nn - BN, second);
        var v0 = vec4<f16>(0.0h);
        var v1 = vec4<f16>(0.0h);
        if i < B_UNITS && n < p.n_len && k < K {
            let at = expert * (p.expert_words / 2u) + (n * K + k) / 4u;
            if second {
                v0 = w1[at];
                v1 = w1[at + 1u];
            } else {
                v0 = w0[at];
                v1 = w0[at + 1u];
            }
        }
        (*rb)[2u * j] = v0;
        (*rb)[2u * j + 1u] = v1;
    }
}

fn store_b(rb: ptr<function, array<vec4<f16>, 2u * LB>>, buf: u32, lid: u32) {
    for (var j = 0u; j < LB; j++) {
        let i = lid + j * THREADS;
        if i < B_UNITS {
            put_b(buf * NB * AST + (i / KV) * AST + (i % KV) * 8u, (*rb)[2u * j], (*rb)[2u * j + 1u]);
        }
    }
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if p.never != 0u {
        // Never runs: keeps every binding in the pipeline's layout whatever the constants.
        out[0] = amax[0] + bitcast<u32>(f32(w0[0].x + w1[0].x) + vecs[0]);
        atomicStore(&omax[0], 0u);
    }
    let tile = tiles[wid.y];
    let expert = tile.x;
    let r0 = tile.y;
    let r1 = tile.z;
    let n0 = wid.x * BN;
    let K = p.k_len;
    let N = p.n_len;
    let warp = lid / SG;
    let lane = lid % SG;
    let wm = warp / WN;
    let wn = warp % WN;

    for (var i = lid; i < BM; i += THREADS) {
        var e = 14;
        if AT != 1u && r0 + i < r1 {
            e = row_exp(amax[r0 + i - p.m_base]);
        }
        mult_s[i] = pow2(14 - e);
        un_s[i] = pow2(e - 14);
        atomicStore(&rmax_s[i], 0u);
    }
    workgroupBarrier();

    var acc0: array<CMat, TM * TN>;
    var acc1: array<CMat, TM * TN>;
    for (var i = 0u; i < TM * TN; i++) {
        acc0[i] = CMat();
        acc1[i] = CMat();
    }
    var ra: array<vec4<u32>, LA * AW>;
    var rb: array<vec4<f16>, 2u * LB>;
    let steps = (K + BK - 1u) / BK;
    fetch_a(&ra, r0, r1, 0u, lid);
    fetch_b(&rb, expert, n0, 0u, lid);
    store_a(&ra, 0u, lid);
    store_b(&rb, 0u, lid);
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let more = s + 1u < steps;
        if more {
            fetch_a(&ra, r0, r1, (s + 1u) * BK, lid);
            fetch_b(&rb, expert, n0, (s + 1u) * BK, lid);
        }
        let buf = s % NBUF;
        let abase = buf * BM * AST + wm * TM * S * AST;
        let bbase = buf * NB * AST + wn * TN * S * AST;
        for (var kk = 0u; kk < BK; kk += S) {
            var af: array<AMat, TM>;
            for (var i = 0u; i < TM; i++) {
                af[i] = coopLoadT<AMat>(&a_s[(abase + i * S * AST + kk) / SV], AST / SV);
            }
            for (var j = 0u; j < TN; j++) {
                let bg = coopLoad<BMat>(&b_s[(bbase + j * S * AST + kk) / SV], AST / SV);
                for (var i = 0u; i < TM; i++) {
                    acc0[i * TN + j] = coopMultiplyAdd(af[i], bg, acc0[i * TN + j]);
                }
                if UP {
                    let bu = coopLoad<BMat>(&b_s[(bbase + (BN + j * S) * AST + kk) / SV], AST / SV);
                    for (var i = 0u; i < TM; i++) {
                        acc1[i * TN + j] = coopMultiplyAdd(af[i], bu, acc1[i * TN + j]);
                    }
                }
            }
        }
        if NBUF == 1u {
            workgroupBarrier();
        }
        if more {
            store_a(&ra, (s + 1u) % NBUF, lid);
            store_b(&rb, (s + 1u) % NBUF, lid);
        }
        workgroupBarrier();
    }

    let cb = warp * SS;
    for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TN; j++) {
            coopStoreT(acc0[i * TN + j], &c_s[cb], S);
            workgroupBarrier();
            var g: array<f32, EPT * PAIR>;
            for (var t = 0u; t < EPT * PAIR; t++) {
                g[t] = c_s[cb + lane * PAIR + (t / PAIR) * SG * PAIR + t % PAIR];
            }
            workgroupBarrier();
            if UP {
                coopStoreT(acc1[i * TN + j], &c_s[cb], S);
                workgroupBarrier();
            }
            for (var t = 0u; t < EPT; t++) {
                let el = (lane + t * SG) * PAIR;
                let ml = wm * TM * S + i * S + el / S;
                let n = n0 + wn * TN * S + j * S + el % S;
                let r = r0 + ml;
                if r < r1 && n < N {
                    let un = un_s[ml];
                    if UP {
                        let h = up_value(g[t] * un, c_s[cb + el] * un, expert, n);
                        out[(r - p.o_base) * N + n] = bitcast<u32>(h);
                        atomicMax(&rmax_s[ml], bitcast<u32>(abs(h)));
                    } else {
                        let y0 = down_value(g[t * PAIR] * un, expert, n);
                        let y1 = down_value(g[t * PAIR + PAIR - 1u] * un, expert, n + PAIR - 1u);
                        let o = (r - p.o_base) * N + n;
                        if OT == 0u {
                            out[o] = bitcast<u32>(y0);
                        } else {
                            out[o / 2u] = narrow_pair(y0, y1, OT);
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if UP {
        for (var i = lid; i < BM; i += THREADS) {
            if r0 + i < r1 {
                atomicMax(&omax[r0 + i - p.m_base], atomicLoad(&rmax_s[i]));
            }
        }
    }
}
