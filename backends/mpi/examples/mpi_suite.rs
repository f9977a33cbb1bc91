//! The multi-rank suite under mpirun: every rank runs this program with its own `MpiGroup`.
//! `tests/mpirun.rs` launches it at several world sizes; each scenario prints one line per rank.
//!
//! ```text
//! mpirun -n 3 target/debug/examples/mpi_suite suite   # group operations + EP and TP layers vs the dense reference
//! mpirun -n 3 target/debug/examples/mpi_suite stall   # the last rank stalls: the others time out naming it
//! mpirun -n 3 target/debug/examples/mpi_suite kill    # the last rank dies mid-run
//! ```

#[path = "../../../tests/common/mod.rs"]
mod harness;

use std::time::Duration;

use harness::{Case, cpu_engine, deepseek_v3_cfg, group_ops, small_cfg, suite_cases};
use moe_ep::Group;
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

fn suite(mut g: MpiGroup) -> moe_ep::Result<MpiGroup> {
    let world = g.size();
    group_ops(&g, 1, 1000)?;
    // Messages split at 7 bytes: many messages per peer, reassembled in order.
    g.set_max_message(7);
    group_ops(&g, 2, 300)?;
    g.set_max_message(moe_ep_mpi::MAX_MESSAGE);

    // The layer against the dense reference: the cases the thread-rank suite runs too.
    let mut group = g;
    for case in &suite_cases(world) {
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
    // The tensor-parallel layer (ep-vs-tp's baseline): plain, bf16, DeepSeek-V3 rules + shared.
    let bf16 = moe_ep::DType::BF16;
    let tp_cases = [small_cfg(2), small_cfg(6).with_dtypes(bf16, bf16), deepseek_v3_cfg()];
    for cfg in tp_cases {
        let case = Case::new(cfg, world);
        let rank = group.rank();
        let ((y, stats), back) = case.run_tp_rank(group, cpu_engine(rank)?)?;
        case.check_tp_rank(rank, &y, &stats);
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
