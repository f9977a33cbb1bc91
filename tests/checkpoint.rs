//! Checkpoints of every family in every layout it ships in, written here (small, random; some
//! sharded with an index), loaded per rank (each rank reading only its own experts, or its
//! experts' slices of fused tensors) and run at world sizes 1, 2 and 3 with uneven tokens (0
//! included) against the family's f64 reference (written from the family's transformers code,
//! with the hyper-parameters read from config.json); FP8 and MXFP4 releases decoded at load;
//! bad checkpoints give errors that name the tensor, the key or the file.

mod common;

use std::path::{Path, PathBuf};

use common::{TIMEOUT, assert_close, tolerance};
use moe_ep::model::checkpoint::{Encoding, Layout};
use moe_ep::testing::checkpoint_writer::{
    WriteEncoding, WriteOptions, family_moe, layer_tensors, layouts, write_checkpoint, write_checkpoint_with,
    write_safetensors,
};
use moe_ep::testing::reference::{dense_moe_full, family_moe_f64};
use moe_ep::{Checkpoint, DType, Family, Group, LayerWeights, LocalGroup, MoeConfig, MoeLayer, Placement, random};

/// A fresh directory under the target dir for one test.
fn dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err(r: moe_ep::Result<impl std::fmt::Debug>) -> String {
    r.expect_err("an error").to_string()
}

/// Token counts per rank: uneven, 0 included.
fn tokens(world: usize) -> Vec<usize> {
    [7usize, 0, 12][..world].to_vec()
}

struct Written {
    dir: PathBuf,
    cfg: MoeConfig,
    /// All experts.
    weights: LayerWeights,
    config: serde_json::Value,
    layer: usize,
}

/// Family `family`'s layer 1 (layer 0 dense where the family has dense layers) in `opts`.
fn fixture(family: Family, dtype: DType, opts: WriteOptions, name: &str, (d, f): (usize, usize)) -> Written {
    let d_ = dir(name);
    let cfg = family_moe(family, 8, d, f, 2).with_dtypes(dtype, dtype);
    let all = Placement::contiguous(cfg.num_experts, 1).unwrap();
    let weights = random::layer_weights(&cfg, 3, &all, 0);
    write_checkpoint_with(&d_, family, &cfg, 1, &weights, &opts).unwrap_or_else(|e| panic!("{family:?}: {e}"));
    let config = serde_json::from_str(&std::fs::read_to_string(d_.join("config.json")).unwrap()).unwrap();
    Written { dir: d_, cfg, weights, config, layer: 1 }
}

/// Rank `rank`'s layer output for its tokens, and what it read.
fn run_rank(w: &Written, g: LocalGroup, world: usize) -> moe_ep::Result<(moe_ep::Tensor, moe_ep::Tensor, u64, usize)> {
    let rank = g.rank();
    let ckpt = Checkpoint::open(&w.dir)?;
    let cfg = ckpt.moe_config(w.layer)?;
    let placement = Placement::balanced(cfg.num_experts, world)?;
    let mine = ckpt.layer_weights(w.layer, &placement, rank)?;
    let (read, held) = (ckpt.bytes_read(), mine.bytes());
    let x = random::input(&cfg, tokens(world)[rank], 11, rank);
    let layer = MoeLayer::from_weights(g, cfg, placement, mine, None, Default::default())?;
    let y = layer.forward(&x)?;
    Ok((x, y, read, held))
}

