//! The layers with state beyond their weights' training: ActNorm's data-dependent
//! initialisation, the 1×1 convolution's inverse, determinant and buffers, batch
//! norm's running statistics; and that all of it survives a checkpoint.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use candle::{DType, Tensor, Var};
use candle_nn::VarMap;
use common::{inputs, max_abs, max_diff, randomize, temp_path, tensors, DEV};
use flow_core::{seeded_var_builder, Bijector, Flow};
use flow_glow::{
    ActNorm, ActNormConfig, BatchNorm, BatchNormConfig, GlowLayer, ImageShape, InvConv1x1,
    InvConv1x1Config,
};
use flow_models::ModelConfig;
use flow_nn::linalg;

/// A model of `layers` over `dim` features, built fresh with a seeded initialiser.
fn build(layers: &[GlowLayer], dim: usize, seed: u64) -> Result<(ModelConfig, VarMap, Flow)> {
    let cfg = ModelConfig::new(dim, layers.iter().map(GlowLayer::spec).collect());
    let varmap = VarMap::new();
    let flow = cfg.build(seeded_var_builder(&varmap, seed, DType::F64, &DEV))?;
    Ok((cfg, varmap, flow))
}

/// Saves the model, loads it back, and checks that every tensor came back bit for bit
/// and the loaded flow computes the same log-densities; returns the loaded model.
fn save_and_load(
    cfg: &ModelConfig,
    varmap: &VarMap,
    flow: &Flow,
    x: &Tensor,
    name: &str,
) -> Result<flow_io::LoadedModel> {
    let path = temp_path(name);
    flow_io::save(&path, cfg, &tensors(varmap), None, &BTreeMap::new())?;
    let loaded = flow_io::load_model(&path, DType::F64, &DEV)?;
    let before = tensors(varmap);
    let after = tensors(&loaded.varmap);
    ensure!(before.len() == after.len(), "{name}: tensor count");
    for (k, t) in &before {
        let u = &after[k];
        let (a, b) = (
            t.flatten_all()?.to_vec1::<f64>()?,
            u.flatten_all()?.to_vec1::<f64>()?,
        );
        ensure!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name}: tensor {k} changed through save and load"
        );
    }
    let lp = flow.log_prob(x)?;
    let lp_loaded = loaded.flow.log_prob(x)?;
    ensure!(
        max_diff(&lp, &lp_loaded)? == 0.0,
        "{name}: log-probs differ"
    );
    std::fs::remove_file(&path).ok();
    Ok(loaded)
}

/// Per-channel mean and variance of rows of `shape` images.
fn channel_stats(z: &Tensor, shape: ImageShape) -> Result<Vec<(f64, f64)>> {
    let rows = z.to_vec2::<f64>()?;
    Ok((0..shape.channels)
        .map(|c| {
            let v: Vec<f64> = rows
                .iter()
                .flat_map(|r| r[c * shape.pixels()..(c + 1) * shape.pixels()].to_vec())
                .collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            (mean, var)
        })
        .collect())
}

/// Data whose channels have their own means and spreads.
fn skewed(n: usize, shape: ImageShape, seed: u64) -> Result<Tensor> {
    let x = inputs(n, shape.dim(), 0.0, 1.0, DType::F64, seed)?;
    let per: Vec<f64> = (0..shape.dim())
        .map(|k| 1.0 + (k / shape.pixels()) as f64)
        .collect();
    let scale = Tensor::from_vec(per, (1, shape.dim()), &DEV)?;
    Ok(x.broadcast_mul(&scale)?.affine(1.0, 3.0)?)
}

