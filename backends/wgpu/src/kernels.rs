//! Every WGSL kernel of the crate, embedded once, and the preludes that specialise them.
//!
//! A kernel's source in `wgsl/` leaves a few names to a prelude: the word type it moves
//! (`vec4<u32>` where rows are a multiple of 16 bytes, else `u32`) and, for arithmetic, the
//! dtype. [`Variant::source`] is the exact text compiled for one specialisation; the pipeline
//! cache is keyed by [`Variant`].

use moe_ep::DType;

/// Row gather: pack, scatter and gather back (`wgsl/gather_rows.wgsl`).
pub const GATHER_ROWS: &str = include_str!("../../../wgsl/gather_rows.wgsl");
/// Weighted zero-copy combine (`wgsl/combine.wgsl`).
pub const COMBINE: &str = include_str!("../../../wgsl/combine.wgsl");
/// Grouped expert GEMM, up (gate and up with SwiGLU) and down (`wgsl/ffn.wgsl`).
pub const FFN: &str = include_str!("../../../wgsl/ffn.wgsl");
/// Decode-shaped grouped expert GEMM, split over the reduction (`wgsl/ffn_gemv.wgsl`).
pub const FFN_GEMV: &str = include_str!("../../../wgsl/ffn_gemv.wgsl");
/// Grouped expert GEMM on cooperative matrices, f16 (`wgsl/ffn_coop.wgsl`).
pub const FFN_COOP: &str = include_str!("../../../wgsl/ffn_coop.wgsl");
/// Sum of a split FFN launch's partials, and its epilogue (`wgsl/ffn_reduce.wgsl`).
pub const FFN_REDUCE: &str = include_str!("../../../wgsl/ffn_reduce.wgsl");
/// silu(g) * u, shared by the FFN kernels (`wgsl/silu.wgsl`).
pub const SILU: &str = include_str!("../../../wgsl/silu.wgsl");
/// Elements of the reduction per chunk in the FFN kernels' summation order (`wgsl/ffn.wgsl`):
/// the unit the decode kernel splits the reduction by.
pub const CHUNK: u32 = 1024;
/// Elements per piece of a chunk in that order: what the decode kernel stages at a time.
pub const PIECE: u32 = 64;
/// Router logits `x · W^T` (and a gate's sigmoid) (`wgsl/router_logits.wgsl`).
pub const ROUTER_LOGITS: &str = include_str!("../../../wgsl/router_logits.wgsl");
/// Router scores, group-limited top-k and weights, one thread per token (`wgsl/router_topk.wgsl`).
pub const ROUTER_TOPK: &str = include_str!("../../../wgsl/router_topk.wgsl");
/// Rows scaled by their routing weight (`wgsl/scale_rows.wgsl`).
pub const SCALE_ROWS: &str = include_str!("../../../wgsl/scale_rows.wgsl");
/// f32 to f16/bf16, two values a word (`wgsl/narrow.wgsl`).
pub const NARROW: &str = include_str!("../../../wgsl/narrow.wgsl");
/// f32 <-> f16/bf16 conversions shared by the arithmetic kernels (`wgsl/convert.wgsl`).
pub const CONVERT: &str = include_str!("../../../wgsl/convert.wgsl");

/// Threads per workgroup of the data-movement kernels and the narrow (the `WG` constant in
/// the sources).
pub const WORKGROUP: u32 = 256;

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `dst[r] = cat(a, b)[idx[r]]`, bitwise.
    GatherRows,
    /// `y[t] = sum_j w[t,j] * cat(a, b)[idx[t,j]]` in f32, cast once.
    Combine,
    /// Expert up projection: `silu(A·Wg^T) * (A·Wu^T)` per row tile, f32 out.
    FfnUp,
    /// Expert down projection: `A·Wd^T` per row tile, f32 in and out.
    FfnDown,
    /// Sum of split partials in chunk order, then SwiGLU (`up`), or for the down projection a
    /// narrow to `dtype` when it is 16-bit.
    FfnReduce { up: bool },
    /// f32 to the 16-bit `dtype`, two values a word.
    Narrow,
    /// `logits[t, e] = x[t] · w[e]` in f32 (`dtype`: x's, `weights`: w's; `k` = 1 writes the
    /// sigmoid instead).
    RouterLogits,
    /// Scores, top-k and weights from the logits.
    RouterTopK,
    /// `out[t * k + j] = x[t] * w[t * k + j]` in `dtype`.
    ScaleRows,
}