/// Load `w` on 1, 2 and 3 ranks and compare every rank with the family's reference, computed on
/// `reference_weights` (the written weights, or for quantized files the decoded ones).
fn check_world_sizes(family: Family, w: &Written, reference_weights: &LayerWeights, dense: bool) {
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let got = ckpt.moe_config(w.layer).unwrap();
    assert_eq!(got.clone().with_dtypes(DType::F32, DType::F32), w.cfg.clone().with_dtypes(DType::F32, DType::F32));
    assert_eq!(ckpt.family(), family);
    for world in [1, 2, 3] {
        let outs = LocalGroup::run(world, TIMEOUT, |g| run_rank(w, g, world)).unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            let (x, y, read, held) = o.unwrap().unwrap_or_else(|e| panic!("{family:?} world {world} rank {r}: {e}"));
            if dense {
                // Only the router, the bias, the shared expert and this rank's expert slices
                // were read (the fixtures store biases in f32, so bytes read = bytes held).
                assert_eq!(read as usize, held, "{family:?} world {world} rank {r}: bytes read");
            }
            let want = family_moe_f64(family, &w.config, &x, reference_weights);
            let tol = tolerance(got.act_dtype);
            assert_close(
                &y.to_f64_vec(),
                &want,
                tol,
                &format!("{family:?} {:?} world {world} rank {r}", got.weight_dtype),
            );
        }
    }
}

#[test]
fn every_family_in_every_layout_matches_its_reference_at_world_sizes_1_2_3() {
    for family in Family::ALL {
        for (i, layout) in layouts(family).into_iter().enumerate() {
            let dtype = [DType::BF16, DType::F32, DType::F16][(i + family as usize) % 3];
            let shards = 1 + (family as usize + i) % 3;
            let opts = WriteOptions { layout, shards, ..Default::default() };
            let w = fixture(family, dtype, opts, &format!("{family:?}-{layout}"), (32, 24));
            let found = Checkpoint::open(&w.dir).unwrap().found(1).unwrap();
            assert_eq!((found.layout, found.experts), (layout, Encoding::Dense(dtype)), "{family:?}");
            check_world_sizes(family, &w, &w.weights, true);
        }
    }
}

#[test]
fn llama4_checkpoint_reads_and_its_reference_scales_the_expert_input() {
    let w = fixture(
        Family::Llama4,
        DType::BF16,
        WriteOptions { layout: Layout::Fused, ..Default::default() },
        "llama4",
        (32, 24),
    );
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let cfg = ckpt.moe_config(1).unwrap();
    assert!(cfg.router.weights_on_input);
    let all = Placement::contiguous(8, 1).unwrap();
    let read = ckpt.layer_weights(1, &all, 0).unwrap();
    assert_eq!(read, w.weights, "every tensor reads back as written");
    let x = random::input(&cfg, 9, 4, 0);
    let want = family_moe_f64(Family::Llama4, &w.config, &x, &w.weights);
    let generic = dense_moe_full(&x, &read.router, None, &read.experts, read.shared.as_ref(), &cfg);
    assert_close(&generic.y, &want, 1e-12, "Llama 4: the RouterConfig reference against the family's");
    // The layer itself (expert inputs scaled by the routing weight) is checked against the
    // family's reference in `every_family_in_every_layout_matches_its_reference_at_world_sizes_1_2_3`.
    // Layers that are not MoE: interleave_moe_layer_step makes every other layer dense.
    let mut c = w.config.clone();
    c["text_config"]["interleave_moe_layer_step"] = 2.into();
    c["text_config"]["num_hidden_layers"] = 4.into();
    let e = err(moe_ep::model::families::parse_config(&c, 2));
    assert!(e.contains("layer 2 is not an MoE layer"), "{e}");
    assert!(moe_ep::model::families::parse_config(&c, 3).is_ok());
}

/// Expert weights decoded from a quantized checkpoint, compared with what was written within
/// the format's precision (relative to each row's largest value).
fn assert_near(got: &moe_ep::Tensor, want: &moe_ep::Tensor, rel: f64, what: &str) {
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    assert_eq!((got.rows(), got.cols()), (want.rows(), want.cols()), "{what}: shape");
    let m = w.iter().fold(0f64, |a, v| a.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= rel * m, "{what}: element {i}: {a} vs {b} (max {m})");
    }
}

