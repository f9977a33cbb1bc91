//! Which rank owns which expert.

use crate::error::{Error, Result};

/// Most experts a placement holds (far above any model's; it bounds the maps' memory).
pub const MAX_EXPERTS: usize = 1 << 24;
/// Most ranks a placement spans.
pub const MAX_WORLD: usize = 1 << 24;

/// The size limits every constructor checks before it allocates.
fn check_size(num_experts: usize, world: usize) -> Result<()> {
    if world == 0 {
        return Err(Error::invalid("world size must be positive"));
    }
    if num_experts > MAX_EXPERTS || world > MAX_WORLD {
        return Err(Error::invalid(format!(
            "placement of {num_experts} experts on {world} ranks exceeds the limits ({MAX_EXPERTS} experts, \
             {MAX_WORLD} ranks)"
        )));
    }
    Ok(())
}

/// The expert -> rank map, with each rank's local expert order.
///
/// A rank's local experts are numbered in increasing global id; that local index orders the
/// rows of every send block and of the expert-major batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    world: usize,
    owner: Vec<u32>,
    local_index: Vec<u32>,
    experts_of: Vec<Vec<usize>>,
}

impl Placement {
    /// Contiguous blocks: rank r owns experts `[r*E/W, (r+1)*E/W)`. `E` must divide by `world`.
    pub fn contiguous(num_experts: usize, world: usize) -> Result<Self> {
        check_size(num_experts, world)?;
        if num_experts == 0 || !num_experts.is_multiple_of(world) {
            return Err(Error::invalid(format!(
                "contiguous placement needs num_experts ({num_experts}) to be a positive multiple \
                 of the world size ({world}); pass an explicit expert->rank map instead"
            )));
        }
        let per = num_experts / world;
        Self::from_map((0..num_experts).map(|e| e / per).collect(), world)
    }

    /// Contiguous blocks whose sizes differ by at most one: the first `E % world` ranks get
    /// one expert more. Equals [`Placement::contiguous`] when `world` divides `E`.
    pub fn balanced(num_experts: usize, world: usize) -> Result<Self> {
        check_size(num_experts, world)?;
        if num_experts < world {
            return Err(Error::invalid(format!(
                "balanced placement needs at least one expert per rank ({num_experts} experts, {world} ranks)"
            )));
        }
        let (base, extra) = (num_experts / world, num_experts % world);
        let owner = (0..world).flat_map(|r| std::iter::repeat_n(r, base + usize::from(r < extra))).collect();
        Self::from_map(owner, world)
    }

    /// An explicit map: `owner[e]` is the rank of expert `e`. Ranks may own no experts.
    /// At most [`MAX_EXPERTS`] experts on [`MAX_WORLD`] ranks.
    pub fn from_map(owner: Vec<usize>, world: usize) -> Result<Self> {
        check_size(owner.len(), world)?;
        if owner.is_empty() {
            return Err(Error::invalid("placement map is empty"));
        }
        let mut experts_of = vec![Vec::new(); world];
        let mut local_index = vec![0u32; owner.len()];
        for (e, &r) in owner.iter().enumerate() {
            if r >= world {
                return Err(Error::invalid(format!(
                    "placement map puts expert {e} on rank {r}, but the world has {world} ranks"
                )));
            }
            local_index[e] = experts_of[r].len() as u32;
            experts_of[r].push(e);
        }
        Ok(Placement { world, owner: owner.into_iter().map(|r| r as u32).collect(), local_index, experts_of })
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn num_experts(&self) -> usize {
        self.owner.len()
    }
    /// Rank that owns expert `e`; `None` when `e >= num_experts()`.
    #[inline]
    pub fn owner(&self, e: usize) -> Option<usize> {
        self.owner.get(e).map(|&r| r as usize)
    }
    /// Index of expert `e` among its owner's local experts; `None` when `e >= num_experts()`.
    #[inline]
    pub fn local_index(&self, e: usize) -> Option<usize> {
        self.local_index.get(e).map(|&l| l as usize)
    }
    /// Global ids of the experts on `rank`, increasing; empty for a rank outside the world
    /// (`rank >= world()`), which owns none.
    pub fn experts_of(&self, rank: usize) -> &[usize] {
        self.experts_of.get(rank).map_or(&[], Vec::as_slice)
    }
    /// [`Placement::owner`] of an expert id already checked against `num_experts()`.
    #[inline]
    pub(crate) fn owner_of_checked(&self, e: usize) -> usize {
        self.owner[e] as usize
    }
    /// [`Placement::local_index`] of an expert id already checked against `num_experts()`.
    #[inline]
    pub(crate) fn local_index_checked(&self, e: usize) -> usize {
        self.local_index[e] as usize
    }
    /// Largest number of experts on any rank.
    pub fn max_local_experts(&self) -> usize {
        self.experts_of.iter().map(Vec::len).max().unwrap_or(0)
    }
    /// The map as a vector of ranks.
    pub fn owners(&self) -> Vec<usize> {
        self.owner.iter().map(|&r| r as usize).collect()
    }
}
