// Grouped expert GEMM on cooperative matrices (tensor cores on NVIDIA, simdgroup matrices on
// Apple): the FFN's fast variant for f16 activations and f16 weights, with f32 accumulators.
// Same tiling as `wgsl/ffn.wgsl`: workgroup (wid.x, wid.y) computes the 64 x 64 outputs of
// row tile tiles[wid.x] (one expert's rows, at most 64) and weight rows wid.y * 64 ..
//
//   up   (UP = true):  A = the f16 batch, out = f16(silu(A·Wg^T) * (A·Wu^T)), [rows, F];
//   down (UP = false): A = that f16 intermediate, out = f16(A·Wd^T), [rows, D].
//
// Four subgroups of 32 threads each own a 32 x 32 quarter of the tile, as 2 x 2 products of
// 16 x 16 matrices, loaded straight from the buffers (cached) 16 columns of the reduction at a
// time. K must be a multiple of 16, and the loader pads the buffers by 64 rows so that the
// fragments of a partial tile (rows of the next expert, or past the batch) read in bounds;
// those rows' results are never written. Results pass through workgroup memory as f32 for the
// epilogue, which writes pairs of f16 values a 32-bit word.
//
// Unlike the portable kernels its summation order is the hardware's (and the intermediate is
// rounded to f16): the deterministic mode never uses it. Tested against the portable kernel.
//
// Prelude (added by the loader): `enable` lines, UP; `wgsl/silu.wgsl` precedes this file.

struct Params {
    k_len: u32,        // K: elements per A row and per weight row (even)
    n_len: u32,        // N: weight rows, the output columns (even)
    expert_words: u32, // 32-bit words of one expert's matrix in the bound weight buffers
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
}

const BM: u32 = 64u;
const BN: u32 = 64u;
const THREADS: u32 = 128u;
// Row stride of the staged f32 results.
const CROW: u32 = 68u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<f16>;
@group(0) @binding(3) var<storage, read> w0: array<f16>;
@group(0) @binding(4) var<storage, read> w1: array<f16>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;

var<workgroup> c_s: array<f32, BM * CROW>;

alias CMat = coop_mat16x16<f32, C>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tile = tiles[wid.x];
    let r0 = tile.y;
    let r1 = tile.z;
    let n0 = wid.y * BN;
    let K = p.k_len;
    let N = p.n_len;
    // This subgroup's quarter of the tile.
    let sg = lid / 32u;
    let sm = (sg / 2u) * 32u;
    let sn = (sg % 2u) * 32u;

    var g00 = CMat();
    var g01 = CMat();
    var g10 = CMat();
    var g11 = CMat();
    var u00 = CMat();
    var u01 = CMat();
    var u10 = CMat();
    var u11 = CMat();

    // A row-major [m][k] with stride K; B = W^T, column-major: element (k, n) at n * K + k.
    let a_at = (r0 + sm) * K;
    let w_at = tile.x * p.expert_words * 2u + (n0 + sn) * K;
    for (var k0 = 0u; k0 < K; k0 += 16u) {
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a[a_at + k0], K);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a[a_at + 16u * K + k0], K);
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&w0[w_at + k0], K);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&w0[w_at + 16u * K + k0], K);
        g00 = coopMultiplyAdd(a0, b0, g00);
        g01 = coopMultiplyAdd(a0, b1, g01);
        g10 = coopMultiplyAdd(a1, b0, g10);
        g11 = coopMultiplyAdd(a1, b1, g11);
        if UP {
            let c0 = coopLoad<coop_mat16x16<f16, B>>(&w1[w_at + k0], K);
            let c1 = coopLoad<coop_mat16x16<f16, B>>(&w1[w_at + 16u * K + k0], K);
            u00 = coopMultiplyAdd(a0, c0, u00);
            u01 = coopMultiplyAdd(a0, c1, u01);
            u10 = coopMultiplyAdd(a1, c0, u10);
            u11 = coopMultiplyAdd(a1, c1, u11);
        }
    }

    // Epilogue: each thread takes 16 pairs of outputs (row i / 32, columns 2 (i % 32) + 0, 1).
    coopStoreT(g00, &c_s[sm * CROW + sn], CROW);
    coopStoreT(g01, &c_s[sm * CROW + sn + 16u], CROW);
    coopStoreT(g10, &c_s[(sm + 16u) * CROW + sn], CROW);
    coopStoreT(g11, &c_s[(sm + 16u) * CROW + sn + 16u], CROW);
    workgroupBarrier();
    var v: array<vec2<f32>, 16>;
    for (var j = 0u; j < 16u; j++) {
        let i = lid + j * THREADS;
        let at = (i / 32u) * CROW + 2u * (i % 32u);
        v[j] = vec2<f32>(c_s[at], c_s[at + 1u]);
    }
    if UP {
        workgroupBarrier();
        coopStoreT(u00, &c_s[sm * CROW + sn], CROW);
        coopStoreT(u01, &c_s[sm * CROW + sn + 16u], CROW);
        coopStoreT(u10, &c_s[(sm + 16u) * CROW + sn], CROW);
        coopStoreT(u11, &c_s[(sm + 16u) * CROW + sn + 16u], CROW);
        workgroupBarrier();
        for (var j = 0u; j < 16u; j++) {
            let i = lid + j * THREADS;
            let at = (i / 32u) * CROW + 2u * (i % 32u);
            v[j] = vec2<f32>(silu_mul(v[j].x, c_s[at]), silu_mul(v[j].y, c_s[at + 1u]));
        }
    }
    for (var j = 0u; j < 16u; j++) {
        let i = lid + j * THREADS;
        let r = r0 + i / 32u;
        let n = n0 + 2u * (i % 32u);
        if r < r1 && n < N {
            out[(r * N + n) / 2u] = pack2x16float(v[j]);
        }
    }
}
