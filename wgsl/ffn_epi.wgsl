// The FFN kernels' epilogues, shared so that every kernel applies them with the same
// operations (the deterministic mode compares kernels bit for bit): on the f32 sums of an
// output column n of `expert`, the weight row's power-of-two scale (WS: bf16 weights stored
// as f16 with per-row scales; exact), then the bias (BIAS), then for the up projection the
// activation, as the CPU engine's `up_epilogue` / `down_epilogue` do.
//
// Expects `p` with vec_stride, wscale_at, bias_at, up_off, alpha, limit, `vecs`, and the
// prelude's WS, BIAS, ACT; `wgsl/ffn_act.wgsl`.

fn vec_at(expert: u32, region: u32, n: u32) -> f32 {
    return vecs[expert * p.vec_stride + region + n];
}

// act(scale_g g + b_g, scale_u u + b_u) for gate sum g and up sum u of column n.
fn up_value(g: f32, u: f32, expert: u32, n: u32) -> f32 {
    var gv = g;
    var uv = u;
    if WS {
        gv = gv * vec_at(expert, p.wscale_at, n);
        uv = uv * vec_at(expert, p.wscale_at + p.up_off, n);
    }
    if BIAS {
        gv = gv + vec_at(expert, p.bias_at, n);
        uv = uv + vec_at(expert, p.bias_at + p.up_off, n);
    }
    return activate(gv, uv, bitcast<f32>(p.alpha), bitcast<f32>(p.limit));
}

// scale_d y + b_d for the down sum y of column n.
fn down_value(y: f32, expert: u32, n: u32) -> f32 {
    var v = y;
    if WS {
        v = v * vec_at(expert, p.wscale_at, n);
    }
    if BIAS {
        v = v + vec_at(expert, p.bias_at, n);
    }
    return v;
}
