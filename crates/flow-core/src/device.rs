//! Choosing the compute device from a string, and sharing the CPU's threads.

use candle::{bail, Device, Result};

/// Parses `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto`.
///
/// A GPU device whose cargo feature was not compiled in is an error naming the feature
/// to enable; `auto` picks CUDA, then Metal, when compiled in and present, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => match n.parse::<usize>() {
            Ok(n) => (kind, n),
            Err(_) => bail!("invalid device ordinal in `{spec}`: expected a number after `:`"),
        },
        None => (spec.as_str(), 0),
    };
    match kind {
        "cpu" if !spec.contains(':') => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(ordinal),
        "cuda" => bail!("device `{spec}` needs CUDA support: rebuild with `--features cuda`"),
        "metal" if cfg!(feature = "metal") => Device::new_metal(ordinal),
        "metal" => bail!("device `{spec}` needs Metal support: rebuild with `--features metal`"),
        "auto" if !spec.contains(':') => Ok(auto()),
        _ => bail!("unknown device `{spec}`: expected cpu, cuda, cuda:N, metal, metal:N or auto"),
    }
}

/// The first CUDA device, for tests and checks that need one: `None` where there is
/// none (a skip, said on stderr), unless the environment sets `FLOWS_REQUIRE_CUDA=1`
/// (as a GPU machine's check script does), where a missing device is an error.
pub fn cuda_if_present() -> Result<Option<Device>> {
    match Device::new_cuda(0) {
        Ok(dev) => Ok(Some(dev)),
        Err(e) if std::env::var("FLOWS_REQUIRE_CUDA").is_ok_and(|v| v == "1") => Err(e),
        Err(e) => {
            eprintln!("no CUDA device ({e}): skipped");
            Ok(None)
        }
    }
}

fn auto() -> Device {
    if cfg!(feature = "cuda") {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    if cfg!(feature = "metal") {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

/// Makes the calling thread one of the CPU compute threads (rayon's global pool, which
/// candle's CPU backend and the fused kernels run on) rather than a thread beside them.
///
/// Call it once, early in `main`, before any CPU work. The calling thread runs candle's
/// single-threaded ops; as a separate thread it competes for the cores with the pool's
/// idle workers, which spin for a while after every parallel op. On two cores that
/// costs about a third of the reference job's training throughput.
///
/// Returns `false`, changing nothing, when the global pool already exists.
pub fn join_cpu_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_auto() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(parse_device("auto").unwrap().is_cpu());
        }
    }

    #[test]
    fn gpu_without_feature_names_the_feature() {
        if !cfg!(feature = "cuda") {
            for s in ["cuda", "cuda:1"] {
                let e = parse_device(s).unwrap_err().to_string();
                assert!(e.contains("--features cuda"), "{e}");
            }
        }
        if !cfg!(feature = "metal") {
            let e = parse_device("metal:0").unwrap_err().to_string();
            assert!(e.contains("--features metal"), "{e}");
        }
    }

    #[test]
    fn unknown_devices_are_rejected() {
        for s in ["tpu", "", "cpu:0", "cuda:x", "auto:1", "gpu"] {
            let e = parse_device(s).unwrap_err().to_string();
            assert!(e.contains("device"), "{s}: {e}");
        }
    }
}
