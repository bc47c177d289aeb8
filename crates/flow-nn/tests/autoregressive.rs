//! Autoregressive layers (MAF's affine, autoregressive NSF's spline; IAF as their
//! inverse): the Jacobian is triangular in the layer's order, the `d`-pass inverse
//! inverts the one-pass forward map, the MADE network runs fused as it does plain, and a
//! flow of them integrates to one.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder, Bijector, Inverse};
use flow_nn::{
    made_masks, Activation, Affine, Autoregressive, AutoregressiveConfig, Mlp, NetConfig, ScaleMap,
    Spline,
};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

fn config<T>(order: Vec<usize>, transform: T) -> AutoregressiveConfig<T> {
    AutoregressiveConfig {
        order,
        hidden: vec![24, 24],
        activation: Activation::Tanh,
        transform,
        inverted: false,
        context_dim: 0,
        zero_init: false,
    }
}

/// Layers over `dim` features with random weights: affine and spline, two orders.
fn layers(dim: usize, seed: u64) -> Result<Vec<(String, Box<dyn Bijector>)>> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &DEV);
    let orders = [
        (0..dim).collect::<Vec<_>>(),
        (0..dim).rev().collect::<Vec<_>>(),
    ];
    let mut out: Vec<(String, Box<dyn Bijector>)> = Vec::new();
    for (o, order) in orders.into_iter().enumerate() {
        let affine = config(
            order.clone(),
            Affine::new(ScaleMap::SoftClamp { clamp: 2.0 }),
        );
        let spline = config(order.clone(), Spline::new(5, 3.0));
        out.push((
            format!("maf {order:?}"),
            Box::new(Autoregressive::new(&affine, vb.pp(format!("maf{o}")))?),
        ));
        out.push((
            format!("nsf-ar {order:?}"),
            Box::new(Autoregressive::new(&spline, vb.pp(format!("nsf{o}")))?),
        ));
        out.push((
            format!("iaf {order:?}"),
            Box::new(Inverse(Autoregressive::new(
                &affine,
                vb.pp(format!("iaf{o}")),
            )?)),
        ));
    }
    Ok(out)
}

/// The Jacobian `∂z/∂x` `(dim, dim)` at one point, by central differences.
fn jacobian(b: &dyn Bijector, x: &[f64]) -> Result<Vec<Vec<f64>>> {
    let dim = x.len();
    let eps = 1e-6;
    let mut rows = Vec::new();
    for j in 0..dim {
        let mut hi = x.to_vec();
        let mut lo = x.to_vec();
        hi[j] += eps;
        lo[j] -= eps;
        let t = Tensor::from_vec([hi, lo].concat(), (2, dim), &DEV)?;
        let z = b.forward(&t)?.0.to_vec2::<f64>()?;
        rows.push(
            (0..dim)
                .map(|i| (z[0][i] - z[1][i]) / (2.0 * eps))
                .collect::<Vec<_>>(),
        );
    }
    // rows[j][i] = ∂z_i/∂x_j; return J[i][j].
    Ok((0..dim)
        .map(|i| (0..dim).map(|j| rows[j][i]).collect())
        .collect())
}

