//! Each GPU kernel against the CPU engine on fresh random data, with poisoned outputs so that
//! every element must be written: bitwise for data movement; bitwise and within relative error
//! of f64 for the combine.

mod common;

use common::{context, context_with, indices, rows};
use moe_ep::compute::engine::ZERO_ROW;
use moe_ep::{CpuEngine, DType, Engine, Error, Tensor};
use moe_ep_wgpu::ops::{Combine, Gather};
use moe_ep_wgpu::{ContextOptions, GpuContext, GpuEngine};
use std::sync::Arc;

const POISON: u8 = 0xA5;

/// Device-level gather into a poisoned destination; the bytes read back.
fn gpu_gather(ctx: &GpuContext, a: &Tensor, b: Option<&Tensor>, idx: &[u32]) -> Vec<u8> {
    let rb = a.row_bytes();
    let abuf = ctx.upload("a", a.as_bytes()).unwrap();
    let bbuf = b.map(|b| ctx.upload("b", b.as_bytes()).unwrap());
    let ibuf = ctx.upload("idx", bytemuck::cast_slice(idx)).unwrap();
    let dst = ctx.upload("dst", &vec![POISON; idx.len() * rb]).unwrap();
    let launch = ctx
        .gather(&Gather {
            a: &abuf,
            a_rows: a.rows(),
            b: bbuf.as_ref(),
            b_rows: b.map_or(0, |b| b.rows()),
            idx: &ibuf,
            dst: &dst,
            rows: idx.len(),
            row_bytes: rb,
        })
        .unwrap();
    let mut enc = ctx.encoder("test");
    launch.encode_pass(&mut enc);
    let mut out = vec![0u8; idx.len() * rb];
    ctx.submit_and_read(enc, &dst, &mut out).unwrap();
    out
}

fn cpu_gather(srcs: &[&Tensor], idx: &[u32]) -> Tensor {
    let mut dst = Tensor::zeros(srcs[0].dtype(), idx.len(), srcs[0].cols());
    CpuEngine.gather_rows(srcs, idx, &mut dst).unwrap();
    dst
}

#[test]
fn gather_equals_cpu_bitwise() {
    let ctx = context();
    let mut seed = 1;
    // (dtype, cols): vec4 rows, u32 rows, 16-bit rows of either word.
    for (dtype, cols) in [(DType::F32, 64), (DType::F32, 7), (DType::BF16, 72), (DType::F16, 10), (DType::BF16, 2)] {
        for (a_rows, b_rows) in [(0, 0), (5, 0), (300, 17), (1, 1)] {
            for n in [0, 1, 255, 257, 1000] {
                seed += 1;
                let a = rows(dtype, a_rows, cols, seed);
                let b = rows(dtype, b_rows, cols, seed + 1000);
                let idx = indices(n, a_rows + b_rows, 9, seed);
                let want = cpu_gather(&[&a, &b], &idx);
                let got = gpu_gather(&ctx, &a, Some(&b), &idx);
                assert!(got == want.as_bytes(), "gather {dtype} D={cols} a={a_rows} b={b_rows} n={n} differs");
                if b_rows == 0 {
                    let got = gpu_gather(&ctx, &a, None, &idx);
                    assert!(got == want.as_bytes(), "one-source gather {dtype} D={cols} n={n} differs");
                }
            }
        }
    }
    // One pipeline per word type, compiled once.
    assert_eq!(ctx.compiled_pipelines(), 2);
}

#[test]
fn gather_more_rows_than_one_grid_dimension() {
    // 129 u32 words a row: one row per workgroup, so 66000 rows need a 2-D grid.
    let ctx = context();
    let n = 66_000;
    let a = rows(DType::F32, n, 129, 3);
    let idx = indices(n, n, 0, 4);
    let want = cpu_gather(&[&a], &idx);
    assert!(gpu_gather(&ctx, &a, None, &idx) == want.as_bytes());
    assert!(n as u32 > ctx.limits().max_compute_workgroups_per_dimension);
}

fn f64_combine(srcs: &[&Tensor], idx: &[u32], w: &[f32], k: usize, cols: usize) -> Vec<f64> {
    let all: Vec<Vec<f64>> = srcs.iter().map(|s| s.to_f64_vec()).collect();
    let starts: Vec<usize> = srcs
        .iter()
        .scan(0, |s, t| {
            *s += t.rows();
            Some(*s - t.rows())
        })
        .collect();
    let n = idx.len() / k;
    let mut y = vec![0f64; n * cols];
    for t in 0..n {
        for j in 0..k {
            let i = idx[t * k + j];
            if i == ZERO_ROW {
                continue;
            }
            let s = (0..srcs.len()).find(|&q| (i as usize) < starts[q] + srcs[q].rows()).expect("index in range");
            let r = i as usize - starts[s];
            for c in 0..cols {
                y[t * cols + c] += f64::from(w[t * k + j]) * all[s][r * cols + c];
            }
        }
    }
    y
}

fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 2e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    }
}