#[test]
fn actnorm_initialisation_standardises_and_survives_a_checkpoint() -> Result<()> {
    let shape = ImageShape::new(3, 4, 4);
    let layer = GlowLayer::ActNorm(ActNormConfig::new(shape));
    let (cfg, varmap, flow) = build(&[layer], shape.dim(), 1)?;
    let x = skewed(32, shape, 2)?;
    flow.initialize(&x, None)?;
    let (z, _) = flow.bijector().forward(&x)?;
    for (c, (mean, var)) in channel_stats(&z, shape)?.into_iter().enumerate() {
        ensure!(mean.abs() < 1e-10, "channel {c}: mean {mean}");
        ensure!((var - 1.0).abs() < 1e-5, "channel {c}: variance {var}");
    }
    // The values are the trainable variables themselves (not buffers)...
    ensure!(flow.buffers().is_empty(), "actnorm declares no buffers");
    let names = tensors(&varmap);
    ensure!(max_abs(&names["layers.0.bias"])? > 1.0, "bias not written");
    // ...so they are saved, and a loaded model has them without initialising.
    let loaded = save_and_load(&cfg, &varmap, &flow, &x, "actnorm.safetensors")?;
    let (z2, _) = loaded.flow.bijector().forward(&x)?;
    ensure!(max_diff(&z, &z2)? == 0.0);

    // The layer on its own, in f32: the same statistics.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &DEV);
    let act = ActNorm::new(&ActNormConfig::new(shape), vb)?;
    let x32 = x.to_dtype(DType::F32)?;
    act.initialize(&x32, None)?;
    let z32 = act.forward(&x32)?.0.to_dtype(DType::F64)?;
    for (mean, var) in channel_stats(&z32, shape)? {
        ensure!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
    }
    Ok(())
}

#[test]
fn lu_inverse_is_the_true_inverse() -> Result<()> {
    let shape = ImageShape::new(8, 2, 2);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 4, DType::F64, &DEV);
    let conv = InvConv1x1::new(&InvConv1x1Config::new(shape), vb)?;
    // Move away from a rotation: any L, U and diagonal.
    randomize(&varmap, &["l", "u", "log_s"], 0.7, 5)?;
    let w = conv.weight()?;
    let w_inv = conv.inverse_weight()?;
    let eye = Tensor::eye(8, DType::F64, &DEV)?;
    ensure!(max_diff(&w.matmul(&w_inv)?, &eye)? < 1e-10);
    ensure!(max_diff(&w_inv.matmul(&w)?, &eye)? < 1e-10);
    // The same as the general inverse, and log|det W| = Σ log_s.
    ensure!(max_diff(&w_inv, &linalg::inverse(&w)?)? < 1e-10);
    let lad = linalg::log_abs_det(&w)?.to_scalar::<f64>()?;
    ensure!((lad - conv.log_abs_det()?.to_scalar::<f64>()?).abs() < 1e-10);

    // P is a permutation matrix and sign(s) is ±1: both buffers, the variables `p`
    // and `sign_s` themselves.
    let vars = tensors(&varmap);
    let p = vars["p"].to_vec2::<f64>()?;
    for (i, row) in p.iter().enumerate() {
        let ones_row = row.iter().filter(|v| **v == 1.0).count();
        let ones_col = p.iter().filter(|r| r[i] == 1.0).count();
        ensure!(ones_row == 1 && ones_col == 1 && row.iter().all(|v| *v == 0.0 || *v == 1.0));
    }
    ensure!(vars["sign_s"]
        .to_vec1::<f64>()?
        .iter()
        .all(|s| s.abs() == 1.0));
    let buffers: Vec<_> = conv.buffers().iter().map(Tensor::id).collect();
    ensure!(buffers == [vars["p"].id(), vars["sign_s"].id()]);

    // f32 gives the inverse too (computed in f64 on the host).
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 4, DType::F32, &DEV);
    let conv = InvConv1x1::new(&InvConv1x1Config::new(shape), vb)?;
    let eye = Tensor::eye(8, DType::F32, &DEV)?;
    ensure!(max_diff(&conv.weight()?.matmul(&conv.inverse_weight()?)?, &eye)? < 1e-5);
    Ok(())
}

/// `f(A)` for a scalar function of a matrix, at `a` with entry `(i, j)` moved by `h`.
fn moved(a: &[f64], n: usize, k: usize, h: f64) -> Result<Tensor> {
    let mut v = a.to_vec();
    v[k] += h;
    Ok(Tensor::from_vec(v, (n, n), &DEV)?)
}

