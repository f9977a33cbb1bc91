//! The unrolled parts of the decode kernels (`wgsl/ffn_gemv.wgsl` and `wgsl/ffn_qgemv.wgsl`,
//! their `//@` lines): the accumulators of the tile's rows, the registers of a fetch and the
//! weights of a 16-byte word as named values instead of arrays indexed in loops (which
//! NVIDIA's compiler kept in local memory in the cooperative kernel; see `mma_source.rs`).
//! The generated code performs the same operations in the same order as the loops it
//! replaces, so the sums keep their bits.

use std::fmt::Write;

/// The sizes the generated code unrolls over.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemvShape {
    /// Gate and up (two weight streams, two sets of sums) or down.
    pub up: bool,
    /// Rows of the tile (BM).
    pub bm: u32,
    /// Values per 32-bit word of the weights (dense: 1 for f32, 2 for 16-bit; packed: 32 / bits).
    pub per_word: u32,
    /// 16-byte words of one row a fetch loads (VPR).
    pub vpr: u32,
    /// Packed weights: each value is `fma(scale, qvalue, bias)` with the word's group's scale.
    pub packed: bool,
}

const COMP: [&str; 4] = ["x", "y", "z", "w"];

/// `src` with every `//@` line replaced by its unrolled code for `sh`.
pub(crate) fn expand(src: &str, sh: GemvShape) -> String {
    let mut out = String::with_capacity(src.len() * 3);
    for line in src.lines() {
        let t = line.trim();
        let code = match t {
            "//@DECLS" => decls(&sh),
            "//@STORE" => store(&sh),
            "//@PARTS" => sums(&sh, "var part", "z"),
            "//@RESET" => sums(&sh, "part", "z"),
            "//@FOLD" => fold(&sh),
            "//@DOT" => dot(&sh),
            "//@WRITE" => write_out(&sh),
            _ => match t.strip_prefix("//@FETCH ") {
                Some(k0) => fetch(&sh, k0),
                None => {
                    out.push_str(line);
                    out.push('\n');
                    continue;
                }
            },
        };
        out.push_str(&code);
    }
    out
}

/// The streams: `0` (gate or down), and `1` (up) for the up projection.
fn streams(sh: &GemvShape) -> &'static [u32] {
    if sh.up { &[0, 1] } else { &[0] }
}

fn decls(sh: &GemvShape) -> String {
    let mut s = sums(sh, "var sum", "z");
    for j in 0..sh.vpr {
        let _ = writeln!(s, "    var g_{j} = vec4<u32>(0u);");
        if sh.up {
            let _ = writeln!(s, "    var u_{j} = vec4<u32>(0u);");
        }
        let _ = writeln!(
            s,
            "    let fr_{j} = (lid + {j}u * BN) / VPR;\n    let fq_{j} = (lid + {j}u * BN) % VPR;\n    \
             let ts_{j} = fr_{j} * VROW + fq_{j};"
        );
    }
    s
}

/// `{prefix}{stream}_{r} = {value};` for every row and stream.
fn sums(sh: &GemvShape, prefix: &str, value: &str) -> String {
    let mut s = String::new();
    for r in 0..sh.bm {
        for &i in streams(sh) {
            let _ = writeln!(s, "    {prefix}{i}_{r} = {value};");
        }
    }
    s
}

fn fold(sh: &GemvShape) -> String {
    let mut s = String::new();
    for r in 0..sh.bm {
        for &i in streams(sh) {
            let _ = writeln!(s, "    sum{i}_{r} = sum{i}_{r} + part{i}_{r};");
        }
    }
    s
}

/// Load the stage of the workgroup's rows that starts at `k0` into g_j (u_j), zeros past
/// k_end or N. Every load is issued unconditionally from an address clamped into the rows
/// and the stage (always in bounds: N is at least 1 and a stage has a word) and the
/// out-of-range words are then replaced by zeros, so that no load sits in a branch and a
/// thread's loads are all in flight at once.
fn fetch(sh: &GemvShape, k0: &str) -> String {
    let mut s = format!(
        "    {{\n    let f_vecs = min(STAGE, k_end - ({k0})) / WV;\n    let f_k = ({k0}) / WV;\n    \
         let f_last = p.n_len - 1u;\n"
    );
    for j in 0..sh.vpr {
        let _ = writeln!(s, "    let ok_{j} = n0 + fr_{j} < p.n_len && fq_{j} < f_vecs;");
        let _ = writeln!(
            s,
            "    let at_{j} = base + min(n0 + fr_{j}, f_last) * row_vecs + f_k + min(fq_{j}, f_vecs - 1u);"
        );
        let _ = writeln!(s, "    g_{j} = select(vec4<u32>(0u), w0[at_{j}], ok_{j});");
        if sh.up {
            let _ = writeln!(s, "    u_{j} = select(vec4<u32>(0u), w1[at_{j}], ok_{j});");
        } else if j == 0 {
            // The down projection binds its weights twice (the layout has w1); never runs.
            let _ = writeln!(s, "    if UP {{ g_{j} = w1[at_{j}]; }}");
        }
    }
    s.push_str("    }\n");
    s
}

fn store(sh: &GemvShape) -> String {
    let mut s = String::new();
    for j in 0..sh.vpr {
        let _ = writeln!(s, "    t0[ts_{j}] = g_{j};");
        if sh.up {
            let _ = writeln!(s, "    t1[ts_{j}] = u_{j};");
        }
    }
    s
}

/// The weights of the word (g, u) in k order, then per row and 16-byte word of A the fma of
/// each of its 4 values into the row's partial sums.
fn dot(sh: &GemvShape) -> String {
    let mut s = String::new();
    let (pw, vw) = (sh.per_word, 4 * sh.per_word);
    for e in 0..vw {
        let (c, h) = (COMP[(e / pw) as usize], e % pw);
        for &i in streams(sh) {
            let (w, sc) = if i == 0 { ("g", "s0") } else { ("u", "s1") };
            let value = if sh.packed {
                format!("fma({sc}.x, qvalue({w}.{c}, {h}u), {sc}.y)")
            } else {
                format!("widen({w}.{c}, {h}u, WT)")
            };
            let _ = writeln!(s, "    let w{w}_{e} = {value};");
        }
    }
    for r in 0..sh.bm {
        for v in 0..pw {
            let _ = writeln!(s, "    let a_{r}_{v} = a_s[{r}u * (STAGE / 4u) + q * {pw}u + {v}u];");
            for (cc, comp) in COMP.iter().enumerate() {
                let e = v * 4 + cc as u32;
                for &i in streams(sh) {
                    let w = if i == 0 { "g" } else { "u" };
                    let _ = writeln!(s, "    part{i}_{r} = fma(a_{r}_{v}.{comp}, w{w}_{e}, part{i}_{r});");
                }
            }
        }
    }
    s
}

fn write_out(sh: &GemvShape) -> String {
    let mut s = String::new();
    for r in 0..sh.bm {
        let _ = writeln!(s, "    if r0 + {r}u < r1 {{\n        let at = (wid.x * p.prows + tile.w + {r}u) * N + n;");
        let _ = writeln!(s, "        out[at] = sum0_{r};");
        if sh.up {
            let _ = writeln!(s, "        out[at + p.chunks * p.prows * N] = sum1_{r};");
        }
        s.push_str("    }\n");
    }
    s
}
