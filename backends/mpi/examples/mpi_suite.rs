//! The multi-rank suite under mpirun: every rank runs this program with its own `MpiGroup`.
//! `tests/mpirun.rs` launches it at several world sizes; each scenario prints one line per rank.
//!
//! ```text
//! mpirun -n 3 target/debug/examples/mpi_suite suite                 # group operations + EP and TP layers vs the dense reference
//! mpirun -n 3 target/debug/examples/mpi_suite scenario stalled-peer # one scenario of moe_ep::testing::group_suite
//! mpirun -n 3 target/debug/examples/mpi_suite lopsided 12000        # liveness: all experts on rank 0, at 12000 rows/s
//! mpirun -n 3 target/debug/examples/mpi_suite kill                  # the last rank dies mid-run
//! ```
//! The failure scenarios are the thread ranks' (tests/failures.rs): each rank prints
//! `rank R: <scenario> ok` or `rank R: <scenario> FAILED: <what it saw>`.

#[path = "../../../tests/common/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{Case, cpu_engine, deepseek_v3_cfg, group_ops, small_cfg, suite_cases};
use moe_ep::Group;
use moe_ep::testing::group_suite::{Lopsided, Scenario};
use moe_ep_mpi::MpiGroup;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().cloned().unwrap_or_else(|| "suite".into());
    match scenario.as_str() {
        "scenario" => failure_scenario(args.get(1).map_or("", String::as_str)),
        "lopsided" => lopsided(args.get(1).and_then(|r| r.parse().ok()).expect("lopsided <rows per second>")),
        _ => {}
    }
    let g = MpiGroup::init(Duration::from_secs(30)).expect("MPI init");
    let rank = g.rank();
    let result = match scenario.as_str() {
        "suite" => suite(g),
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

/// One scenario of the suite every group engine passes; exits with 0 when this rank saw what it
/// should. A rank whose group failed stays alive for the scenario's span (its exit without
/// `MPI_Finalize` would make mpirun end the job before its peers have reported), then exits.
fn failure_scenario(name: &str) -> ! {
    let s = Scenario::from_name(name).unwrap_or_else(|| panic!("unknown scenario {name:?}"));
    let start = Instant::now();
    let g = MpiGroup::init(s.timeout()).expect("MPI init");
    let rank = g.rank();
    let lose = |g: MpiGroup| {
        eprintln!("rank {}: aborting itself (pid {})", g.rank(), std::process::id());
        std::process::abort();
    };
    let code = match s.run(g, lose) {
        Ok(()) => {
            println!("rank {rank}: {name} ok");
            0
        }
        Err(e) => {
            println!("rank {rank}: {name} FAILED: {e}");
            3
        }
    };
    if s.fails() {
        std::thread::sleep(s.span().saturating_sub(start.elapsed()));
    }
    std::process::exit(code)
}

/// The liveness case: every expert on rank 0, a prefill sized for `rows_per_s`.
fn lopsided(rows_per_s: f64) -> ! {
    let g = MpiGroup::init(Lopsided::TIMEOUT).expect("MPI init");
    let (rank, world) = (g.rank(), g.size());
    match Lopsided::new(world, rows_per_s).run(g) {
        Ok(()) => {
            println!("rank {rank}: lopsided ok");
            std::process::exit(0)
        }
        Err(e) => {
            println!("rank {rank}: lopsided FAILED: {e}");
            std::process::exit(3)
        }
    }
}

fn kill(mut g: MpiGroup) -> moe_ep::Result<MpiGroup> {
    g.set_timeout(Duration::from_secs(5));
    group_ops(&g, 3, 100)?;
    if g.rank() == g.size() - 1 {
        eprintln!("rank {}: aborting itself (pid {})", g.rank(), std::process::id());
        std::process::abort();
    }
    for i in 0..100 {
        group_ops(&g, 4 + i, 100)?;
    }
    Ok(g)
}