#[test]
fn plain_log_det_and_inverse_have_the_right_gradients() -> Result<()> {
    let n = 5;
    let a: Vec<f64> = inputs(1, n * n, 0.0, 1.0, DType::F64, 8)?
        .flatten_all()?
        .to_vec1()?;
    let h = 1e-6;
    // log|det A| against the LU-free determinant of the test helper, and its gradient
    // A⁻ᵀ against central differences.
    let var = Var::from_tensor(&Tensor::from_vec(a.clone(), (n, n), &DEV)?)?;
    let lad = linalg::log_abs_det(var.as_tensor())?;
    let rows: Vec<Vec<f64>> = a.chunks(n).map(|r| r.to_vec()).collect();
    ensure!((lad.to_scalar::<f64>()? - common::log_abs_det(rows)).abs() < 1e-12);
    let grad = lad.backward()?;
    let g = grad
        .get(&var)
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (k, gk) in g.iter().enumerate() {
        let f = |s: f64| -> Result<f64> {
            Ok(linalg::log_abs_det(&moved(&a, n, k, s)?)?.to_scalar::<f64>()?)
        };
        let numeric = (f(h)? - f(-h)?) / (2.0 * h);
        ensure!((gk - numeric).abs() < 1e-6, "entry {k}: {gk} vs {numeric}");
    }
    // The inverse: the gradient of ⟨R, A⁻¹⟩ for a fixed R.
    let r = inputs(n, n, 0.0, 1.0, DType::F64, 9)?;
    let loss = linalg::inverse(var.as_tensor())?.mul(&r)?.sum_all()?;
    let g = loss
        .backward()?
        .get(&var)
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (k, gk) in g.iter().enumerate() {
        let f = |s: f64| -> Result<f64> {
            Ok(linalg::inverse(&moved(&a, n, k, s)?)?
                .mul(&r)?
                .sum_all()?
                .to_scalar::<f64>()?)
        };
        let numeric = (f(h)? - f(-h)?) / (2.0 * h);
        ensure!(
            (gk - numeric).abs() < 1e-5 * (1.0 + numeric.abs()),
            "entry {k}: {gk} vs {numeric}"
        );
    }
    // f32 in, f32 out.
    let a32 = Tensor::from_vec(a.clone(), (n, n), &DEV)?.to_dtype(DType::F32)?;
    ensure!(linalg::inverse(&a32)?.dtype() == DType::F32);
    ensure!(linalg::log_abs_det(&a32)?.dtype() == DType::F32);
    // A singular matrix is an error, not a panic.
    let err = linalg::inverse(&Tensor::zeros((3, 3), DType::F64, &DEV)?).expect_err("singular");
    ensure!(
        err.to_string()
            .contains("the 3×3 matrix is singular or not finite"),
        "{err}"
    );
    Ok(())
}

#[test]
fn one_by_one_convolutions_survive_a_checkpoint() -> Result<()> {
    let shape = ImageShape::new(4, 2, 2);
    let layers = [
        GlowLayer::InvConv1x1(InvConv1x1Config::new(shape)),
        GlowLayer::InvConv1x1(InvConv1x1Config::new(shape).with_lu(false)),
    ];
    let (cfg, varmap, flow) = build(&layers, shape.dim(), 3)?;
    // Loading must not draw a new rotation: the same tensors, the same map.
    let x = inputs(4, shape.dim(), 0.0, 1.0, DType::F64, 1)?;
    let loaded = save_and_load(&cfg, &varmap, &flow, &x, "conv.safetensors")?;
    ensure!(loaded.flow.buffers().len() == 2, "p and sign_s");
    // The plain weight starts orthogonal: |det W| = 1.
    let w = tensors(&varmap)["layers.1.weight"].clone();
    let wtw = w.t()?.matmul(&w)?;
    ensure!(max_diff(&wtw, &Tensor::eye(4, DType::F64, &DEV)?)? < 1e-12);
    Ok(())
}

