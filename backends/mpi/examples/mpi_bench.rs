//! exchange_v of MpiGroup against a bare MPI_Alltoallv of the same bytes, in the same run.
//!
//! ```text
//! mpirun -n 2 target/release/examples/mpi_bench [--iters 20]
//! ```
//! Prints, per message size, the median time of the slowest rank for both, the bytes each rank
//! sends per second, and the ratio. Floor: MPI's own Alltoallv.

use std::time::{Duration, Instant};

use moe_ep::Group;
use moe_ep_mpi::MpiGroup;
use mpi::datatype::{Partition, PartitionMut};
use mpi::traits::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over iterations of the slowest rank's time of `f`.
fn time(g: &MpiGroup, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        g.barrier().expect("barrier");
        let t = Instant::now();
        f();
        let mine = t.elapsed().as_secs_f64();
        let all = g.all_gather_u64(&[mine.to_bits()]).expect("gather times");
        v.push(all.iter().map(|&b| f64::from_bits(b)).fold(0.0, f64::max));
    }
    median(v)
}

fn main() {
    let iters: usize =
        std::env::args().skip_while(|a| a != "--iters").nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let g = MpiGroup::init(Duration::from_secs(120)).expect("MPI init");
    let (me, n) = (g.rank(), g.size());
    if me == 0 {
        println!("mpi_bench: {n} ranks, threading {:?}, median of {iters} (slowest rank)", g.threading());
        println!(
            "{:>14} {:>12} {:>12} {:>12} {:>12} {:>8}",
            "bytes/rank", "alltoallv", "GB/s", "exchange_v", "GB/s", "ratio"
        );
    }
    for per_rank in [8 * n, 4 << 10, 1 << 20, 16 << 20, 64 << 20] {
        // per_rank bytes sent by each rank, split evenly over all ranks (itself included).
        let c = per_rank / n;
        let counts = vec![c; n];
        let send: Vec<u8> = (0..c * n).map(|i| (i * 7 + me) as u8).collect();
        let mut recv = vec![0u8; c * n];
        let counts_i: Vec<i32> = vec![c as i32; n];
        let displs: Vec<i32> = (0..n).map(|p| (p * c) as i32).collect();
        let comm = g.communicator();
        let bare = time(&g, iters, || {
            let sp = Partition::new(&send[..], &counts_i[..], &displs[..]);
            let mut rp = PartitionMut::new(&mut recv[..], &counts_i[..], &displs[..]);
            comm.all_to_all_varcount_into(&sp, &mut rp);
        });
        let bare_recv = recv.clone();
        let ours = time(&g, iters, || g.exchange_v_known_into(&send, &counts, &mut recv, &counts).expect("exchange_v"));
        assert!(recv == bare_recv, "rank {me}: exchange_v and Alltoallv received different bytes");
        let bytes = (c * n) as f64;
        if me == 0 {
            println!(
                "{:>14} {:>9.1} us {:>12.2} {:>9.1} us {:>12.2} {:>8.2}",
                c * n,
                bare * 1e6,
                bytes / bare / 1e9,
                ours * 1e6,
                bytes / ours / 1e9,
                bare / ours
            );
        }
    }
}
