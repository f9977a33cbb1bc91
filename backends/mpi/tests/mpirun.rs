//! The multi-rank suite over MPI at 2, 3 and 4 processes (mpirun), and what happens when a
//! peer stalls or dies. Needs `mpirun` (Open MPI or MPICH); scripts/test.sh installs or checks it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The example binary cargo built beside this test.
fn suite_exe() -> PathBuf {
    let mut p = std::env::current_exe().unwrap();
    p.pop(); // deps/
    p.pop();
    p.push("examples");
    p.push(format!("mpi_suite{}", std::env::consts::EXE_SUFFIX));
    assert!(p.exists(), "{} not built (cargo test builds examples)", p.display());
    p
}

fn is_open_mpi() -> bool {
    let version = Command::new("mpirun").arg("--version").output().expect(
        "mpirun not found: install MPI (apt-get install openmpi-bin libopenmpi-dev), or run scripts/test.sh, which does",
    );
    String::from_utf8_lossy(&version.stdout).contains("Open MPI")
}

/// `mpirun -n <n> mpi_suite <scenario>`, as root if need be, oversubscribing the cores.
fn mpirun(n: usize, scenario: &str) -> (Output, Duration) {
    mpirun_with(n, scenario, &[])
}

fn mpirun_with(n: usize, scenario: &str, extra: &[&str]) -> (Output, Duration) {
    let mut cmd = Command::new("mpirun");
    // Open MPI refuses root without this flag and more ranks than cores without the other;
    // MPICH's mpirun knows neither, so only pass them to Open MPI.
    if is_open_mpi() {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd.args(extra);
    cmd.args(["-n", &n.to_string()]).arg(suite_exe()).arg(scenario);
    let t = Instant::now();
    let out = cmd.output().expect("run mpirun");
    (out, t.elapsed())
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn suite_at_two_three_and_four_ranks() {
    for n in [2, 3, 4] {
        let (out, t) = mpirun(n, "suite");
        let all = text(&out);
        assert!(out.status.success(), "mpirun -n {n} suite failed after {t:?}:\n{all}");
        for r in 0..n {
            assert!(all.contains(&format!("rank {r}: suite ok")), "rank {r} of {n} did not finish:\n{all}");
        }
        eprintln!("mpirun -n {n} suite: {t:?}");
    }
}

#[test]
fn a_stalled_peer_is_named_within_the_timeout() {
    let n = 3;
    let (out, t) = mpirun(n, "stall");
    let all = text(&out);
    assert!(!out.status.success(), "the job should fail:\n{all}");
    for r in 0..n - 1 {
        // exchange_v's counts round is an all_to_all: that is where the stall shows.
        assert!(
            all.contains(&format!(
                "rank {r}: error: rank {r}: all_to_all timed out after 2s waiting for rank {}",
                n - 1
            )),
            "rank {r} should time out naming rank {}:\n{all}",
            n - 1
        );
    }
    // 2 s timeout; the stalled rank sleeps 20 s, which the job must not wait for.
    assert!(t < Duration::from_secs(15), "the job took {t:?}:\n{all}");
}

/// MPI's default: mpirun ends the whole job when a rank dies; its report names the rank.
#[test]
fn a_killed_peer_ends_the_job_with_its_name() {
    let n = 3;
    let (out, t) = mpirun(n, "kill");
    let all = text(&out);
    assert!(!out.status.success(), "the job should fail:\n{all}");
    assert!(all.contains(&format!("rank {}: aborting itself", n - 1)), "{all}");
    // Open MPI: "mpirun noticed that process rank 2 ..."; MPICH: "... RANK 2 PID ...".
    let lower = all.to_lowercase();
    assert!(
        lower.contains(&format!("process rank {}", n - 1)) || lower.contains(&format!("rank {} pid", n - 1)),
        "MPI's report does not name rank {}:\n{all}",
        n - 1
    );
    for r in 0..n - 1 {
        assert!(!all.contains(&format!("rank {r}: kill ok")), "rank {r} finished despite the dead peer:\n{all}");
    }
    assert!(t < Duration::from_secs(30), "the job took {t:?}:\n{all}");
}

/// With Open MPI's `--enable-recovery` the survivors live on, and each returns an error naming
/// the dead rank within the group's 5 s timeout.
#[test]
fn survivors_of_a_killed_peer_return_an_error_naming_it() {
    if !is_open_mpi() {
        panic!("this test uses Open MPI's --enable-recovery; with another MPI, adapt it");
    }
    let n = 3;
    let (out, t) = mpirun_with(n, "kill", &["--enable-recovery"]);
    let all = text(&out);
    // (Under --enable-recovery mpirun's own exit status is 0 whatever the ranks did.)
    // Each survivor times out on the dead rank, or hears it from the other survivor first.
    for r in 0..n - 1 {
        let timed_out = format!("rank {r}: error: rank {r}: all_to_all timed out after 5s waiting for rank {}", n - 1);
        let reported =
            format!("rank {r}: error: rank {r}: all_to_all: rank {} reports that rank {} failed", 1 - r, n - 1);
        assert!(
            all.contains(&timed_out) || all.contains(&reported),
            "rank {r} should report rank {} with an error:\n{all}",
            n - 1
        );
    }
    assert!(t < Duration::from_secs(20), "the job took {t:?}:\n{all}");
}
