// Decode-shaped grouped expert GEMM: a few rows per expert, so the weights are streamed once and
// the work is split over the reduction. Workgroup (wid.x, wid.y, wid.z) takes chunk wid.x of
// the reduction (CHUNK elements), BN weight rows from wid.y * BN, and the rows of row tile wid.z
// (one expert's, at most BM). Thread t owns weight row t of the tile and keeps BM partial
// sums. Chunks vary fastest so that workgroups running together stream neighbouring bytes of
// the same weight rows (a grid that ran one chunk of every row at once would hit memory with
// a large power-of-two stride).
//
// Piece by piece (PIECE elements of the reduction), the workgroup loads its BN rows' pieces
// with 16-byte loads in which consecutive threads read consecutive bytes (a row's piece is
// PIECE * element-size contiguous bytes, the next row's follows), stages them in workgroup
// memory, and each thread then walks its own row's piece in order.
//
// Summation order: exactly `wgsl/ffn.wgsl`'s: a piece's sum starts at zero (p.zero) and takes
// fma(A[r, k], W[n, k], piece) for its k in order; a chunk's sum starts at zero and adds its
// pieces' sums in order. The chunk sums go to `out` as [chunk][q][n] with q = tiles[.].w plus
// the row's place in its tile, among p.prows rows (UP: the gate's, then the up's,
// `chunks * prows * N` values later), and `wgsl/ffn_reduce.wgsl` adds them, in chunk order,
// to a zero, and applies the tiled kernel's epilogue: the bits equal the tiled kernel's.
// Row r of A is A's row r - a_base.
//
// Needs K (and so every row start) a multiple of 4 words (8 16-bit or 4 f32 elements) for
// the 16-byte loads; the loader uses the tiled kernel otherwise.
//
// Prelude (added by the loader): UP, AT (A's dtype: 0 = f32, 1 = f16, 2 = bf16), WT (weights'
// dtype), BM, BN, PIECE, CHUNK (a multiple of PIECE), PREFETCH, and widen_f16(word, h);
// `wgsl/convert.wgsl` precedes this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

const WPE: u32 = select(2u, 1u, WT == 0u);
// Values of one 16-byte word.
const WV: u32 = 4u * WPE;
// Values a fetch loads of each row (the generated fetch's stage).
const STAGE: u32 = PIECE;
// 16-byte words of one row's piece, and the staged row's stride (padded against bank conflicts).
const VPR: u32 = PIECE / WV;
const VROW: u32 = VPR + 1u;
const T1_LEN: u32 = select(1u, BN * VROW, UP);

@group(0) @binding(0) var<uniform> p: Params;
// Row tiles: (expert within the bound weights, first row, end row, first partial row q).
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> w0: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> w1: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> a_s: array<vec4<f32>, BM * PIECE / 4u>;
var<workgroup> t0: array<vec4<u32>, BN * VROW>;
var<workgroup> t1: array<vec4<u32>, T1_LEN>;

fn widen(word: u32, h: u32, dt: u32) -> f32 {
    if dt == 0u {
        return bitcast<f32>(word);
    }
    if dt == 2u {
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, h == 1u));
    }
    return widen_f16(word, h);
}

fn load_a(i: u32) -> f32 {
    if AT == 0u {
        return bitcast<f32>(a[i]);
    }
    return widen(a[i >> 1u], i & 1u, AT);
}

@compute @workgroup_size(BN)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tile = tiles[wid.z];
    let r0 = tile.y;
    let r1 = tile.z;
    let K = p.k_len;
    let N = p.n_len;
    let n0 = wid.y * BN;
    let k_begin = wid.x * CHUNK;
    let k_end = min(K, k_begin + CHUNK);
    let row_vecs = K / WV;
    let base = tile.x * p.expert_words / 4u;

    let z = bitcast<f32>(p.zero);
    // Generated (`backends/wgpu/src/ffn/gemv_source.rs`): the accumulators sum0_r (sum1_r)
    // for the BM rows, the registers g_j (u_j) that hold this thread's VPR 16-byte words of a
    // piece, and where each goes in workgroup memory.
    //@DECLS
    // Software pipeline (PREFETCH): the next piece's weights are loaded into registers while
    // the workgroup computes on the current one from workgroup memory; without, it loads after
    // computing (fewer live registers). A fetch loads the piece of the workgroup's BN weight
    // rows that starts at k0 (zeros past k_end or N): register g_j of thread t holds 16-byte
    // word i % VPR of row i / VPR, i = t + j * BN, so that a warp's loads are contiguous runs
    // of whole pieces.
    //@FETCH k_begin
    for (var k0 = k_begin; k0 < k_end; k0 += PIECE) {
        let len = min(PIECE, k_end - k0);
        let vecs = len / WV;
        //@STORE
        for (var i = lid; i < BM * PIECE / 4u; i += BN) {
            let r = r0 + i / (PIECE / 4u);
            let kk = (i % (PIECE / 4u)) * 4u;
            var v = vec4<f32>(0.0);
            if r < r1 && kk < len {
                // len is a multiple of 4 (K is a multiple of 8 elements).
                let at = (r - p.a_base) * K + k0 + kk;
                v = vec4<f32>(load_a(at), load_a(at + 1u), load_a(at + 2u), load_a(at + 3u));
            }
            a_s[i] = v;
        }
        workgroupBarrier();
        if PREFETCH && k0 + PIECE < k_end {
            //@FETCH k0 + PIECE
        }
        //@PARTS
        for (var q = 0u; q < vecs; q++) {
            let g = t0[lid * VROW + q];
            var u = vec4<u32>(0u);
            if UP {
                u = t1[lid * VROW + q];
            }
            // The WV weights of this word, in k order (wg_e, wu_e), and for each row r and
            // 16-byte word v of it the fma of each of its 4 values, in k order.
            //@DOT
        }
        //@FOLD
        workgroupBarrier();
        if !PREFETCH && k0 + PIECE < k_end {
            //@FETCH k0 + PIECE
        }
    }

    let n = n0 + lid;
    if n >= N {
        return;
    }
    //@WRITE
}
