//! The unrolled parts of the cooperative-matrix kernel (`wgsl/ffn_mma.wgsl`'s `//@` lines):
//! per-thread registers, accumulators and fragments as named values. Written as loops over
//! arrays, NVIDIA's compiler kept them in local memory: every global load was stored there at
//! once, so a thread waited for each load in turn (measured on the H200: 7.7 us a k-step,
//! 2-11% of the copy bandwidth).

use std::fmt::Write;

use crate::kernels::{MmaProbe, MmaTile};

/// The sizes the generated code unrolls over.
struct Shape {
    t: MmaTile,
    up: bool,
    at: u32,
    threads: u32,
    kv: u32,
    a_units: u32,
    b_units: u32,
    la: u32,
    lb: u32,
    aw: u32,
    tm: u32,
    tn: u32,
    pair: u32,
    ept: u32,
    /// Packed weights: bits a value (4 or 8); `None` for f16 weights.
    packed: Option<u32>,
}

impl Shape {
    fn new(t: MmaTile, up: bool, at: u32, out16: bool, packed: Option<u32>) -> Shape {
        let threads = t.threads();
        let kv = t.bk / 8;
        let nb = t.bn * (1 + u32::from(up));
        let (a_units, b_units) = (t.bm * kv, nb * kv);
        let pair = if !up && out16 { 2 } else { 1 };
        Shape {
            t,
            up,
            at,
            threads,
            kv,
            a_units,
            b_units,
            la: a_units.div_ceil(threads),
            lb: b_units.div_ceil(threads),
            aw: if at == 0 { 2 } else { 1 },
            tm: t.bm / t.wm / t.s,
            tn: t.bn / t.wn / t.s,
            pair,
            ept: t.s * t.s / t.sg / pair,
            packed,
        }
    }
}

