// Row gather: dst[r] = cat(src_a, src_b)[idx[r]], zeros where idx[r] == ZERO_ROW, and the
// row left as it is where idx[r] == KEEP_ROW (rows the host writes: exchange status blocks).
//
// The one data-movement kernel of the GPU path. It moves 32-bit words and never looks at
// their meaning, so it serves every dtype and is bitwise exact. Its roles:
//   pack (packet_gather)             src_a = x,           rows for every peer, in send order
//   scatter (dispatch_local +        src_a = received,    src_b = x: remote and local rows
//            dispatch_scatter_remote)                     into the expert-major batch at once
//   gather back (combine_gather_remote) src_a = outputs,  rows back in arrival order per peer
//
// The prelude (added by the loader) defines `Word` (vec4<u32> when rows are a multiple of
// 16 bytes, else u32) and `word_zero()`.
//
// Layout: a workgroup holds WG threads, split into rows of TPR = 1 << p.tpr_shift threads;
// each row's threads stride over its words. Workgroups form a 2-D grid (x < 65536).

struct Params {
    rows: u32,       // destination rows
    row_words: u32,  // Words per row
    a_rows: u32,     // rows of src_a; larger indices read src_b
    tpr_shift: u32,  // log2(threads per row)
    groups_x: u32,   // workgroups along x
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const WG: u32 = 256u;
const ZERO_ROW: u32 = 0xffffffffu;
const KEEP_ROW: u32 = 0xfffffffeu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src_a: array<Word>;
@group(0) @binding(2) var<storage, read> src_b: array<Word>;
@group(0) @binding(3) var<storage, read> idx: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<Word>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tpr = 1u << p.tpr_shift;
    let row = (wid.y * p.groups_x + wid.x) * (WG >> p.tpr_shift) + (lid >> p.tpr_shift);
    if row >= p.rows {
        return;
    }
    let lane = lid & (tpr - 1u);
    let n = p.row_words;
    let out = row * n;
    let i = idx[row];
    if i == KEEP_ROW {
        return;
    }
    if i == ZERO_ROW {
        for (var w = lane; w < n; w += tpr) {
            dst[out + w] = word_zero();
        }
    } else if i < p.a_rows {
        let base = i * n;
        for (var w = lane; w < n; w += tpr) {
            dst[out + w] = src_a[base + w];
        }
    } else {
        let base = (i - p.a_rows) * n;
        for (var w = lane; w < n; w += tpr) {
            dst[out + w] = src_b[base + w];
        }
    }
}
