//! Helpers shared by the test files: random inputs, numerical Jacobians, variables.

#![allow(dead_code)]

#[path = "../../../../tests/support/bijector_checks.rs"]
mod bijector_checks;
// Each test binary uses some of these.
#[allow(unused_imports)]
pub use bijector_checks::{inputs, log_abs_det, numerical_log_det};

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::Bijector;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub const DEV: Device = Device::Cpu;

pub fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .flatten_all()?
        .to_dtype(DType::F64)?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// `max |a − b|`.
pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)
}

/// `forward` then `inverse` give `x` back and opposite log-dets; returns the largest
/// errors `(round trip, log-det sum)`.
pub fn round_trip(b: &dyn Bijector, x: &Tensor) -> Result<(f64, f64)> {
    let (z, ld) = b.forward(x)?;
    ensure!(
        z.dims() == x.dims(),
        "shape {:?} → {:?}",
        x.dims(),
        z.dims()
    );
    ensure!(ld.dims() == [x.dim(0)?], "log-det shape {:?}", ld.dims());
    let (back, ld_inv) = b.inverse(&z)?;
    Ok((max_diff(&back, x)?, max_abs(&(ld + ld_inv)?)?))
}

/// Overwrites every variable of `varmap` whose name ends with one of `suffixes` with
/// `N(0, scale²)` draws.
pub fn randomize(varmap: &VarMap, suffixes: &[&str], scale: f64, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if !suffixes.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let var = &data[name];
        let n = var.elem_count();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                // Box–Muller.
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                scale * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        let t = Tensor::from_vec(v, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Every tensor of `varmap`, by name, as `flow_io::save` takes them.
pub fn tensors(varmap: &VarMap) -> std::collections::HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// A fresh temporary file path.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flow-glow-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir.join(name)
}
