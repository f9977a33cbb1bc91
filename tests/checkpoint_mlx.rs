//! mlx-lm checkpoints (written by `testing::mlx_writer` as `mlx_lm.convert -q` writes them) of
//! every family mlx-lm converts: read packed, each rank reading only its experts' packed
//! bytes, the packed bytes equal to MLX's quantization of the weights, and the layer at world
//! sizes 1, 2 and 3 with uneven tokens against the family's f64 reference on the same packed
//! bytes; affine at 4 and 8 bits with bf16, f16 and f32 scales, mxfp4 mode, a projection left
//! dense, per-module entries, decoding at load, quantizing at load, and bad files.

mod common;

use std::path::{Path, PathBuf};

use common::{TIMEOUT, assert_close, tolerance};
use moe_ep::model::checkpoint::{Encoding, LoadOptions};
use moe_ep::model::quant::affine::{MlxKernel, quantize_tensor};
use moe_ep::testing::checkpoint_writer::{WriteEncoding, WriteOptions, family_moe, write_checkpoint_with};
use moe_ep::testing::mlx_writer::MlxWrite;
use moe_ep::testing::reference::family_moe_f64;
use moe_ep::{
    Checkpoint, DType, Family, Group, LayerWeights, LocalGroup, MoeConfig, MoeLayer, Placement, Quantize, Weight,
    random,
};

fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mlx-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Written {
    dir: PathBuf,
    cfg: MoeConfig,
    weights: LayerWeights,
    config: serde_json::Value,
}

fn write(family: Family, dtype: DType, enc: WriteEncoding, name: &str, (d, f): (usize, usize)) -> Written {
    let dir = dir(name);
    let cfg = family_moe(family, 8, d, f, 2).with_dtypes(dtype, dtype);
    let all = Placement::contiguous(cfg.num_experts, 1).unwrap();
    let weights = random::layer_weights(&cfg, 3, &all, 0);
    let opts = WriteOptions { encoding: enc, shards: 2, ..Default::default() };
    write_checkpoint_with(&dir, family, &cfg, 1, &weights, &opts).unwrap_or_else(|e| panic!("{family:?}: {e}"));
    let config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Written { dir, cfg, weights, config }
}

fn tokens(world: usize) -> Vec<usize> {
    [7usize, 0, 12][..world].to_vec()
}

/// The layer on `world` ranks, each loading its own share as `opts` says, against the family's
/// reference on `reference` (all experts, as read); each rank reads the replicated tensors
/// and its own experts' bytes only (`expert_bytes[e]` each).
fn check_worlds(family: Family, w: &Written, opts: LoadOptions, reference: &LayerWeights, expert_bytes: &[u64]) {
    let replicated = {
        let c = Checkpoint::open(&w.dir).unwrap();
        c.router(1).unwrap();
        c.selection_bias(1).unwrap();
        c.shared_expert_with(1, &opts).unwrap();
        c.bytes_read()
    };
    for world in [1, 2, 3] {
        let outs = LocalGroup::run(world, TIMEOUT, |g| {
            let rank = g.rank();
            let ckpt = Checkpoint::open(&w.dir)?;
            let cfg = ckpt.moe_config(1)?;
            let placement = Placement::balanced(cfg.num_experts, world)?;
            let mine = ckpt.layer_weights_with(1, &placement, rank, &opts)?;
            let want_read = replicated + placement.experts_of(rank).iter().map(|&e| expert_bytes[e]).sum::<u64>();
            let x = random::input(&cfg, tokens(world)[rank], 11, rank);
            let layer = MoeLayer::from_weights(g, cfg.clone(), placement, mine, None, Default::default())?;
            let y = layer.forward(&x)?;
            Ok::<_, moe_ep::Error>((x, y, ckpt.bytes_read(), want_read, cfg.act_dtype))
        })
        .unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            let (x, y, read, want_read, act) = o.unwrap().unwrap_or_else(|e| panic!("{family:?} world {world}: {e}"));
            assert_eq!(read, want_read, "{family:?} world {world} rank {r}: bytes read");
            let want = family_moe_f64(family, &w.config, &x, reference);
            assert_close(&y.to_f64_vec(), &want, tolerance(act), &format!("{family:?} world {world} rank {r}"));
        }
    }
}

/// What MLX makes of a dense matrix at `(bits, group)` (dense when its inputs are not whole
/// groups), and its bytes in the files.
fn mlx_of(t: &Weight, bits: u32, group: u32) -> (Weight, u64) {
    let t = t.dense().unwrap();
    if !t.cols().is_multiple_of(group as usize) {
        return (Weight::Dense(t.clone()), t.as_bytes().len() as u64);
    }
    let p = quantize_tensor(t, bits, group, MlxKernel::Gpu).unwrap();
    let b = p.bytes() as u64;
    (Weight::Packed(p), b)
}

