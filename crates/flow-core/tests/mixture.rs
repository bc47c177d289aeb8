//! The Gaussian-mixture base: its density against a direct computation, its
//! normalisation, its samples against its moments, and gradients to every parameter.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flow_core::{sampling::randn, seeded_var_builder, DiagNormal, Distribution, GaussianMixture};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

const LOGITS: [f64; 3] = [0.3, -1.0, 0.8];
const LOC: [[f64; 2]; 3] = [[-1.5, 0.5], [2.0, 1.0], [0.0, -2.0]];
const LOG_SCALE: [[f64; 2]; 3] = [[-0.3, 0.2], [0.4, -0.5], [0.0, 0.1]];

/// The mixture above, read from tensors as a checkpoint would give them.
fn mixture(dtype: DType) -> Result<GaussianMixture> {
    let t = |v: Vec<f64>, shape: &[usize]| Tensor::from_vec(v, shape, &DEV)?.to_dtype(dtype);
    let tensors = HashMap::from([
        ("logits".to_string(), t(LOGITS.to_vec(), &[3])?),
        ("loc".to_string(), t(LOC.concat(), &[3, 2])?),
        ("log_scale".to_string(), t(LOG_SCALE.concat(), &[3, 2])?),
    ]);
    Ok(GaussianMixture::new(
        3,
        2,
        VarBuilder::from_tensors(tensors, dtype, &DEV),
    )?)
}

/// `log Σ_k w_k Π_j N(x_j; μ_kj, σ_kj)`, written out.
fn direct(x: [f64; 2]) -> f64 {
    let norm: f64 = LOGITS.iter().map(|l| l.exp()).sum();
    let p: f64 = (0..3)
        .map(|k| {
            let w = LOGITS[k].exp() / norm;
            w * (0..2)
                .map(|j| {
                    let s = LOG_SCALE[k][j].exp();
                    let u = (x[j] - LOC[k][j]) / s;
                    (-0.5 * u * u).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
                })
                .product::<f64>()
        })
        .sum();
    p.ln()
}

#[test]
fn log_prob_matches_the_direct_formula() -> Result<()> {
    let m = mixture(DType::F64)?;
    let points = [[0.0, 0.0], [-1.5, 0.5], [3.0, -4.0], [10.0, 10.0]];
    let x = Tensor::from_vec(points.concat(), (4, 2), &DEV)?;
    let lp = m.log_prob(&x)?.to_vec1::<f64>()?;
    for (p, got) in points.iter().zip(lp) {
        let want = direct(*p);
        ensure!((got - want).abs() < 1e-10, "{p:?}: {got} against {want}");
    }
    Ok(())
}

#[test]
fn density_integrates_to_one() -> Result<()> {
    let m = mixture(DType::F64)?;
    let (lo, hi, n) = (-9.0, 9.0, 400);
    let h = (hi - lo) / n as f64;
    let mut grid = Vec::with_capacity(2 * n * n);
    for i in 0..n {
        for j in 0..n {
            grid.push(lo + (i as f64 + 0.5) * h);
            grid.push(lo + (j as f64 + 0.5) * h);
        }
    }
    let x = Tensor::from_vec(grid, (n * n, 2), &DEV)?;
    let mass = m.log_prob(&x)?.exp()?.sum_all()?.to_scalar::<f64>()? * h * h;
    ensure!((mass - 1.0).abs() < 1e-6, "mass {mass}");
    Ok(())
}

#[test]
fn one_component_is_the_diagonal_normal() -> Result<()> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 5, DType::F64, &DEV);
    let m = GaussianMixture::new(1, 3, vb.clone())?;
    let loc = varmap.data().lock().expect("lock")["loc"]
        .as_tensor()
        .clone();
    let d = DiagNormal::from_tensors(loc.squeeze(0)?, Tensor::zeros(3, DType::F64, &DEV)?)?;
    let x = (randn(50, 3, DType::F64, &DEV, &mut StdRng::seed_from_u64(11))? * 2.0)?;
    let diff = (m.log_prob(&x)? - d.log_prob(&x)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    ensure!(diff < 1e-12, "differs by {diff}");
    Ok(())
}

#[test]
fn samples_have_the_mixture_moments() -> Result<()> {
    let m = mixture(DType::F64)?;
    let n = 200_000;
    let s = m.sample(n, &mut StdRng::seed_from_u64(3))?;
    let mean = s.mean(0)?.to_vec1::<f64>()?;
    let second = s.sqr()?.mean(0)?.to_vec1::<f64>()?;
    let norm: f64 = LOGITS.iter().map(|l| l.exp()).sum();
    for j in 0..2 {
        let (mut m1, mut m2) = (0.0, 0.0);
        for k in 0..3 {
            let w = LOGITS[k].exp() / norm;
            let s2 = (2.0 * LOG_SCALE[k][j]).exp();
            m1 += w * LOC[k][j];
            m2 += w * (s2 + LOC[k][j] * LOC[k][j]);
        }
        // Within five standard errors of the estimates.
        let se1 = ((m2 - m1 * m1) / n as f64).sqrt();
        ensure!(
            (mean[j] - m1).abs() < 5.0 * se1,
            "feature {j}: mean {} against {m1}",
            mean[j]
        );
        ensure!(
            (second[j] - m2).abs() < 0.02 * m2,
            "feature {j}: second moment {} against {m2}",
            second[j]
        );
    }
    // Sampling at temperature 0 gives the components' means only.
    let cold = m.sample_with_temperature(100, 0.0, &mut StdRng::seed_from_u64(4))?;
    for row in cold.to_vec2::<f64>()? {
        ensure!(
            LOC.iter().any(|c| c[0] == row[0] && c[1] == row[1]),
            "{row:?} is no component's mean"
        );
    }
    Ok(())
}

#[test]
fn gradients_reach_weights_means_and_scales() -> Result<()> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 1, DType::F32, &DEV);
    let m = GaussianMixture::new(4, 2, vb)?;
    let x = (randn(64, 2, DType::F32, &DEV, &mut StdRng::seed_from_u64(12))? * 1.5)?;
    let grads = m.log_prob(&x)?.mean_all()?.backward()?;
    let vars = varmap.data().lock().expect("lock").clone();
    ensure!(vars.len() == 3, "tensors: {:?}", vars.keys());
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
        let size = g.abs()?.max_all()?.to_scalar::<f32>()?;
        ensure!(size > 0.0, "zero gradient for {name}");
    }
    Ok(())
}
