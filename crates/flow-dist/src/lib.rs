//! Collectives for data-parallel training: every process computes the gradients of
//! its share of a batch, and the processes sum them.
//!
//! One small trait, [`Collective`] (sum over the processes, broadcast, barrier), with
//! its backends:
//! - [`Single`]: a world of one process, the default; it needs nothing;
//! - [`ThreadGroup`]: ranks that are threads of one process (tests, and library users
//!   who want the data-parallel arithmetic without a launcher);
//! - MPI (cargo feature `mpi`): processes started by `mpirun` or SLURM's `srun`, over
//!   the system's MPI library, for CPUs;
//! - NCCL (cargo feature `nccl`): processes started by `torchrun`, `srun` or `mpirun`,
//!   one CUDA GPU each.
//!
//! [`connect`] starts the backend a [`Backend`] names. Every call of the MPI and NCCL
//! backends waits at most a set time for the other processes ([`Launch::timeout`]),
//! then fails with an error that says so: a process that died or hangs stops the
//! others instead of leaving them waiting for ever.

mod checksum;
mod collective;
mod launch;
#[cfg(feature = "mpi")]
mod mpi_transport;
#[cfg(feature = "nccl")]
mod nccl_transport;
mod rendezvous;
mod replicated;
mod tensors;
mod threads;
// The MPI and NCCL backends run on it; its tests run in every build.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
mod worker;

pub use checksum::checksum;
pub use collective::{Collective, Single};
pub use launch::{connect, local_processes, Backend, Launch, LauncherVars, DEFAULT_TIMEOUT_SECS};
pub use rendezvous::{receive_id, serve_id};
pub use replicated::{replicated_sum, ReplicaSum};
pub use tensors::{all_reduce_tensors, broadcast_tensors};
pub use threads::ThreadGroup;
