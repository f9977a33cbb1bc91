//! The agreement round of collective constructors: every rank's status and the fields that must
//! be equal on every rank (config numbers, hashes of replicated weights), gathered once.

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

    /// A hash of `parts` (one after another): see [`stable_hash`].
    pub fn hash(name: &'static str, parts: &[&[u8]]) -> Self {
        Field { name, value: stable_hash(parts), hashed: true }
    }
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

/// XXH3-64 (seed 0) of `parts`, each preceded by its length as a little-endian u64, so that
/// ranks built by any compiler or release agree, and `["ab", "c"]` differs from `["a", "bc"]`.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::stable_hash;

    /// The values are XXH3-64 of the framed bytes as the reference implementation computes them
    /// (Python's `xxhash.xxh3_64_intdigest`), so a change of algorithm or framing shows here.
    #[test]
    fn the_agreement_hash_is_pinned() {
        assert_eq!(stable_hash(&[]), 0x2d06800538d394c2);
        assert_eq!(stable_hash(&[b"moe-ep"]), 0xa60e5209e188ee01);
        assert_eq!(stable_hash(&[b"router", &[0, 1, 2, 3, 255]]), 0x100aec01954a81a5);
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
    }
}
