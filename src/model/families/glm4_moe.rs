//! GLM-4.5 / GLM-4.6 (`glm4_moe`: `modeling_glm4_moe.py`, `configuration_glm4_moe.py`).
//!
//! - Keys as DeepSeek-V3's with GLM's defaults: `n_routed_experts` 128 (alias
//!   `num_local_experts`), `num_experts_per_tok` 8, `moe_intermediate_size` 1408,
//!   `n_shared_experts` 1, `routed_scaling_factor` 1.0, `n_group` 1, `topk_group` 1,
//!   `first_k_dense_replace` 1, `norm_topk_prob` true, `hidden_size` 4096,
//!   `num_hidden_layers` 46.
//! - Routing (`Glm4MoeTopkRouter`) is DeepSeek-V3's `noaux_tc` line for line: sigmoid,
//!   `e_score_correction_bias` for selection, top-two group scores, `sum + 1e-20`, scaling.
//! - Names as DeepSeek-V3's.

use super::deepseek_v2::{dense_first, shared_experts};
use super::deepseek_v3::noaux_tc;
use super::keys::{KeyResult, Keys};
use crate::model::config::{MoeConfig, RouterConfig};

pub(super) fn config(k: &Keys<'_>, layer: usize) -> KeyResult<MoeConfig> {
    dense_first(k, layer, 46, 1)?;
    noaux_tc(k)?;
    let f = k.usize(&["moe_intermediate_size"], Some(1408))?;
    let router = RouterConfig::deepseek_v3(
        k.usize(&["n_group"], Some(1))?,
        k.usize(&["topk_group"], Some(1))?,
        k.f64(&["routed_scaling_factor"], Some(1.0))? as f32,
    );
    let cfg = MoeConfig::new(
        k.usize(&["n_routed_experts", "num_local_experts"], Some(128))?,
        k.usize(&["hidden_size"], Some(4096))?,
        f,
        k.usize(&["num_experts_per_tok"], Some(8))?,
    )
    .with_norm_topk_prob(k.bool(&["norm_topk_prob"], true)?)
    .with_router(router);
    shared_experts(k, cfg, f, 1)
}
