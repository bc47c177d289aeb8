//! `flow train --distributed`: joining the other processes of a data-parallel run,
//! and what each process does that one alone does not.

use std::time::Duration;

use candle::Device;
use flow_dist::{connect, Backend, Launch, LauncherVars};
use flow_train::{Replicas, TrainSummary};

use crate::{cli::DistributedArg, cli::TrainArgs, signals, CmdResult, Failure};

/// The longest `--dist-timeout`: a year, far below what a `Duration` holds.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// The backend `--distributed` names, refused when this build lacks it; `None`
/// without the flag, when the flags that go with it are refused.
pub fn backend(a: &TrainArgs) -> Result<Option<Backend>, Failure> {
    let Some(arg) = a.distributed else {
        for (flag, given) in [
            ("dist-timeout", a.dist_timeout.is_some()),
            ("dist-check-every", a.dist_check_every.is_some()),
        ] {
            if given {
                return Err(format!("--{flag} applies to --distributed runs only").into());
            }
        }
        return Ok(None);
    };
    if let Some(secs) = a.dist_timeout {
        if !(secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
            return Err(format!(
                "--dist-timeout must be a positive number of seconds up to {MAX_TIMEOUT_SECS}, got {secs}"
            )
            .into());
        }
    }
    if a.dist_check_every == Some(0) {
        return Err("--dist-check-every must be at least 1".into());
    }
    if a.low_memory {
        return Err("--low-memory does not apply to --distributed runs".into());
    }
    let backend = match arg {
        DistributedArg::Mpi => Backend::Mpi,
        DistributedArg::Nccl => Backend::Nccl,
    };
    if let Some(why) = backend.unavailable() {
        return Err(format!("--distributed {}: {why}", backend.name()).into());
    }
    Ok(Some(backend))
}

/// The device of this process: NCCL's processes each take the GPU of their local
/// rank; other runs the one `--device` names.
pub fn device(a: &TrainArgs, backend: Option<Backend>) -> Result<Device, Failure> {
    if backend != Some(Backend::Nccl) {
        return super::device(&a.device);
    }
    if !matches!(a.device.as_str(), "cpu" | "cuda") {
        return Err(format!(
            "--distributed nccl puts each process on the GPU of its local rank: give --device cuda, not {}",
            a.device
        )
        .into());
    }
    let vars = LauncherVars::from_env().map_err(Failure::from)?;
    super::device(&format!("cuda:{}", vars.local_rank))
}

/// Joins the other processes of the run over `backend`.
pub fn join(a: &TrainArgs, backend: Backend, device: &Device) -> Result<Replicas, Failure> {
    let mut launch = Launch::new(backend);
    if let Some(secs) = a.dist_timeout {
        launch = launch.with_timeout(Duration::from_secs_f64(secs));
    }
    let collective = connect(launch, device).map_err(|e| Failure {
        message: format!("--distributed {}: {e}", backend.name()),
        code: 1,
    })?;
    let mut replicas = Replicas::new(collective);
    if a.dist_check_every.is_some() {
        replicas = replicas.with_check_every(a.dist_check_every);
    }
    Ok(replicas)
}

/// How a process other than rank 0 ends, silently: rank 0 reports and saves, and
/// this exit status is the one rank 0's report ends with.
pub fn follower_exit(s: &TrainSummary, start_step: usize, signalled: bool) -> CmdResult {
    let quiet = |code| {
        Err(Failure {
            message: String::new(),
            code,
        })
    };
    if s.kept_step == Some(start_step) {
        return quiet(1);
    }
    if s.interrupted && signalled {
        return quiet(signals::INTERRUPTED);
    }
    match &s.stopped {
        Some(reason) if !s.interrupted && !reason.starts_with("early stop") => quiet(1),
        _ => Ok(()),
    }
}

/// Ends this process at once on an error in the middle of a run: without shutting MPI
/// down, which would wait for the other processes, still waiting at the next step for
/// this one. The launcher sees the process end and stops the others.
pub fn abandon(f: Failure) -> ! {
    let msg = f.message.lines().find(|l| !l.trim().is_empty());
    eprintln!("error: {}", msg.unwrap_or("failed"));
    std::process::exit(i32::from(f.code))
}
