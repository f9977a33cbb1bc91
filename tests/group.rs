//! LocalGroup collectives: bitwise data movement at several world sizes, and disagreement.

mod common;

use std::time::Duration;

use common::TIMEOUT;
use moe_ep::{Error, Group, LocalGroup};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deterministic random bytes for (from, to, len).
fn bytes(from: usize, to: usize, len: usize) -> Vec<u8> {
    let mut r = ChaCha8Rng::seed_from_u64((from * 1000 + to) as u64);
    (0..len).map(|_| r.random()).collect()
}

/// Uneven size of the message from `a` to `b` (0 included).
fn len(a: usize, b: usize) -> usize {
    (a * 7 + b * 13) % 11 * 5
}

#[test]
fn every_collective_moves_bytes_exactly() {
    for world in [1, 2, 3, 4, 8] {
        let outs = LocalGroup::run(world, TIMEOUT, |g| {
            let me = g.rank();
            // all_to_all, equal chunks
            let chunk = 24;
            let send: Vec<u8> = (0..world).flat_map(|p| bytes(me, p, chunk)).collect();
            let got = g.all_to_all(&send)?;
            let want: Vec<u8> = (0..world).flat_map(|p| bytes(p, me, chunk)).collect();
            assert_eq!(got, want);
            // exchange_v with a counts round, uneven and empty messages
            let counts: Vec<usize> = (0..world).map(|p| len(me, p)).collect();
            let send: Vec<u8> = (0..world).flat_map(|p| bytes(me, p, len(me, p))).collect();
            let (got, rc) = g.exchange_v(&send, &counts)?;
            assert_eq!(rc, (0..world).map(|p| len(p, me)).collect::<Vec<_>>());
            assert_eq!(got, (0..world).flat_map(|p| bytes(p, me, len(p, me))).collect::<Vec<u8>>());
            // all_gather
            let got = g.all_gather(&bytes(me, 99, 10))?;
            assert_eq!(got, (0..world).flat_map(|p| bytes(p, 99, 10)).collect::<Vec<u8>>());
            // all_reduce: rank order sum, identical on every rank
            let mut v: Vec<f32> = (0..33).map(|i| (i as f32 + 0.1) * (me as f32 + 1.3)).collect();
            g.all_reduce_sum_f32(&mut v)?;
            let want: Vec<f32> = (0..33)
                .map(|i| {
                    let mut acc = (i as f32 + 0.1) * 1.3;
                    for p in 1..world {
                        acc += (i as f32 + 0.1) * (p as f32 + 1.3);
                    }
                    acc
                })
                .collect();
            assert_eq!(v, want);
            g.barrier()?;
            Ok::<_, Error>(())
        })
        .unwrap();
        for o in outs {
            o.unwrap().unwrap();
        }
    }
}

#[test]
fn different_operations_are_a_mismatch_not_a_hang() {
    let outs = LocalGroup::run(3, Duration::from_secs(2), |g| {
        if g.rank() == 1 { g.barrier() } else { g.all_gather(&[1, 2]).map(|_| ()) }
    })
    .unwrap();
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        assert!(
            matches!(e, Error::Mismatch { .. } | Error::PeerFailed { .. } | Error::PeerReported { .. }),
            "rank {r}: {e}"
        );
        if r != 1 {
            assert_eq!(e.peer(), Some(1), "rank {r}: {e}");
        }
    }
}

#[test]
fn chunks_of_another_size_are_a_mismatch() {
    let outs = LocalGroup::run(2, Duration::from_secs(2), |g| {
        let n = if g.rank() == 0 { 8 } else { 12 };
        g.all_to_all(&vec![7u8; n]).map(|_| ())
    })
    .unwrap();
    let errs: Vec<Error> = outs.into_iter().map(|o| o.unwrap().unwrap_err()).collect();
    assert!(errs[0].to_string().contains("it sent 6 bytes, this rank expects 4"), "{}", errs[0]);
    assert!(
        errs[1].to_string().contains("it sent 4 bytes, this rank expects 6")
            || matches!(errs[1], Error::PeerFailed { .. }),
        "{}",
        errs[1]
    );
}

#[test]
fn a_group_refuses_calls_after_a_failure() {
    let outs = LocalGroup::run(2, Duration::from_millis(200), |g| {
        if g.rank() == 0 {
            let first = g.barrier().unwrap_err();
            assert!(matches!(first, Error::Timeout { peer: 1, .. }), "{first}");
            let again = g.barrier().unwrap_err();
            assert!(matches!(again, Error::Poisoned { rank: 0, .. }), "{again}");
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .unwrap();
    for o in outs {
        o.unwrap();
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_rank() {
    let outs = LocalGroup::run(2, TIMEOUT, |g| {
        let e = g.exchange_v_known_into(&[0; 4], &[4], &mut [], &[0, 0]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("rank {}: invalid input: exchange_v: send_counts has 1 entries", g.rank())),
            "{e}"
        );
    })
    .unwrap();
    for o in outs {
        o.unwrap();
    }
    assert!(LocalGroup::world(0, TIMEOUT).is_err());
}

/// The group-operation suite that MPI processes run too (backends/mpi/examples/mpi_suite.rs).
#[test]
fn shared_group_suite_on_thread_ranks() {
    for world in 1..=4 {
        let outs = LocalGroup::run(world, TIMEOUT, |g| common::group_ops(&g, 7, 300)).unwrap();
        for (r, o) in outs.into_iter().enumerate() {
            o.unwrap_or_else(|_| panic!("rank {r} of {world} panicked")).unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    }
}

/// The trait's helpers take part in their call even when this rank's arguments are bad, so
/// the peers fail in the same call instead of waiting out the timeout.
#[test]
fn helpers_with_bad_arguments_fail_on_every_rank() {
    let start = std::time::Instant::now();
    let outs = LocalGroup::run(3, Duration::from_secs(30), |g| {
        let counts = if g.rank() == 1 { vec![1, 2] } else { vec![0; 3] };
        g.exchange_counts(&counts)
    })
    .unwrap();
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        if r == 1 {
            assert!(e.to_string().contains("exchange_counts: send_counts has 2 entries, the group has 3"), "{e}");
        } else {
            assert!(matches!(e, Error::PeerFailed { op: "all_to_all", peer: 1, .. }), "rank {r}: {e}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(10), "the peers waited for the timeout");
}

/// A timeout too large for an `Instant` (`Duration::MAX` and the like) means none: calls work,
/// a late rank is waited for, and `working` is harmless.
#[test]
fn a_timeout_too_large_for_an_instant_is_no_timeout() {
    for timeout in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
        let outs = LocalGroup::run(3, timeout, |g| {
            let _busy = g.working();
            if g.rank() == 2 {
                std::thread::sleep(Duration::from_millis(300));
            }
            common::group_ops(&g, 9, 20)
        })
        .unwrap();
        for o in outs {
            o.unwrap().unwrap();
        }
    }
}

#[test]
fn a_local_group_has_one_to_max_local_ranks() {
    assert!(LocalGroup::world(0, TIMEOUT).is_err());
    let e = LocalGroup::world(moe_ep::exchange::group::MAX_LOCAL_RANKS + 1, TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("1 to 1024 ranks"), "{e}");
}
