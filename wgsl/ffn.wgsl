// Grouped expert GEMM with weights in Hugging Face layout: out[r, n] = sum_k A[r, k] * W_e[n, k]
// for the rows r of each row tile, e the tile's expert. Two uses (the prelude's UP):
//   up   (UP = true):  A = the expert-major batch, W = gate and up read in one pass over A,
//                      out = act(A·Wg^T, A·Wu^T), f32 [rows, F];
//   down (UP = false): A = that f32 intermediate, W = down, out = f32 [rows, D];
// with the epilogue of `wgsl/ffn_epi.wgsl` (weight row scales, biases) on the sums. Row r of
// A is A's row r - a_base, of out out's row r - o_base (a call's row chunks).
//
// A workgroup computes a BM x BN tile of out: rows tiles[wid.x] (one expert's, at most BM),
// columns wid.y * BN ... Each step stages BK columns of A (widened to f32) and of the BN weight
// rows (as raw 32-bit words, BKW a row: wide contiguous reads, widened where used) in
// workgroup memory, widened to f32 (so f16 and bf16 weights are converted once per element per
// tile, and read as 32-bit words: two elements each); each thread accumulates TM x TN outputs.
//
// Reduction order, the same for every tile shape: K is cut into chunks of CHUNK elements, and
// chunks into pieces of PIECE; a piece's sum starts at zero and takes fma(A[r, k], W[n, k],
// piece) for its k in order; a chunk's sum starts at zero and adds its pieces' sums in order;
// the output starts at zero and adds the chunks' sums in order. A row's bits therefore
// do not depend on the tile shape, nor on which rows share its tile or its call: the
// deterministic mode relies on it. (`fma` is explicit so that no compiler choice between fused
// and unfused forms can differ between shapes; the zeros are a runtime value, `p.zero`, so that
// no compiler folds `0 + x`.)
//
// Decode shapes use `wgsl/ffn_gemv.wgsl`, which sums in this same order.
//
// Prelude (added by the loader): UP, AT (A's dtype: 0 = f32, 1 = f16, 2 = bf16), WT
// (weights' dtype), BM, BN, TM, TN, BKW, PIECE (a multiple of BK), CHUNK (a multiple of
// PIECE), WS, BIAS, ACT, and widen_f16(word, h); `wgsl/convert.wgsl`, `wgsl/ffn_act.wgsl`
// and `wgsl/ffn_epi.wgsl` precede this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

const THREADS: u32 = (BN / TN) * (BM / TM);
// Weight elements per 32-bit word, and words per staged weight row.
const WPE: u32 = select(2u, 1u, WT == 0u);
const BK: u32 = BKW * WPE;
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

var<workgroup> a_s: array<f32, BM * BK>;
var<workgroup> w0_s: array<u32, BN * WROW>;
var<workgroup> w1_s: array<u32, W1_LEN>;

// Element h (0 or 1) of a 32-bit word of dtype dt.
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
        out[0] = vecs[0] + bitcast<f32>(w1[0]);
    }
    let tile = tiles[wid.x];
    let r0 = tile.y;
    let r1 = tile.z;
    let n0 = wid.y * BN;
    let K = p.k_len;
    let N = p.n_len;
    let row_words = K / WPE;
    let wbase = tile.x * p.expert_words;
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
            let word = k0 / WPE + kw;
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
        workgroupBarrier();
        let kmax = min(BK, K - k0);
        for (var kk = 0u; kk < kmax; kk++) {
            var b0: array<f32, TN>;
            var b1: array<f32, TN>;
            for (var j = 0u; j < TN; j++) {
                let at = (tn + j * (BN / TN)) * WROW + kk / WPE;
                b0[j] = widen(w0_s[at], kk % WPE, WT);
                if UP {
                    b1[j] = widen(w1_s[at], kk % WPE, WT);
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
