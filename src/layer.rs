//! `MoeLayer`: route, dispatch, experts, combine on one rank of a group.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use crate::config::MoeConfig;
use crate::cpu::CpuEngine;
use crate::dispatch::{combine_or_fail, dispatch_or_fail};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::group::Group;
use crate::placement::Placement;
use crate::router;
use crate::stats::ForwardStats;
use crate::tensor::Tensor;
use crate::weights::{ExpertWeights, validate_router};
use crate::workspace::Workspace;

/// One rank's part of an expert-parallel MoE layer: the router (replicated), this rank's
/// experts, and the group it shares with the other ranks.
pub struct MoeLayer<G: Group> {
    group: G,
    config: MoeConfig,
    placement: Placement,
    gate: Tensor,
    experts: Vec<ExpertWeights>,
    engine: Box<dyn Engine>,
    ws: Workspace,
}

impl<G: Group> std::fmt::Debug for MoeLayer<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("rank", &self.group.rank())
            .field("world", &self.group.size())
            .field("config", &self.config)
            .field("local_experts", &self.placement.experts_of(self.group.rank()))
            .field("engine", &self.engine.name())
            .finish()
    }
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl<G: Group> MoeLayer<G> {
    /// Build this rank's layer on the CPU engine. Collective: every rank of `group` calls it.
    ///
    /// `gate` is the router weight `[E, D]` (the same on every rank); `experts` are this rank's
    /// experts in increasing global id (`placement.experts_of(rank)`). Errors, on every rank,
    /// when a shape or dtype is wrong on some rank or when the config, placement or router
    /// weight differ between ranks (the message names the field and the ranks).
    pub fn new(
        group: G,
        config: MoeConfig,
        placement: Placement,
        gate: Tensor,
        experts: Vec<ExpertWeights>,
    ) -> Result<Self> {
        Self::with_engine(group, config, placement, gate, experts, Box::new(CpuEngine))
    }

    /// [`MoeLayer::new`] with another compute engine.
    pub fn with_engine(
        group: G,
        config: MoeConfig,
        placement: Placement,
        gate: Tensor,
        experts: Vec<ExpertWeights>,
        engine: Box<dyn Engine>,
    ) -> Result<Self> {
        let rank = group.rank();
        let _span = tracing::debug_span!("moe_layer_new", rank).entered();
        let local = (|| {
            config.validate()?;
            if placement.world() != group.size() {
                return Err(Error::invalid(format!(
                    "placement is for {} ranks but the group has {}",
                    placement.world(),
                    group.size()
                )));
            }
            if placement.num_experts() != config.num_experts {
                return Err(Error::invalid(format!(
                    "placement maps {} experts but the config has {}",
                    placement.num_experts(),
                    config.num_experts
                )));
            }
            validate_router(&gate, &config)?;
            let mine = placement.experts_of(rank);
            if experts.len() != mine.len() {
                return Err(Error::invalid(format!(
                    "{} expert weights given but the placement puts {} experts on this rank",
                    experts.len(),
                    mine.len()
                )));
            }
            for (w, &e) in experts.iter().zip(mine) {
                w.validate(&config, &format!("expert {e}"))?;
            }
            Ok(())
        })()
        .map_err(|e| e.on_rank(rank));

        // Agreement round: status, then every field that must match, then hashes of the
        // placement and the router weight.
        let mut fields: Vec<(&str, u64)> = vec![("status", local.is_err() as u64)];
        fields.extend(config.fingerprint_fields());
        let owners: Vec<u64> = placement.owners().iter().map(|&r| r as u64).collect();
        fields.push(("placement", hash_bytes(bytemuck::cast_slice(&owners))));
        fields.push(("router weight", if local.is_ok() { hash_bytes(gate.as_bytes()) } else { 0 }));
        let mine: Vec<u64> = fields.iter().map(|f| f.1).collect();
        let all = group.all_gather_u64(&mine)?;
        local?;
        let m = mine.len();
        for peer in 0..group.size() {
            if all[peer * m] != 0 {
                return Err(Error::PeerFailed { rank, op: "MoeLayer::new", peer });
            }
        }
        for (i, (name, _)) in fields.iter().enumerate().skip(1) {
            if let Some(peer) = (1..group.size()).find(|&p| all[p * m + i] != all[i]) {
                let what = if name.contains("weight") || *name == "placement" {
                    format!("{name} differs between rank 0 and rank {peer}")
                } else {
                    format!("{name} is {} on rank 0 but {} on rank {peer}", all[i], all[peer * m + i])
                };
                return Err(Error::ConfigMismatch { rank, detail: what });
            }
        }
        Ok(MoeLayer { group, config, placement, gate, experts, engine, ws: Workspace::new() })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
    pub fn group(&self) -> &G {
        &self.group
    }
    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }
    /// This rank's experts' weights, in local order.
    pub fn local_experts(&self) -> &[ExpertWeights] {
        &self.experts
    }
    /// Take the group back (to build another layer on it).
    pub fn into_group(self) -> G {
        self.group
    }

    /// `y = MoE(x)` for this rank's tokens `x` (`[N, D]` in the activation dtype; N may be 0
    /// and may differ per rank). Collective.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_stats(x).map(|(y, _)| y)
    }

    /// [`MoeLayer::forward`] with the call's statistics.
    pub fn forward_with_stats(&self, x: &Tensor) -> Result<(Tensor, ForwardStats)> {
        let rank = self.group.rank();
        let cfg = &self.config;
        let _span = tracing::debug_span!("moe_forward", rank, tokens = x.rows()).entered();

        let t = Instant::now();
        let routing = x
            .expect("input x", cfg.act_dtype, None, cfg.hidden)
            .and_then(|_| router::route(x, &self.gate, cfg.top_k, cfg.norm_topk_prob))
            .map_err(|e| e.on_rank(rank));
        let route_time = t.elapsed().as_secs_f64();

        let d = dispatch_or_fail(
            &self.group,
            self.engine.as_ref(),
            &self.ws,
            &self.placement,
            cfg.capacity,
            x,
            routing.as_ref().map_err(Clone::clone),
        )?;

        let t = Instant::now();
        let mut out = self.ws.take(cfg.act_dtype, d.batch.rows(), cfg.hidden);
        let ffn = {
            let _s = tracing::debug_span!("experts", rank, rows = d.batch.rows()).entered();
            self.engine.ffn(&d.batch, &d.expert_offsets, &self.experts, &mut out)
        };
        let experts_time = t.elapsed().as_secs_f64();

        self.ws.recycle(d.batch);
        let (y, mut stats) = combine_or_fail(&self.group, self.engine.as_ref(), &self.ws, d.handle, ffn.map(|_| &out))?;
        self.ws.recycle(out);
        stats.times.route = route_time;
        stats.times.experts = experts_time;
        Ok((y, stats))
    }
}
