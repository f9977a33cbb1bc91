//! Segments laid end to end: the prefix sums that turn lengths into start offsets.

/// Start offset of each segment when segments of the given lengths are laid end to end
/// (exclusive prefix sum; same length as `counts`).
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    counts
        .iter()
        .map(|&c| {
            let o = acc;
            acc += c;
            o
        })
        .collect()
}
