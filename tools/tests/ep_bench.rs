//! The README's main command, on a small preset: it runs, prints the table, writes valid JSON.

#[cfg(feature = "mpi")]
mod common;

use std::process::Command;

#[test]
fn ep_bench_runs_and_reports() {
    let dir = std::env::temp_dir().join(format!("ep-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ep-bench"))
        .args(["--config", "tiny", "--world", "3", "--tokens", "40", "--iters", "2", "--warmup", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ep-bench failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["stage", "exchange_back", "forward", "floors: memcpy", "move GB/s (memcpy)", "% GEMM"] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["world"], 3);
    assert!(v["points"][0]["forward_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["points"][0]["last_stats_rank0"]["rows_sent"].as_array().unwrap().len(), 3);

    // A sweep with uniform and skewed routing: one row per (routing, N); skew sends every
    // token's first choice to expert 0, so rank 0 receives more rows than under uniform routing.
    let out = Command::new(env!("CARGO_BIN_EXE_ep-bench"))
        .args(["--config", "tiny", "--world", "2", "--tokens", "8,64", "--routing", "both"])
        .args(["--iters", "2", "--warmup", "1", "--backend", "cpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ep-bench sweep failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let points = v["points"].as_array().unwrap();
    let key: Vec<(String, u64)> = points
        .iter()
        .map(|p| (p["routing"].as_str().unwrap().to_string(), p["tokens_per_rank"].as_u64().unwrap()))
        .collect();
    let want = [("uniform", 8), ("uniform", 64), ("skewed", 8), ("skewed", 64)];
    assert_eq!(key, want.map(|(r, n)| (r.to_string(), n)).to_vec());
    let received_by_0 = |p: &serde_json::Value| -> u64 {
        p["last_stats_rank0"]["rows_received"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum()
    };
    assert!(received_by_0(&points[3]) > received_by_0(&points[1]), "skew loads rank 0");
    assert_eq!(v["warm_up"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ep_bench_rejects_bad_arguments_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_ep-bench")).args(["--config", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown config \"nope\""));
    let out =
        Command::new(env!("CARGO_BIN_EXE_ep-bench")).args(["--config", "tiny", "--world", "17"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("16 experts, 17 ranks"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ep-bench")).args(["--dtype", "f64"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn ep_bench_runs_every_call_on_the_gpu() {
    let dir = std::env::temp_dir().join(format!("ep-bench-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ep-bench"))
        .args(["--config", "tiny", "--world", "2", "--tokens", "24", "--iters", "1", "--warmup", "1"])
        .args(["--backend", "wgpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ep-bench --backend wgpu failed (a GPU test needs a wgpu adapter: apt-get install mesa-vulkan-drivers): {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rank 0 GPU engine: wgpu:"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["points"][0]["last_stats_rank0"]["backend"].as_str().unwrap().starts_with("wgpu:"), "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--group mpi` under mpirun (the tools built with `--features mpi`, as scripts/test.sh does).
#[cfg(feature = "mpi")]
#[test]
fn ep_bench_runs_over_mpi() {
    let mut cmd = common::mpirun();
    let out = cmd
        .args(["-n", "2", env!("CARGO_BIN_EXE_ep-bench"), "--group", "mpi", "--backend", "cpu"])
        .args(["--config", "tiny", "--tokens", "24", "--iters", "2", "--warmup", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 ranks as MPI processes"), "{stdout}");
    // Rank 0 alone reports, with both ranks' rows.
    assert_eq!(stdout.matches("  uniform ").count(), 1, "{stdout}");
    assert!(stdout.contains("rank 0, last point: rows sent per rank ["), "{stdout}");
}