fn check_quantized(family: Family, layout: Layout, enc: WriteEncoding, dims: (usize, usize), rel: f64) {
    let opts = WriteOptions { layout, encoding: enc, shards: 2 };
    let w = fixture(family, DType::BF16, opts, &format!("{family:?}-{layout}-{enc:?}"), dims);
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let found = ckpt.found(1).unwrap();
    assert_eq!(found.layout, layout);
    assert!(!matches!(found.experts, Encoding::Dense(_)), "{found}");
    assert_eq!(found.dtype, DType::BF16);
    let all = Placement::contiguous(8, 1).unwrap();
    let decode = moe_ep::LoadOptions { decode: true, ..Default::default() };
    let decoded = ckpt.layer_weights_with(1, &all, 0, &decode).unwrap();
    for (e, (a, b)) in decoded.experts.iter().zip(&w.weights.experts).enumerate() {
        for (x, y, p) in [(&a.gate, &b.gate, "gate"), (&a.up, &b.up, "up"), (&a.down, &b.down, "down")] {
            let what = format!("{family:?} {layout} {enc:?} expert {e} {p}");
            assert_near(x.dense().unwrap(), y.dense().unwrap(), rel, &what);
        }
        assert_eq!(a.bias, b.bias);
    }
    assert_eq!(decoded.router, w.weights.router);
    // By default the experts stay packed; the layer computes on them, checked against the
    // reference on the same packed bytes.
    let packed = ckpt.layer_weights(1, &all, 0).unwrap();
    assert!(packed.experts.iter().all(|x| x.is_packed()), "{family:?}: packed by default");
    check_world_sizes(family, &w, &packed, false);
}

#[test]
fn fp8_block_scaled_releases_decode_at_load_in_both_layouts() {
    // 16 x 16 blocks over D = 40, F = 24: partial blocks at both edges; the shared experts are
    // FP8 too, as in DeepSeek-V3's and Kimi-K2's releases.
    for family in [Family::DeepseekV3, Family::KimiK2, Family::MinimaxM2] {
        for layout in [Layout::PerExpert, Layout::Fused] {
            check_quantized(family, layout, WriteEncoding::Fp8 { block: (16, 16) }, (40, 24), 1.0 / 16.0);
        }
    }
}

#[test]
fn mxfp4_gpt_oss_release_decodes_at_load() {
    check_quantized(Family::GptOss, Layout::Fused, WriteEncoding::Mxfp4, (64, 32), 0.26);
}

#[test]
fn each_rank_reads_only_its_experts_slices_of_fused_tensors() {
    let opts = WriteOptions { layout: Layout::Fused, ..Default::default() };
    let w = fixture(Family::Qwen3Moe, DType::BF16, opts, "fused-slices", (32, 24));
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    let router = ckpt.router(1).unwrap().as_bytes().len() as u64;
    let one = ckpt.experts(1, &[5]).unwrap();
    assert_eq!(ckpt.bytes_read(), router + one[0].bytes() as u64, "the router and one expert's slices");
    assert_eq!(one[0], w.weights.experts[5]);
    assert!(ckpt.bytes_read() * 7 < ckpt.file_bytes(), "one of 8 experts");
    // The raw slices a packed path would take: gate and up come from one slab of the fused tensor.
    let p = ckpt.expert_projections(1, 5).unwrap();
    assert_eq!(p[0].data.as_ptr(), p[1].data.as_ptr());
    assert_eq!((p[0].out, p[0].inp, p[1].first, p[2].out), (24, 32, 24, 32));
}

