//! MPI for moe-ep: [`MpiGroup`], the core crate's [`moe_ep::Group`] across processes and
//! machines, on rsmpi (Open MPI, MPICH; found through pkg-config).
//!
//! ```text
//! mpirun -n 4 target/release/my-server        # each process:
//! let group = MpiGroup::init(Duration::from_secs(60))?;
//! let layer = MoeLayer::new(group, cfg, placement, gate, my_experts)?;
//! ```
//!
//! What MPI itself does when a rank crashes: with Open MPI (`mpirun`), a rank that is killed
//! or exits without `MPI_Finalize` makes mpirun terminate every other rank of the job, so a
//! crash ends the job in seconds whatever this library does. A rank that stalls (stopped,
//! deadlocked) is what the deadlines here are for: its peers return [`moe_ep::Error::Timeout`]
//! naming it within the group's timeout, and it is told, in its next call, that it stalled.
//! A rank that is merely slow because it computes holds a [`moe_ep::Group::working`] guard and
//! is not timed out. MPICH works as well as Open MPI; see the README for running under both.

mod control;
mod group;
mod transfer;
mod wire;

pub use group::{MAX_MESSAGE, MpiGroup};
pub use mpi::Threading;
