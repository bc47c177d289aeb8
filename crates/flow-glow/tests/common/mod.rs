//! Helpers shared by the test files: random inputs, numerical Jacobians, variables.

#![allow(dead_code)]

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::Bijector;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub const DEV: Device = Device::Cpu;

/// `(n, dim)` uniform in `[offset − spread, offset + spread]`.
pub fn inputs(
    n: usize,
    dim: usize,
    offset: f64,
    spread: f64,
    dtype: DType,
    seed: u64,
) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n * dim)
        .map(|_| offset + spread * (rng.random::<f64>() * 2.0 - 1.0))
        .collect();
    Ok(Tensor::from_vec(v, (n, dim), &DEV)?.to_dtype(dtype)?)
}

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

/// `log|det a|` by Gaussian elimination with partial pivoting.
pub fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut acc = 0.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .expect("non-empty");
        a.swap(c, p);
        let pivot = a[c][c];
        acc += pivot.abs().ln();
        let (top, rest) = a.split_at_mut(c + 1);
        let pivot_row = &top[c];
        for row in rest.iter_mut() {
            let f = row[c] / pivot;
            for (x, p) in row[c..].iter_mut().zip(&pivot_row[c..]) {
                *x -= f * p;
            }
        }
    }
    acc
}

/// Central-difference Jacobian of `f` at each row of `x: (n, d)`, as `log|det|`.
pub fn numerical_log_det(
    f: impl Fn(&Tensor) -> candle::Result<(Tensor, Tensor)>,
    x: &Tensor,
) -> Result<Vec<f64>> {
    let h = 1e-5;
    let (n, d) = x.dims2()?;
    let rows = x.to_vec2::<f64>()?;
    let mut out = Vec::with_capacity(n);
    for row in rows {
        let mut batch = Vec::with_capacity(2 * d * d);
        for j in 0..d {
            for sign in [1.0, -1.0] {
                let mut p = row.clone();
                p[j] += sign * h;
                batch.extend(p);
            }
        }
        let z = f(&Tensor::from_vec(batch, (2 * d, d), &DEV)?)?
            .0
            .to_vec2::<f64>()?;
        // jac[i][j] = ∂z_i / ∂x_j
        let jac: Vec<Vec<f64>> = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| (z[2 * j][i] - z[2 * j + 1][i]) / (2.0 * h))
                    .collect()
            })
            .collect();
        out.push(log_abs_det(jac));
    }
    Ok(out)
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
        let t = Tensor::from_vec(v, var.shape(), &DEV)?.to_dtype(var.dtype())?;
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
