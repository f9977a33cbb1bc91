//! Every WGSL kernel of the crate, embedded once, and the preludes that specialise them.
//!
//! A kernel's source in `wgsl/` leaves a few names to a prelude: the word type it moves
//! (`vec4<u32>` where rows are a multiple of 16 bytes, else `u32`) and, for arithmetic, the
//! dtype. [`Variant::source`] is the exact text compiled for one specialisation; the pipeline
//! cache is keyed by [`Variant`].

use moe_ep::DType;

use crate::ffn::gemv_source::GemvShape;

/// Row gather: pack, scatter and gather back (`wgsl/gather_rows.wgsl`).
pub const GATHER_ROWS: &str = include_str!("../../../wgsl/gather_rows.wgsl");
/// Weighted zero-copy combine (`wgsl/combine.wgsl`).
pub const COMBINE: &str = include_str!("../../../wgsl/combine.wgsl");
/// Grouped expert GEMM, up (gate and up with SwiGLU) and down (`wgsl/ffn.wgsl`).
pub const FFN: &str = include_str!("../../../wgsl/ffn.wgsl");
/// Decode-shaped grouped expert GEMM, split over the reduction (`wgsl/ffn_gemv.wgsl`).
pub const FFN_GEMV: &str = include_str!("../../../wgsl/ffn_gemv.wgsl");
/// Grouped expert GEMM on cooperative matrices, staged and prefetched (`wgsl/ffn_mma.wgsl`).
pub const FFN_MMA: &str = include_str!("../../../wgsl/ffn_mma.wgsl");
/// Row maxima of a bf16 batch, for the cooperative kernel's row scales (`wgsl/ffn_rowmax.wgsl`).
pub const FFN_ROWMAX: &str = include_str!("../../../wgsl/ffn_rowmax.wgsl");
/// Sum of a split FFN launch's partials, and its epilogue (`wgsl/ffn_reduce.wgsl`).
pub const FFN_REDUCE: &str = include_str!("../../../wgsl/ffn_reduce.wgsl");
/// The experts' activation, shared by the FFN kernels (`wgsl/ffn_act.wgsl`).
pub const FFN_ACT: &str = include_str!("../../../wgsl/ffn_act.wgsl");
/// The FFN kernels' epilogue: row scales, biases, activation (`wgsl/ffn_epi.wgsl`).
pub const FFN_EPI: &str = include_str!("../../../wgsl/ffn_epi.wgsl");
/// Packed weights dequantized where used (`wgsl/ffn_quant.wgsl`).
pub const FFN_QUANT: &str = include_str!("../../../wgsl/ffn_quant.wgsl");
/// Grouped expert GEMM on packed weights (`wgsl/ffn_q.wgsl`).
pub const FFN_Q: &str = include_str!("../../../wgsl/ffn_q.wgsl");
/// Decode-shaped grouped expert GEMM on packed weights (`wgsl/ffn_qgemv.wgsl`).
pub const FFN_QGEMV: &str = include_str!("../../../wgsl/ffn_qgemv.wgsl");
/// The FFN kernels' launch parameters (`struct Params`), in each one's prelude.
pub const FFN_PARAMS: &str = include_str!("../../../wgsl/ffn_params.wgsl");
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
    /// Expert up projection: `act(A·Wg^T, A·Wu^T)` per row tile, f32 out (portable).
    FfnUp,
    /// Expert down projection: `A·Wd^T` per row tile, f32 in and out (portable).
    FfnDown,
    /// Sum of split partials in chunk order, then the epilogue (act for `up`), f32 out.
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
    /// The cooperative-matrix grouped GEMM (`wgsl/ffn_mma.wgsl`), up or down.
    FfnMma { up: bool },
    /// Row maxima of a bf16 batch (`wgsl/ffn_rowmax.wgsl`).
    FfnRowMax,
}

/// What the FFN kernels apply to their f32 sums (`wgsl/ffn_epi.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Epilogue {
    /// The activation: 0 SwiGLU, 1 gpt-oss's clamped SwiGLU (its alpha and limit are launch
    /// parameters).
    pub act: u32,
    /// Biases on the projections.
    pub bias: bool,
    /// Per-row power-of-two weight scales (bf16 weights stored as f16).
    pub wscale: bool,
}