/// Every expert read from the files equals MLX's quantization of what was written; returns
/// each expert's bytes in the files.
fn assert_experts_are_mlx_bytes(family: Family, w: &Written, bits: u32, group: u32) -> Vec<u64> {
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let ids: Vec<usize> = (0..w.cfg.num_experts).collect();
    let read = ckpt.experts(1, &ids).unwrap();
    let mut bytes = Vec::new();
    for (e, (got, orig)) in read.iter().zip(&w.weights.experts).enumerate() {
        let mut b = orig.bias.as_ref().map_or(0, |b| b.bytes() as u64);
        for (g, o, p) in [(&got.gate, &orig.gate, "gate"), (&got.up, &orig.up, "up"), (&got.down, &orig.down, "down")] {
            let (want, n) = mlx_of(o, bits, group);
            assert_eq!(g, &want, "{family:?} expert {e} {p}: not MLX's bytes");
            b += n;
        }
        assert_eq!(got.bias, orig.bias, "{family:?} expert {e}: biases");
        bytes.push(b);
    }
    bytes
}

#[test]
fn every_family_mlx_lm_converts_at_world_sizes_1_2_3() {
    for (i, family) in Family::ALL.into_iter().enumerate() {
        let dtype = [DType::BF16, DType::F16, DType::F32][i % 3];
        let (bits, group) = [(4, 32), (8, 64), (4, 64)][i % 3];
        let w =
            write(family, dtype, WriteEncoding::Mlx(MlxWrite::affine(bits, group)), &format!("{family:?}"), (64, 64));
        let ckpt = Checkpoint::open(&w.dir).unwrap();
        let found = ckpt.found(1).unwrap();
        assert_eq!(found.experts, Encoding::Affine { bits, group, scales: dtype }, "{family:?}: {found}");
        let cfg = ckpt.moe_config(1).unwrap();
        assert_eq!(cfg.clone().with_dtypes(DType::F32, DType::F32), w.cfg.clone().with_dtypes(DType::F32, DType::F32));
        let bytes = assert_experts_are_mlx_bytes(family, &w, bits, group);
        let all = Placement::contiguous(8, 1).unwrap();
        let reference = ckpt.layer_weights(1, &all, 0).unwrap();
        if let (Some(s), Some(o)) = (&reference.shared, &w.weights.shared) {
            assert_eq!(s.weights.gate, mlx_of(&o.weights.gate, bits, group).0, "{family:?}: shared expert");
        }
        check_worlds(family, &w, LoadOptions::default(), &reference, &bytes);
    }
}

#[test]
fn routers_as_mlx_lm_quantizes_them() {
    // Qwen3-MoE pins its router at 8 bits in groups of 64 (a per-module entry); Mixtral's is
    // quantized with the layer; DeepSeek-V3's is a plain array, never quantized.
    for (family, router) in
        [(Family::Qwen3Moe, Some((8, 64))), (Family::Mixtral, Some((4, 32))), (Family::DeepseekV3, None)]
    {
        let w = write(
            family,
            DType::BF16,
            WriteEncoding::Mlx(MlxWrite::affine(4, 32)),
            &format!("router-{family:?}"),
            (64, 64),
        );
        let got = Checkpoint::open(&w.dir).unwrap().router(1).unwrap();
        let want = match router {
            Some((b, g)) => quantize_tensor(&w.weights.router, b, g, MlxKernel::Gpu).unwrap().to_tensor(DType::F32),
            None => w.weights.router.clone(),
        };
        assert_eq!(got, want, "{family:?}");
        let q = &w.config["quantization"];
        assert_eq!(q.get("model.layers.1.mlp.gate").is_some(), family == Family::Qwen3Moe, "{q}");
        assert_eq!(w.config["quantization_config"], *q);
    }
}

