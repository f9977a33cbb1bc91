// Router top-k: from each token's logits to its k experts and their weights, one thread per
// token, in the operations and order of the CPU router (`src/model/router.rs`, `RowRule`):
//
//   scores    softmax over all experts (max, then the sum of exp(l - max) in expert order)
//             or sigmoid(l);
//   keys      the logit where it ranks as the score does (no bias, no top-two groups), else
//             score + bias (with a selection bias) or score;
//   groups    n_group groups of consecutive experts scored by their best key or the sum of
//             their two best; the topk_group best kept (ties to the lower group), the others'
//             keys -inf;
//   top-k     the k largest keys, ties to the lower expert id (an insertion list that takes a
//             -inf key only while fewer than k were seen);
//   weights   the chosen experts' scores, divided by their sum (in slot order) when
//             renormalised, then times routed_scaling_factor when it is not 1.
//
// Writes ids[t * k + j] and weights[t * k + j]. exp() differs from the CPU's by rounding, so
// weights agree within rounding and ids wherever no two keys are within it of each other.

struct Params {
    n: u32,
    e: u32,
    k: u32,
    n_group: u32,
    topk_group: u32,
    flags: u32,     // 1: sigmoid scores; 2: top-two-sum groups; 4: selection bias; 8: renormalise; 16: by logit
    scale: f32,     // routed_scaling_factor
    groups_x: u32,  // workgroups along x
}

const MAX_K: u32 = 16u;
const MAX_GROUPS: u32 = 64u;
// Below every real key: the CPU's -inf (WGSL has no infinities, and fast-math compilers may
// assume there are none).
const NEG_INF: f32 = -3.40282347e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;

fn flag(f: u32) -> bool {
    return (p.flags & f) != 0u;
}

fn score(l: f32, max_l: f32, sum: f32) -> f32 {
    if flag(1u) {
        return 1.0 / (1.0 + exp(-l));
    }
    return exp(l - max_l) / sum;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = (wid.y * p.groups_x + wid.x) * 64u + lid;
    if t >= p.n {
        return;
    }
    let e = p.e;
    let row = t * e;
    var max_l = NEG_INF;
    var sum = 0.0;
    if !flag(1u) {
        for (var i = 0u; i < e; i++) {
            max_l = max(max_l, logits[row + i]);
        }
        for (var i = 0u; i < e; i++) {
            sum = sum + exp(logits[row + i] - max_l);
        }
    }
    // Kept groups (all when ungrouped), as a bit set.
    var keep: array<bool, MAX_GROUPS>;
    let per = e / p.n_group;
    for (var g = 0u; g < MAX_GROUPS; g++) {
        keep[g] = p.n_group == 1u;
    }
    if p.n_group > 1u {
        var gk: array<f32, MAX_GROUPS>;
        var gid: array<u32, MAX_GROUPS>;
        var filled = 0u;
        for (var g = 0u; g < p.n_group; g++) {
            var a = NEG_INF;
            var b = NEG_INF;
            for (var i = g * per; i < (g + 1u) * per; i++) {
                let v = key(row, i, max_l, sum);
                if v > a {
                    b = a;
                    a = v;
                } else if v > b {
                    b = v;
                }
            }
            let gs = select(a, a + b, flag(2u));
            // Insertion into the best topk_group (ties keep the earlier group).
            let kk = p.topk_group;
            if filled < kk || gs > gk[kk - 1u] {
                var j = min(filled, kk - 1u);
                while j > 0u && gs > gk[j - 1u] {
                    gk[j] = gk[j - 1u];
                    gid[j] = gid[j - 1u];
                    j--;
                }
                gk[j] = gs;
                gid[j] = g;
                filled = min(filled + 1u, kk);
            }
        }
        for (var j = 0u; j < filled; j++) {
            keep[gid[j]] = true;
        }
    }
    var tk: array<f32, MAX_K>;
    var tid: array<u32, MAX_K>;
    var filled = 0u;
    let k = p.k;
    for (var i = 0u; i < e; i++) {
        var v = NEG_INF;
        if keep[i / per] {
            v = key(row, i, max_l, sum);
        }
        if filled < k || v > tk[k - 1u] {
            var j = min(filled, k - 1u);
            while j > 0u && v > tk[j - 1u] {
                tk[j] = tk[j - 1u];
                tid[j] = tid[j - 1u];
                j--;
            }
            tk[j] = v;
            tid[j] = i;
            filled = min(filled + 1u, k);
        }
    }
    var ws: array<f32, MAX_K>;
    var total = 0.0;
    for (var j = 0u; j < k; j++) {
        ws[j] = score(logits[row + tid[j]], max_l, sum);
        total = total + ws[j];
    }
    for (var j = 0u; j < k; j++) {
        var wv = ws[j];
        if flag(8u) {
            wv = wv / total;
        }
        if p.scale != 1.0 {
            wv = wv * p.scale;
        }
        ids[t * k + j] = tid[j];
        weights[t * k + j] = wv;
    }
}

// The selection key of expert i (see the header).
fn key(row: u32, i: u32, max_l: f32, sum: f32) -> f32 {
    let l = logits[row + i];
    if flag(16u) {
        return l;
    }
    let s = score(l, max_l, sum);
    if flag(4u) {
        return s + bias[i];
    }
    return s;
}
