//! Checkpoints written here with the safetensors crate (small, random, one per family this
//! library reads, one of them sharded with an index), loaded per rank (each rank only its own
//! experts) and run at several world sizes against the f64 dense reference; bad checkpoints
//! give errors that name the tensor and the file.

mod common;

use std::path::{Path, PathBuf};

use common::{TIMEOUT, assert_close, tolerance};
use moe_ep::testing::checkpoint_writer::{layer_tensors, write_checkpoint, write_safetensors};
use moe_ep::testing::reference::dense_moe_full;
use moe_ep::{
    Checkpoint, DType, Family, Group, LayerWeights, LocalGroup, MoeConfig, MoeLayer, Placement, RouterConfig, Tensor,
    random,
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
    /// All experts (not one rank's).
    weights: LayerWeights,
    layer: usize,
}

/// Each family's layer as a small config: the family's routing rules and shared expert.
fn family_cfg(family: Family, dtype: DType) -> MoeConfig {
    let (e, hidden, inter, k) = (8, 24, 40, 2);
    let base = MoeConfig::new(e, hidden, inter, k).with_dtypes(dtype, dtype);
    match family {
        Family::Mixtral => base,
        Family::Qwen3Moe => base.with_norm_topk_prob(false),
        Family::Qwen2Moe => base.with_norm_topk_prob(false).with_shared_expert(56, true),
        Family::DeepseekV2 => base
            .with_norm_topk_prob(false)
            .with_shared_expert(2 * inter, false)
            .with_router(RouterConfig { n_group: 4, topk_group: 2, routed_scaling_factor: 16.0, ..Default::default() }),
        Family::DeepseekV3 => base.with_shared_expert(inter, false).with_router(RouterConfig::deepseek_v3(4, 2, 2.5)),
    }
}

/// A 2-layer checkpoint whose layer 1 is MoE (layer 0 dense by the family's keys); Mixtral and
/// DeepSeek-V3 sharded over files with an index, the others in one file.
fn fixture(family: Family, dtype: DType, name: &str) -> Written {
    let d = dir(name);
    let cfg = family_cfg(family, dtype);
    let all = Placement::contiguous(cfg.num_experts, 1).unwrap();
    let weights = random::layer_weights(&cfg, 3, &all, 0);
    let layer = 1;
    let shards = match family {
        Family::Mixtral => 2,
        Family::DeepseekV3 => 3,
        _ => 1,
    };
    write_checkpoint(&d, family, &cfg, layer, &weights, shards).unwrap();
    Written { dir: d, cfg, weights, layer }
}