/// `src` with every `//@` line replaced by its unrolled code for `tile` (up or down, A of
/// dtype code `at`, 16-bit output `out16`, weights packed with `packed` bits a value or f16).
pub(crate) fn expand(src: &str, tile: MmaTile, up: bool, at: u32, out16: bool, packed: Option<u32>) -> String {
    let sh = Shape::new(tile, up, at, out16, packed);
    let mut out = String::with_capacity(src.len() * 2);
    for line in src.lines() {
        match line.trim() {
            "//@DECLS" => out.push_str(&decls(&sh)),
            "//@FETCH" => out.push_str(&fetch(&sh)),
            "//@STORE" => out.push_str(&store(&sh)),
            "//@COMPUTE" => out.push_str(&compute(&sh)),
            "//@EPILOGUE" => out.push_str(&epilogue(&sh)),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn decls(sh: &Shape) -> String {
    let mut s = String::new();
    for i in 0..sh.tm {
        for j in 0..sh.tn {
            let _ = writeln!(s, "    var acc0_{i}_{j} = CMat();");
            if sh.up {
                let _ = writeln!(s, "    var acc1_{i}_{j} = CMat();");
            }
        }
    }
    for q in 0..sh.la * sh.aw {
        let _ = writeln!(s, "    var ra_{q}: vec4<u32>;");
    }
    for q in 0..2 * sh.lb {
        let _ = writeln!(s, "    var rb_{q}: vec4<f16>;");
    }
    s
}

/// `i < units && ` where some thread of slice `j` may be past `units`, else nothing.
fn guard(sh: &Shape, j: u32, units: u32) -> String {
    if (j + 1) * sh.threads > units { format!("i < {units}u && ") } else { String::new() }
}

/// The loads of step `k0`: every one issued unconditionally from an address clamped into the
/// tile's rows, the weights' rows and the reduction (in bounds: a tile has a row, N at least
/// 1, K at least 8), the words out of range then replaced by zeros, so that no load sits in a
/// bounds branch and a thread's loads are all in flight at once. (A slice of weight loads
/// that straddles the gate's and the up's rows still branches on the side; no default tile
/// has one.)
fn fetch(sh: &Shape) -> String {
    let mut s = String::new();
    if sh.t.probe == MmaProbe::NoLoads {
        // Timing probe: the staging registers keep the zeros they were declared with.
        return s;
    }
    for j in 0..sh.la {
        let (q, g) = (j * sh.aw, guard(sh, j, sh.a_units));
        let _ = writeln!(s, "        {{\n            let i = lid + {}u;", j * sh.threads);
        let _ = writeln!(s, "            let r = r0 + i / KV;\n            let k = k0 + (i % KV) * 8u;");
        let _ = writeln!(s, "            let ok = {g}r < r1 && k < K;");
        let _ = writeln!(s, "            let e = (min(r, r1 - 1u) - p.a_base) * K + min(k, K - 8u);");
        if sh.aw == 2 {
            let _ = writeln!(s, "            ra_{q} = select(vec4<u32>(0u), a[e / 4u], ok);");
            let _ = writeln!(s, "            ra_{} = select(vec4<u32>(0u), a[e / 4u + 1u], ok);", q + 1);
        } else {
            let _ = writeln!(s, "            ra_{q} = select(vec4<u32>(0u), a[e / 8u], ok);");
        }
        s.push_str("        }\n");
    }
    for j in 0..sh.lb {
        fetch_b(sh, j, &mut s);
    }
    s
}

/// Slice `j` of the weight loads: gate (w0) or up (w1) rows, statically where the slice's
/// rows all lie on one side. f16 weights: two 8-byte loads a unit of 8 inputs; packed ones
/// ([`packed_unit`]): the unit's words and its group's scale, dequantized.
fn fetch_b(sh: &Shape, j: u32, s: &mut String) {
    let g = guard(sh, j, sh.b_units);
    let lo = j * sh.threads / sh.kv;
    let hi = ((j + 1) * sh.threads - 1).min(sh.b_units.saturating_sub(1)) / sh.kv;
    let bn = sh.t.bn;
    let side = if !sh.up || hi < bn {
        Some(("w0", ""))
    } else if lo >= bn {
        Some(("w1", " - BN"))
    } else {
        None
    };
    let (a, b) = (2 * j, 2 * j + 1);
    let _ = writeln!(s, "        {{\n            let i = lid + {}u;", j * sh.threads);
    let _ = writeln!(s, "            let nn = i / KV;\n            let kr = k0 + (i % KV) * 8u;");
    let n = match side {
        Some((_, minus)) => format!("n0 + nn{minus}"),
        None => "n0 + select(nn, nn - BN, nn >= BN)".to_string(),
    };
    // Clamped into the weights (the unit past them is replaced by zeros below).
    let _ = writeln!(s, "            let nr = {n};\n            let ok = {g}nr < p.n_len && kr < K;");
    let _ = writeln!(s, "            let n = min(nr, p.n_len - 1u);\n            let k = min(kr, K - 8u);");
    // The loads of one side (w0 or w1), at `indent`.
    let loads = |w: &str, indent: &str| -> String {
        match sh.packed {
            Some(bits) => packed_unit(w, bits, indent, a, b),
            None => format!(
                "{indent}let at = expert * (p.expert_words / 2u) + (n * K + k) / 4u;\n\
                 {indent}rb_{a} = {w}[at];\n{indent}rb_{b} = {w}[at + 1u];\n"
            ),
        }
    };
    match side {
        Some((w, _)) => s.push_str(&loads(w, "            ")),
        None => {
            let (up, gate) = (loads("w1", "                "), loads("w0", "                "));
            let _ = write!(s, "            if nn >= BN {{\n{up}            }} else {{\n{gate}            }}\n");
        }
    }
    let _ = writeln!(s, "            rb_{a} = select(vec4<f16>(0.0h), rb_{a}, ok);");
    let _ = writeln!(s, "            rb_{b} = select(vec4<f16>(0.0h), rb_{b}, ok);");
    s.push_str("        }\n");
}

/// One side's packed unit of 8 inputs into `rb_{a}`, `rb_{b}` (`w` its words, `qs0`/`qs1`
/// their scales): its words (one of 4-bit values, two of 8-bit ones) and its group's scale
/// words (the second only for f32 affine scales), decoded with `wgsl/ffn_quant.wgsl` as the
/// portable kernels read them, each value `fma(s, q, b)` in f32, rounded to f16.
fn packed_unit(w: &str, bits: u32, indent: &str, a: u32, b: u32) -> String {
    let qs = if w == "w1" { "qs1" } else { "qs0" };
    let mut s = String::new();
    let _ = writeln!(s, "{indent}let at = expert * p.expert_words + n * (K / EPW) + k / EPW;");
    let _ = writeln!(s, "{indent}let groups = (K + GROUP - 1u) / GROUP;\n{indent}let gi = k / GROUP;");
    let _ = writeln!(s, "{indent}let sw = expert * p.scale_words + scale_word(n, gi, groups);");
    let _ = writeln!(s, "{indent}var s1 = 0u;");
    let _ = writeln!(s, "{indent}if QK == 1u && ST == 0u {{\n{indent}    s1 = {qs}[sw + 1u];\n{indent}}}");
    let _ = writeln!(s, "{indent}let sb = decode_sb({qs}[sw], s1, n, gi, groups);");
    let per = 32 / bits;
    for q in 0..8 / per {
        let _ = writeln!(s, "{indent}let q{q} = {w}[at + {q}u];");
    }
    let v: Vec<String> = (0..8).map(|e| format!("f16(fma(sb.x, qvalue(q{}, {}u), sb.y))", e / per, e % per)).collect();
    let _ = writeln!(s, "{indent}rb_{a} = vec4<f16>({}, {}, {}, {});", v[0], v[1], v[2], v[3]);
    let _ = writeln!(s, "{indent}rb_{b} = vec4<f16>({}, {}, {}, {});", v[4], v[5], v[6], v[7]);
    s
}

/// Stage eight f16 values `h0..h3` (vec2s) at element `at` of `arr`.
fn put(sh: &Shape, arr: &str, h: [&str; 4]) -> String {
    if sh.t.sv == 4 {
        format!(
            "                {arr}[at / 4u] = vec4<f16>({}, {});\n                {arr}[at / 4u + 1u] = vec4<f16>({}, {});\n",
            h[0], h[1], h[2], h[3]
        )
    } else {
        let mut s = String::new();
        for (q, v) in h.iter().enumerate() {
            let _ = writeln!(
                s,
                "                {arr}[at + {}u] = {v}.x;\n                {arr}[at + {}u] = {v}.y;",
                2 * q,
                2 * q + 1
            );
        }
        s
    }
}

fn store(sh: &Shape) -> String {
    let mut s = String::new();
    let c = ["x", "y", "z", "w"];
    for j in 0..sh.la {
        let q = j * sh.aw;
        let _ = writeln!(s, "        {{\n            let i = lid + {}u;", j * sh.threads);
        let _ = writeln!(s, "            if {}true {{", guard(sh, j, sh.a_units));
        let _ = writeln!(
            s,
            "                let m = i / KV;\n                let at = buf * BM * AST + m * AST + (i % KV) * 8u;"
        );
        let _ = writeln!(s, "                let sc = mult_s[m];");
        for (k, h) in c.iter().enumerate() {
            let v = match sh.at {
                1 => format!("vec2<f16>(unpack2x16float(ra_{q}.{h}))"),
                2 => format!(
                    "vec2<f16>(f16(bitcast<f32>(ra_{q}.{h} << 16u) * sc), f16(bitcast<f32>(ra_{q}.{h} & 0xffff0000u) * sc))"
                ),
                _ => {
                    let (src, x, y) = (q + (k as u32) / 2, c[2 * (k % 2)], c[2 * (k % 2) + 1]);
                    format!("vec2<f16>(f16(bitcast<f32>(ra_{src}.{x}) * sc), f16(bitcast<f32>(ra_{src}.{y}) * sc))")
                }
            };
            let _ = writeln!(s, "                let h{k} = {v};");
        }
        s.push_str(&put(sh, "a_s", ["h0", "h1", "h2", "h3"]));
        s.push_str("            }\n        }\n");
    }
    for j in 0..sh.lb {
        let _ = writeln!(s, "        {{\n            let i = lid + {}u;", j * sh.threads);
        let _ = writeln!(s, "            if {}true {{", guard(sh, j, sh.b_units));
        let _ = writeln!(s, "                let at = buf * NB * AST + (i / KV) * AST + (i % KV) * 8u;");
        if sh.t.sv == 4 {
            let _ = writeln!(
                s,
                "                b_s[at / 4u] = rb_{};\n                b_s[at / 4u + 1u] = rb_{};",
                2 * j,
                2 * j + 1
            );
        } else {
            for (half, r) in [2 * j, 2 * j + 1].into_iter().enumerate() {
                for (k, h) in c.iter().enumerate() {
                    let _ = writeln!(s, "                b_s[at + {}u] = rb_{r}.{h};", 4 * half + k);
                }
            }
        }
        s.push_str("            }\n        }\n");
    }
    s
}

fn compute(sh: &Shape) -> String {
    let mut s = String::new();
    if sh.t.probe == MmaProbe::NoProducts {
        // Timing probe: no fragment loads, no products (the accumulators stay zero).
        return s;
    }
    let (sz, ast) = (sh.t.s, sh.t.bk + 8);
    for kk in (0..sh.t.bk).step_by(sz as usize) {
        s.push_str("            {\n");
        for i in 0..sh.tm {
            let _ = writeln!(
                s,
                "                let af_{i} = coopLoadT<AMat>(&a_s[(abase + {}u) / SV], AST / SV);",
                i * sz * ast + kk
            );
        }
        for j in 0..sh.tn {
            let _ = writeln!(
                s,
                "                let bg_{j} = coopLoad<BMat>(&b_s[(bbase + {}u) / SV], AST / SV);",
                j * sz * ast + kk
            );
            if sh.up {
                let off = (sh.t.bn + j * sz) * ast + kk;
                let _ =
                    writeln!(s, "                let bu_{j} = coopLoad<BMat>(&b_s[(bbase + {off}u) / SV], AST / SV);");
            }
        }
        for j in 0..sh.tn {
            for i in 0..sh.tm {
                let _ = writeln!(s, "                acc0_{i}_{j} = coopMultiplyAdd(af_{i}, bg_{j}, acc0_{i}_{j});");
                if sh.up {
                    let _ =
                        writeln!(s, "                acc1_{i}_{j} = coopMultiplyAdd(af_{i}, bu_{j}, acc1_{i}_{j});");
                }
            }
        }
        s.push_str("            }\n");
    }
    s
}

fn epilogue(sh: &Shape) -> String {
    let mut s = String::new();
    let (sz, sg, pair) = (sh.t.s, sh.t.sg, sh.pair);
    for i in 0..sh.tm {
        for j in 0..sh.tn {
            let _ = writeln!(s, "    {{\n        coopStoreT(acc0_{i}_{j}, &c_s[cb], S);\n        workgroupBarrier();");
            for t in 0..sh.ept * pair {
                let _ = writeln!(
                    s,
                    "        let g_{t} = c_s[cb + lane * {pair}u + {}u];",
                    (t / pair) * sg * pair + t % pair
                );
            }
            s.push_str("        workgroupBarrier();\n");
            if sh.up {
                let _ = writeln!(s, "        coopStoreT(acc1_{i}_{j}, &c_s[cb], S);\n        workgroupBarrier();");
            }
            for t in 0..sh.ept {
                let _ = writeln!(s, "        {{\n            let el = (lane + {}u) * {pair}u;", t * sg);
                let _ = writeln!(
                    s,
                    "            let ml = m0 + {}u + el / S;\n            let n = c0 + {}u + el % S;",
                    i * sz,
                    j * sz
                );
                if sh.up {
                    let _ = writeln!(s, "            emit_up(expert, r0 + ml, ml, n, g_{t}, c_s[cb + el]);");
                } else {
                    let (a, b) = (t * pair, t * pair + pair - 1);
                    let _ = writeln!(s, "            emit_down(expert, r0 + ml, ml, n, g_{a}, g_{b});");
                }
                s.push_str("        }\n");
            }
            s.push_str("        workgroupBarrier();\n    }\n");
        }
    }
    s
}