#[test]
fn transformers5_and_hub_configs_map_to_the_rules() {
    use moe_ep::model::families::parse_config;
    use serde_json::json;
    let parse = |c: serde_json::Value, layer| parse_config(&c, layer);
    // Qwen3-MoE as transformers 5 writes it (num_local_experts) and as the Hub has it (num_experts).
    let (_, m) =
        parse(json!({"model_type": "qwen3_moe", "num_local_experts": 128, "num_hidden_layers": 48}), 3).unwrap();
    assert_eq!((m.num_experts, m.top_k, m.intermediate, m.hidden, m.norm_topk_prob), (128, 8, 768, 2048, false));
    let (_, m) = parse(json!({"model_type": "qwen3_moe", "num_experts": 64, "norm_topk_prob": true}), 0).unwrap();
    assert_eq!((m.num_experts, m.norm_topk_prob), (64, true));
    let e = err(parse(json!({"model_type": "qwen3_moe", "num_experts": 64, "num_local_experts": 32}), 0));
    assert!(e.contains("num_local_experts = 32") && e.contains("num_experts = 64"), "{e}");
    // DeepSeek-V3 without scoring_func / topk_method (transformers 5): sigmoid, noaux_tc, defaults.
    let (_, m) = parse(json!({"model_type": "deepseek_v3"}), 3).unwrap();
    assert_eq!(m.router, moe_ep::RouterConfig::deepseek_v3(8, 4, 2.5));
    assert_eq!((m.num_experts, m.top_k, m.intermediate, m.shared_expert.unwrap().intermediate), (256, 8, 2048, 2048));
    assert!(err(parse(json!({"model_type": "deepseek_v3"}), 2)).contains("layer 2 is not an MoE layer"));
    let e = err(parse(json!({"model_type": "deepseek_v3", "topk_method": "greedy"}), 3));
    assert!(e.contains("topk_method") && e.contains("greedy"), "{e}");
    // Kimi-K2's Hub config: one group, its scaling factor.
    let kimi = json!({"model_type": "kimi_k2", "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.827, "first_k_dense_replace": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}});
    let (f, m) = parse(kimi, 1).unwrap();
    assert_eq!((f, m.num_experts, m.router.n_group, m.router.routed_scaling_factor), (Family::KimiK2, 384, 1, 2.827));
    // DeepSeek-V2: n_shared_experts defaults to 2; norm_topk_prob true cannot be honoured.
    let (_, m) = parse(json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6}), 0).unwrap();
    assert_eq!((m.shared_expert.unwrap().intermediate, m.norm_topk_prob), (2 * 1407, false));
    assert!(
        err(parse(json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "norm_topk_prob": true}), 0))
            .contains("norm_topk_prob")
    );
    assert!(
        err(parse(json!({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "moe_layer_freq": 2}), 0))
            .contains("moe_layer_freq")
    );
    // gpt-oss: the clamped SwiGLU's constants, router bias, expert biases.
    let (_, m) = parse(json!({"model_type": "gpt_oss", "num_local_experts": 32, "swiglu_limit": 7.0}), 0).unwrap();
    assert_eq!(m.activation, moe_ep::Activation::ClampedSwiglu { alpha: 1.702, limit: 7.0 });
    assert!(m.expert_bias && m.router.logit_bias && m.top_k == 4 && m.intermediate == 2880);
    // GLM-4.5: DeepSeek-V3's rules with GLM's defaults.
    let (_, m) = parse(json!({"model_type": "glm4_moe", "n_group": 1, "topk_group": 1}), 1).unwrap();
    assert_eq!(
        (m.num_experts, m.router.n_group, m.router.routed_scaling_factor, m.norm_topk_prob),
        (128, 1, 1.0, true)
    );
    assert!(err(parse(json!({"model_type": "glm4_moe"}), 0)).contains("first_k_dense_replace = 1"));
    // ERNIE-4.5: moe_k, moe_num_experts, 2 shared experts by default, layer range.
    let ernie = json!({"model_type": "ernie4_5_moe", "moe_num_experts": 64, "moe_k": 6, "num_hidden_layers": 28,
        "moe_layer_start_index": 1, "moe_layer_end_index": 27});
    let (_, m) = parse(ernie.clone(), 1).unwrap();
    assert_eq!((m.top_k, m.shared_expert.unwrap().intermediate, m.router.norm_min), (6, 2 * 1536, 1e-12));
    assert!(err(parse(ernie, 0)).contains("moe_layer_start_index"));
    // DBRX: ffn_config, d_model; a null normalisation exponent means none.
    let dbrx = json!({"model_type": "dbrx", "d_model": 6144, "n_layers": 40, "ffn_config":
        {"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 10752, "moe_normalize_expert_weights": 1}});
    let (_, m) = parse(dbrx, 39).unwrap();
    assert_eq!((m.num_experts, m.top_k, m.hidden, m.intermediate, m.router.norm_p), (16, 4, 6144, 10752, 1.0));
    let (_, m) = parse(json!({"model_type": "dbrx", "ffn_config": {"moe_normalize_expert_weights": null}}), 0).unwrap();
    assert!(!m.norm_topk_prob);
    // Qwen3-Next's defaults differ from Qwen2-MoE's; Qwen3.5's keys sit in text_config.
    let (_, m) = parse(json!({"model_type": "qwen3_next"}), 0).unwrap();
    assert_eq!((m.num_experts, m.top_k, m.norm_topk_prob, m.shared_expert.unwrap().gated), (512, 10, true, true));
    let (f, m) = parse(json!({"model_type": "qwen3_5_moe", "text_config": {"num_experts": 256}}), 39).unwrap();
    assert_eq!((f, m.num_experts, m.norm_topk_prob), (Family::Qwen35Moe, 256, true));
    let e = err(parse(json!({"model_type": "qwen2_moe", "mlp_only_layers": [0, 3], "num_hidden_layers": 4}), 3));
    assert!(e.contains("layer 3 is not an MoE layer") && e.contains("mlp_only_layers"), "{e}");
    assert!(
        err(parse(json!({"model_type": "qwen2_moe", "decoder_sparse_step": 2}), 0)).contains("decoder_sparse_step")
    );
    // Llama 4's Maverick interleaves dense and MoE layers.
    let mav =
        json!({"model_type": "llama4", "text_config": {"num_local_experts": 128, "interleave_moe_layer_step": 2}});
    assert!(parse(mav.clone(), 1).is_ok() && err(parse(mav, 0)).contains("layer 0 is not an MoE layer"));
    // Values the library cannot honour, and unknown families, are errors naming them.
    assert!(err(parse(json!({"model_type": "mixtral", "hidden_act": "gelu"}), 0)).contains("hidden_act"));
    assert!(err(parse(json!({"model_type": "minimax_m2", "scoring_func": "softmax"}), 0)).contains("scoring_func"));
    assert!(err(parse(json!({"model_type": "olmoe", "num_experts": "8"}), 0)).contains("num_experts"));
    let e = err(parse(json!({"model_type": "qwen3_moe", "num_experts_per_tok": 20}), 0));
    assert!(e.contains("top_k = 20") && e.contains("k = num_experts_per_tok"), "{e}");
    let e = err(parse(json!({"model_type": "gpt_oss", "swiglu_limit": -1.0}), 0));
    assert!(e.contains("limit = swiglu_limit"), "{e}");
    let e = err(parse(json!({"model_type": "deepseek_v3", "n_group": 3}), 3));
    assert!(e.contains("n_group = 3") && e.contains("groups = n_group"), "{e}");
    let e = err(parse(json!({"model_type": "llama"}), 0));
    assert!(e.contains("llama") && e.contains("gpt_oss") && e.contains("dbrx"), "{e}");
}

#[test]
fn bad_checkpoints_name_the_tensor_the_key_and_the_file() {
    let w = fixture(Family::Qwen3Moe, DType::BF16, WriteOptions::default(), "bad-qwen3", (24, 40));
    let file = w.dir.join("model.safetensors");
    let ckpt = Checkpoint::open(&w.dir).unwrap();
    // A dense layer, an expert out of range, a layer past the model.
    assert!(err(ckpt.moe_config(0)).contains("layer 0 is not an MoE layer"));
    assert!(err(ckpt.experts(1, &[8])).contains("expert 8"));
    assert!(err(ckpt.moe_config(5)).contains("layer 5 of a model with 2 layers"));

    // A missing tensor.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    tensors.retain(|(n, _)| !n.ends_with("experts.4.up_proj.weight"));
    write_safetensors(&file, &tensors).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("model.layers.1.mlp.experts.4.up_proj.weight") && e.contains("model.safetensors"), "{e}");

    // A wrong shape.
    let mut tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    tensors[4].1 = random::uniform(DType::BF16, 7, 24, 1.0, 1, 1);
    let bad = tensors[4].0.clone();
    write_safetensors(&file, &tensors).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().experts(1, &[0, 1]));
    assert!(e.contains(&bad) && e.contains("[7, 24]") && e.contains("hidden_size"), "{e}");

    // An unsupported dtype (an expert in I32) lists what is supported.
    let tensors = layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap();
    let ints = vec![0u8; 40 * 24 * 4];
    let mut views = Vec::new();
    for (n, t) in &tensors {
        let v = if n.ends_with("experts.0.gate_proj.weight") {
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![40, 24], &ints).unwrap()
        } else {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![t.rows(), t.cols()], t.as_bytes())
                .unwrap()
        };
        views.push((n.clone(), v));
    }
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(
        e.contains("I32") && e.contains("experts.0.gate_proj.weight") && e.contains("F8_E4M3") && e.contains("MXFP4"),
        "{e}"
    );

    // A truncated file.
    write_safetensors(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap()).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    // Keys: a default hidden size that the tensors contradict names the key; a mistyped key.
    write_safetensors(&file, &layer_tensors(Family::Qwen3Moe, 1, &w.weights).unwrap()).unwrap();
    std::fs::write(
        w.dir.join("config.json"),
        r#"{"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8}"#,
    )
    .unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("hidden_size") && e.contains("D = 2048"), "{e}");
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "qwen3_moe", "num_experts_per_tok": -2}"#).unwrap();
    assert!(err(Checkpoint::open(&w.dir).unwrap().moe_config(1)).contains("num_experts_per_tok = -2"));
    std::fs::write(w.dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = err(Checkpoint::open(&w.dir));
    assert!(e.contains("llama") && e.contains("config.json") && e.contains("qwen3_moe"), "{e}");
    // An unsupported quantization method.
    let mut c: serde_json::Value = w.config.clone();
    c["quantization_config"] = serde_json::json!({"quant_method": "gptq"});
    std::fs::write(w.dir.join("config.json"), c.to_string()).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("quant_method") && e.contains("gptq") && e.contains("fp8"), "{e}");
}

