//! moe-run on a small Mixtral checkpoint written here (sharded, with an index): every rank
//! reads only its share, the layer runs, the stage table prints; a dense layer is refused.

use std::process::Command;

use moe_ep::checkpoint::write::write_checkpoint;
use moe_ep::{DType, Family, MoeConfig, random};

#[test]
fn moe_run_loads_a_checkpoint_and_reports() {
    let dir = std::env::temp_dir().join(format!("moe-run-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = MoeConfig::new(8, 32, 48, 2).with_dtypes(DType::BF16, DType::BF16);
    let experts = random::experts(&cfg, 1, &(0..8).collect::<Vec<_>>());
    write_checkpoint(&dir, Family::Mixtral, &cfg, 2, &random::gate(&cfg, 1), &experts, 3).unwrap();
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
    for needle in
        ["Mixtral layer 2: E=8 D=32 F=48 k=2 bf16", "rank 3: read", "2 experts", "exchange_back", "forward median"]
    {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let out = run("7");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("layer 7 of a model with 3 layers"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
