// Decode-shaped grouped expert GEMM on packed weights (`wgsl/ffn_quant.wgsl`):
// `wgsl/ffn_gemv.wgsl` streaming the packed words (128 bytes of each row a stage, in the same
// coalesced 16-byte loads), each thread dequantizing its own row's values in f32 with the
// row's scale for each word's group, then the same sums in the same order (pieces of PIECE
// values folded into the chunk's sum as they end): its partials,
// summed by `wgsl/ffn_reduce.wgsl`, equal `wgsl/ffn_q.wgsl`'s sums bit for bit.
//
// Needs K a multiple of 4 * EPW (whole 16-byte words a row) and GROUP a multiple of 4 * EPW
// (a word's values share one scale).
//
// Prelude: UP, AT, BM, BN, PIECE, CHUNK, PREFETCH, widen_f16, and `wgsl/ffn_quant.wgsl`'s
// constants; `wgsl/convert.wgsl` and `wgsl/ffn_quant.wgsl` precede this file.

// struct Params: `wgsl/ffn_params.wgsl` (in the prelude).

// Values of one 16-byte word.
const VPW: u32 = 4u * EPW;
// Values staged at a time: 128 bytes of each row (several pieces of the summation order, so
// that every thread keeps as many bytes in flight as the dense kernel does).
const SPIECE: u32 = 1024u / BITS;
// 16-byte words of one row's stage, of one piece, and the staged row's stride (padded
// against bank conflicts).
const VPR: u32 = SPIECE / VPW;
// The generated fetch's stage and values per 16-byte word.
const STAGE: u32 = SPIECE;
const WV: u32 = VPW;
const QPP: u32 = PIECE / VPW;
const VROW: u32 = VPR + 1u;
const T1_LEN: u32 = select(1u, BN * VROW, UP);

@group(0) @binding(0) var<uniform> p: Params;
// Row tiles: (expert within the bound weights, first row, end row, first partial row q).
@group(0) @binding(1) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> w0: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> w1: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// Quantization scales of w0's and w1's matrices.
@group(0) @binding(6) var<storage, read> qs0: array<u32>;
@group(0) @binding(7) var<storage, read> qs1: array<u32>;

var<workgroup> a_s: array<vec4<f32>, BM * SPIECE / 4u>;
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
    let row_vecs = K / VPW;
    let base = tile.x * p.expert_words / 4u;
    let sbase = tile.x * p.scale_words;
    let groups = (K + GROUP - 1u) / GROUP;
    let nrow = min(n0 + lid, N - 1u);

    let z = bitcast<f32>(p.zero);
    // Generated (`backends/wgpu/src/ffn/gemv_source.rs`): the accumulators sum0_r (sum1_r)
    // for the BM rows, the registers g_j (u_j) that hold this thread's VPR 16-byte words of a
    // stage, and where each goes in workgroup memory.
    //@DECLS
    // Software pipeline (PREFETCH): the next stage's weights are loaded into registers while
    // the workgroup computes on the current one from workgroup memory; without, it loads after
    // computing (fewer live registers). A fetch loads the stage of the workgroup's BN weight
    // rows that starts at k0 (zeros past k_end or N): register g_j of thread t holds 16-byte
    // word i % VPR of row i / VPR, i = t + j * BN, so that a warp's loads are contiguous runs
    // of whole stages.
    //@FETCH k_begin
    for (var k0 = k_begin; k0 < k_end; k0 += SPIECE) {
        let len = min(SPIECE, k_end - k0);
        let vecs = len / VPW;
        //@STORE
        for (var i = lid; i < BM * SPIECE / 4u; i += BN) {
            let r = r0 + i / (SPIECE / 4u);
            let kk = (i % (SPIECE / 4u)) * 4u;
            var v = vec4<f32>(0.0);
            if r < r1 && kk < len {
                // len is a multiple of 4 (K is a multiple of 8 elements).
                let at = (r - p.a_base) * K + k0 + kk;
                v = vec4<f32>(load_a(at), load_a(at + 1u), load_a(at + 2u), load_a(at + 3u));
            }
            a_s[i] = v;
        }
        workgroupBarrier();
        if PREFETCH && k0 + SPIECE < k_end {
            //@FETCH k0 + SPIECE
        }
        //@PARTS
        for (var q = 0u; q < vecs; q++) {
            let g = t0[lid * VROW + q];
            var u = vec4<u32>(0u);
            if UP {
                u = t1[lid * VROW + q];
            }
            // The VPW weights of this word, in k order, dequantized with the row's scale for
            // the word's group (thread lid's row; a row past N reads row N - 1's, unused).
            let grp = (k0 + q * VPW) / GROUP;
            let at = sbase + scale_word(nrow, grp, groups);
            let s0 = decode_sb(qs0[at], qs0[at + select(0u, 1u, QK == 1u && ST == 0u)], nrow, grp, groups);
            var s1 = vec2<f32>(0.0);
            if UP {
                s1 = decode_sb(qs1[at], qs1[at + select(0u, 1u, QK == 1u && ST == 0u)], nrow, grp, groups);
            }
            // wg_e, wu_e, then for each row r and 16-byte word v of it the fma of each of its
            // 4 values, in k order.
            //@DOT
            // End of a piece of the summation order (or of the stage): fold it into the chunk.
            if (q + 1u) % QPP == 0u || q + 1u == vecs {
                //@FOLD
                //@RESET
            }
        }
        workgroupBarrier();
        if !PREFETCH && k0 + SPIECE < k_end {
            //@FETCH k0 + SPIECE
        }
    }

    let n = n0 + lid;
    if n >= N {
        return;
    }
    //@WRITE
}
