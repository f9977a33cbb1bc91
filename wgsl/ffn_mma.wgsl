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
// checkpoints converted at upload), or packed (QK, BITS, ..: dequantized in f32 and rounded to
// f16 as they are staged; the loader uses this only where every value fits f16); b_* are the
// optional biases (BIAS). Scales by powers of
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
// The loader unrolls the per-thread work (`//@DECLS`, `//@FETCH` (k0), `//@STORE` (buf),
// `//@COMPUTE` (abase, bbase), `//@EPILOGUE` lines, from `src/ffn/mma_source.rs`): the
// registers of a step's loads (ra_j, rb_j), the accumulators (acc0_i_j, acc1_i_j for up) and
// the fragments are named values; loops over them would leave them in (slow) memory.
//
// The staging arrays hold f16 scalars (SV = 1: eight 2-byte stores per 16-byte load; what
// Metal's simdgroup loads take) or vec4<f16> (SV = 4: two 8-byte stores; cooperative loads
// then count offsets and strides in vec4s, as SPV_KHR_cooperative_matrix defines them).
//
// Prelude (added by the loader): `enable` lines, AMat/BMat/CMat aliases of S x S
// cooperative matrices, SVT (the staged element: f16 or vec4<f16>), UP, S, BM, BN, BK, WM,
// WN, SG (subgroup size), NBUF, SV, AT, OT, WS, BIAS, ACT, WT and touch_weights (and for packed
// weights QK, BITS, GROUP, ST, FBN, widen_f16); `wgsl/convert.wgsl`, `wgsl/ffn_act.wgsl`,
// `wgsl/ffn_epi.wgsl` (and `wgsl/ffn_quant.wgsl`) precede this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

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
// Weights (WT): f16, four a vec4 (8-byte loads, two per 8 elements), or packed words
// (`wgsl/ffn_quant.wgsl`: 8 elements in one word of 4 bits, two of 8 bits), dequantized in f32
// with their scales (qs0 for w0, qs1 for w1; unused for f16) and rounded to f16 as staged.
@group(0) @binding(4) var<storage, read> w0: array<WT>;
@group(0) @binding(5) var<storage, read> w1: array<WT>;
@group(0) @binding(6) var<storage, read> vecs: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<u32>;
@group(0) @binding(8) var<storage, read_write> omax: array<atomic<u32>>;
@group(0) @binding(9) var<storage, read> qs0: array<u32>;
@group(0) @binding(10) var<storage, read> qs1: array<u32>;

var<workgroup> a_s: array<SVT, NBUF * BM * AST / SV>;
var<workgroup> b_s: array<SVT, NBUF * NB * AST / SV>;
var<workgroup> c_s: array<f32, WARPS * SS>;
// Per tile row: the power of two A's row was multiplied by, and its inverse.
var<workgroup> mult_s: array<f32, BM>;
var<workgroup> un_s: array<f32, BM>;
var<workgroup> rmax_s: array<atomic<u32>, BM>;
// The tile's end row (for the epilogue functions).
var<private> tiles_end: u32;

// 2^e for e in [-126, 127].
fn pow2(e: i32) -> f32 {
    return bitcast<f32>(u32(e + 127) << 23u);
}

// The exponent e such that 2^(14 - e) brings a row whose max |x| has f32 bits m to
// [2^14, 2^15) (clamped: zero rows take any factor, infinite ones stay infinite).
fn row_exp(m: u32) -> i32 {
    return clamp(i32(m >> 23u) - 127, -100, 127);
}

// The epilogue of one up output: row r (tile row ml) of `expert`, column n, gate sum g and
// up sum u of the scaled rows (`wgsl/ffn_epi.wgsl`); writes the intermediate and the row's max.
fn emit_up(expert: u32, r: u32, ml: u32, n: u32, g: f32, u: f32) {
    if r < tiles_end && n < p.n_len {
        let un = un_s[ml];
        let h = up_value(g * un, u * un, expert, n);
        out[(r - p.o_base) * p.n_len + n] = bitcast<u32>(h);
        atomicMax(&rmax_s[ml], bitcast<u32>(abs(h)));
    }
}

// The epilogue of down outputs n (and n + 1 for 16-bit outputs, written as one word).
fn emit_down(expert: u32, r: u32, ml: u32, n: u32, y0: f32, y1: f32) {
    if r < tiles_end && n < p.n_len {
        let un = un_s[ml];
        let o = (r - p.o_base) * p.n_len + n;
        let v0 = down_value(y0 * un, expert, n);
        if OT == 0u {
            out[o] = bitcast<u32>(v0);
        } else {
            let v1 = down_value(y1 * un, expert, n + 1u);
            out[o / 2u] = narrow_pair(v0, v1, OT);
        }
    }
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if p.zero != 0u {
        // Never runs: keeps every binding in the pipeline's layout whatever the constants.
        out[0] = amax[0] + touch_weights() + bitcast<u32>(vecs[0]);
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

    tiles_end = r1;
    // Unrolled by the loader (`//@` lines): registers and accumulators as scalars, so that
    // none lives in memory and the loads of a step are all in flight at once.
//@DECLS
    let steps = (K + BK - 1u) / BK;
    {
        let k0 = 0u;
//@FETCH
    }
    {
        let buf = 0u;
//@STORE
    }
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let more = s + 1u < steps;
        if more {
            let k0 = (s + 1u) * BK;
//@FETCH
        }
        {
            let buf = s % NBUF;
            let abase = buf * BM * AST + wm * TM * S * AST;
            let bbase = buf * NB * AST + wn * TN * S * AST;
//@COMPUTE
        }
        if NBUF == 1u {
            workgroupBarrier();
        }
        if more {
            let buf = (s + 1u) % NBUF;
//@STORE
        }
        workgroupBarrier();
    }

    let cb = warp * SS;
    let m0 = wm * TM * S;
    let c0 = n0 + wn * TN * S;
//@EPILOGUE
    if UP {
        for (var i = lid; i < BM; i += THREADS) {
            if r0 + i < r1 {
                atomicMax(&omax[r0 + i - p.m_base], atomicLoad(&rmax_s[i]));
            }
        }
    }
}
