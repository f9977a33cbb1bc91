//! One pass of the checkpoint parser over arbitrary bytes, shared by the proptest corpus in
//! `tests/checkpoint_fuzz.rs` (run in CI) and the cargo-fuzz target in `fuzz/` (longer runs):
//! whatever `config.json`, index and safetensors bytes it gets, the parser returns errors, never
//! panics, never allocates from a count the tensors do not back, and what it returns is
//! consistent (shapes as the config says).

use crate::model::checkpoint::Checkpoint;
use crate::model::placement::Placement;

/// Open the in-memory checkpoint and read every layer `0..layers` the way a rank of a
/// `world`-rank layer would; panics only when a returned value is inconsistent.
pub fn exercise(config: &[u8], index: Option<&[u8]>, files: Vec<(String, Vec<u8>)>, layers: usize, world: usize) {
    let Ok(ckpt) = Checkpoint::from_memory(config, index, files) else { return };
    let file_bytes = ckpt.file_bytes();
    for layer in 0..layers {
        let Ok(cfg) = ckpt.moe_config(layer) else { continue };
        // Counts are backed by the files: the router alone holds E x D values.
        assert!((cfg.num_experts as u64).saturating_mul(cfg.hidden as u64) <= file_bytes, "{cfg:?}");
        let _ = ckpt.found(layer);
        let Ok(placement) = Placement::balanced(cfg.num_experts, world.clamp(1, cfg.num_experts)) else { continue };
        for rank in 0..placement.world() {
            let Ok(w) = ckpt.layer_weights(layer, &placement, rank) else { continue };
            assert_eq!((w.router.rows(), w.router.cols()), (cfg.num_experts, cfg.hidden));
            assert_eq!(w.experts.len(), placement.experts_of(rank).len());
            for e in &w.experts {
                assert!(e.validate(&cfg, "expert").is_ok(), "an expert read that does not fit its config");
            }
            assert_eq!(w.shared.is_some(), cfg.shared_expert.is_some());
        }
        for e in [0, cfg.num_experts - 1, cfg.num_experts] {
            let _ = ckpt.expert_projections(layer, e);
        }
    }
}
