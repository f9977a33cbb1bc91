//! The agreement round of collective constructors: every rank's status and the fields that must
//! be equal on every rank (config numbers, hashes of replicated weights), gathered once.

use std::hash::{Hash, Hasher};

use crate::error::{Error, Result};
use crate::exchange::group::Group;

/// A field compared across ranks: its name, its value on this rank, and whether the value is a
/// hash (reported as "differs") rather than a number (reported with both values).
pub(crate) struct Field {
    pub name: &'static str,
    pub value: u64,
    pub hashed: bool,
}

impl Field {
    pub fn number(name: &'static str, value: u64) -> Self {
        Field { name, value, hashed: false }
    }

    /// A hash of `parts` (one after another).
    pub fn hash(name: &'static str, parts: &[&[u8]]) -> Self {
        Field { name, value: hash_bytes(parts), hashed: true }
    }
}

/// A hash of `parts` (one after another, each with its length), the same on every rank.
pub(crate) fn hash_bytes(parts: &[&[u8]]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// A fresh random 64-bit value (the identity of a layer or of a call, taken from rank 0).
pub(crate) fn nonce() -> u64 {
    use std::hash::BuildHasher;
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::collections::hash_map::RandomState::new().hash_one(n)
}

/// Gather `failed` and `fields` from every rank (collective). When this rank failed, returns
/// `Ok` so that the caller returns its own error; otherwise errors with
/// [`Error::PeerFailed`] naming the first failed peer, or [`Error::ConfigMismatch`] naming the
/// first field that differs from rank 0's and the rank where it does. Returns an id every
/// rank now shares (rank 0's nonce): the identity of what was built.
pub(crate) fn agree<G: Group + ?Sized>(group: &G, op: &'static str, failed: bool, fields: &[Field]) -> Result<u64> {
    let rank = group.rank();
    let mut mine = vec![failed as u64, nonce()];
    // A failed rank's fields may be meaningless; zeros keep the round the same size.
    mine.extend(fields.iter().map(|f| if failed { 0 } else { f.value }));
    let all = group.all_gather_u64(&mine)?;
    if failed {
        return Ok(0);
    }
    let m = mine.len();
    if let Some(peer) = (0..group.size()).find(|&p| all[p * m] != 0) {
        return Err(Error::PeerFailed { rank, op, peer });
    }
    for (i, f) in fields.iter().enumerate().map(|(i, f)| (i + 2, f)) {
        if let Some(peer) = (1..group.size()).find(|&p| all[p * m + i] != all[i]) {
            let detail = if f.hashed {
                format!("{} differs between rank 0 and rank {peer}", f.name)
            } else {
                format!("{} is {} on rank 0 but {} on rank {peer}", f.name, all[i], all[peer * m + i])
            };
            return Err(Error::ConfigMismatch { rank, detail });
        }
    }
    Ok(all[1])
}
