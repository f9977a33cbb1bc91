//! Packed weight formats: every format, bit width, group size and scale dtype decoded bit for
//! bit against the definitions (`testing::dequant_ref`), every code of E2M1 and E4M3, bad
//! inputs refused, and MLX's affine quantization against its formula.

use moe_ep::DType;
use moe_ep::model::quant::affine::{self, MlxKernel};
use moe_ep::model::quant::{PackedMatrix, QuantFormat, Scales, words_of_bytes};
use moe_ep::testing::dequant_ref::{dequantize_f64, e2m1_f64, e4m3_f64};
use moe_ep::testing::random;
use moe_ep::{Tensor, model::checkpoint::dequant};

/// Every packed format the library reads.
fn formats() -> Vec<QuantFormat> {
    let mut v = Vec::new();
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            for dt in DType::ALL {
                v.push(QuantFormat::affine(bits, group, dt).unwrap());
            }
        }
    }
    v.push(QuantFormat::Mxfp4);
    v.push(QuantFormat::fp8((128, 128)).unwrap());
    v.push(QuantFormat::fp8((3, 40)).unwrap());
    v
}

/// Decoded values equal the definition's, rounded once to f32, bit for bit.
fn assert_decodes(m: &PackedMatrix, what: &str) {
    let want = dequantize_f64(m);
    let mut row = vec![0f32; m.cols()];
    for r in 0..m.rows() {
        m.decode_row(r, &mut row);
        for (c, &got) in row.iter().enumerate() {
            let w = want[r * m.cols() + c] as f32;
            assert_eq!(got.to_bits(), w.to_bits(), "{what}: element [{r}, {c}] is {got}, the definition gives {w}");
        }
    }
    let t = m.to_tensor(DType::F32).to_f32_vec();
    assert!(t.iter().zip(&want).all(|(a, b)| a.to_bits() == (*b as f32).to_bits()), "{what}: to_tensor");
}

#[test]
fn every_format_decodes_as_defined() {
    for (i, f) in formats().into_iter().enumerate() {
        for (rows, cols) in [(1, 256), (7, 128), (5, 384)] {
            let m = random::packed(f, rows, cols, 11, i as u64);
            assert_decodes(&m, &format!("{f} [{rows}, {cols}]"));
            assert_eq!(m.value_bytes(), rows * cols * f.bits() as usize / 8);
            assert_eq!(m.bytes(), f.bytes(rows, cols), "{f}: bytes");
        }
    }
}

#[test]
fn every_e2m1_and_e4m3_code() {
    for n in 0..16u8 {
        assert_eq!(dequant::e2m1_value(n) as f64, e2m1_f64(n), "E2M1 {n:#x}");
    }
    assert_eq!((0..16u8).map(e2m1_f64).map(f64::abs).fold(0.0, f64::max), 6.0);
    for b in 0..=255u8 {
        assert_eq!(dequant::e4m3_value(b).map(f64::from), e4m3_f64(b), "E4M3 {b:#04x}");
    }
    assert_eq!(e4m3_f64(0x7E), Some(448.0));
    assert_eq!(e4m3_f64(0x01), Some(2f64.powi(-9)));
    // Every MXFP4 code with the extreme usable scales (2^-127 is an f32 subnormal).
    for e in [0u8, 1, 100, 127, 130, 252] {
        let values: Vec<u8> = (0..16u8).map(|i| i | (15 - i) << 4).collect();
        let m = PackedMatrix::mxfp4(1, 32, &values, vec![e]).unwrap();
        assert_decodes(&m, &format!("MXFP4 with E8M0 {e}"));
    }
    // Every E4M3 code, partial scale blocks.
    let bytes: Vec<u8> = (0..=255u8).map(|b| if b & 0x7F == 0x7F { 0x3C } else { b }).collect();
    let m = PackedMatrix::fp8(8, 32, (3, 20), &bytes, (0..6).map(|i| 0.25 + i as f32 * 0.37).collect()).unwrap();
    assert_decodes(&m, "E4M3 codes");
}