#[test]
fn counts_are_checked_against_the_tensors_before_any_allocation() {
    let w = fixture(Family::Mixtral, DType::BF16, WriteOptions::default(), "huge-counts", (32, 24));
    for (key, v) in [
        ("num_local_experts", serde_json::json!(3_000_000_000u64)),
        ("intermediate_size", serde_json::json!(u64::MAX / 2)),
    ] {
        let mut c = w.config.clone();
        c[key] = v;
        std::fs::write(w.dir.join("config.json"), c.to_string()).unwrap();
        let ckpt = Checkpoint::open(&w.dir).unwrap();
        let e = err(ckpt.moe_config(1));
        assert!(e.contains("more values than the files") && e.contains(key_value(&c, key)), "{key}: {e}");
        assert!(err(ckpt.layer_weights(1, &Placement::contiguous(8, 1).unwrap(), 0)).contains("more values"));
    }
    // Counts the files could hold but the tensors contradict: named with the tensor's shape.
    let mut c = w.config.clone();
    c["num_local_experts"] = serde_json::json!(9);
    std::fs::write(w.dir.join("config.json"), c.to_string()).unwrap();
    let e = err(Checkpoint::open(&w.dir).unwrap().moe_config(1));
    assert!(e.contains("[8, 32]") && e.contains("expected [9, 32]") && e.contains("E = 9"), "{e}");
    let mut c = w.config.clone();
    c["num_local_experts"] = serde_json::json!(u64::MAX);
    c["num_experts_per_tok"] = serde_json::json!(1);
    std::fs::write(w.dir.join("config.json"), c.to_string()).unwrap();
    assert!(Checkpoint::open(&w.dir).unwrap().moe_config(1).is_err());
}

