//! The multi-rank suite under mpirun: every rank runs this program with its own `MpiGroup`.
//! `tests/mpirun.rs` launches it at several world sizes; each scenario prints one line per rank.
//!
//! ```text
//! mpirun -n 3 target/debug/examples/mpi_suite suite   # group operations + layer vs the dense reference
//! mpirun -n 3 target/debug/examples/mpi_suite stall   # the last rank stalls: the others time out naming it
//! mpirun -n 3 target/debug/examples/mpi_suite kill    # the last rank dies mid-run
//! ```

#[path = "../../../tests/common/mod.rs"]
mod harness;

use std::time::Duration;

use harness::{Case, cpu_engine, small_cfg};
use moe_ep::{Capacity, DType, Group};
use moe_ep_mpi::MpiGroup;

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_else(|| "suite".into());
    let g = MpiGroup::init(Duration::from_secs(30)).expect("MPI init");
    let rank = g.rank();
    let result = match scenario.as_str() {
        "suite" => suite(g),
        "stall" => stall(g),
        "kill" => kill(g),
        other => panic!("unknown scenario {other}"),
    };
    match result {
        Ok(_group) => println!("rank {rank}: {scenario} ok"),
        Err(e) => {
            println!("rank {rank}: error: {e}");
            std::process::exit(3);
        }
    }
}

/// Deterministic bytes from (seed, src, dst, i).
fn pattern(seed: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((seed as usize * 131 + src * 31 + dst * 7 + i * 13) % 251) as u8).collect()
}

/// Uneven bytes from `src` to `dst`, zero for some pairs.
fn count(src: usize, dst: usize, scale: usize) -> usize {
    ((src * 5 + dst * 3) % 4) * scale + (src + 2 * dst) % 3
}

fn group_ops(g: &MpiGroup, seed: u64, scale: usize) -> moe_ep::Result<()> {
    let (me, n) = (g.rank(), g.size());
    // Variable exchange with a counts round.
    let send_counts: Vec<usize> = (0..n).map(|d| count(me, d, scale)).collect();
    let send: Vec<u8> = (0..n).flat_map(|d| pattern(seed, me, d, send_counts[d])).collect();
    let (recv, recv_counts) = g.exchange_v(&send, &send_counts)?;
    let want: Vec<u8> = (0..n).flat_map(|s| pattern(seed, s, me, count(s, me, scale))).collect();
    assert_eq!(recv_counts, (0..n).map(|s| count(s, me, scale)).collect::<Vec<_>>(), "rank {me}: counts");
    assert!(recv == want, "rank {me}: exchange_v payload");
    // Equal chunks.
    let c = 3 + scale;
    let send: Vec<u8> = (0..n).flat_map(|d| pattern(seed + 1, me, d, c)).collect();
    let recv = g.all_to_all(&send)?;
    assert!(recv == (0..n).flat_map(|s| pattern(seed + 1, s, me, c)).collect::<Vec<_>>(), "rank {me}: all_to_all");
    // All-gather, all-reduce (bitwise the same on every rank), barrier.
    let all = g.all_gather(&pattern(seed + 2, me, 0, 5 + scale))?;
    assert!(
        all == (0..n).flat_map(|s| pattern(seed + 2, s, 0, 5 + scale)).collect::<Vec<_>>(),
        "rank {me}: all_gather"
    );
    let mut v: Vec<f32> = (0..257).map(|i| (i as f32 * 0.37 + me as f32).sin() * 1e3).collect();
    g.all_reduce_sum_f32(&mut v)?;
    let want: Vec<f32> =
        (0..257).map(|i| (0..n).fold(0.0f32, |a, p| a + (i as f32 * 0.37 + p as f32).sin() * 1e3)).collect();
    assert!(v.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {me}: all_reduce");
    let bits = g.all_gather_u64(&v.iter().map(|x| x.to_bits() as u64).collect::<Vec<_>>())?;
    assert!((0..n).all(|p| bits[p * 257..(p + 1) * 257] == bits[..257]), "rank {me}: all_reduce differs between ranks");
    g.barrier()
}

fn suite(mut g: MpiGroup) -> moe_ep::Result<MpiGroup> {
    let world = g.size();
    group_ops(&g, 1, 1000)?;
    // Messages split at 7 bytes: many messages per peer, reassembled in order.
    g.set_max_message(7);
    group_ops(&g, 2, 300)?;
    g.set_max_message(moe_ep_mpi::MAX_MESSAGE);

    // The layer against the dense reference, as the thread-rank suite runs it.
    let mut cases = Vec::new();
    for k in [1, 2, 6] {
        cases.push(Case::new(small_cfg(k), world));
    }
    cases.push(Case::new(small_cfg(2).with_dtypes(DType::BF16, DType::BF16), world));
    cases.push(Case::new(small_cfg(2).with_dtypes(DType::F16, DType::F32), world));
    cases.push(Case::new(small_cfg(3).with_capacity(Capacity::Factor(1.0)), world));
    let mut skewed = Case::new(small_cfg(2), world);
    skewed.skew = true;
    cases.push(skewed);
    let mut group = g;
    for case in &cases {
        let rank = group.rank();
        let ((y, stats), back) = case.run_rank(group, cpu_engine(rank)?)?;
        case.check_rank(rank, &y, &stats);
        // Conservation across processes: what a sent to b is what b received from a.
        let sent = back.all_gather_u64(&stats.rows_sent.iter().map(|&r| r as u64).collect::<Vec<_>>())?;
        let got = back.all_gather_u64(&stats.rows_received.iter().map(|&r| r as u64).collect::<Vec<_>>())?;
        for a in 0..world {
            for b in 0..world {
                assert_eq!(sent[a * world + b], got[b * world + a], "rows {a} -> {b}");
            }
        }
        group = back;
    }
    Ok(group)
}

fn stall(mut g: MpiGroup) -> moe_ep::Result<MpiGroup> {
    g.set_timeout(Duration::from_secs(2));
    g.barrier()?;
    if g.rank() == g.size() - 1 {
        // A stalled peer: alive, but not taking part for far longer than the timeout.
        std::thread::sleep(Duration::from_secs(20));
    }
    let counts = vec![64; g.size()];
    g.exchange_v(&vec![1u8; 64 * g.size()], &counts)?;
    Ok(g)
}

fn kill(mut g: MpiGroup) -> moe_ep::Result<MpiGroup> {
    g.set_timeout(Duration::from_secs(5));
    group_ops(&g, 3, 100)?;
    if g.rank() == g.size() - 1 {
        eprintln!("rank {}: aborting itself", g.rank());
        std::process::abort();
    }
    for i in 0..100 {
        group_ops(&g, 4 + i, 100)?;
    }
    Ok(g)
}
