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

/// Threads per workgroup of every kernel (the `WG` constant in the sources).
pub const WORKGROUP: u32 = 256;

/// A kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `dst[r] = cat(a, b)[idx[r]]`, bitwise.
    GatherRows,
    /// `y[t] = sum_j w[t,j] * cat(a, b)[idx[t,j]]` in f32, cast once.
    Combine,
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
    /// capability) instead of integer operations; only meaningful for an f16 combine.
    pub unpack_f16: bool,
}

/// Largest top-k the combine is compiled for.
pub const MAX_K: usize = 64;

impl Variant {
    /// The row gather moving `word`s.
    pub fn gather(word: Word) -> Self {
        Variant { kernel: Kernel::GatherRows, word, dtype: DType::F32, k: 0, unpack_f16: false }
    }

    /// The combine of `dtype` rows moving `word`s, `k` (1..=[`MAX_K`]) slots per token;
    /// `unpack_f16` asks for the hardware f16 widening (ignored for other dtypes).
    pub fn combine(word: Word, dtype: DType, k: u32, unpack_f16: bool) -> Self {
        Variant { kernel: Kernel::Combine, word, dtype, k, unpack_f16: unpack_f16 && dtype == DType::F16 }
    }

    /// The naga capabilities the variant needs beyond core WGSL.
    pub fn capabilities(&self) -> &'static str {
        if self.unpack_f16 { "SHADER_FLOAT16_IN_FLOAT32" } else { "" }
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
        match self.kernel {
            Kernel::GatherRows => format!("{prelude}\n{GATHER_ROWS}"),
            Kernel::Combine => {
                let dt = match self.dtype {
                    DType::F32 => 0,
                    DType::F16 => 1,
                    DType::BF16 => 2,
                };
                let widen = if self.unpack_f16 {
                    "fn widen_f16(word: u32, h: u32) -> f32 { return unpack2x16float(word)[h]; }"
                } else {
                    "fn widen_f16(word: u32, h: u32) -> f32 { return f16_to_f32((word >> (16u * h)) & 0xffffu); }"
                };
                format!("{prelude}const DT: u32 = {dt}u;\nconst K: u32 = {}u;\n{widen}\n\n{COMBINE}", self.k)
            }
        }
    }
}