#[test]
fn batch_norm_trains_on_batches_and_evaluates_on_running_statistics() -> Result<()> {
    let shape = ImageShape::new(2, 2, 3);
    let cfg = BatchNormConfig::new(shape).with_momentum(0.25);
    let (model, varmap, mut flow) = build(&[GlowLayer::BatchNorm(cfg)], shape.dim(), 0)?;
    let x = skewed(16, shape, 3)?;
    let stats = channel_stats(&x, shape)?;

    // Evaluation (the default): running statistics (0, 1) and γ = β = 0, the identity
    // up to eps.
    let (z, ld) = flow.bijector().forward(&x)?;
    ensure!(max_diff(&z, &x)? < 1e-4 && max_abs(&ld)? < 1e-3);

    // Training: the batch's statistics, and the running ones move towards them.
    flow.set_training(true);
    let (z, ld) = flow.bijector().forward(&x)?;
    for (mean, var) in channel_stats(&z, shape)? {
        ensure!(
            mean.abs() < 1e-10 && (var - 1.0).abs() < 1e-4,
            "{mean} {var}"
        );
    }
    let want_ld: f64 = stats
        .iter()
        .map(|(_, v)| -0.5 * (v + 1e-5).ln() * shape.pixels() as f64)
        .sum();
    ensure!((ld.to_vec1::<f64>()?[0] - want_ld).abs() < 1e-10);
    let vars = tensors(&varmap);
    let (rm, rv) = (
        vars["layers.0.running_mean"].to_vec1::<f64>()?,
        vars["layers.0.running_var"].to_vec1::<f64>()?,
    );
    for c in 0..2 {
        ensure!(
            (rm[c] - 0.25 * stats[c].0).abs() < 1e-12,
            "running mean {c}"
        );
        ensure!(
            (rv[c] - (0.75 + 0.25 * stats[c].1)).abs() < 1e-12,
            "running var {c}"
        );
    }
    // The running statistics are the buffers, the variables themselves.
    let ids: Vec<_> = flow.buffers().iter().map(Tensor::id).collect();
    ensure!(
        ids == [
            vars["layers.0.running_mean"].id(),
            vars["layers.0.running_var"].id()
        ]
    );

    // Evaluation again: the running statistics, a fixed bijection that inverts.
    flow.set_training(false);
    randomize(&varmap, &["log_gamma", "beta"], 0.5, 2)?;
    let (z, ld) = flow.bijector().forward(&x)?;
    let gamma = vars["layers.0.log_gamma"].to_vec1::<f64>()?;
    let beta = vars["layers.0.beta"].to_vec1::<f64>()?;
    let (xs, zs) = (x.to_vec2::<f64>()?, z.to_vec2::<f64>()?);
    for (xr, zr) in xs.iter().zip(&zs) {
        for k in 0..shape.dim() {
            let c = k / shape.pixels();
            let want = (xr[k] - rm[c]) / (rv[c] + 1e-5).sqrt() * gamma[c].exp() + beta[c];
            ensure!((zr[k] - want).abs() < 1e-12);
        }
    }
    let (back, ld_inv) = flow.bijector().inverse(&z)?;
    ensure!(max_diff(&back, &x)? < 1e-12 && max_diff(&ld_inv.neg()?, &ld)? < 1e-12);

    // A checkpoint keeps the running statistics; the loaded layer evaluates with them.
    save_and_load(&model, &varmap, &flow, &x, "batch_norm.safetensors")?;

    // The layer alone in f32.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &DEV);
    let mut bn = BatchNorm::new(&BatchNormConfig::new(shape), vb)?;
    bn.set_training(true);
    let x32 = x.to_dtype(DType::F32)?;
    bn.forward(&x32)?;
    bn.set_training(false);
    let (z32, _) = bn.forward(&x32)?;
    ensure!(max_diff(&bn.inverse(&z32)?.0, &x32)? < 1e-5);
    Ok(())
}