impl Epilogue {
    /// Plain SwiGLU, unscaled weights, no biases.
    pub const PLAIN: Epilogue = Epilogue { act: 0, bias: false, wscale: false };

    fn prelude(&self) -> String {
        format!(
            "const ACT: u32 = {}u;\nconst BIAS: bool = {};\nconst WS: bool = {};\n",
            self.act, self.bias, self.wscale
        )
    }
}

/// A packed weight format as the FFN kernels read it (`wgsl/ffn_quant.wgsl`); [`Packed::NONE`]
/// for dense weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packed {
    /// 0 dense, 1 MLX affine, 2 MXFP4, 3 FP8 E4M3.
    pub kind: u32,
    pub bits: u32,
    /// Inputs per scale along a row (FP8: the block's columns).
    pub group: u32,
    /// Affine scales' dtype code (0 f32, 1 f16, 2 bf16).
    pub scales: u32,
    /// FP8: rows per scale block.
    pub block_rows: u32,
}

impl Packed {
    pub const NONE: Packed = Packed { kind: 0, bits: 0, group: 0, scales: 0, block_rows: 0 };

    /// The kernels' view of `f`.
    pub fn of(f: moe_ep::QuantFormat) -> Packed {
        use moe_ep::QuantFormat as Q;
        match f {
            Q::Affine { bits, group, scales } => {
                Packed { kind: 1, bits, group, scales: dtype_code(scales), block_rows: 0 }
            }
            Q::Mxfp4 => Packed { kind: 2, bits: 4, group: 32, scales: 0, block_rows: 0 },
            Q::Fp8 { block_rows, block_cols } => Packed { kind: 3, bits: 8, group: block_cols, scales: 0, block_rows },
        }
    }

    /// Values per 32-bit word.
    pub fn per_word(&self) -> u32 {
        32 / self.bits
    }

    fn prelude(&self) -> String {
        format!(
            "const QK: u32 = {}u;\nconst BITS: u32 = {}u;\nconst GROUP: u32 = {}u;\nconst ST: u32 = {}u;\nconst FBN: u32 = {}u;\n",
            self.kind,
            self.bits,
            self.group,
            self.scales,
            self.block_rows.max(1)
        )
    }

    fn label(&self) -> String {
        match self.kind {
            0 => String::new(),
            1 => format!(".q{}g{}s{}", self.bits, self.group, self.scales),
            2 => ".mxfp4".into(),
            _ => format!(".fp8b{}x{}", self.block_rows, self.group),
        }
    }
}

/// A tile of the cooperative-matrix kernel (`wgsl/ffn_mma.wgsl`): `bm x bn` outputs a
/// workgroup (twice `bn` weight rows for the up projection), `bk` of the reduction a step,
/// `wm x wn` subgroups of `sg` threads, fragments of `s x s`, `nbuf` staging buffers, staged
/// elements of `sv` halves (1 or 4). `probe` is a timing probe for tuning ([`MmaProbe`]): 0
/// for the kernel itself; the FFN refuses other values except for a projection run alone
/// (`Run::Up`, `Run::Down`), whose output is not the FFN's anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmaTile {
    pub s: u32,
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub wm: u32,
    pub wn: u32,
    pub sg: u32,
    pub nbuf: u32,
    pub sv: u32,
    pub probe: MmaProbe,
}

/// What a cooperative-kernel variant leaves out, to time its parts (`ffn-bench --sweep-up`
/// labels ending in `p1` or `p2`): each step's products (loads, conversions, staging and
/// barriers remain), or each step's loads from memory (the staging registers keep their
/// zeros; staging, fragment loads, products and barriers remain).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MmaProbe {
    #[default]
    Whole,
    NoProducts,
    NoLoads,
}

