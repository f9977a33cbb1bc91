// Router top-k: from each token's logits to its k experts and their weights, one thread per
// token, in the operations and order of the CPU router (`src/model/router.rs`, `RowRule`):
//
//   logits    l = logits[t, e] (+ bias[e] with a logit bias: gpt-oss);
//   scores    softmax over all experts (max, then the sum of exp(l - max) in expert order),
//             sigmoid(l), or none yet (softmax over the chosen k);
//   keys      score + bias with a selection bias, else the logit where it ranks as the score
//             does (no top-two groups; always for softmax over the chosen k), else the score;
//   groups    n_group groups of consecutive experts scored by their best key or the sum of
//             their two best; the topk_group best kept (ties to the lower group), the others'
//             keys -inf;
//   top-k     the k largest keys, ties to the lower expert id (an insertion list that takes a
//             -inf key only while fewer than k were seen);
//   weights   the chosen experts' scores, or (softmax over the chosen k) exp(l_j - max) over
//             their sum in slot order; when renormalised divided by d = (sum_j w_j^p)^(1/p)
//             (p = 1: the plain sum in slot order) + eps, at least norm_min; then times
//             routed_scaling_factor when it is not 1.
//
// Writes ids[t * k + j] and weights[t * k + j]. exp() differs from the CPU's by rounding, so
// weights agree within rounding and ids wherever no two keys are within it of each other.

struct Params {
    n: u32,
    e: u32,
    k: u32,
    n_group: u32,
    topk_group: u32,
    // 1: sigmoid scores; 2: top-two-sum groups; 4: selection bias; 8: renormalise; 16: keys
    // are the logits; 32: bias on the logits; 64: softmax over the chosen k
    flags: u32,
    scale: f32,     // routed_scaling_factor
    groups_x: u32,  // workgroups along x
    norm_p: f32,
    norm_eps: f32,
    norm_min: f32,
    _pad: u32,
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

// Logit i of the row at `row` (with the logit bias).
fn logit(row: u32, i: u32) -> f32 {
    if flag(32u) {
        return logits[row + i] + bias[i];
    }
    return logits[row + i];
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
    if !flag(1u) && !flag(64u) {
        for (var i = 0u; i < e; i++) {
            max_l = max(max_l, logit(row, i));
        }
        for (var i = 0u; i < e; i++) {
            sum = sum + exp(logit(row, i) - max_l);
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
    if flag(64u) {
        var top_l = NEG_INF;
        for (var j = 0u; j < k; j++) {
            top_l = max(top_l, logit(row, tid[j]));
        }
        var s = 0.0;
        for (var j = 0u; j < k; j++) {
            ws[j] = exp(logit(row, tid[j]) - top_l);
            s = s + ws[j];
        }
        for (var j = 0u; j < k; j++) {
            ws[j] = ws[j] / s;
        }
    } else {
        for (var j = 0u; j < k; j++) {
            ws[j] = score(logit(row, tid[j]), max_l, sum);
        }
    }
    if flag(8u) {
        var d = 0.0;
        if p.norm_p == 1.0 {
            for (var j = 0u; j < k; j++) {
                d = d + ws[j];
            }
        } else {
            for (var j = 0u; j < k; j++) {
                d = d + pow(abs(ws[j]), p.norm_p);
            }
            d = pow(d, 1.0 / p.norm_p);
        }
        d = max(d + p.norm_eps, p.norm_min);
        for (var j = 0u; j < k; j++) {
            ws[j] = ws[j] / d;
        }
    }
    for (var j = 0u; j < k; j++) {
        var wv = ws[j];
        if p.scale != 1.0 {
            wv = wv * p.scale;
        }
        ids[t * k + j] = tid[j];
        weights[t * k + j] = wv;
    }
}

// The selection key of expert i (see the header).
fn key(row: u32, i: u32, max_l: f32, sum: f32) -> f32 {
    let l = logit(row, i);
    if flag(4u) {
        return score(l, max_l, sum) + bias[i];
    }
    if flag(16u) {
        return l;
    }
    return score(l, max_l, sum);
}
