// Packed expert weights as the FFN kernels read them (`wgsl/ffn_q.wgsl`, `wgsl/ffn_qgemv.wgsl`),
// dequantized in f32 where they are used: never widened in memory. Formats (src/model/quant):
//   QK = 1: MLX affine, BITS = 4 or 8, w = fma(s, q, b) with s, b the group's scale and bias;
//   QK = 2: MXFP4, BITS = 4, w = e2m1 * 2^(e - 127);
//   QK = 3: FP8 E4M3, BITS = 8, w = e4m3 * scale of the FBN x GROUP block.
// Values are packed low bits first in little-endian 32-bit words, a row's values in input
// order, rows one after another. GROUP inputs share a scale (affine: its group; MXFP4: 32;
// FP8: the block's columns). A row has `groups` = ceil(K / GROUP) scales.
//
// The scales of one expert's matrix start at word `base` of its scale buffer:
//   affine, ST = 2 (bf16) or 1 (f16): one word per (row, group), scale in the low half, bias
//   in the high half; ST = 0 (f32): two words, scale then bias;
//   MXFP4: the E8M0 bytes, row-major, four a word (2^-127, byte 0, is an f32 subnormal: a GPU
//   that flushes subnormals reads it as 0);
//   FP8: one f32 per block, [ceil(rows / FBN), groups].
//
// Every kernel computes a weight as fma(scale, qvalue, bias) (bias 0 for MXFP4 and FP8), the
// same f32 operations in the decode and the tiled kernel, so that their sums agree bit for bit.
//
// Prelude: QK, BITS, GROUP, ST, FBN, widen_f16.

const EPW: u32 = 32u / BITS;
const QMASK: u32 = (1u << BITS) - 1u;

// f32(c) for c < 2^23, exactly, without an integer conversion (a quarter-rate instruction on
// NVIDIA's GPUs, 16 a clock an SM, which would cap a 4-bit decode near half the memory
// bandwidth): 2^23 + c as f32 bits, minus 2^23.
fn small_f32(c: u32) -> f32 {
    return bitcast<f32>(c | 0x4B000000u) - 8388608.0;
}

// E2M1 code c (low 4 bits): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
fn e2m1(c: u32) -> f32 {
    let m = c & 7u;
    let mag = select(bitcast<f32>((((m >> 1u) + 126u) << 23u) | ((m & 1u) << 22u)), small_f32(m) * 0.5, m < 2u);
    return select(mag, -mag, (c & 8u) != 0u);
}

// E4M3 byte c: 2^(e - 7) (1 + m / 8), subnormal m 2^-9 (NaN codes never occur: checked at load).
fn e4m3(c: u32) -> f32 {
    let e = (c >> 3u) & 15u;
    let m = c & 7u;
    let mag = select(bitcast<f32>(((e + 120u) << 23u) | (m << 20u)), small_f32(m) * 0.001953125, e == 0u);
    return select(mag, -mag, (c & 0x80u) != 0u);
}

// Value j (< EPW) of a word before its scale: the affine integer, the E2M1 or E4M3 value.
fn qvalue(word: u32, j: u32) -> f32 {
    let c = (word >> (BITS * j)) & QMASK;
    if QK == 1u {
        return small_f32(c);
    }
    if QK == 2u {
        return e2m1(c);
    }
    return e4m3(c);
}

// Where the scale words of (row n, group g) start, relative to the matrix's base.
fn scale_word(n: u32, g: u32, groups: u32) -> u32 {
    if QK == 1u {
        return select(1u, 2u, ST == 0u) * (n * groups + g);
    }
    if QK == 2u {
        return (n * groups + g) / 4u;
    }
    return (n / FBN) * groups + g;
}

// (scale, bias) from the words at scale_word (w0) and after it (w1, affine f32 only).
fn decode_sb(w0: u32, w1: u32, n: u32, g: u32, groups: u32) -> vec2<f32> {
    if QK == 1u {
        if ST == 0u {
            return vec2<f32>(bitcast<f32>(w0), bitcast<f32>(w1));
        }
        if ST == 2u {
            return vec2<f32>(bitcast<f32>(w0 << 16u), bitcast<f32>(w0 & 0xffff0000u));
        }
        return vec2<f32>(widen_f16(w0, 0u), widen_f16(w0, 1u));
    }
    if QK == 2u {
        let b = (w0 >> (8u * ((n * groups + g) % 4u))) & 255u;
        return vec2<f32>(select(bitcast<f32>(b << 23u), bitcast<f32>(0x400000u), b == 0u), 0.0);
    }
    return vec2<f32>(bitcast<f32>(w0), 0.0);
}
