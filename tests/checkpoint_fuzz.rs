//! The checkpoint parser fuzzed in CI: a corpus of valid checkpoints of every family (both
//! layouts, FP8 and MXFP4 included), mutated by proptest in their `config.json` values, their
//! safetensors bytes (header and data) and their index, each case run through
//! `moe_ep::testing::checkpoint_fuzz::exercise` (no panic, no allocation the files do not back,
//! consistent results). `fuzz/` holds a cargo-fuzz target over the same entry point for longer
//! runs.

use std::path::Path;
use std::sync::OnceLock;

use moe_ep::model::checkpoint::Layout;
use moe_ep::testing::checkpoint_fuzz::exercise;
use moe_ep::testing::checkpoint_writer::{WriteEncoding, WriteOptions, family_moe, layouts, write_checkpoint_with};
use moe_ep::{DType, Family, Placement, random};
use proptest::prelude::*;

/// One valid checkpoint in memory: config, index (when sharded), files.
#[derive(Debug, Clone)]
struct Seed {
    config: serde_json::Value,
    index: Option<Vec<u8>>,
    files: Vec<(String, Vec<u8>)>,
}

fn read_dir(d: &Path) -> Seed {
    let config = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    let index = std::fs::read(d.join("model.safetensors.index.json")).ok();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    Seed { config, index, files }
}

/// Every family in every layout, some sharded, plus the quantized releases.
fn corpus() -> &'static [Seed] {
    static C: OnceLock<Vec<Seed>> = OnceLock::new();
    C.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-corpus");
        let mut v = Vec::new();
        let mut write = |family: Family, opts: WriteOptions, (d, f): (usize, usize), i: usize| {
            let dir = root.join(format!("{i}"));
            let _ = std::fs::remove_dir_all(&dir);
            let cfg = family_moe(family, 4, d, f, 2).with_dtypes(DType::BF16, DType::BF16);
            let w = random::layer_weights(&cfg, 1, &Placement::contiguous(4, 1).unwrap(), 0);
            write_checkpoint_with(&dir, family, &cfg, 1, &w, &opts).unwrap();
            v.push(read_dir(&dir));
        };
        let mut i = 0;
        for family in Family::ALL {
            for layout in layouts(family) {
                write(family, WriteOptions { layout, shards: 1 + i % 2, ..Default::default() }, (8, 8), i);
                i += 1;
            }
        }
        write(
            Family::DeepseekV3,
            WriteOptions { encoding: WriteEncoding::Fp8 { block: (4, 4) }, ..Default::default() },
            (8, 6),
            i,
        );
        let mx = WriteOptions { layout: Layout::Fused, encoding: WriteEncoding::Mxfp4, shards: 1 };
        write(Family::GptOss, mx, (32, 32), i + 1);
        v
    })
}

fn run(seed: &Seed) {
    let config = serde_json::to_vec(&seed.config).unwrap();
    exercise(&config, seed.index.as_deref(), seed.files.clone(), 3, 2);
}

/// A JSON value of any kind, including the ones a count must refuse.
fn any_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        (0u64..10).prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        "[a-z_]{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([0, 1, 5])),
        Just(serde_json::json!({"name": "gelu", "quant_method": "fp8", "weight_block_size": [0, 7]})),
    ]
}

/// Keys the families read, and some they do not.
const KEYS: &[&str] = &[
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "intermediate_size",
    "shared_expert_intermediate_size",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
    "first_k_dense_replace",
    "topk_method",
    "scoring_func",
    "mlp_only_layers",
    "decoder_sparse_step",
    "moe_layer_freq",
    "swiglu_limit",
    "swiglu_alpha",
    "moe_k",
    "moe_num_experts",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "moe_norm_min",
    "interleave_moe_layer_step",
    "moe_layers",
    "text_config",
    "ffn_config",
    "d_model",
    "quantization_config",
    "hidden_act",
];

proptest! {
    // 256 cases a property by default (PROPTEST_CASES raises it for a longer run).
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_values_of_any_kind(s in 0usize..64, edits in prop::collection::vec((0..KEYS.len(), any_value(), any::<bool>()), 1..6)) {
        let mut seed = corpus()[s % corpus().len()].clone();
        for (k, v, nested) in edits {
            let target = match (&mut seed.config, nested) {
                (c, true) if c.get("text_config").is_some() => &mut c["text_config"],
                (c, true) if c.get("ffn_config").is_some() => &mut c["ffn_config"],
                (c, _) => c,
            };
            if let Some(o) = target.as_object_mut() {
                if v.is_null() && k % 3 == 0 { o.remove(KEYS[k]); } else { o.insert(KEYS[k].to_string(), v); }
            }
        }
        run(&seed);
    }

    #[test]
    fn safetensors_bytes_mutated(s in 0usize..64, file in 0usize..4, edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in prop::option::of(any::<prop::sample::Index>())) {
        let mut seed = corpus()[s % corpus().len()].clone();
        let n = seed.files.len();
        let bytes = &mut seed.files[file % n].1;
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, b) in edits {
            // Mostly in the header (length, JSON), sometimes in the data.
            let i = if at.index(4) < 3 { at.index(header.min(bytes.len())) } else { at.index(bytes.len()) };
            bytes[i] = b;
        }
        if let Some(c) = cut { bytes.truncate(c.index(bytes.len() + 1)); }
        run(&seed);
    }

    #[test]
    fn header_json_replaced(s in 0usize..64, json in "[{}\\[\\]\":,a-zA-Z0-9_ .\\-]{0,200}", shape in prop::collection::vec(any::<u64>(), 0..4)) {
        let mut seed = corpus()[s % corpus().len()].clone();
        let text = if json.len() % 2 == 0 {
            json
        } else {
            // A well-formed header whose tensor has an arbitrary shape.
            serde_json::json!({"model.layers.1.mlp.gate.weight": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 64]}}).to_string()
        };
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text.as_bytes());
        bytes.extend([0u8; 64]);
        let n = seed.files.len();
        seed.files[s % n].1 = bytes;
        run(&seed);
    }

    #[test]
    fn index_entries_of_any_kind(s in 0usize..64, name in "[a-z0-9_.]{0,40}", file in prop_oneof![Just("../x.safetensors".to_string()), Just("/etc/passwd".to_string()), Just(String::new()), "[a-z0-9./\\-]{0,30}"]) {
        let mut seed = corpus()[s % corpus().len()].clone();
        let mut index: serde_json::Value = match &seed.index {
            Some(i) => serde_json::from_slice(i).unwrap(),
            None => serde_json::json!({"weight_map": {}}),
        };
        index["weight_map"][name] = file.into();
        seed.index = Some(serde_json::to_vec(&index).unwrap());
        run(&seed);
    }
}

#[test]
fn the_corpus_itself_reads() {
    for seed in corpus() {
        run(seed);
        let config = serde_json::to_vec(&seed.config).unwrap();
        let c = moe_ep::Checkpoint::from_memory(&config, seed.index.as_deref(), seed.files.clone()).unwrap();
        assert!(c.moe_config(1).is_ok(), "{:?}", seed.config);
    }
}
