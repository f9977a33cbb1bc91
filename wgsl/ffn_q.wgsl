// Grouped expert GEMM on packed weights (`wgsl/ffn_quant.wgsl`): `wgsl/ffn.wgsl` with the
// weight rows staged as their packed words (BKW words, BK = BKW * EPW values a row a step)
// and their scales and biases for the step's groups staged beside them, each weight
// dequantized in f32 where it is used. Same tiles, epilogue and reduction order as
// `wgsl/ffn.wgsl`, and the same weights as `wgsl/ffn_qgemv.wgsl`, so its sums equal the
// decode kernel's bit for bit.
//
// Needs K a multiple of EPW (whole words a row), and GROUP and BK multiples of one another.
//
// Prelude: UP, AT, BM, BN, TM, TN, BKW, PIECE (a multiple of BK), CHUNK, WS, BIAS, ACT,
// widen_f16, and `wgsl/ffn_quant.wgsl`'s QK, BITS, GROUP, ST, FBN; `wgsl/convert.wgsl`,
// `wgsl/ffn_act.wgsl`, `wgsl/ffn_epi.wgsl` and `wgsl/ffn_quant.wgsl` precede this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

const THREADS: u32 = (BN / TN) * (BM / TM);
// Weight values per staged row and step; groups of scales a step.
const BK: u32 = BKW * EPW;
const SG: u32 = max(1u, BK / GROUP);
// Staged weight rows are padded by one so that threads reading consecutive rows hit
// different banks.
const WROW: u32 = BKW + 1u;
const W1_LEN: u32 = select(1u, BN * WROW, UP);

@group(0) @binding(0) var<uniform> p: Params;
// Row tiles: (expert within the bound weights, first row, end row, 0).
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> w0: array<u32>;
@group(0) @binding(4) var<storage, read> w1: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// Row scales and biases of the bound experts (`wgsl/ffn_epi.wgsl`).
@group(0) @binding(6) var<storage, read> vecs: array<f32>;
// Quantization scales of w0's and w1's matrices (`wgsl/ffn_quant.wgsl`).
@group(0) @binding(7) var<storage, read> qs0: array<u32>;
@group(0) @binding(8) var<storage, read> qs1: array<u32>;

var<workgroup> a_s: array<f32, BM * BK>;
var<workgroup> w0_s: array<u32, BN * WROW>;
var<workgroup> w1_s: array<u32, W1_LEN>;
var<workgroup> s0_s: array<vec2<f32>, BN * SG>;
var<workgroup> s1_s: array<vec2<f32>, select(1u, BN * SG, UP)>;

// Element h (0 or 1) of a 32-bit word of dtype dt (A's values).
fn widen(word: u32, h: u32, dt: u32) -> f32 {
    if dt == 0u {
        return bitcast<f32>(word);
    }
    if dt == 2u {
        return bitcast<f32>(((word >> (16u * h)) & 0xffffu) << 16u);
    }
    return widen_f16(word, h);
}