#[test]
fn scale_dtypes_mxfp4_mode_and_a_dense_down_projection() {
    // bf16, f16 and f32 scales at 8 bits; F = 48 is not whole groups of 32: down stays dense.
    for dtype in DType::ALL {
        let w = write(
            Family::Qwen3Moe,
            dtype,
            WriteEncoding::Mlx(MlxWrite::affine(8, 32)),
            &format!("q8-{dtype}"),
            (64, 48),
        );
        let bytes = assert_experts_are_mlx_bytes(Family::Qwen3Moe, &w, 8, 32);
        let ckpt = Checkpoint::open(&w.dir).unwrap();
        let all = Placement::contiguous(8, 1).unwrap();
        let reference = ckpt.layer_weights(1, &all, 0).unwrap();
        assert!(reference.experts.iter().all(|x| x.down.dense().is_some() && x.gate.packed().is_some()));
        check_worlds(Family::Qwen3Moe, &w, LoadOptions::default(), &reference, &bytes);
    }
    // mxfp4 mode: uint32 words of E2M1 nibbles, uint8 E8M0 scales, no biases.
    for family in [Family::GptOss, Family::Mixtral] {
        let mx = MlxWrite { mxfp4: true, ..MlxWrite::affine(4, 32) };
        let w = write(family, DType::BF16, WriteEncoding::Mlx(mx), &format!("mxfp4-{family:?}"), (64, 64));
        let ckpt = Checkpoint::open(&w.dir).unwrap();
        assert_eq!(ckpt.found(1).unwrap().experts, Encoding::Mxfp4);
        let all = Placement::contiguous(8, 1).unwrap();
        let reference = ckpt.layer_weights(1, &all, 0).unwrap();
        let bytes: Vec<u64> = reference.experts.iter().map(|x| x.bytes() as u64).collect();
        check_worlds(family, &w, LoadOptions::default(), &reference, &bytes);
    }
}

#[test]
fn decoding_at_load_and_quantizing_at_load() {
    // decode: the same values, dense, in the scales' dtype (values rounded to it once).
    let w = write(Family::Mixtral, DType::BF16, WriteEncoding::Mlx(MlxWrite::affine(4, 64)), "decode", (64, 64));
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let decode = LoadOptions { decode: true, ..Default::default() };
    let dense = ckpt.experts_with(1, &[3], &decode).unwrap().remove(0);
    let packed = ckpt.experts(1, &[3]).unwrap().remove(0);
    assert_eq!(dense.gate.dense().unwrap(), &packed.gate.packed().unwrap().to_tensor(DType::BF16));
    // quantize: a dense bf16 checkpoint quantized at load gives exactly the bytes mlx-lm's
    // conversion of it has (the quantize-at-load round trip), and runs.
    let dense_ckpt = write(Family::Mixtral, DType::BF16, WriteEncoding::Dense, "dense", (64, 64));
    let q = LoadOptions { quantize: Some(Quantize::new(4, 64).unwrap()), ..Default::default() };
    let c = Checkpoint::open(&dense_ckpt.dir).unwrap();
    let ids: Vec<usize> = (0..8).collect();
    assert_eq!(
        c.experts_with(1, &ids, &q).unwrap(),
        ckpt.experts(1, &ids).unwrap(),
        "quantize at load = mlx-lm's bytes"
    );
    let all = Placement::contiguous(8, 1).unwrap();
    let reference = c.layer_weights_with(1, &all, 0, &q).unwrap();
    let bytes: Vec<u64> = dense_ckpt.weights.experts.iter().map(|x| x.bytes() as u64).collect();
    check_worlds(Family::Mixtral, &dense_ckpt, q, &reference, &bytes);
    assert!(Quantize::new(3, 64).is_err() && Quantize::new(4, 48).is_err());
}

#[test]
fn bad_mlx_checkpoints_are_errors() {
    let w = write(Family::Qwen3Moe, DType::BF16, WriteEncoding::Mlx(MlxWrite::affine(4, 32)), "bad", (64, 64));
    let mut c = w.config.clone();
    let write_config = |c: &serde_json::Value| std::fs::write(w.dir.join("config.json"), c.to_string()).unwrap();
    let open_err = || Checkpoint::open(&w.dir).and_then(|c| c.moe_config(1)).unwrap_err().to_string();
    c["quantization"]["mode"] = "nvfp4".into();
    write_config(&c);
    assert!(open_err().contains("nvfp4"), "{}", open_err());
    c["quantization"]["mode"] = "affine".into();
    c["quantization"]["model.layers.1.mlp.switch_mlp.gate_proj"] = false.into();
    write_config(&c);
    assert!(open_err().contains("is false but"), "{}", open_err());
    c["quantization"].as_object_mut().unwrap().remove("model.layers.1.mlp.switch_mlp.gate_proj");
    c["quantization"]["bits"] = 8.into();
    write_config(&c);
    assert!(open_err().contains("expected"), "8 bits against 4-bit words: {}", open_err());
    c.as_object_mut().unwrap().remove("quantization");
    c.as_object_mut().unwrap().remove("quantization_config");
    write_config(&c);
    assert!(open_err().contains("no quantization entry"), "{}", open_err());
}