#[test]
fn the_bit_layouts() {
    // Affine 4-bit: value j of a row is bits 4 (j % 8) of word j / 8, low bits first.
    let words = vec![0x7654_3210u32, 0xFEDC_BA98];
    let ones = |dt| Tensor::from_f32(dt, 1, 1, &[1.0]).unwrap();
    let zeros = |dt| Tensor::from_f32(dt, 1, 1, &[0.0]).unwrap();
    let m4 = PackedMatrix::new(
        QuantFormat::Affine { bits: 4, group: 32, scales: DType::BF16 },
        1,
        32,
        [words.clone(), vec![0, 0]].concat(),
        Scales::Affine { scales: ones(DType::BF16), biases: zeros(DType::BF16) },
    )
    .unwrap();
    let mut row = vec![0f32; 32];
    m4.decode_row(0, &mut row);
    assert_eq!(&row[..16], &(0..16).map(|v| v as f32).collect::<Vec<_>>()[..]);
    // Affine 8-bit: byte order within the word.
    let m8 = PackedMatrix::new(
        QuantFormat::Affine { bits: 8, group: 32, scales: DType::F32 },
        1,
        32,
        [vec![0x0403_0201u32], vec![0; 7]].concat(),
        Scales::Affine { scales: ones(DType::F32), biases: zeros(DType::F32) },
    )
    .unwrap();
    m8.decode_row(0, &mut row);
    assert_eq!(&row[..5], &[1.0, 2.0, 3.0, 4.0, 0.0]);
    // MXFP4: element 2i in the low nibble of byte i.
    let mut blocks = vec![0u8; 16];
    blocks[0] = 0x72; // element 0 = 1.0 (code 2), element 1 = 6.0 (code 7)
    let mx = PackedMatrix::mxfp4(1, 32, &blocks, vec![128]).unwrap();
    mx.decode_row(0, &mut row);
    assert_eq!(&row[..3], &[2.0, 12.0, 0.0]);
    assert_eq!(words_of_bytes(&[1, 2, 3, 4, 5]), vec![0x0403_0201, 5]);
}

#[test]
fn bad_packed_matrices_are_errors() {
    let f = QuantFormat::affine(4, 64, DType::BF16).unwrap();
    let good = random::packed(f, 2, 128, 1, 0);
    let Scales::Affine { scales, biases } = good.scales().clone() else { unreachable!() };
    let err = |r: moe_ep::Result<PackedMatrix>| r.unwrap_err().to_string();
    assert!(err(PackedMatrix::new(f, 2, 128, vec![0; 31], good.scales().clone())).contains("needs 32 words"));
    assert!(err(PackedMatrix::new(f, 2, 96, vec![0; 12], good.scales().clone())).contains("not groups of 64"));
    let mut s = scales.to_f32_vec();
    s[3] = f32::INFINITY;
    let bad = Scales::Affine { scales: Tensor::from_f32(DType::F32, 2, 2, &s).unwrap(), biases: biases.clone() };
    assert!(err(PackedMatrix::new(f, 2, 128, good.words().to_vec(), bad)).contains("dtype f32"));
    let bad = Scales::Affine { scales: Tensor::from_f32(DType::BF16, 2, 2, &s).unwrap(), biases };
    assert!(err(PackedMatrix::new(f, 2, 128, good.words().to_vec(), bad)).contains("group [1, 1]"));
    assert!(err(PackedMatrix::mxfp4(1, 32, &[0; 16], vec![0xFF])).contains("E8M0 scale is NaN"));
    assert!(err(PackedMatrix::mxfp4(1, 32, &[0x77; 16], vec![254])).contains("overflows"));
    let mut b = vec![0x38u8; 64];
    b[37] = 0xFF;
    assert!(err(PackedMatrix::fp8(2, 32, (128, 128), &b, vec![1.0])).contains("element [1, 5]"));
    assert!(err(PackedMatrix::fp8(2, 32, (1, 128), &[0; 64], vec![1.0])).contains("needs 2 scales"));
    assert!(QuantFormat::affine(3, 64, DType::BF16).is_err() && QuantFormat::affine(4, 16, DType::BF16).is_err());
    let m = PackedMatrix::mxfp4(1, 64, &[0; 32], vec![0x7F; 2]).unwrap();
    assert!(err(PackedMatrix::new(f, 1, 64, m.words().to_vec(), m.scales().clone())).contains("another format"));
}

#[test]
fn slices_of_rows_decode_as_the_whole() {
    for f in formats() {
        let m = random::packed(f, 9, 128, 3, 1);
        let (r0, r1) =
            if let QuantFormat::Fp8 { block_rows, .. } = f { (block_rows.min(9) as usize % 9, 9) } else { (2, 7) };
        let s = m.slice_rows(r0, r1).unwrap();
        let (a, b) = (dequantize_f64(&m), dequantize_f64(&s));
        assert_eq!(&a[r0 * 128..r1 * 128], &b[..], "{f}");
    }
    let fp8 = random::packed(QuantFormat::fp8((4, 128)).unwrap(), 9, 128, 3, 1);
    assert!(fp8.slice_rows(1, 4).is_err());
}

