//! Checkpoints written here with the safetensors crate (small, random, one per family this
//! library reads, one of them sharded with an index), loaded per rank (each rank only its own
//! experts) and run at several world sizes against the f64 dense reference; bad checkpoints
//! give errors that name the tensor and the file.

mod common;

use std::path::{Path, PathBuf};

use common::{TIMEOUT, assert_close, tolerance};
use moe_ep::checkpoint::write::{layer_tensors, write_checkpoint, write_safetensors};
use moe_ep::reference::dense_moe;
use moe_ep::{
    Checkpoint, DType, ExpertWeights, Family, Group, LocalGroup, MoeConfig, MoeLayer, Placement, Tensor, random,
};
use safetensors::tensor::TensorView;

/// A fresh directory under the target dir for one test.
fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, tensors: &[(String, Tensor)]) {
    write_safetensors(path, tensors).unwrap();
}

struct Written {
    dir: PathBuf,
    cfg: MoeConfig,
    gate: Tensor,
    experts: Vec<ExpertWeights>,
    layer: usize,
}

/// A 2-layer checkpoint whose layer 1 is MoE: Mixtral sharded over two files with an index,
/// Qwen3-MoE in one file with layer 0 dense (`mlp_only_layers`).
fn fixture(family: Family, dtype: DType, name: &str) -> Written {
    let d = dir(name);
    let (e, hidden, inter, k) = (6, 24, 40, 2);
    let cfg =
        MoeConfig::new(e, hidden, inter, k).with_dtypes(dtype, dtype).with_norm_topk_prob(family == Family::Mixtral);
    let gate = random::gate(&cfg, 3);
    let experts = random::experts(&cfg, 3, &(0..e).collect::<Vec<_>>());
    let layer = 1;
    // Mixtral sharded over two files with an index; Qwen3-MoE in one, layer 0 dense.
    let shards = if family == Family::Mixtral { 2 } else { 1 };
    write_checkpoint(&d, family, &cfg, layer, &gate, &experts, shards).unwrap();
    Written { dir: d, cfg, gate, experts, layer }
}

fn run_family(family: Family, dtype: DType, name: &str) {
    let w = fixture(family, dtype, name);
    for world in [1, 2, 3] {
        let tokens = [9usize, 0, 14];
        let outs = LocalGroup::run(world, TIMEOUT, |g| {
            let rank = g.rank();
            let ckpt = Checkpoint::open(&w.dir)?;
            assert_eq!(ckpt.family(), family);
            let cfg = ckpt.moe_config(w.layer)?;
            let placement = Placement::contiguous(cfg.num_experts, world)?;
            let mine = ckpt.experts(w.layer, placement.experts_of(rank))?;
            let gate = ckpt.router(w.layer)?;
            // Only the router and this rank's experts were read.
            let per_expert = 3 * cfg.hidden * cfg.intermediate * dtype.size();
            let want_read = cfg.num_experts * cfg.hidden * dtype.size() + mine.len() * per_expert;
            assert_eq!(ckpt.bytes_read() as usize, want_read, "rank {rank}");
            let layer = MoeLayer::new(g, cfg.clone(), placement, gate, mine)?;
            let x = random::input(&cfg, tokens[rank], 11, rank);
            let y = layer.forward(&x)?;
            Ok::<_, moe_ep::Error>((cfg, x, y))
        })
        .unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            let (cfg, x, y) = o.unwrap().unwrap_or_else(|e| panic!("{family:?} world {world} rank {r}: {e}"));
            assert_eq!(cfg, w.cfg, "{family:?}: config read from the checkpoint");
            let want = dense_moe(&x, &w.gate, &w.experts, &w.cfg);
            assert_close(&y.to_f64_vec(), &want.y, tolerance(dtype), &format!("{family:?} world {world} rank {r}"));
        }
    }
}

#[test]
fn mixtral_sharded_checkpoint_matches_the_reference_at_every_world_size() {
    run_family(Family::Mixtral, DType::BF16, "mixtral");
}

#[test]
fn qwen3_moe_checkpoint_matches_the_reference_at_every_world_size() {
    run_family(Family::Qwen3Moe, DType::F32, "qwen3");
}

fn err(r: moe_ep::Result<impl std::fmt::Debug>) -> String {
    r.expect_err("an error").to_string()
}

#[test]
fn bad_checkpoints_name_the_tensor_and_the_file() {
    let w = fixture(Family::Qwen3Moe, DType::BF16, "bad-qwen3");
    let file = w.dir.join("model.safetensors");
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    // A dense layer, an expert out of range, a layer past the model.
    assert!(err(ckpt.moe_config(0)).contains("dense MLP layer"));
    assert!(err(ckpt.experts(1, &[6])).contains("expert 6"));
    assert!(err(ckpt.moe_config(5)).contains("layer 5 of a model with 2 layers"));

    // A missing tensor.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.gate, &w.experts);
    tensors.retain(|(n, _)| !n.ends_with("experts.4.up_proj.weight"));
    write(&file, &tensors);
    let e = err(Checkpoint::open(&w.dir).unwrap().experts(1, &[4]));
    assert!(e.contains("model.layers.1.mlp.experts.4.up_proj.weight") && e.contains("model.safetensors"), "{e}");

    // A wrong shape.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.gate, &w.experts);
    tensors[4].1 = random::uniform(DType::BF16, 7, 24, 1.0, 1, 1);
    let bad = tensors[4].0.clone();
    write(&file, &tensors);
    let e = err(Checkpoint::open(&w.dir).unwrap().experts(1, &[0, 1]));
    assert!(e.contains(&bad) && e.contains("[7, 24]") && e.contains("model.safetensors"), "{e}");

    // An unsupported dtype (the router in I32).
    let tensors = layer_tensors(Family::Qwen3Moe, 1, &w.gate, &w.experts);
    let ints = vec![0u8; 6 * 24 * 4];
    let mut views: Vec<(String, TensorView<'_>)> =
        vec![(tensors[0].0.clone(), TensorView::new(safetensors::Dtype::I32, vec![6, 24], &ints).unwrap())];
    for (n, t) in &tensors[1..] {
        views.push((
            n.clone(),
            TensorView::new(safetensors::Dtype::BF16, vec![t.rows(), t.cols()], t.as_bytes()).unwrap(),
        ));
    }
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("I32") && e.contains("model.layers.1.mlp.gate.weight"), "{e}");

    // A truncated file.
    write(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.gate, &w.experts));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    // Families not supported yet say so.
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "deepseek_v3", "num_hidden_layers": 2}"#).unwrap();
    write(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.gate, &w.experts));
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("not supported yet"), "{e}");
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("llama") && e.contains("config.json"), "{e}");
}
