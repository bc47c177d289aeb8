//! Which backend a run uses, and what the launcher tells each process.

use std::{sync::Arc, time::Duration};

use candle::Device;

use crate::Collective;

/// How long a call waits for the other processes unless told otherwise: long enough
/// for rank 0 to write a large checkpoint while the others wait at the next step.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// A transport between processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MPI (cargo feature `mpi`), for processes on CPUs.
    Mpi,
    /// NCCL (cargo feature `nccl`), for processes with a CUDA GPU each.
    Nccl,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Mpi, Backend::Nccl];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether this build has the backend: its cargo feature of the same name.
    pub fn built(self) -> bool {
        match self {
            Backend::Mpi => cfg!(feature = "mpi"),
            Backend::Nccl => cfg!(feature = "nccl"),
        }
    }

    /// Why the backend cannot be used, when this build lacks it.
    pub fn unavailable(self) -> Option<String> {
        (!self.built()).then(|| {
            let name = self.name();
            format!(
                "this build has no {name} backend: build it with `--features {name}` (see the README's data-parallel training)"
            )
        })
    }
}

/// Where a data-parallel run finds its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub backend: Backend,
    /// How long any call waits for the other processes before it fails.
    pub timeout: Duration,
}

impl Launch {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// This process's place among the processes a launcher started, from the variables
/// the launcher sets: `torchrun`'s `RANK`, `WORLD_SIZE` and `LOCAL_RANK`, SLURM's
/// `SLURM_PROCID`, `SLURM_NTASKS` and `SLURM_LOCALID`, or Open MPI's
/// `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE` and `OMPI_COMM_WORLD_LOCAL_RANK`,
/// in that order of preference. Without any, a world of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LauncherVars {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes on this machine: the GPU this process uses.
    pub local_rank: usize,
}

/// The launchers' variables: rank, world size, local rank.
const LAUNCHERS: [[&str; 3]; 3] = [
    ["RANK", "WORLD_SIZE", "LOCAL_RANK"],
    ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
    [
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ],
];

impl LauncherVars {
    /// From this process's environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From the variables `get` returns.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let Some(names) = LAUNCHERS.iter().find(|names| get(names[0]).is_some()) else {
            return Ok(Self {
                rank: 0,
                world: 1,
                local_rank: 0,
            });
        };
        let read = |name: &str, required: bool| -> Result<Option<usize>, String> {
            match get(name) {
                None if required => Err(format!(
                    "{} is set but {name} is not: the launcher sets both",
                    names[0]
                )),
                None => Ok(None),
                Some(text) => text.trim().parse::<usize>().map(Some).map_err(|_| {
                    format!("{name}=`{text}` from the launcher is not a whole number")
                }),
            }
        };
        let rank = read(names[0], true)?.unwrap_or(0);
        let world = read(names[1], true)?.unwrap_or(1);
        let local_rank = read(names[2], false)?.unwrap_or(rank);
        if world == 0 || rank >= world {
            return Err(format!(
                "{}={rank} and {}={world} from the launcher: the rank must lie below the number of processes",
                names[0], names[1]
            ));
        }
        Ok(Self {
            rank,
            world,
            local_rank,
        })
    }
}

/// The number of processes a launcher started on this machine, this one included:
/// `torchrun`'s `LOCAL_WORLD_SIZE`, Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE` or
/// MPICH's `MPI_LOCALNRANKS`; 1 without a launcher (or with one that says nothing).
pub fn local_processes() -> usize {
    [
        "LOCAL_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse::<usize>().ok())
    .unwrap_or(1)
    .max(1)
}

/// Joins the processes the launcher started, over `launch`'s backend; `device` is
/// where the tensors handed to the collective live (NCCL: this process's GPU). Every
/// process calls it, once.
pub fn connect(launch: Launch, device: &Device) -> candle::Result<Arc<dyn Collective>> {
    let _ = device;
    match launch.backend {
        #[cfg(feature = "mpi")]
        Backend::Mpi => Ok(Arc::new(crate::worker::Worker::start(
            "MPI",
            launch.timeout,
            crate::mpi_transport::open,
        )?)),
        #[cfg(feature = "nccl")]
        Backend::Nccl => crate::nccl_transport::connect(launch.timeout, device),
        #[allow(unreachable_patterns)]
        backend => Err(candle::Error::Msg(
            backend.unavailable().unwrap_or_default(),
        )),
    }
}