fn run_family(family: Family, dtype: DType, name: &str) {
    let w = fixture(family, dtype, name);
    for world in [1, 2, 4] {
        let tokens = [9usize, 0, 14, 5];
        let outs = LocalGroup::run(world, TIMEOUT, |g| {
            let rank = g.rank();
            let ckpt = Checkpoint::open(&w.dir)?;
            assert_eq!(ckpt.family(), family);
            let cfg = ckpt.moe_config(w.layer)?;
            let placement = Placement::contiguous(cfg.num_experts, world)?;
            let mine = ckpt.layer_weights(w.layer, &placement, rank)?;
            // Only the router, the bias, the shared expert and this rank's experts were read.
            // (The fixtures store the bias in f32, so its bytes read equal the bytes held.)
            let want_read = mine.bytes();
            assert_eq!(ckpt.bytes_read() as usize, want_read, "rank {rank}");
            assert!(want_read < ckpt.file_bytes() as usize || world == 1);
            let layer = MoeLayer::from_weights(g, cfg.clone(), placement, mine, None, Default::default())?;
            let x = random::input(&cfg, tokens[rank], 11, rank);
            let y = layer.forward(&x)?;
            Ok::<_, moe_ep::Error>((cfg, x, y))
        })
        .unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            let (cfg, x, y) = o.unwrap().unwrap_or_else(|e| panic!("{family:?} world {world} rank {r}: {e}"));
            assert_eq!(cfg, w.cfg, "{family:?}: config read from the checkpoint");
            let ww = &w.weights;
            let want =
                dense_moe_full(&x, &ww.router, ww.selection_bias.as_deref(), &ww.experts, ww.shared.as_ref(), &w.cfg);
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

#[test]
fn qwen2_moe_checkpoint_with_gated_shared_expert_matches_the_reference() {
    run_family(Family::Qwen2Moe, DType::BF16, "qwen2");
}

#[test]
fn deepseek_v2_checkpoint_matches_the_reference_at_every_world_size() {
    run_family(Family::DeepseekV2, DType::F16, "deepseek-v2");
}

#[test]
fn deepseek_v3_sharded_checkpoint_matches_the_reference_at_every_world_size() {
    run_family(Family::DeepseekV3, DType::BF16, "deepseek-v3");
}

#[test]
fn deepseek_config_keys_map_to_the_routing_rules() {
    // DeepSeek-V3's published config (scaled down): the keys this library reads.
    let d = dir("deepseek-v3-keys");
    let cfg = family_cfg(Family::DeepseekV3, DType::BF16);
    let all = Placement::contiguous(cfg.num_experts, 1).unwrap();
    write_checkpoint(&d, Family::DeepseekV3, &cfg, 1, &random::layer_weights(&cfg, 1, &all, 0), 1).unwrap();
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    for key in [
        r#""topk_method":"noaux_tc""#,
        r#""scoring_func":"sigmoid""#,
        r#""n_group":4"#,
        r#""topk_group":2"#,
        r#""routed_scaling_factor":2.5"#,
        r#""n_shared_experts":1"#,
        r#""first_k_dense_replace":1"#,
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
    // A routing this library does not implement is refused by name.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["topk_method"] = "greedy".into();
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let e = err(Checkpoint::open(&d).unwrap().moe_config(1));
    assert!(e.contains("greedy") && e.contains("config.json"), "{e}");
    // The dense layer before it is not an MoE layer.
    assert!(err(Checkpoint::open(&d).unwrap().moe_config(0)).contains("dense MLP layer"));
    // A family that cannot express a config is refused when writing.
    let e =
        write_checkpoint(&dir("mixtral-shared"), Family::Mixtral, &cfg, 1, &random::layer_weights(&cfg, 1, &all, 0), 1);
    assert!(err(e).contains("Mixtral cannot express"));
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
    assert!(err(ckpt.experts(1, &[8])).contains("expert 8"));
    assert!(err(ckpt.moe_config(5)).contains("layer 5 of a model with 2 layers"));

    // A missing tensor.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    tensors.retain(|(n, _)| !n.ends_with("experts.4.up_proj.weight"));
    write(&file, &tensors);
    let e = err(Checkpoint::open(&w.dir).unwrap().experts(1, &[4]));
    assert!(e.contains("model.layers.1.mlp.experts.4.up_proj.weight") && e.contains("model.safetensors"), "{e}");

    // A wrong shape.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    tensors[4].1 = random::uniform(DType::BF16, 7, 24, 1.0, 1, 1);
    let bad = tensors[4].0.clone();
    write(&file, &tensors);
    let e = err(Checkpoint::open(&w.dir).unwrap().experts(1, &[0, 1]));
    assert!(e.contains(&bad) && e.contains("[7, 24]") && e.contains("model.safetensors"), "{e}");

    // An unsupported dtype (the router in I32).
    let tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    let ints = vec![0u8; 8 * 24 * 4];
    let mut views: Vec<(String, TensorView<'_>)> =
        vec![(tensors[0].0.clone(), TensorView::new(safetensors::Dtype::I32, vec![8, 24], &ints).unwrap())];
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
    write(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap());
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    // A config missing a key the family needs names it.
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "deepseek_v3", "num_hidden_layers": 2}"#).unwrap();
    write(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap());
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("hidden_size") && e.contains("config.json"), "{e}");
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("llama") && e.contains("config.json"), "{e}");
}
