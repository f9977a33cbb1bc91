//! ep-vs-tp end to end on a tiny layer: the table, the geometric means, the JSON and the SVG.

#[cfg(feature = "mpi")]
mod common;

use std::process::Command;

#[test]
fn ep_vs_tp_prints_the_table_and_writes_json_and_svg() {
    let dir = std::env::temp_dir().join(format!("ep-vs-tp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("out.json"), dir.join("out.svg"));
    for world in ["2", "3"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ep-vs-tp"))
            .args(["--config", "tiny", "--backend", "cpu", "--world", world, "--max-tokens", "256"])
            .args(["--warmup", "1", "--iters", "2", "--json"])
            .arg(&json)
            .arg("--svg")
            .arg(&svg)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ep-vs-tp failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        for needle in ["TP/EP", "decode (N <= 64) geometric mean", "prefill (N >= 256) geometric mean", "256"] {
            assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
        }
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let points = report["points"].as_array().unwrap();
        assert_eq!(points.len(), 9, "N = 1 .. 256");
        for p in points {
            let (ep, tp) = (p["ep_s"].as_f64().unwrap(), p["tp_s"].as_f64().unwrap());
            assert!(ep > 0.0 && tp > 0.0);
            assert!((p["ep_speedup"].as_f64().unwrap() - tp / ep).abs() < 1e-9);
        }
        assert!(report["decode_ep_speedup"].as_f64().unwrap() > 0.0);
        let plot = std::fs::read_to_string(&svg).unwrap();
        assert!(plot.starts_with("<svg") && plot.contains("EP") && plot.contains("TP") && plot.contains("<polyline"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// ep-vs-tp as 2 MPI processes (the tools built with `--features mpi`, as scripts/test.sh does).
#[cfg(feature = "mpi")]
#[test]
fn ep_vs_tp_runs_over_mpi() {
    let mut cmd = common::mpirun();
    let out = cmd
        .args(["-n", "2", env!("CARGO_BIN_EXE_ep-vs-tp"), "--group", "mpi", "--backend", "cpu"])
        .args(["--config", "tiny", "--max-tokens", "8", "--iters", "2", "--warmup", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2 ranks as MPI processes"), "{stdout}");
    // Rank 0 alone prints the table: one row per N.
    assert_eq!(stdout.matches("TP/EP").count(), 3, "{stdout}");
}