// Element i of A.
fn load_a(i: u32) -> f32 {
    if AT == 0u {
        return bitcast<f32>(a[i]);
    }
    return widen(a[i >> 1u], i & 1u, AT);
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if p.zero != 0u {
        // Never runs: keeps every binding in the pipeline's layout whatever the constants.
        out[0] = vecs[0] + bitcast<f32>(w1[0] + qs0[0] + qs1[0]);
    }
    let tile = tiles[wid.x];
    let r0 = tile.y;
    let r1 = tile.z;
    let n0 = wid.y * BN;
    let K = p.k_len;
    let N = p.n_len;
    let row_words = K / EPW;
    let wbase = tile.x * p.expert_words;
    let sbase = tile.x * p.scale_words;
    let groups = (K + GROUP - 1u) / GROUP;
    let tn = lid % (BN / TN);
    let tm = lid / (BN / TN);

    // Sums of the current piece (part*) and chunk (chunk*), and of whole chunks (acc*).
    var part0: array<f32, TM * TN>;
    var part1: array<f32, TM * TN>;
    var chunk0: array<f32, TM * TN>;
    var chunk1: array<f32, TM * TN>;
    var acc0: array<f32, TM * TN>;
    var acc1: array<f32, TM * TN>;
    let z = bitcast<f32>(p.zero);
    for (var i = 0u; i < TM * TN; i++) {
        part0[i] = z;
        part1[i] = z;
        chunk0[i] = z;
        chunk1[i] = z;
        acc0[i] = z;
        acc1[i] = z;
    }

    for (var k0 = 0u; k0 < K; k0 += BK) {
        for (var i = lid; i < BM * BK; i += THREADS) {
            let r = r0 + i / BK;
            let k = k0 + i % BK;
            var v = 0.0;
            if r < r1 && k < K {
                v = load_a((r - p.a_base) * K + k);
            }
            a_s[i] = v;
        }
        for (var i = lid; i < BN * BKW; i += THREADS) {
            let nn = i / BKW;
            let kw = i % BKW;
            let n = n0 + nn;
            let word = k0 / EPW + kw;
            var u0 = 0u;
            var u1 = 0u;
            if n < N && word < row_words {
                let at = wbase + n * row_words + word;
                u0 = w0[at];
                if UP {
                    u1 = w1[at];
                }
            }
            w0_s[nn * WROW + kw] = u0;
            if UP {
                w1_s[nn * WROW + kw] = u1;
            }
        }
        for (var i = lid; i < BN * SG; i += THREADS) {
            let n = n0 + i / SG;
            let g = k0 / GROUP + i % SG;
            var s0 = vec2<f32>(0.0);
            var s1 = vec2<f32>(0.0);
            if n < N && g < groups {
                let at = sbase + scale_word(n, g, groups);
                s0 = decode_sb(qs0[at], qs0[at + select(0u, 1u, QK == 1u && ST == 0u)], n, g, groups);
                if UP {
                    s1 = decode_sb(qs1[at], qs1[at + select(0u, 1u, QK == 1u && ST == 0u)], n, g, groups);
                }
            }
            s0_s[i] = s0;
            if UP {
                s1_s[i] = s1;
            }
        }
        workgroupBarrier();
        let kmax = min(BK, K - k0);
        for (var kk = 0u; kk < kmax; kk++) {
            var b0: array<f32, TN>;
            var b1: array<f32, TN>;
            for (var j = 0u; j < TN; j++) {
                let nn = tn + j * (BN / TN);
                let at = nn * WROW + kk / EPW;
                let s0 = s0_s[nn * SG + kk / GROUP];
                b0[j] = fma(s0.x, qvalue(w0_s[at], kk % EPW), s0.y);
                if UP {
                    let s1 = s1_s[nn * SG + kk / GROUP];
                    b1[j] = fma(s1.x, qvalue(w1_s[at], kk % EPW), s1.y);
                }
            }
            for (var i = 0u; i < TM; i++) {
                let av = a_s[(tm + i * (BM / TM)) * BK + kk];
                for (var j = 0u; j < TN; j++) {
                    part0[i * TN + j] = fma(av, b0[j], part0[i * TN + j]);
                    if UP {
                        part1[i * TN + j] = fma(av, b1[j], part1[i * TN + j]);
                    }
                }
            }
        }
        // End of a piece, of a chunk (or of K): fold the sums one level up.
        let last = k0 + BK >= K;
        if (k0 + BK) % PIECE == 0u || last {
            for (var i = 0u; i < TM * TN; i++) {
                chunk0[i] = chunk0[i] + part0[i];
                part0[i] = z;
                if UP {
                    chunk1[i] = chunk1[i] + part1[i];
                    part1[i] = z;
                }
            }
        }
        if (k0 + BK) % CHUNK == 0u || last {
            for (var i = 0u; i < TM * TN; i++) {
                acc0[i] = acc0[i] + chunk0[i];
                chunk0[i] = z;
                if UP {
                    acc1[i] = acc1[i] + chunk1[i];
                    chunk1[i] = z;
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < TM; i++) {
        let r = r0 + tm + i * (BM / TM);
        if r >= r1 {
            continue;
        }
        for (var j = 0u; j < TN; j++) {
            let n = n0 + tn + j * (BN / TN);
            if n < N {
                var v: f32;
                if UP {
                    v = up_value(acc0[i * TN + j], acc1[i * TN + j], tile.x, n);
                } else {
                    v = down_value(acc0[i * TN + j], tile.x, n);
                }
                out[(r - p.o_base) * N + n] = v;
            }
        }
    }
}