/// MLX's affine quantization written out again from its definition (mlx's
/// `fast::Quantize::eval_cpu` and Metal `affine_quantize`): per group the scale, the bias and
/// each value's integer.
fn mlx_formula(v: &[f32], bits: u32, kernel: MlxKernel) -> (f32, f32, Vec<u32>) {
    let n = (2u32.pow(bits) - 1) as f32;
    let round = |x: f32| if kernel == MlxKernel::Cpu { x.round_ties_even() } else { x.round() };
    let start_max = if kernel == MlxKernel::Cpu { f32::NEG_INFINITY } else { 0.0 };
    let w_max = v.iter().fold(start_max, |a, &b| if b > a { b } else { a });
    let w_min = v.iter().fold(f32::MAX, |a, &b| if b < a { b } else { a });
    let min_side = w_min.abs() > w_max.abs();
    let range = (w_max - w_min) / n;
    let s0 = if range < 1e-7 { 1e-7 } else { range };
    let s0 = if min_side { s0 } else { -s0 };
    let edge = if min_side { w_min } else { w_max };
    let q0 = round(edge / s0);
    let (s, b) = if q0 == 0.0 { (s0, 0.0) } else { (edge / q0, edge) };
    let q = v.iter().map(|&x| round((x - b) / s).max(0.0).min(n) as u32).collect();
    (s, b, q)
}

#[test]
fn quantize_is_mlx_affine_quantization() {
    for kernel in [MlxKernel::Cpu, MlxKernel::Gpu] {
        for (bits, group) in [(4, 32), (4, 64), (8, 64), (8, 128), (4, 128)] {
            for dt in DType::ALL {
                let (rows, cols) = (6, 256);
                let w = random::uniform(dt, rows, cols, 0.3, 5, bits as u64 + group as u64);
                let mut v = w.to_f32_vec();
                // A group of negatives (the kernels differ), one of equal values, one of zeros.
                v[..group as usize].iter_mut().for_each(|x| *x = -x.abs() - 0.01);
                v[group as usize..2 * group as usize].fill(0.125);
                v[2 * group as usize..3 * group as usize].fill(0.0);
                let w = Tensor::from_f32(dt, rows, cols, &v).unwrap();
                let v = w.to_f32_vec();
                let m = affine::quantize_tensor(&w, bits, group, kernel).unwrap();
                let Scales::Affine { scales, biases } = m.scales() else { panic!() };
                assert_eq!(scales.dtype(), dt);
                let per_word = 32 / bits as usize;
                for (g, chunk) in v.chunks(group as usize).enumerate() {
                    let (s, b, q) = mlx_formula(chunk, bits, kernel);
                    let (r, gc) = (g / (cols / group as usize), g % (cols / group as usize));
                    let what = format!("{kernel:?} q{bits} g{group} {dt} group {g}");
                    let want_s = Tensor::from_f32(dt, 1, 1, &[s]).unwrap().get_f32(0, 0).unwrap();
                    let want_b = Tensor::from_f32(dt, 1, 1, &[b]).unwrap().get_f32(0, 0).unwrap();
                    assert_eq!(scales.get_f32(r, gc).unwrap().to_bits(), want_s.to_bits(), "{what}: scale");
                    assert_eq!(biases.get_f32(r, gc).unwrap().to_bits(), want_b.to_bits(), "{what}: bias");
                    for (j, &qj) in q.iter().enumerate() {
                        let i = g * group as usize + j;
                        let got = (m.words()[i / per_word] >> (bits as usize * (i % per_word))) & ((1 << bits) - 1);
                        assert_eq!(got, qj, "{what}: value {j}");
                    }
                }
                // Decoded values lie within a step (MLX clips the top of a range whose zero
                // adjustment shrank the scale) plus the scales' rounding of the input.
                let d = dequantize_f64(&m);
                let step = 1.0 / (2u32.pow(bits) - 1) as f64;
                for (g, (a, b)) in v.chunks(group as usize).zip(d.chunks(group as usize)).enumerate() {
                    let range = a.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)) * 2.0;
                    let tol = range * step * 1.1 + range * 2f64.powi(-7) * 2.0 + 1e-6;
                    for (x, y) in a.iter().zip(b) {
                        assert!((*x as f64 - y).abs() <= tol, "{kernel:?} q{bits} g{group} {dt} group {g}: {x} -> {y}");
                    }
                }
            }
        }
    }
}