impl MmaTile {
    /// No tile (every other kernel).
    pub const NONE: MmaTile =
        MmaTile { s: 0, bm: 0, bn: 0, bk: 0, wm: 0, wn: 0, sg: 0, nbuf: 0, sv: 0, probe: MmaProbe::Whole };

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        self.wm * self.wn * self.sg
    }

    /// Whether the shape is one the kernel can be compiled for: whole fragments per
    /// subgroup, `bk` a multiple of 8 and of `s`, fragments a whole number of elements per lane.
    pub fn is_valid(&self) -> bool {
        let (s, sg) = (self.s, self.sg);
        s > 0
            && sg > 0
            && self.wm > 0
            && self.wn > 0
            && self.bm.is_multiple_of(self.wm * s)
            && self.bn.is_multiple_of(self.wn * s)
            && self.bk.is_multiple_of(8)
            && self.bk.is_multiple_of(s)
            && (s * s) % (2 * sg) == 0
            && (self.nbuf == 1 || self.nbuf == 2)
            && (self.sv == 1 || self.sv == 4)
    }

    /// Workgroup memory of the up (`up`: twice `bn` weight rows staged) or down kernel, bytes.
    pub fn workgroup_bytes(&self, up: bool) -> u32 {
        let ast = self.bk + 8;
        let staged = 2 * self.nbuf * (self.bm + (1 + u32::from(up)) * self.bn) * ast;
        staged + 4 * self.wm * self.wn * self.s * self.s + 12 * self.bm
    }

    /// `BMxBNxBKwWMxWNbNBUFvSVsS` (and `p1`, `p2` for probes) for labels and tool output.
    pub fn label(&self) -> String {
        let probe = match self.probe {
            MmaProbe::Whole => "",
            MmaProbe::NoProducts => "p1",
            MmaProbe::NoLoads => "p2",
        };
        format!(
            "{}x{}x{}w{}x{}b{}v{}s{}{probe}",
            self.bm, self.bn, self.bk, self.wm, self.wn, self.nbuf, self.sv, self.s
        )
    }

    /// Parse [`MmaTile::label`]'s format back (`sg` from the argument).
    pub fn parse(spec: &str, sg: u32) -> Option<MmaTile> {
        let (spec, probe) = match spec.split_once('p') {
            None => (spec, MmaProbe::Whole),
            Some((t, "1")) => (t, MmaProbe::NoProducts),
            Some((t, "2")) => (t, MmaProbe::NoLoads),
            Some(_) => return None,
        };
        let nums: Vec<u32> = spec.split(['x', 'w', 'b', 'v', 's']).map(|t| t.parse().ok()).collect::<Option<_>>()?;
        let [bm, bn, bk, wm, wn, nbuf, sv, s] = nums[..] else { return None };
        let t = MmaTile { s, bm, bn, bk, wm, wn, sg, nbuf, sv, probe };
        t.is_valid().then_some(t)
    }
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
}

impl Tile {
    /// Prefill: 64 x 64 outputs, 4 x 4 per thread, 256 threads.
    pub const SQUARE: Tile = Tile { bm: 64, bn: 64, tm: 4, tn: 4, bkw: 8, split: false };
    /// No tile (the data-movement kernels and the combine).
    pub const NONE: Tile = Tile { bm: 0, bn: 0, tm: 0, tn: 0, bkw: 0, split: false };

    /// The decode kernel for tiles of `bm` rows: 32 threads, each streaming one weight row;
    /// `bkw` 1 loads the next piece while computing on the current one, 0 after (which frees
    /// registers, but measured slower on the H100 even at 8 rows: kept as a tested variant).
    pub const fn gemv(bm: u32) -> Tile {
        Tile { bm, bn: 32, tm: bm, tn: 1, bkw: 1, split: true }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        if self.split { self.bn } else { (self.bn / self.tn) * (self.bm / self.tm) }
    }

