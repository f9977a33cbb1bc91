//! The quantized formats decoded bit for bit against references written from their
//! specifications: E4M3 per the OCP 8-bit floating point spec (bias 7, no infinities,
//! S.1111.111 NaN, largest 448), E2M1 and E8M0 per the OCP Microscaling spec, and IEEE
//! round-to-nearest-even to bf16 found by search over every bf16 value, not by bit tricks.

use half::bf16;
use moe_ep::model::checkpoint::dequant::{
    Fp8Scales, bf16_round, e2m1_value, e4m3_value, e8m0_exponent, fp8_to_bf16, mxfp4_to_bf16,
};
use rand::{Rng, SeedableRng};

/// E4M3 from its fields: `(-1)^s 2^(e-7) (1 + m/8)`, subnormal `(-1)^s 2^-6 m/8`, NaN at e=15, m=7.
fn spec_e4m3(b: u8) -> Option<f64> {
    let (s, e, m) = (b >> 7, (b >> 3) & 15, b & 7);
    if e == 15 && m == 7 {
        return None;
    }
    let mag = if e == 0 { 2f64.powi(-6) * m as f64 / 8.0 } else { 2f64.powi(e as i32 - 7) * (1.0 + m as f64 / 8.0) };
    Some(if s == 1 { -mag } else { mag })
}

/// E2M1 from its fields: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; subnormal 0.5 m.
fn spec_e2m1(n: u8) -> f64 {
    let (s, e, m) = ((n >> 3) & 1, (n >> 1) & 3, n & 1);
    let mag = if e == 0 { 0.5 * m as f64 } else { 2f64.powi(e as i32 - 1) * (1.0 + m as f64 / 2.0) };
    if s == 1 { -mag } else { mag }
}

/// The bf16 nearest to `x`, ties to the even bit pattern, by binary search over the ordered
/// non-negative bf16 patterns; infinity at or past the largest value plus half its spacing.
fn spec_bf16(x: f64) -> u16 {
    let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
    let a = x.abs();
    let val = |p: u16| bf16::from_bits(p).to_f64();
    let max = val(0x7F7F);
    if a >= max + 2f64.powi(119) {
        return sign | 0x7F80;
    }
    // The largest pattern with value <= a.
    let (mut lo, mut hi) = (0u16, 0x7F7F);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if val(mid) <= a { lo = mid } else { hi = mid - 1 }
    }
    let below = lo;
    let pick = if val(below) == a || below == 0x7F7F && a <= max {
        below
    } else {
        let above = below + 1;
        let (db, da) = (a - val(below), val(above) - a);
        if db < da || (db == da && below % 2 == 0) { below } else { above }
    };
    sign | pick
}

#[test]
fn e4m3_matches_the_spec_for_every_byte() {
    for b in 0..=255u8 {
        assert_eq!(e4m3_value(b).map(f64::from), spec_e4m3(b), "byte {b:#04x}");
    }
    assert_eq!(e4m3_value(0x7E), Some(448.0));
    assert_eq!(e4m3_value(0x01), Some(2f32.powi(-9)));
    assert!(e4m3_value(0x7F).is_none() && e4m3_value(0xFF).is_none());
    assert_eq!(e4m3_value(0x78), Some(256.0), "exponent 15 is finite (no infinities)");
}

#[test]
fn e2m1_and_e8m0_match_the_spec() {
    for n in 0..16u8 {
        assert_eq!(e2m1_value(n) as f64, spec_e2m1(n), "nibble {n}");
    }
    assert_eq!(e2m1_value(7), 6.0);
    for s in 0..=254u8 {
        assert_eq!(e8m0_exponent(s), Some(s as i32 - 127));
    }
    assert_eq!(e8m0_exponent(0xFF), None);
}

