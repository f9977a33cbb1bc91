//! ep-plot on ep-bench JSON written by ep-bench itself at two world sizes.

use std::process::Command;

#[test]
fn ep_plot_draws_time_against_rank_count() {
    let dir = std::env::temp_dir().join(format!("ep-plot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for world in ["1", "2"] {
        let json = dir.join(format!("w{world}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_ep-bench"))
            .args(["--config", "tiny", "--backend", "cpu", "--world", world, "--tokens", "4,32"])
            .args(["--iters", "2", "--warmup", "1", "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        files.push(json);
    }
    let svg = dir.join("scaling.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_ep-plot")).args(&files).arg("--svg").arg(&svg).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // One row per (N, world): the smallest world is the 100% baseline (a 2-rank row may also
    // round to 100%: its scaling is timing).
    let rows: Vec<Vec<&str>> =
        stdout.lines().filter(|l| l.starts_with("uniform")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for r in &rows {
        assert!(r.last().is_some_and(|s| s.ends_with('%')), "{stdout}");
        if r[2] == "1" {
            assert_eq!(r.last(), Some(&"100%"), "{stdout}");
        }
    }
    assert_eq!(rows.iter().filter(|r| r[2] == "1").count(), 2, "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("N=32/rank") && plot.contains("<polyline"));
    // Not ep-bench JSON: an error naming the file.
    std::fs::write(dir.join("bad.json"), "{}").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_ep-plot")).arg(dir.join("bad.json")).arg("--svg").arg(&svg).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bad.json"));
    std::fs::remove_dir_all(&dir).ok();
}