#[test]
fn combine_equals_cpu_bitwise_and_f64_within_rounding() {
    let ctx = context();
    let strict = ctx.adapter_info().backend != wgpu::Backend::Metal;
    let mut seed = 100;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for cols in [64, 6, 2, 130] {
            for k in [1, 2, 8] {
                for n in [0, 1, 33, 300] {
                    seed += 1;
                    let a = rows(dtype, 2 * n + 1, cols, seed);
                    let b = rows(dtype, n + 3, cols, seed + 1);
                    let idx = indices(n * k, a.rows() + b.rows(), 7, seed);
                    let w: Vec<f32> = rows(DType::F32, n * k, 1, seed + 2).to_f32_vec();
                    let mut want = Tensor::zeros(dtype, n, cols);
                    CpuEngine.weighted_sum(&[&a, &b], &idx, &w, k, &mut want).unwrap();
                    let abuf = ctx.upload("a", a.as_bytes()).unwrap();
                    let bbuf = ctx.upload("b", b.as_bytes()).unwrap();
                    let ibuf = ctx.upload("idx", bytemuck::cast_slice(&idx)).unwrap();
                    let wbuf = ctx.upload("w", bytemuck::cast_slice(&w)).unwrap();
                    let dst = ctx.upload("y", &vec![POISON; want.as_bytes().len()]).unwrap();
                    let launch = ctx
                        .combine(&Combine {
                            a: &abuf,
                            a_rows: a.rows(),
                            b: Some(&bbuf),
                            b_rows: b.rows(),
                            idx: &ibuf,
                            c: None,
                            c_rows: 0,
                            weights: moe_ep_wgpu::ops::CombineWeights::PerSlot(&wbuf),
                            dst: &dst,
                            rows: n,
                            k,
                            dtype,
                            row_bytes: want.row_bytes(),
                        })
                        .unwrap();
                    let mut enc = ctx.encoder("test");
                    launch.encode_pass(&mut enc);
                    let mut got = Tensor::zeros(dtype, n, cols);
                    ctx.submit_and_read(enc, &dst, got.as_bytes_mut()).unwrap();
                    let what = format!("combine {dtype} D={cols} k={k} n={n}");
                    let exact = f64_combine(&[&a, &b], &idx, &w, k, cols);
                    let rel = moe_ep::testing::reference::rel_error(&got.to_f64_vec(), &exact);
                    assert!(rel <= tolerance(dtype), "{what}: relative error {rel:.2e} against f64");
                    // Metal compiles with fast math (wgpu's default), free to reorder the sum.
                    if strict && got.as_bytes() != want.as_bytes() {
                        let (g, c) = (got.to_f32_vec(), want.to_f32_vec());
                        let i = g.iter().zip(&c).position(|(x, y)| x.to_bits() != y.to_bits()).unwrap();
                        panic!("{what}: element {i}: GPU {} != CPU {}", g[i], c[i]);
                    }
                }
            }
        }
    }
}

#[test]
fn engine_stages_equal_cpu_bitwise() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    assert!(gpu.name().starts_with("wgpu:"));
    for dtype in [DType::F32, DType::BF16] {
        let (x, recv, extra) = (rows(dtype, 40, 24, 1), rows(dtype, 23, 24, 2), rows(dtype, 5, 24, 3));
        // One, two and three sources (three are concatenated on upload).
        for srcs in [vec![&x], vec![&recv, &x], vec![&recv, &x, &extra]] {
            let total = srcs.iter().map(|s| s.rows()).sum();
            let idx = indices(97, total, 11, 5);
            let want = cpu_gather(&srcs, &idx);
            let mut got = Tensor::zeros(dtype, 97, 24);
            gpu.gather_rows(&srcs, &idx, &mut got).unwrap();
            assert!(got.as_bytes() == want.as_bytes(), "engine gather {dtype} {} sources", srcs.len());
            let k = 3;
            let idx = indices(31 * k, total, 6, 6);
            let w = rows(DType::F32, 31 * k, 1, 7).to_f32_vec();
            let mut want = Tensor::zeros(dtype, 31, 24);
            CpuEngine.weighted_sum(&srcs, &idx, &w, k, &mut want).unwrap();
            let mut got = Tensor::zeros(dtype, 31, 24);
            gpu.weighted_sum(&srcs, &idx, &w, k, &mut got).unwrap();
            assert!(got.as_bytes() == want.as_bytes(), "engine combine {dtype} {} sources", srcs.len());
        }
    }
    // Nothing to do: no rows, no columns, no sources.
    let x = rows(DType::F32, 4, 8, 9);
    let mut empty = Tensor::zeros(DType::F32, 0, 8);
    gpu.gather_rows(&[&x], &[], &mut empty).unwrap();
    gpu.weighted_sum(&[&x], &[], &[], 2, &mut empty).unwrap();
    let mut zero = Tensor::zeros(DType::F32, 2, 8);
    zero.as_bytes_mut().fill(POISON);
    gpu.gather_rows(&[], &[ZERO_ROW, ZERO_ROW], &mut zero).unwrap();
    assert!(zero.as_bytes().iter().all(|&b| b == 0), "ZERO_ROW rows are zeros");
}