/// (The log-dets against numerical Jacobians: the bijector zoo in flow-realnvp's tests.)
#[test]
fn jacobians_are_triangular_in_the_order() -> Result<()> {
    let dim = 4;
    let rng = &mut StdRng::seed_from_u64(3);
    let points = (randn(3, dim, DType::F64, &DEV, rng)? * 1.2)?.to_vec2::<f64>()?;
    for (name, layer) in layers(dim, 1)? {
        for x in &points {
            if name.starts_with("iaf") {
                continue; // the inverse of a triangular map
            }
            let jac = jacobian(layer.as_ref(), x)?;
            // z_i depends on x_j only where j comes before i in the order.
            let order: Vec<usize> = if name.contains("[3, 2") {
                (0..dim).rev().collect()
            } else {
                (0..dim).collect()
            };
            let rank = |f: usize| order.iter().position(|&o| o == f).unwrap_or(0);
            for (i, row) in jac.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    if i != j && rank(j) > rank(i) {
                        ensure!(v.abs() < 1e-8, "{name}: ∂z{i}/∂x{j} = {v}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn inverses_invert_in_d_passes() -> Result<()> {
    for dim in [1, 3, 6] {
        let rng = &mut StdRng::seed_from_u64(5);
        let x = (randn(50, dim, DType::F64, &DEV, rng)? * 2.0)?;
        for (name, layer) in layers(dim, 2)? {
            let (z, ld) = layer.forward(&x)?;
            let (back, ld_inv) = layer.inverse(&z)?;
            let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
            ensure!(
                err < 1e-9,
                "{name} ({dim} features): round trip off by {err:e}"
            );
            let sum = (ld + ld_inv)?.abs()?.max_all()?.to_scalar::<f64>()?;
            ensure!(sum < 1e-9, "{name}: log-dets do not cancel ({sum:e})");
        }
    }
    Ok(())
}

#[test]
fn masked_networks_run_fused_as_they_do_plain() -> Result<()> {
    // The MADE network through the fused kernel (weights masked before packing) and
    // through plain ops: the same values and gradients, f32 and f64.
    for dtype in [DType::F32, DType::F64] {
        let varmap = VarMap::new();
        let (dim, params) = (5, 3);
        let cfg = NetConfig::Mlp {
            hidden: vec![32, 16],
            activation: Activation::Relu,
        };
        let vb = seeded_var_builder(&varmap, 4, dtype, &DEV);
        let masks = made_masks(&[2, 5, 1, 4, 3], 0, &[32, 16], params, &DEV)?
            .into_iter()
            .map(|m| m.to_dtype(dtype))
            .collect::<candle::Result<Vec<_>>>()?;
        let mlp = Mlp::new(&cfg, dim, dim * params, false, vb)?.with_masks(masks)?;
        let rng = &mut StdRng::seed_from_u64(6);
        let x = candle::Var::from_tensor(&randn(40, dim, dtype, &DEV, rng)?)?;
        ensure!(mlp.uses_fused(x.as_tensor()));
        let fused = mlp.forward(x.as_tensor())?;
        let plain = mlp.forward_reference(x.as_tensor())?;
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        let e = (&fused - &plain)?.abs()?.max_all()?.to_dtype(DType::F64)?;
        ensure!(e.to_scalar::<f64>()? < tol, "{dtype:?}: values differ");
        let w = randn(40, dim * params, dtype, &DEV, rng)?;
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gp = (plain * &w)?.sum_all()?.backward()?;
        for (name, v) in varmap.data().lock().expect("lock").iter() {
            let (a, b) = (gf.get(v.as_tensor()), gp.get(v.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                anyhow::bail!("no gradient for {name}");
            };
            let e = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            ensure!(
                e < tol * 10.0,
                "{dtype:?}: gradient of {name} differs by {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn an_autoregressive_flow_integrates_to_one() -> Result<()> {
    // Two layers over 2 features on a standard normal, integrated over a grid.
    for spline in [false, true] {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 8, DType::F64, &DEV);
        let mut chain = flow_core::Chain::default();
        for (i, order) in [vec![0, 1], vec![1, 0]].into_iter().enumerate() {
            let vb = vb.pp(i);
            if spline {
                chain.push(Autoregressive::new(
                    &config(order, Spline::new(4, 3.0)),
                    vb,
                )?);
            } else {
                let affine = Affine::new(ScaleMap::SoftClamp { clamp: 1.5 });
                chain.push(Autoregressive::new(&config(order, affine), vb)?);
            }
        }
        let flow = flow_core::Flow::new(chain, flow_core::StandardNormal::new(2, DType::F64, &DEV));
        let (n, half) = (500usize, 9.0f64);
        let h = 2.0 * half / n as f64;
        let axis: Vec<f64> = (0..n).map(|i| -half + (i as f64 + 0.5) * h).collect();
        let grid: Vec<f64> = axis
            .iter()
            .flat_map(|&a| axis.iter().flat_map(move |&b| [a, b]))
            .collect();
        let grid = Tensor::from_vec(grid, (n * n, 2), &DEV)?;
        let mass = flow.log_prob(&grid)?.exp()?.sum_all()?.to_scalar::<f64>()? * h * h;
        ensure!(
            (mass - 1.0).abs() < 2e-3,
            "spline {spline}: integrates to {mass}"
        );
    }
    Ok(())
}