#[test]
fn quantize_hand_computed_groups() {
    // 0..15 four times: largest magnitude positive, so the scale is negative: s = -1, b = 15.
    let v: Vec<f32> = (0..64).map(|i| (i % 16) as f32).collect();
    for kernel in [MlxKernel::Cpu, MlxKernel::Gpu] {
        let m = affine::quantize(&v, 1, 64, 4, 64, DType::BF16, kernel).unwrap();
        let Scales::Affine { scales, biases } = m.scales() else { panic!() };
        assert_eq!((scales.get_f32(0, 0), biases.get_f32(0, 0)), (Some(-1.0), Some(15.0)));
        assert_eq!(m.words()[0], 0x89AB_CDEF, "q = 15 - w");
    }
    // -8..7: largest magnitude negative: s = 1, b = -8, q = w + 8.
    let v: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
    let m = affine::quantize(&v, 1, 32, 4, 32, DType::F32, MlxKernel::Cpu).unwrap();
    let Scales::Affine { scales, biases } = m.scales() else { panic!() };
    assert_eq!((scales.get_f32(0, 0), biases.get_f32(0, 0)), (Some(1.0), Some(-8.0)));
    assert_eq!(m.words()[0], 0x7654_3210);
    // A tie: 2.5 in the 0..15 group is q = 12.5: the CPU rounds to even (12), the GPU away (13).
    let mut v: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
    v[1] = 2.5;
    let q1 = |k| (affine::quantize(&v, 1, 32, 4, 32, DType::F32, k).unwrap().words()[0] >> 4) & 15;
    assert_eq!((q1(MlxKernel::Cpu), q1(MlxKernel::Gpu)), (12, 13));
    // All negative: the GPU kernel's range reaches 0, the CPU's stops at the largest value.
    let v: Vec<f32> = (0..32).map(|i| -1.0 - i as f32 / 31.0).collect();
    let sb = |k| affine::group_scale_bias(&v, 4, k);
    assert_eq!(sb(MlxKernel::Cpu), (1.0 / 15.0 * 1.0, -2.0));
    assert_eq!(sb(MlxKernel::Gpu).1, -2.0);
    assert_eq!(sb(MlxKernel::Gpu).0, -2.0 / (-2.0f32 / (2.0 / 15.0)).round());
    assert!(affine::quantize(&[f32::NAN; 32], 1, 32, 4, 32, DType::F32, MlxKernel::Cpu).is_err());
}

/// A tensor from raw bits (f32: 32-bit patterns, 16-bit dtypes: 16-bit ones).
fn from_bits(dt: DType, rows: usize, cols: usize, bits: &[serde_json::Value]) -> Tensor {
    let bytes: Vec<u8> = bits
        .iter()
        .flat_map(|b| {
            let v = b.as_u64().unwrap();
            if dt == DType::F32 { (v as u32).to_le_bytes().to_vec() } else { (v as u16).to_le_bytes().to_vec() }
        })
        .collect();
    Tensor::from_bytes(dt, rows, cols, &bytes).unwrap()
}

/// MLX's own outputs (`tools/scripts/mlx_quantize_golden.py`, `mx.quantize` on MLX's CPU
/// stream): the same words, scales and biases, bit for bit; MLX's `mxfp4` mode's words read
/// as this library's MXFP4 decode to what `mx.dequantize` gives.
#[test]
fn quantize_gives_mlx_bytes() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mlx_quantize_golden.json"))
        .expect("golden file");
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (rows, cols) = (g["rows"].as_u64().unwrap() as usize, g["cols"].as_u64().unwrap() as usize);
    let cases = g["affine"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    for c in cases {
        let dt: DType = c["dtype"].as_str().unwrap().parse().unwrap();
        let (bits, group) = (c["bits"].as_u64().unwrap() as u32, c["group"].as_u64().unwrap() as u32);
        let what = format!("q{bits} g{group} {dt}");
        let w = from_bits(dt, rows, cols, c["w"].as_array().unwrap());
        let m = affine::quantize_tensor(&w, bits, group, MlxKernel::Cpu).unwrap();
        let q: Vec<u32> = c["q"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(m.words(), &q[..], "{what}: words");
        let Scales::Affine { scales, biases } = m.scales() else { panic!() };
        let groups = cols / group as usize;
        assert_eq!(scales, &from_bits(dt, rows, groups, c["scales"].as_array().unwrap()), "{what}: scales");
        assert_eq!(biases, &from_bits(dt, rows, groups, c["biases"].as_array().unwrap()), "{what}: biases");
    }
    let mx = &g["mxfp4"][0];
    let q: Vec<u32> = mx["q"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let bytes: Vec<u8> = q.iter().flat_map(|w| w.to_le_bytes()).collect();
    let s: Vec<u8> = mx["scales"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let m = PackedMatrix::mxfp4(rows, cols, &bytes, s).unwrap();
    let want = from_bits(DType::F32, rows, cols, mx["dequantized"].as_array().unwrap());
    assert_eq!(m.to_tensor(DType::F32), want, "MLX mxfp4 words as MXFP4");
}
