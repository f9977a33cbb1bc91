// Exact conversions between f32 and the 16-bit float formats with integer operations only
// (no SHADER_F16 needed), rounding to nearest even exactly as the `half` crate does on the
// CPU. Added by the loader ahead of every arithmetic kernel (combine, ffn, narrow).

fn f16_to_f32(h: u32) -> f32 {
    let e = h & 0x7c00u;
    if e != 0u && e != 0x7c00u {
        // Normal: rebias the exponent (15 -> 127), widen the mantissa.
        return bitcast<f32>(((h & 0x8000u) << 16u) | (((h & 0x7fffu) << 13u) + 0x38000000u));
    }
    return f16_to_f32_rare(h);
}

// Zeros, subnormals, infinities and NaNs.
fn f16_to_f32_rare(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0x1fu {
        return bitcast<f32>(s | select(0x7f800000u, 0x7fc00000u, m != 0u) | (m << 13u));
    }
    if e == 0u {
        // Zero or subnormal: m * 2^-24, exact in f32; the sign set as bits, so that a compiler
        // that ignores the sign of zero cannot lose it.
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

fn f32_to_f16(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    let a = x & 0x7fffffffu;
    if a >= 0x38800000u && a < 0x477ff000u {
        // Normal f16 result: rebias (127 -> 15) and round to nearest even by adding
        // 0xfff + the kept lowest bit, so that a carry out of the mantissa bumps the exponent.
        return ((x >> 16u) & 0x8000u) | ((a - 0x38000000u + 0xfffu + ((a >> 13u) & 1u)) >> 13u);
    }
    return f32_to_f16_rare(v);
}

// Results that are zero, subnormal, infinite or NaN in f16: the `half` crate's algorithm.
fn f32_to_f16_rare(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    let sign = (x & 0x80000000u) >> 16u;
    let ex = x & 0x7f800000u;
    let man = x & 0x007fffffu;
    if ex == 0x7f800000u {
        return sign | 0x7c00u | select(0u, 0x0200u, man != 0u) | (man >> 13u);
    }
    let he = i32(ex >> 23u) - 112;
    if he >= 0x1f {
        return sign | 0x7c00u;
    }
    if he <= 0 {
        if 14 - he > 24 {
            return sign;
        }
        let m = man | 0x00800000u;
        var hm = m >> u32(14 - he);
        let rb = 1u << u32(13 - he);
        if (m & rb) != 0u && (m & (3u * rb - 1u)) != 0u {
            hm += 1u;
        }
        return sign | hm;
    }
    let r = sign | (u32(he) << 10u) | (man >> 13u);
    let rb = 0x00001000u;
    if (man & rb) != 0u && (man & (3u * rb - 1u)) != 0u {
        return r + 1u;
    }
    return r;
}

fn f32_to_bf16(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    if (x & 0x7fffffffu) > 0x7f800000u {
        return (x >> 16u) | 0x0040u;
    }
    let rb = 0x00008000u;
    if (x & rb) != 0u && (x & (3u * rb - 1u)) != 0u {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

// a and b narrowed to the 16-bit dtype dt (1 = f16, 2 = bf16), packed in one word: a | b << 16.
fn narrow_pair(a: f32, b: f32, dt: u32) -> u32 {
    if dt == 2u {
        return f32_to_bf16(a) | (f32_to_bf16(b) << 16u);
    }
    return f32_to_f16(a) | (f32_to_f16(b) << 16u);
}