/// Tile shape of the FFN kernels: a workgroup computes `bm x bn` outputs, `tm x tn` per
/// thread, staging `bkw` 32-bit words of each weight row (`bkw` elements of f32, twice as
/// many of 16-bit types) at a time (`wgsl/ffn.wgsl`). A `split` tile is the decode kernel
/// instead (`wgsl/ffn_gemv.wgsl`): `bm` rows, `bn` threads each streaming one weight row,
/// one [`CHUNK`] of the reduction per workgroup, partials summed by [`Kernel::FfnReduce`].
/// Every shape sums in the same order, so switching between them never changes a bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub tm: u32,
    pub tn: u32,
    pub bkw: u32,
    pub split: bool,
    /// The cooperative-matrix kernel (f16 only; 64 x 64 tiles, 128 threads).
    pub coop: bool,
}

impl Tile {
    /// Prefill: 64 x 64 outputs, 4 x 4 per thread, 256 threads.
    pub const SQUARE: Tile = Tile { bm: 64, bn: 64, tm: 4, tn: 4, bkw: 8, split: false, coop: false };
    /// Prefill on cooperative matrices (f16 activations and weights; not deterministic).
    pub const COOP: Tile = Tile { bm: 64, bn: 64, tm: 32, tn: 32, bkw: 16, split: false, coop: true };
    /// No tile (the data-movement kernels and the combine).
    pub const NONE: Tile = Tile { bm: 0, bn: 0, tm: 0, tn: 0, bkw: 0, split: false, coop: false };

    /// The decode kernel for tiles of `bm` rows: 32 threads, each streaming one weight row;
    /// `bkw` 1 loads the next piece while computing on the current one, 0 after (which frees
    /// registers, but measured slower on the H100 even at 8 rows: kept as a tested variant).
    pub const fn gemv(bm: u32) -> Tile {
        Tile { bm, bn: 32, tm: bm, tn: 1, bkw: 1, split: true, coop: false }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        if self.coop {
            128
        } else if self.split {
            self.bn
        } else {
            (self.bn / self.tn) * (self.bm / self.tm)
        }
    }

    /// Workgroup memory of the up kernel (the larger) with 16-bit weights (the larger), bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        if self.coop {
            // f32 results of 64 x 68.
            4 * 64 * 68
        } else if self.split {
            4 * self.bm * CHUNK
        } else {
            4 * (self.bm * 2 * self.bkw + 2 * self.bn * (self.bkw + 1))
        }
    }
}

/// The unit a kernel moves: 16 bytes where the row allows, else 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Word {
    /// `vec4<u32>`: rows are a multiple of 16 bytes.
    Vec4,
    /// `u32`: rows are a multiple of 4 bytes.
    Scalar,
}

impl Word {
    /// Bytes in one word.
    pub fn bytes(self) -> usize {
        match self {
            Word::Vec4 => 16,
            Word::Scalar => 4,
        }
    }

    /// The widest word that tiles a row of `row_bytes`, or `None` when the row is not a
    /// multiple of 4 bytes (an odd number of 16-bit elements).
    pub fn for_row(row_bytes: usize) -> Option<Word> {
        if row_bytes % 16 == 0 {
            Some(Word::Vec4)
        } else if row_bytes % 4 == 0 {
            Some(Word::Scalar)
        } else {
            None
        }
    }
}

/// One compiled specialisation of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    /// The kernel family.
    pub kernel: Kernel,
    /// The word it moves.
    pub word: Word,
    /// The element type, for arithmetic kernels; data movement ignores it (always `F32`).
    pub dtype: DType,
    /// Slots per token the combine is compiled for (0 for data movement).
    pub k: u32,
    /// f16 widening with `unpack2x16float` (needs the SHADER_F16_IN_F32 downlevel
    /// capability) instead of integer operations; only meaningful where f16 is read.
    pub unpack_f16: bool,
    /// Weight dtype of the FFN kernels (`F32` elsewhere).
    pub weights: DType,
    /// Tile shape of the FFN kernels ([`Tile::NONE`] elsewhere).
    pub tile: Tile,
}