#[test]
fn odd_16bit_rows_are_a_clear_error() {
    let gpu = GpuEngine::with_context(Arc::new(context()));
    let x = rows(DType::BF16, 4, 3, 1);
    let mut dst = Tensor::zeros(DType::BF16, 2, 3);
    let e = gpu.gather_rows(&[&x], &[0, 1], &mut dst).unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }) && e.to_string().contains("multiple of 4"), "{e}");
    let e = gpu.weighted_sum(&[&x], &[0, 1], &[0.5, 0.5], 1, &mut dst).unwrap_err();
    assert!(e.to_string().contains("even number of columns"), "{e}");
    let e = gpu.gather_rows(&[&x], &[7], &mut Tensor::zeros(DType::BF16, 1, 3)).unwrap_err();
    assert!(e.to_string().contains("row index 7"), "{e}");
}

#[test]
fn sizes_over_the_binding_limit_are_an_error() {
    let ctx = context_with(&ContextOptions { max_binding_bytes: Some(4096), ..ContextOptions::from_env() });
    assert_eq!(ctx.max_binding_bytes(), 4096);
    let gpu = GpuEngine::with_context(Arc::new(ctx));
    let x = rows(DType::F32, 64, 32, 1); // 8 KiB
    let mut dst = Tensor::zeros(DType::F32, 2, 32);
    let e = gpu.gather_rows(&[&x], &[0, 63], &mut dst).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Backend { .. }) && msg.contains("8192 bytes") && msg.contains("4096"), "{msg}");
    // Within the limit it works.
    let small = x.slice_rows(0, 16).unwrap();
    gpu.gather_rows(&[&small], &[0, 15], &mut dst).unwrap();
    assert!(dst.as_bytes() == cpu_gather(&[&small], &[0, 15]).as_bytes());
}

#[test]
fn a_device_index_past_the_adapters_is_an_error_naming_them() {
    // Index 0 is the adapter the default picks; one past the last is refused with the count.
    let first = GpuContext::new(&ContextOptions { device_index: Some(0), ..ContextOptions::from_env() }).unwrap();
    assert_eq!(first.adapter_info().name, context().adapter_info().name);
    let e = GpuContext::new(&ContextOptions { device_index: Some(64), ..ContextOptions::from_env() }).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("device 64 asked for") && msg.contains("adapters; found"), "{msg}");
}

#[test]
fn combine_converts_every_16bit_value_as_the_cpu_does() {
    // All 65536 bit patterns (subnormals, infinities and NaNs included), scaled by weights that
    // round, overflow to infinity and underflow to subnormals and zero.
    let fast = GpuEngine::with_context(Arc::new(context()));
    let portable = GpuEngine::with_context(Arc::new(context_with(&ContextOptions {
        fast_variants: false,
        ..ContextOptions::from_env()
    })));
    eprintln!("fast variants: unpack2x16float for f16: {}", fast.context().unpack_f16());
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    for (gpu, dtype) in [(&fast, DType::F16), (&portable, DType::F16), (&fast, DType::BF16)] {
        let mut x = Tensor::zeros(dtype, 1024, 64);
        x.as_bytes_mut().copy_from_slice(bytemuck::cast_slice(&bits));
        let idx: Vec<u32> = (0..1024).collect();
        for w in [1.0f32, 0.3, 1.0 / 3.0, -1e-3, 3e-6, 1000.0, 7e4, 1e-30] {
            let ws = vec![w; 1024];
            let (mut want, mut got) = (Tensor::zeros(dtype, 1024, 64), Tensor::zeros(dtype, 1024, 64));
            CpuEngine.weighted_sum(&[&x], &idx, &ws, 1, &mut want).unwrap();
            gpu.weighted_sum(&[&x], &idx, &ws, 1, &mut got).unwrap();
            let (g, c): (&[u16], &[u16]) =
                (bytemuck::cast_slice(got.as_bytes()), bytemuck::cast_slice(want.as_bytes()));
            let is_nan = |b: u16| match dtype {
                DType::F16 => b & 0x7c00 == 0x7c00 && b & 0x03ff != 0,
                _ => b & 0x7f80 == 0x7f80 && b & 0x007f != 0,
            };
            let value = |b: u16| match dtype {
                DType::F16 => half::f16::from_bits(b).to_f32(),
                _ => half::bf16::from_bits(b).to_f32(),
            };
            for i in 0..g.len() {
                // NaN payloads may differ (GPUs may return a canonical NaN); NaN-ness may not.
                // A GPU may flush f32 values below 2^-126 to zero, as operand or as product
                // (the H100 through Vulkan flushes bf16 subnormals; Metal's fast math may too).
                let (v, product) = (value(bits[i]), w * value(bits[i]));
                let tiny = |x: f32| x != 0.0 && x.abs() < f32::MIN_POSITIVE;
                let flushed = (tiny(v) || tiny(product)) && g[i] & 0x7fff == 0;
                let same = g[i] == c[i] || (is_nan(g[i]) && is_nan(c[i])) || flushed;
                assert!(same, "{dtype} w={w}: input {:#06x}: GPU {:#06x}, CPU {:#06x}", bits[i], g[i], c[i]);
            }
        }
    }
}
