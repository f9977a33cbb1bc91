//! moe-run on a small Mixtral checkpoint written here (sharded, with an index): every rank
//! reads only its share, the layer runs, the stage table prints; a dense layer is refused.

#[cfg(feature = "mpi")]
mod common;

use std::process::Command;

use moe_ep::model::checkpoint::Layout;
use moe_ep::testing::checkpoint_writer::{
    WriteEncoding, WriteOptions, family_moe, layouts, write_checkpoint, write_checkpoint_with,
};
use moe_ep::{DType, Family, MoeConfig, Placement, RouterConfig, random};

#[test]
fn moe_run_loads_a_checkpoint_and_reports() {
    let dir = std::env::temp_dir().join(format!("moe-run-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = MoeConfig::new(8, 32, 48, 2).with_dtypes(DType::BF16, DType::BF16);
    let all = Placement::contiguous(8, 1).unwrap();
    write_checkpoint(&dir, Family::Mixtral, &cfg, 2, &random::layer_weights(&cfg, 1, &all, 0), 3).unwrap();
    let run = |layer: &str| {
        Command::new(env!("CARGO_BIN_EXE_moe-run"))
            .args(["--checkpoint"])
            .arg(&dir)
            .args(["--layer", layer, "--world", "4", "--tokens", "5", "--iters", "2"])
            .output()
            .unwrap()
    };
    let out = run("2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "moe-run failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "Mixtral layer 2: E=8 D=32 F=48 k=2 bf16",
        "rank 3: 2 experts; read",
        "holds",
        "exchange_back",
        "forward median",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let out = run("7");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("layer 7 of a model with 3 layers"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A 2-layer DeepSeek-V3 checkpoint (layer 1 MoE: selection bias, groups, a shared expert),
/// sharded over two files.
fn deepseek_v3_checkpoint(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = MoeConfig::new(8, 32, 16, 2)
        .with_dtypes(DType::BF16, DType::BF16)
        .with_router(RouterConfig::deepseek_v3(4, 2, 2.5))
        .with_shared_expert(32, false);
    let all = Placement::contiguous(8, 1).unwrap();
    write_checkpoint(&dir, Family::DeepseekV3, &cfg, 1, &random::layer_weights(&cfg, 2, &all, 0), 2).unwrap();
    dir
}

const V3_NEEDLES: [&str; 5] = ["DeepseekV3 layer 1", "Sigmoid", "intermediate: 32", "rank 2: 2 experts", "shared"];

#[test]
fn moe_run_runs_a_deepseek_v3_layer_with_bias_and_shared_expert() {
    let dir = deepseek_v3_checkpoint("moe-run-v3");
    let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["--checkpoint"])
        .arg(&dir)
        .args(["--layer", "1", "--world", "3", "--tokens", "4", "--iters", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "moe-run failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in V3_NEEDLES {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// moe-run as 3 MPI processes: each reads its own share; rank 0 prints every rank's line.
#[cfg(feature = "mpi")]
#[test]
fn moe_run_over_mpi_processes() {
    let dir = deepseek_v3_checkpoint("moe-run-v3-mpi");
    let mut cmd = common::mpirun();
    let out = cmd
        .args(["-n", "3", env!("CARGO_BIN_EXE_moe-run"), "--group", "mpi", "--checkpoint"])
        .arg(&dir)
        .args(["--layer", "1", "--tokens", "4", "--iters", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mpirun moe-run failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in V3_NEEDLES.iter().chain(&["one rank per process", "rank 0: forward median"]) {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A 2-layer checkpoint of `family` (layer 1 MoE) in `opts`.
fn family_checkpoint(family: Family, opts: WriteOptions, dims: (usize, usize), name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = family_moe(family, 8, dims.0, dims.1, 2).with_dtypes(DType::BF16, DType::BF16);
    let all = Placement::contiguous(8, 1).unwrap();
    write_checkpoint_with(&dir, family, &cfg, 1, &random::layer_weights(&cfg, 5, &all, 0), &opts).unwrap();
    dir
}

fn moe_run(dir: &std::path::Path, world: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["--checkpoint"])
        .arg(dir)
        .args(["--layer", "1", "--world", world, "--tokens", "3", "--iters", "1"])
        .output()
        .unwrap()
}

/// Every family in every layout it ships in, and the FP8 and MXFP4 releases: moe-run says what it
/// found and runs the layer on 4 ranks (8 experts: 2 each).
#[test]
fn moe_run_reads_every_family_layout_and_encoding() {
    let mut cases: Vec<(Family, WriteOptions, (usize, usize), String)> = Vec::new();
    for family in Family::ALL {
        for layout in layouts(family) {
            cases.push((
                family,
                WriteOptions { layout, shards: 2, ..Default::default() },
                (32, 16),
                "experts bf16".to_string(),
            ));
        }
    }
    let fp8 = WriteOptions { encoding: WriteEncoding::Fp8 { block: (16, 16) }, ..Default::default() };
    cases.push((Family::KimiK2, fp8, (40, 24), "experts fp8-e4m3 (16x16 block scales)".into()));
    let mx = WriteOptions { layout: Layout::Fused, encoding: WriteEncoding::Mxfp4, shards: 1 };
    cases.push((Family::GptOss, mx, (64, 32), "experts mxfp4".into()));
    let mlx = WriteOptions {
        layout: Layout::Fused,
        encoding: WriteEncoding::Mlx(moe_ep::testing::mlx_writer::MlxWrite::affine(4, 32)),
        shards: 2,
    };
    cases.push((Family::Qwen3Moe, mlx, (64, 64), "experts mlx affine 4-bit, groups of 32, bf16 scales".into()));
    for (i, (family, opts, dims, enc)) in cases.into_iter().enumerate() {
        let dir = family_checkpoint(family, opts, dims, &format!("{i}"));
        let out = moe_run(&dir, "4");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let want = format!("found: family {family}, layout {}, {enc}", opts.layout);
        assert!(stdout.contains(&want), "{family:?}: missing {want:?} in:\n{stdout}\n{stderr}");
        assert!(out.status.success(), "{family:?} {opts:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("rank 3: 2 experts; read") && stdout.contains("forward median"), "{stdout}");
        assert!(stdout.contains("expert weights streamed at"), "{stdout}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// `--quantize 4,64` quantizes a dense checkpoint's experts at load, `--decode` decodes a
/// quantized one's: moe-run says which weights the rank holds.
#[test]
fn moe_run_quantizes_and_decodes_at_load() {
    let dir = family_checkpoint(Family::Mixtral, WriteOptions::default(), (64, 64), "quantize");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
            .arg("--checkpoint")
            .arg(&dir)
            .args(["--layer", "1", "--world", "2", "--tokens", "3", "--iters", "1"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    assert!(run(&["--quantize", "4,64"]).contains("rank 0 experts [\"q4g64-bf16\", \"q4g64-bf16\", \"q4g64-bf16\"]"));
    assert!(run(&[]).contains("rank 0 experts [\"bf16\", \"bf16\", \"bf16\"]"));
    let q = WriteOptions { encoding: WriteEncoding::Mxfp4, layout: Layout::Fused, shards: 1 };
    let dir2 = family_checkpoint(Family::GptOss, q, (64, 32), "decode");
    let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .arg("--checkpoint")
        .arg(&dir2)
        .args(["--layer", "1", "--world", "2", "--tokens", "3", "--iters", "1", "--decode"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rank 0 experts [\"bf16\", \"bf16\", \"bf16\"]"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&dir2).ok();
}

#[test]
fn moe_run_lists_what_is_supported() {
    let dir = family_checkpoint(Family::Mixtral, WriteOptions::default(), (32, 16), "unsupported");
    let config = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["quantization_config"] = serde_json::json!({"quant_method": "awq"});
    std::fs::write(&config, c.to_string()).unwrap();
    let stderr = String::from_utf8_lossy(&moe_run(&dir, "2").stderr).into_owned();
    assert!(stderr.contains("awq") && stderr.contains("fp8") && stderr.contains("mxfp4"), "{stderr}");
    std::fs::write(&config, r#"{"model_type": "jamba"}"#).unwrap();
    let stderr = String::from_utf8_lossy(&moe_run(&dir, "2").stderr).into_owned();
    assert!(stderr.contains("jamba") && stderr.contains("mixtral") && stderr.contains("ernie4_5_moe"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--iters 0` (nothing to time) is refused as a usage error, not a panic.
#[test]
fn moe_run_refuses_zero_iterations() {
    let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["--checkpoint", "/nonexistent", "--layer", "1", "--iters", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value '0' for '--iters"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