/// Largest top-k the combine is compiled for.
pub const MAX_K: usize = 64;

impl Variant {
    /// The row gather moving `word`s.
    pub fn gather(word: Word) -> Self {
        Variant {
            kernel: Kernel::GatherRows,
            word,
            dtype: DType::F32,
            k: 0,
            unpack_f16: false,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// The combine of `dtype` rows moving `word`s, `k` (1..=[`MAX_K`]) slots per token;
    /// `unpack_f16` asks for the hardware f16 widening (ignored for other dtypes).
    pub fn combine(word: Word, dtype: DType, k: u32, unpack_f16: bool) -> Self {
        Variant {
            kernel: Kernel::Combine,
            word,
            dtype,
            k,
            unpack_f16: unpack_f16 && dtype == DType::F16,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// The FFN up kernel (`up`) reading `act` rows, or the down kernel (reading the f32
    /// intermediate; `act` is ignored), over `weights` in `tile`s.
    pub fn ffn(up: bool, act: DType, weights: DType, tile: Tile, unpack_f16: bool) -> Self {
        // The down kernel reads the f32 intermediate (f16 in the cooperative variant).
        let act = if up || tile.coop { act } else { DType::F32 };
        Variant {
            kernel: if up { Kernel::FfnUp } else { Kernel::FfnDown },
            word: Word::Scalar,
            dtype: act,
            k: 0,
            unpack_f16: unpack_f16 && (act == DType::F16 || weights == DType::F16),
            weights,
            tile,
        }
    }

    /// The sum of split FFN partials, with SwiGLU for the up projection; the down projection
    /// writes `out` (f32, or narrowed to a 16-bit type; `up` always writes f32).
    pub fn ffn_reduce(up: bool, out: DType) -> Self {
        Variant {
            kernel: Kernel::FfnReduce { up },
            word: Word::Scalar,
            dtype: if up { DType::F32 } else { out },
            k: 0,
            unpack_f16: false,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// Router logits of `x` (`act`) against a `w` (`weights`) matrix; `sigmoid` writes
    /// `sigmoid(logit)` (a shared expert's gate).
    pub fn router_logits(act: DType, weights: DType, sigmoid: bool, unpack_f16: bool) -> Self {
        Variant {
            kernel: Kernel::RouterLogits,
            word: Word::Scalar,
            dtype: act,
            k: u32::from(sigmoid),
            unpack_f16: unpack_f16 && (act == DType::F16 || weights == DType::F16),
            weights,
            tile: Tile::NONE,
        }
    }

    /// The router's top-k.
    pub fn router_topk() -> Self {
        Variant {
            kernel: Kernel::RouterTopK,
            word: Word::Scalar,
            dtype: DType::F32,
            k: 0,
            unpack_f16: false,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// Rows of `dtype` scaled by routing weights.
    pub fn scale_rows(dtype: DType) -> Self {
        Variant {
            kernel: Kernel::ScaleRows,
            word: Word::Scalar,
            dtype,
            k: 0,
            unpack_f16: false,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// The narrow to the 16-bit `dtype`.
    pub fn narrow(dtype: DType) -> Self {
        Variant {
            kernel: Kernel::Narrow,
            word: Word::Scalar,
            dtype,
            k: 0,
            unpack_f16: false,
            weights: DType::F32,
            tile: Tile::NONE,
        }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        match self.kernel {
            Kernel::FfnUp | Kernel::FfnDown => self.tile.threads(),
            Kernel::RouterTopK => 64,
            _ => WORKGROUP,
        }
    }

    /// The naga capabilities the variant needs beyond core WGSL, `|`-separated.
    pub fn capabilities(&self) -> &'static str {
        if self.tile.coop {
            "COOPERATIVE_MATRIX|SHADER_FLOAT16|SHADER_FLOAT16_IN_FLOAT32"
        } else if self.unpack_f16 {
            "SHADER_FLOAT16_IN_FLOAT32"
        } else {
            ""
        }
    }

    /// Every variant the crate can compile (what the naga test validates).
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for word in [Word::Vec4, Word::Scalar] {
            v.push(Variant::gather(word));
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for k in [1, 2, 8, MAX_K as u32] {
                    v.push(Variant::combine(word, dtype, k, false));
                    if dtype == DType::F16 {
                        v.push(Variant::combine(word, dtype, k, true));
                    }
                }
            }
        }
        let no_prefetch = Tile { bkw: 1 - Tile::gemv(8).bkw, ..Tile::gemv(8) };
        for tile in [Tile::gemv(1), Tile::gemv(2), Tile::gemv(4), Tile::gemv(8), no_prefetch, Tile::SQUARE] {
            for weights in [DType::F32, DType::F16, DType::BF16] {
                for unpack in [false, true] {
                    for act in [DType::F32, DType::F16, DType::BF16] {
                        v.push(Variant::ffn(true, act, weights, tile, unpack));
                    }
                    v.push(Variant::ffn(false, DType::F32, weights, tile, unpack));
                }
            }
        }
        v.push(Variant::ffn(true, DType::F16, DType::F16, Tile::COOP, false));
        v.push(Variant::ffn(false, DType::F16, DType::F16, Tile::COOP, false));
        v.push(Variant::ffn_reduce(true, DType::F32));
        for out in [DType::F32, DType::F16, DType::BF16] {
            v.push(Variant::ffn_reduce(false, out));
        }
        v.push(Variant::narrow(DType::F16));
        v.push(Variant::narrow(DType::BF16));
        for act in [DType::F32, DType::F16, DType::BF16] {
            for weights in [DType::F32, DType::F16, DType::BF16] {
                for sigmoid in [false, true] {
                    for unpack in [false, true] {
                        v.push(Variant::router_logits(act, weights, sigmoid, unpack));
                    }
                }
            }
        }
        v.push(Variant::router_topk());
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            v.push(Variant::scale_rows(dtype));
        }
        v.sort_by_key(|v| v.label());
        v.dedup();
        v
    }

    /// A label for pipelines and logs, e.g. `combine.vec4.bf16`.
    pub fn label(&self) -> String {
        let word = match self.word {
            Word::Vec4 => "vec4",
            Word::Scalar => "u32",
        };
        match self.kernel {
            Kernel::GatherRows => format!("gather_rows.{word}"),
            Kernel::Combine => {
                format!("combine.{word}.{}.k{}{}", self.dtype, self.k, if self.unpack_f16 { ".unpack" } else { "" })
            }
            Kernel::FfnUp | Kernel::FfnDown => {
                let t = self.tile;
                format!(
                    "ffn_{}.{}.w{}.{}x{}x{}.{}x{}{}{}",
                    if self.kernel == Kernel::FfnUp { "up" } else { "down" },
                    self.dtype,
                    self.weights,
                    t.bm,
                    t.bn,
                    t.bkw,
                    t.tm,
                    t.tn,
                    if t.split {
                        ".split"
                    } else if t.coop {
                        ".coop"
                    } else {
                        ""
                    },
                    if self.unpack_f16 { ".unpack" } else { "" }
                )
            }
            Kernel::FfnReduce { up } => format!("ffn_reduce.{}.{}", if up { "up" } else { "down" }, self.dtype),
            Kernel::Narrow => format!("narrow.{}", self.dtype),
            Kernel::RouterLogits => format!(
                "router_logits.{}.w{}{}{}",
                self.dtype,
                self.weights,
                if self.k == 1 { ".sigmoid" } else { "" },
                if self.unpack_f16 { ".unpack" } else { "" }
            ),
            Kernel::RouterTopK => "router_topk".into(),
            Kernel::ScaleRows => format!("scale_rows.{}", self.dtype),
        }
    }

    /// The full WGSL text: prelude, then the kernel's file. Entry point `main`.
    pub fn source(&self) -> String {
        let prelude = match self.word {
            Word::Vec4 => {
                "alias Word = vec4<u32>;\n\
                 const LANES: u32 = 4u;\n\
                 fn word_zero() -> Word { return vec4<u32>(0u); }\n\
                 fn word_lane(w: Word, l: u32) -> u32 { return w[l]; }\n\
                 fn make_word(a: array<u32, 4>) -> Word { return vec4<u32>(a[0], a[1], a[2], a[3]); }\n"
            }
            Word::Scalar => {
                "alias Word = u32;\n\
                 const LANES: u32 = 1u;\n\
                 fn word_zero() -> Word { return 0u; }\n\
                 fn word_lane(w: Word, l: u32) -> u32 { return w; }\n\
                 fn make_word(a: array<u32, 1>) -> Word { return a[0]; }\n"
            }
        };
        let code = |d: DType| match d {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        let widen = if self.unpack_f16 {
            "fn widen_f16(word: u32, h: u32) -> f32 { return unpack2x16float(word)[h]; }"
        } else {
            "fn widen_f16(word: u32, h: u32) -> f32 { return f16_to_f32((word >> (16u * h)) & 0xffffu); }"
        };
        match self.kernel {
            Kernel::GatherRows => format!("{prelude}\n{GATHER_ROWS}"),
            Kernel::Combine => {
                let dt = code(self.dtype);
                format!("{prelude}const DT: u32 = {dt}u;\nconst K: u32 = {}u;\n{widen}\n\n{CONVERT}\n{COMBINE}", self.k)
            }
            Kernel::FfnUp | Kernel::FfnDown if self.tile.coop => format!(
                "enable f16;\nenable wgpu_cooperative_matrix;\nconst UP: bool = {};\n\n{SILU}\n{FFN_COOP}",
                self.kernel == Kernel::FfnUp
            ),
            Kernel::FfnUp | Kernel::FfnDown if self.tile.split => format!(
                "const UP: bool = {};\nconst AT: u32 = {}u;\nconst WT: u32 = {}u;\nconst BM: u32 = {}u;\n\
                 const BN: u32 = {}u;\nconst PIECE: u32 = {PIECE}u;\nconst CHUNK: u32 = {CHUNK}u;\n\
                 const PREFETCH: bool = {};\n{widen}\n\n{CONVERT}\n{FFN_GEMV}",
                self.kernel == Kernel::FfnUp,
                code(self.dtype),
                code(self.weights),
                self.tile.bm,
                self.tile.bn,
                self.tile.bkw != 0,
            ),
            Kernel::FfnUp | Kernel::FfnDown => {
                let t = self.tile;
                format!(
                    "const UP: bool = {};\nconst AT: u32 = {}u;\nconst WT: u32 = {}u;\n\
                     const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst TM: u32 = {}u;\nconst TN: u32 = {}u;\n\
                     const BKW: u32 = {}u;\nconst PIECE: u32 = {PIECE}u;\nconst CHUNK: u32 = {CHUNK}u;\n{widen}\n\n{CONVERT}\n{SILU}\n{FFN}",
                    self.kernel == Kernel::FfnUp,
                    code(self.dtype),
                    code(self.weights),
                    t.bm,
                    t.bn,
                    t.tm,
                    t.tn,
                    t.bkw
                )
            }
            Kernel::FfnReduce { up } => format!(
                "const UP: bool = {up};\nconst DT: u32 = {}u;\n\n{CONVERT}\n{SILU}\n{FFN_REDUCE}",
                code(self.dtype)
            ),
            Kernel::Narrow => format!("const DT: u32 = {}u;\n\n{CONVERT}\n{NARROW}", code(self.dtype)),
            Kernel::RouterLogits => format!(
                "const XT: u32 = {}u;\nconst WT: u32 = {}u;\nconst SIGMOID: bool = {};\n{widen}\n\n{CONVERT}\n{ROUTER_LOGITS}",
                code(self.dtype),
                code(self.weights),
                self.k == 1
            ),
            Kernel::RouterTopK => ROUTER_TOPK.to_string(),
            Kernel::ScaleRows => format!("const DT: u32 = {}u;\n\n{CONVERT}\n{SCALE_ROWS}", code(self.dtype)),
        }
    }
}