fn key_value(c: &serde_json::Value, key: &str) -> &'static str {
    match (key, c[key].as_u64()) {
        ("num_local_experts", _) => "E = 3000000000",
        _ => "F = 9223372036854775807",
    }
}

#[test]
fn only_regular_files_inside_the_directory_are_opened() {
    let w = fixture(Family::Mixtral, DType::BF16, WriteOptions { shards: 2, ..Default::default() }, "escape", (32, 24));
    let index_path = w.dir.join("model.safetensors.index.json");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let outside = w.dir.parent().unwrap().join("outside.safetensors");
    std::fs::copy(w.dir.join("model-00001-of-00002.safetensors"), &outside).unwrap();
    for bad in ["../outside.safetensors", outside.to_str().unwrap(), "", "sub/../../outside.safetensors"] {
        let mut i = index.clone();
        let first = i["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
        i["weight_map"][&first] = bad.into();
        std::fs::write(&index_path, i.to_string()).unwrap();
        let e = err(Checkpoint::open(&w.dir));
        assert!(e.contains("not a file name inside the checkpoint directory"), "{bad:?}: {e}");
    }
    std::fs::write(&index_path, index.to_string()).unwrap();
    // A shard that is a directory, then a FIFO: refused at once (a FIFO's open would block).
    let shard = w.dir.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    assert!(err(Checkpoint::open(&w.dir)).contains("not a regular file"));
    std::fs::remove_dir(&shard).unwrap();
    #[cfg(unix)]
    {
        let c = std::ffi::CString::new(shard.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let d = w.dir.clone();
        std::thread::spawn(move || tx.send(Checkpoint::open(&d).map(|_| ()).map_err(|e| e.to_string())));
        let r = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("opening a FIFO shard must not block");
        assert!(r.unwrap_err().contains("not a regular file"));
        std::fs::remove_file(&shard).unwrap();
    }
}

#[cfg(unix)]
unsafe extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}

#[test]
fn checkpoints_written_by_the_old_entry_point_still_read() {
    // write_checkpoint: the family's first layout, dense, sharded with an index.
    let d = dir("old-entry");
    let cfg = family_moe(Family::DeepseekV2, 8, 24, 16, 2);
    let all = Placement::contiguous(8, 1).unwrap();
    let w = random::layer_weights(&cfg, 1, &all, 0);
    write_checkpoint(&d, Family::DeepseekV2, &cfg, 1, &w, 3).unwrap();
    let ckpt = Checkpoint::open(&d).unwrap();
    assert_eq!(ckpt.layer_weights(1, &all, 0).unwrap(), w);
    // A family that cannot express a config is refused when writing.
    let e = err(write_checkpoint(&dir("mixtral-shared"), Family::Mixtral, &cfg, 1, &w, 1));
    assert!(e.contains("Mixtral cannot express"), "{e}");
}

#[test]
fn an_f32_router_beside_bf16_experts_stays_f32() {
    // transformers 5 keeps DeepSeek-V3's, GLM's and ERNIE's `gate.weight` in f32
    // (`_keep_in_fp32_modules_strict`) and saves it so: the experts stay bf16.
    for family in [Family::DeepseekV3, Family::Glm4Moe, Family::Ernie45Moe] {
        let w = fixture(family, DType::BF16, WriteOptions::default(), &format!("f32-router-{family:?}"), (32, 24));
        let mut tensors = layer_tensors(family, 1, &w.weights).unwrap();
        tensors[0].1 = tensors[0].1.to_dtype(DType::F32);
        write_safetensors(&w.dir.join("model.safetensors"), &tensors).unwrap();
        let ckpt = Checkpoint::open(&w.dir).unwrap();
        assert_eq!(ckpt.moe_config(1).unwrap().weight_dtype, DType::BF16);
        assert_eq!(ckpt.router(1).unwrap().dtype(), DType::F32);
        check_world_sizes(family, &w, &w.weights, false);
    }
}
