//! Liveness apart from deadlines, on thread ranks: a rank that computes for several timeouts is
//! not declared stalled (backends/mpi runs the same case over MPI). Its own test binary, so that
//! its minutes of compute on every core do not starve the short-timeout tests of failures.rs.

use moe_ep::LocalGroup;
use moe_ep::testing::group_suite::Lopsided;

/// Liveness apart from deadlines: every expert on rank 0 and a prefill that keeps it busy for
/// several timeouts; the other ranks wait on it in the combine's exchange, hearing its
/// heartbeats, and every rank returns the right values.
#[test]
fn a_rank_that_computes_for_several_timeouts_is_not_timed_out() {
    let rate = Lopsided::measure_rate();
    for world in [2, 3] {
        let case = Lopsided::new(world, rate);
        let outs = LocalGroup::run(world, Lopsided::TIMEOUT, |g| case.run(g)).unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            o.unwrap_or_else(|_| panic!("rank {r} of {world} panicked"))
                .unwrap_or_else(|e| panic!("world {world}: {e}"));
        }
    }
}