#[test]
fn bf16_rounding_is_nearest_even_once() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut cases: Vec<f64> = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 2f64.powi(-8),
        1.0 + 3.0 * 2f64.powi(-8),
        1.0 + 2f64.powi(-8) + 2f64.powi(-40),
        2f64.powi(-126),
        2f64.powi(-133),
        2f64.powi(-134),
        3.0 * 2f64.powi(-135),
        2f64.powi(-140),
        3.3895313892515355e38,
        3.3895313892515355e38 + 2f64.powi(119),
        3.3895313892515355e38 + 2f64.powi(118),
        1e300,
        -1e-300,
    ];
    for _ in 0..20000 {
        let e = rng.random_range(-140..130);
        cases.push(rng.random_range(-2.0..2.0) * 2f64.powi(e));
    }
    // Values one bit of f32 away from bf16 ties: where rounding through f32 first would differ.
    for _ in 0..2000 {
        let p: u16 = rng.random_range(0..0x7F00);
        let tie = (bf16::from_bits(p).to_f64() + bf16::from_bits(p + 1).to_f64()) / 2.0;
        cases.extend([tie, tie + tie * 2f64.powi(-30), tie - tie * 2f64.powi(-30)]);
    }
    for x in cases {
        assert_eq!(bf16_round(x).to_bits(), spec_bf16(x), "{x:e}");
    }
}

fn rand_fp8(rng: &mut impl Rng) -> u8 {
    loop {
        let b: u8 = rng.random();
        if b & 0x7F != 0x7F {
            return b;
        }
    }
}

#[test]
fn fp8_block_dequantization_is_exact_with_partial_blocks() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (rows, cols, bn, bk) in [(40, 24, 16, 16), (128, 256, 128, 128), (130, 70, 128, 128), (5, 3, 2, 2)] {
        let data: Vec<u8> = (0..rows * cols).map(|_| rand_fp8(&mut rng)).collect();
        let (sr, sc) = (usize::div_ceil(rows, bn), usize::div_ceil(cols, bk));
        let scales: Vec<f32> =
            (0..sr * sc).map(|_| rng.random_range(1e-4f32..3e-2) * if rng.random() { 1.0 } else { -1.0 }).collect();
        let bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let got = fp8_to_bf16(&data, rows, cols, Fp8Scales { scale_inv: &bytes, block: (bn, bk), row0: 0 }).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let exact = spec_e4m3(data[r * cols + c]).unwrap() * scales[(r / bn) * sc + c / bk] as f64;
                assert_eq!(got[r * cols + c].to_bits(), spec_bf16(exact), "[{r}, {c}] of {rows}x{cols}");
            }
        }
    }
}

#[test]
fn mxfp4_dequantization_is_exact_low_nibble_first() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let (rows, cols) = (6, 96);
    let blocks: Vec<u8> = (0..rows * cols / 2).map(|_| rng.random()).collect();
    let scales: Vec<u8> = (0..rows * cols / 32).map(|_| rng.random_range(100..150)).collect();
    let got = mxfp4_to_bf16(&blocks, &scales, rows, cols).unwrap();
    for r in 0..rows {
        for c in 0..cols {
            let byte = blocks[(r * cols + c) / 2];
            let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
            let exact = spec_e2m1(nib) * 2f64.powi(scales[r * cols / 32 + c / 32] as i32 - 127);
            assert_eq!(got[r * cols + c].to_bits(), spec_bf16(exact), "[{r}, {c}]");
            assert_eq!(got[r * cols + c].to_f64(), exact, "MXFP4 values are exact in bf16");
        }
    }
    // The smallest and largest scales: still exact (bf16 reaches 2^-133), or an overflow error.
    assert_eq!(mxfp4_to_bf16(&[0x11; 16], &[0], 1, 32).unwrap()[0].to_f64(), 0.5 * 2f64.powi(-127));
    assert!(mxfp4_to_bf16(&[0x77; 16], &[254], 1, 32).unwrap_err().what.contains("overflows"));
}

#[test]
fn corrupt_values_are_errors_naming_the_element() {
    let one = 1f32.to_le_bytes();
    let s = Fp8Scales { scale_inv: &one, block: (128, 128), row0: 0 };
    let e = fp8_to_bf16(&[0x38, 0x7F], 1, 2, s).unwrap_err();
    assert_eq!((e.row, e.col), (0, 1));
    assert!(e.what.contains("NaN"), "{e}");
    let nan = f32::NAN.to_le_bytes();
    assert!(fp8_to_bf16(&[0x38], 1, 1, Fp8Scales { scale_inv: &nan, ..s }).unwrap_err().what.contains("scale"));
    let huge = 1e38f32.to_le_bytes();
    assert!(fp8_to_bf16(&[0x7E], 1, 1, Fp8Scales { scale_inv: &huge, ..s }).unwrap_err().what.contains("overflows"));
    let e = mxfp4_to_bf16(&[0u8; 32], &[127, 0xFF], 1, 64).unwrap_err();
    assert_eq!((e.col, e.what.contains("NaN")), (32, true));
}
