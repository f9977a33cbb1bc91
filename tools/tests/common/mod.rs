//! Shared by the tools' tests: launching a tool under mpirun.

use std::process::Command;

/// `mpirun` ready for `-n N program ...`: as root and with more ranks than cores where the MPI is
/// Open MPI (MPICH's mpirun knows neither flag). Panics when mpirun is missing (scripts/test.sh
/// installs it).
pub fn mpirun() -> Command {
    let version =
        Command::new("mpirun").arg("--version").output().expect("mpirun not found: install MPI or run scripts/test.sh");
    let mut cmd = Command::new("mpirun");
    if String::from_utf8_lossy(&version.stdout).contains("Open MPI") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd
}