    /// Workgroup memory of the up kernel (the larger) with 16-bit weights (the larger), bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        // Decode tiles: A's staged values (at most 256 a row: packed 4-bit stages) and the
        // weights' two staged streams (BN rows of 9 16-byte words).
        if self.split {
            4 * self.bm * 256 + 2 * self.bn * 9 * 16
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
        if row_bytes.is_multiple_of(16) {
            Some(Word::Vec4)
        } else if row_bytes.is_multiple_of(4) {
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
    /// For the FFN kernels, that of A (the cooperative down kernel: the f32 intermediate).
    pub dtype: DType,
    /// Slots per token the combine is compiled for (0 for data movement).
    pub k: u32,
    /// f16 widening with `unpack2x16float` (needs the SHADER_F16_IN_F32 downlevel
    /// capability) instead of integer operations; only meaningful where f16 is read.
    pub unpack_f16: bool,
    /// Weight dtype of the FFN kernels (`F32` elsewhere).
    pub weights: DType,
    /// Tile shape of the portable FFN kernels ([`Tile::NONE`] elsewhere).
    pub tile: Tile,
    /// Tile of the cooperative-matrix kernel ([`MmaTile::NONE`] elsewhere).
    pub mma: MmaTile,
    /// The FFN kernels' epilogue ([`Epilogue::PLAIN`] elsewhere).
    pub epi: Epilogue,
    /// Output dtype of the cooperative down kernel (`F32` elsewhere).
    pub out: DType,
    /// Packed weights of the portable FFN kernels ([`Packed::NONE`] elsewhere).
    pub quant: Packed,
}

/// Largest top-k the combine is compiled for.
pub const MAX_K: usize = 64;

const BASE: Variant = Variant {
    kernel: Kernel::GatherRows,
    word: Word::Scalar,
    dtype: DType::F32,
    k: 0,
    unpack_f16: false,
    weights: DType::F32,
    tile: Tile::NONE,
    mma: MmaTile::NONE,
    epi: Epilogue::PLAIN,
    out: DType::F32,
    quant: Packed::NONE,
};

fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl Variant {
    /// The row gather moving `word`s.
    pub fn gather(word: Word) -> Self {
        Variant { kernel: Kernel::GatherRows, word, ..BASE }
    }

    /// The combine of `dtype` rows moving `word`s, `k` (1..=[`MAX_K`]) slots per token;
    /// `unpack_f16` asks for the hardware f16 widening (ignored for other dtypes).
    pub fn combine(word: Word, dtype: DType, k: u32, unpack_f16: bool) -> Self {
        Variant { kernel: Kernel::Combine, word, dtype, k, unpack_f16: unpack_f16 && dtype == DType::F16, ..BASE }
    }

    /// The portable FFN up kernel (`up`) reading `act` rows, or the down kernel (reading the
    /// f32 intermediate; `act` is ignored), over `weights` in `tile`s, with `epi`.
    pub fn ffn(up: bool, act: DType, weights: DType, tile: Tile, unpack_f16: bool, epi: Epilogue) -> Self {
        let act = if up { act } else { DType::F32 };
        Variant {
            kernel: if up { Kernel::FfnUp } else { Kernel::FfnDown },
            dtype: act,
            unpack_f16: unpack_f16 && (act == DType::F16 || weights == DType::F16),
            weights,
            tile,
            epi,
            ..BASE
        }
    }

    /// The portable FFN kernel (up or down, as [`Variant::ffn`]) over packed weights `quant`.
    pub fn ffn_packed(up: bool, act: DType, quant: Packed, tile: Tile, unpack_f16: bool, epi: Epilogue) -> Self {
        let f16_scales = quant.kind == 1 && quant.scales == 1;
        Variant { quant, ..Variant::ffn(up, act, DType::F32, tile, unpack_f16, epi) }
            .with_unpack(unpack_f16 && (act == DType::F16 && up || f16_scales))
    }

    fn with_unpack(mut self, on: bool) -> Self {
        self.unpack_f16 = on;
        self
    }

    /// The sum of split FFN partials with the epilogue (the activation for `up`), f32 out, or
    /// for the down projection `out` (16-bit: narrowed pairs).
    pub fn ffn_reduce(up: bool, epi: Epilogue, out: DType) -> Self {
        Variant { kernel: Kernel::FfnReduce { up }, epi, out: if up { DType::F32 } else { out }, ..BASE }
    }

    /// The cooperative-matrix kernel: up (A the batch in `act`, f16 or bf16) or down (A the
    /// f32 intermediate, output in `act`), f16 weights or packed ones (`quant`, dequantized to
    /// f16 as they are staged), `tile`, `epi`.
    pub fn ffn_mma(up: bool, act: DType, tile: MmaTile, epi: Epilogue, quant: Packed) -> Self {
        Variant {
            kernel: Kernel::FfnMma { up },
            dtype: if up { act } else { DType::F32 },
            weights: DType::F16,
            mma: tile,
            epi,
            out: if up { DType::F32 } else { act },
            quant,
            ..BASE
        }
    }

    /// Router logits of `x` (`act`) against a `w` (`weights`) matrix; `sigmoid` writes
    /// `sigmoid(logit)` (a shared expert's gate).
    pub fn router_logits(act: DType, weights: DType, sigmoid: bool, unpack_f16: bool) -> Self {
        Variant {
            kernel: Kernel::RouterLogits,
            dtype: act,
            k: u32::from(sigmoid),
            unpack_f16: unpack_f16 && (act == DType::F16 || weights == DType::F16),
            weights,
            ..BASE
        }
    }

    /// The router's top-k.
    pub fn router_topk() -> Self {
        Variant { kernel: Kernel::RouterTopK, ..BASE }
    }

    /// Rows of `dtype` scaled by routing weights.
    pub fn scale_rows(dtype: DType) -> Self {
        Variant { kernel: Kernel::ScaleRows, dtype, ..BASE }
    }

    /// Row maxima of a bf16 batch.
    pub fn ffn_rowmax() -> Self {
        Variant { kernel: Kernel::FfnRowMax, ..BASE }
    }

    /// The narrow to the 16-bit `dtype`.
    pub fn narrow(dtype: DType) -> Self {
        Variant { kernel: Kernel::Narrow, dtype, ..BASE }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        match self.kernel {
            Kernel::FfnUp | Kernel::FfnDown => self.tile.threads(),
            Kernel::RouterTopK => 64,
            Kernel::RouterLogits => 128,
            Kernel::FfnMma { .. } => self.mma.threads(),
            _ => WORKGROUP,
        }
    }

    /// The naga capabilities the variant needs beyond core WGSL, `|`-separated.
    pub fn capabilities(&self) -> &'static str {
        if matches!(self.kernel, Kernel::FfnMma { .. }) {
            "COOPERATIVE_MATRIX|SHADER_FLOAT16|SHADER_FLOAT16_IN_FLOAT32"
        } else if self.unpack_f16 {
            "SHADER_FLOAT16_IN_FLOAT32"
        } else {
            ""
        }
    }

    /// Every variant the crate can compile, or a representative of each family's options
    /// (what the naga test validates): every portable FFN shape with every dtype pair, every
    /// epilogue option on one pair, the cooperative kernel at both fragment sizes.
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
        let full = Epilogue { act: 1, bias: true, wscale: true };
        let no_prefetch = Tile { bkw: 1 - Tile::gemv(8).bkw, ..Tile::gemv(8) };
        for tile in [Tile::gemv(1), Tile::gemv(2), Tile::gemv(4), Tile::gemv(8), no_prefetch, Tile::SQUARE] {
            for weights in [DType::F32, DType::F16, DType::BF16] {
                for unpack in [false, true] {
                    for act in [DType::F32, DType::F16, DType::BF16] {
                        v.push(Variant::ffn(true, act, weights, tile, unpack, Epilogue::PLAIN));
                    }
                    v.push(Variant::ffn(false, DType::F32, weights, tile, unpack, Epilogue::PLAIN));
                }
            }
            for up in [true, false] {
                v.push(Variant::ffn(up, DType::BF16, DType::F16, tile, false, full));
            }
        }
        let biased = Epilogue { act: 1, bias: true, wscale: false };
        for q in [
            Packed { kind: 1, bits: 4, group: 64, scales: 2, block_rows: 0 },
            Packed { kind: 1, bits: 8, group: 32, scales: 1, block_rows: 0 },
            Packed { kind: 1, bits: 4, group: 128, scales: 0, block_rows: 0 },
            Packed { kind: 2, bits: 4, group: 32, scales: 0, block_rows: 0 },
            Packed { kind: 3, bits: 8, group: 128, scales: 0, block_rows: 128 },
        ] {
            for tile in [Tile::gemv(1), Tile::gemv(8), Tile::SQUARE] {
                for unpack in [false, true] {
                    for act in [DType::F32, DType::BF16, DType::F16] {
                        v.push(Variant::ffn_packed(true, act, q, tile, unpack, Epilogue::PLAIN));
                    }
                    v.push(Variant::ffn_packed(false, DType::F32, q, tile, unpack, biased));
                }
            }
        }
        for up in [true, false] {
            for epi in [Epilogue::PLAIN, full, Epilogue { act: 0, bias: true, wscale: false }] {
                for out in [DType::F32, DType::F16, DType::BF16] {
                    v.push(Variant::ffn_reduce(up, epi, out));
                }
            }
        }
        for tile in crate::ffn::mma_tiles_for_validation() {
            for epi in [Epilogue::PLAIN, full] {
                for act in [DType::F16, DType::BF16] {
                    v.push(Variant::ffn_mma(true, act, tile, epi, Packed::NONE));
                    v.push(Variant::ffn_mma(false, act, tile, epi, Packed::NONE));
                }
            }
        }
        // Packed weights on the matrix units: every format on each tile of the 16x16 shape, and
        // one format on the 8x8 ones.
        let packed = |q| Packed::of(q);
        for tile in crate::ffn::mma_tiles_for_validation() {
            let formats: Vec<Packed> = if tile.s == 16 {
                vec![
                    packed(moe_ep::QuantFormat::affine(4, 64, DType::BF16).expect("a format")),
                    packed(moe_ep::QuantFormat::affine(8, 32, DType::F32).expect("a format")),
                    packed(moe_ep::QuantFormat::affine(4, 128, DType::F16).expect("a format")),
                    packed(moe_ep::QuantFormat::Mxfp4),
                    packed(moe_ep::QuantFormat::fp8((128, 128)).expect("a format")),
                ]
            } else {
                vec![packed(moe_ep::QuantFormat::affine(4, 64, DType::BF16).expect("a format"))]
            };
            for q in formats {
                v.push(Variant::ffn_mma(true, DType::BF16, tile, full, q));
                v.push(Variant::ffn_mma(false, DType::BF16, tile, Epilogue::PLAIN, q));
            }
        }
        v.push(Variant::ffn_rowmax());
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
        let e = self.epi;
        let epi = format!(
            "{}{}{}",
            if e.act == 1 { ".clamped" } else { "" },
            if e.bias { ".bias" } else { "" },
            if e.wscale { ".scaled" } else { "" }
        );
        match self.kernel {
            Kernel::GatherRows => format!("gather_rows.{word}"),
            Kernel::Combine => {
                format!("combine.{word}.{}.k{}{}", self.dtype, self.k, if self.unpack_f16 { ".unpack" } else { "" })
            }
            Kernel::FfnUp | Kernel::FfnDown => {
                let t = self.tile;
                format!(
                    "ffn_{}.{}.w{}{}.{}x{}x{}.{}x{}{}{}{epi}",
                    if self.kernel == Kernel::FfnUp { "up" } else { "down" },
                    self.dtype,
                    self.weights,
                    self.quant.label(),
                    t.bm,
                    t.bn,
                    t.bkw,
                    t.tm,
                    t.tn,
                    if t.split { ".split" } else { "" },
                    if self.unpack_f16 { ".unpack" } else { "" }
                )
            }
            Kernel::FfnReduce { up } => format!("ffn_reduce.{}.{}{epi}", if up { "up" } else { "down" }, self.out),
            Kernel::FfnMma { up } => format!(
                "ffn_mma_{}.{}.{}.{}{epi}{}",
                if up { "up" } else { "down" },
                self.dtype,
                self.out,
                self.mma.label(),
                self.quant.label()
            ),
            Kernel::FfnRowMax => "ffn_rowmax".into(),
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
        let code = dtype_code;
        let widen = if self.unpack_f16 {
            "fn widen_f16(word: u32, h: u32) -> f32 { let v = unpack2x16float(word); return select(v.x, v.y, h == 1u); }"
        } else {
            "fn widen_f16(word: u32, h: u32) -> f32 { return f16_to_f32((word >> (16u * h)) & 0xffffu); }"
        };
        let epi = self.epi.prelude();
        match self.kernel {
            Kernel::GatherRows => format!("{prelude}\n{GATHER_ROWS}"),
            Kernel::Combine => {
                let dt = code(self.dtype);
                format!("{prelude}const DT: u32 = {dt}u;\nconst K: u32 = {}u;\n{widen}\n\n{CONVERT}\n{COMBINE}", self.k)
            }
            Kernel::FfnMma { up } => self.mma_source(up, widen),
            Kernel::FfnUp | Kernel::FfnDown if self.quant.kind != 0 => self.packed_source(widen),
            Kernel::FfnUp | Kernel::FfnDown if self.tile.split => {
                let up = self.kernel == Kernel::FfnUp;
                let per_word = if self.weights == DType::F32 { 1 } else { 2 };
                let text = format!(
                    "const UP: bool = {up};\nconst AT: u32 = {}u;\nconst WT: u32 = {}u;\nconst BM: u32 = {}u;\n\
                     const BN: u32 = {}u;\nconst PIECE: u32 = {PIECE}u;\nconst CHUNK: u32 = {CHUNK}u;\n\
                     const PREFETCH: bool = {};\n{widen}\n\n{CONVERT}\n{FFN_PARAMS}\n{FFN_GEMV}",
                    code(self.dtype),
                    code(self.weights),
                    self.tile.bm,
                    self.tile.bn,
                    self.tile.bkw != 0,
                );
                let vpr = PIECE / (4 * per_word);
                let shape = GemvShape { up, bm: self.tile.bm, per_word, vpr, packed: false };
                crate::ffn::gemv_source::expand(&text, shape)
            }
            Kernel::FfnUp | Kernel::FfnDown => {
                let t = self.tile;
                format!(
                    "const UP: bool = {};\nconst AT: u32 = {}u;\nconst WT: u32 = {}u;\n\
                     const BM: u32 = {}u;\nconst BN: u32 = {}u;\nconst TM: u32 = {}u;\nconst TN: u32 = {}u;\n\
                     const BKW: u32 = {}u;\nconst PIECE: u32 = {PIECE}u;\nconst CHUNK: u32 = {CHUNK}u;\n{epi}{widen}\n\n\
                     {CONVERT}\n{FFN_ACT}\n{FFN_EPI}\n{FFN_PARAMS}\n{FFN}",
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
                "const UP: bool = {up};\nconst OT: u32 = {}u;\n{epi}\n{CONVERT}\n{FFN_ACT}\n{FFN_EPI}\n{FFN_PARAMS}\n{FFN_REDUCE}",
                code(self.out)
            ),
            Kernel::FfnRowMax => FFN_ROWMAX.to_string(),
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

    /// The packed FFN kernels' text (`wgsl/ffn_qgemv.wgsl` for split tiles, else `wgsl/ffn_q.wgsl`).
    fn packed_source(&self, widen: &str) -> String {
        let (t, q, up) = (self.tile, self.quant.prelude(), self.kernel == Kernel::FfnUp);
        let at = dtype_code(self.dtype);
        if t.split {
            let text = format!(
                "const UP: bool = {up};\nconst AT: u32 = {at}u;\nconst BM: u32 = {}u;\nconst BN: u32 = {}u;\n\
                 const PIECE: u32 = {PIECE}u;\nconst CHUNK: u32 = {CHUNK}u;\nconst PREFETCH: bool = {};\n{q}{widen}\n\n\
                 {CONVERT}\n{FFN_QUANT}\n{FFN_PARAMS}\n{FFN_QGEMV}",
                t.bm,
                t.bn,
                t.bkw != 0,
            );
            // ffn_qgemv.wgsl stages 1024 bits of each row: 8 words of 16 bytes in every format.
            let per_word = self.quant.per_word();
            let vpr = (1024 / self.quant.bits) / (4 * per_word);
            let shape = GemvShape { up, bm: t.bm, per_word, vpr, packed: true };
            return crate::ffn::gemv_source::expand(&text, shape);
        }
        format!(
            "const UP: bool = {up};\nconst AT: u32 = {at}u;\nconst BM: u32 = {}u;\nconst BN: u32 = {}u;\n\
             const TM: u32 = {}u;\nconst TN: u32 = {}u;\nconst BKW: u32 = {}u;\nconst PIECE: u32 = {PIECE}u;\n\
             const CHUNK: u32 = {CHUNK}u;\n{}{q}{widen}\n\n{CONVERT}\n{FFN_ACT}\n{FFN_EPI}\n{FFN_QUANT}\n{FFN_PARAMS}\n{FFN_Q}",
            t.bm,
            t.bn,
            t.tm,
            t.tn,
            t.bkw,
            self.epi.prelude(),
        )
    }

    fn mma_source(&self, up: bool, widen: &str) -> String {
        let t = self.mma;
        let s = t.s;
        let svt = if t.sv == 4 { "vec4<f16>" } else { "f16" };
        // Dense weights: f16, four to a vec4; packed ones: their words, dequantized as staged
        // (`wgsl/ffn_quant.wgsl`), with the scales at bindings 9 and 10 (dense: unused).
        let (weights, quant) = if self.quant.kind == 0 {
            (
                "alias WT = vec4<f16>;\nfn touch_weights() -> u32 { return bitcast<u32>(f32(w0[0].x + w1[0].x)) + qs0[0] + qs1[0]; }\n"
                    .to_string(),
                String::new(),
            )
        } else {
            (
                format!(
                    "alias WT = u32;\nfn touch_weights() -> u32 {{ return w0[0] + w1[0] + qs0[0] + qs1[0]; }}\n{}{widen}\n",
                    self.quant.prelude()
                ),
                FFN_QUANT.to_string(),
            )
        };
        let text = format!(
            "enable f16;\nenable wgpu_cooperative_matrix;\n\
             alias AMat = coop_mat{s}x{s}<f16, A>;\nalias BMat = coop_mat{s}x{s}<f16, B>;\n\
             alias CMat = coop_mat{s}x{s}<f32, C>;\nalias SVT = {svt};\n{weights}\
             const UP: bool = {up};\nconst S: u32 = {s}u;\nconst BM: u32 = {}u;\nconst BN: u32 = {}u;\n\
             const BK: u32 = {}u;\nconst WM: u32 = {}u;\nconst WN: u32 = {}u;\nconst SG: u32 = {}u;\n\
             const NBUF: u32 = {}u;\nconst SV: u32 = {}u;\nconst AT: u32 = {}u;\nconst OT: u32 = {}u;\n{}\
             \n{CONVERT}\n{FFN_ACT}\n{FFN_EPI}\n{quant}\n{FFN_PARAMS}\n{FFN_MMA}",
            t.bm,
            t.bn,
            t.bk,
            t.wm,
            t.wn,
            t.sg,
            t.nbuf,
            t.sv,
            dtype_code(self.dtype),
            dtype_code(self.out),
            self.epi.prelude(),
        );
        let packed_bits = (self.quant.kind != 0).then_some(self.quant.bits);
        crate::ffn::mma_source::expand(&text, t, up, dtype_code(self.dtype), self.out != DType::F32, packed_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::{MmaProbe, MmaTile};

    #[test]
    fn tile_labels_parse_back() {
        let t =
            MmaTile { s: 16, bm: 128, bn: 128, bk: 32, wm: 2, wn: 4, sg: 32, nbuf: 1, sv: 4, probe: MmaProbe::Whole };
        for probe in [MmaProbe::Whole, MmaProbe::NoProducts, MmaProbe::NoLoads] {
            let t = MmaTile { probe, ..t };
            assert_eq!(MmaTile::parse(&t.label(), 32), Some(t), "{}", t.label());
        }
        assert_eq!(t.label(), "128x128x32w2x4b1v4s16");
        for bad in ["128x128x32w2x4b1v4s16p3", "128x128x32w2x4b1v4s16p", "128x128x32w2x4b1v4", "128x128x33w2x4b1v4s16"]
        {
            assert_eq!(MmaTile::parse(bad, 32), None, "{bad}");
        }
    }
}
