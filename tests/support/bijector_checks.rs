//! Helpers for the bijector tests of several crates (each includes this file with
//! `#[path]`): seeded inputs, and numerical Jacobians by central differences with
//! `log|det|` by elimination.

use anyhow::Result;
use candle::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// `(n, dim)` uniform in `[offset − spread, offset + spread]`, drawn from `seed`.
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
    Ok(Tensor::from_vec(v, (n, dim), &Device::Cpu)?.to_dtype(dtype)?)
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
        let z = f(&Tensor::from_vec(batch, (2 * d, d), &Device::Cpu)?)?
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
