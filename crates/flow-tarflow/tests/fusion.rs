//! A TarFlow block with its fused kernels (layer norm, attention, linear maps, the
//! affine update) against the same block on plain candle ops: the same latents,
//! log-dets and gradients. A file of its own: the fusion switch is process-wide.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Bijector};
use flow_nn::set_fusion;
use flow_tarflow::{ImageShape, TarFlowBlock, TarFlowBlockConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DEV: Device = Device::Cpu;

fn rows(n: usize, d: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n * d)
        .map(|_| rng.random::<f64>() * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (n, d), &DEV)?)
}

/// Latent, log-det, and the gradient of a weighted loss to every variable, by name.
fn pass(b: &TarFlowBlock, varmap: &VarMap, x: &Tensor, c: &Tensor) -> Result<Vec<Tensor>> {
    let (z, ld) = b.forward_with_context(x, c)?;
    let (back, _) = b.inverse_with_context(&z, c)?;
    let loss = ((&z * 0.3)?.sqr()?.sum_all()? + ld.sum_all()?)?;
    let grads = loss.backward()?;
    let mut out = vec![z, ld, back];
    let data = varmap.data().lock().expect("variables");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let g = grads.get(data[name].as_tensor());
        out.push(g.cloned().unwrap_or(Tensor::zeros(1, DType::F64, &DEV)?));
    }
    Ok(out)
}

#[test]
fn a_block_computes_the_same_fused_and_on_plain_ops() -> Result<()> {
    let cfg = TarFlowBlockConfig::new(ImageShape::new(2, 4, 4), 2, 2, 8, 2)
        .with_reversed(true)
        .with_context_dim(3)
        .with_zero_init(false);
    let varmap = VarMap::new();
    let b = TarFlowBlock::new(&cfg, seeded_var_builder(&varmap, 1, DType::F64, &DEV))?;
    let (x, c) = (rows(6, 32, 2)?, rows(6, 3, 3)?);
    set_fusion(true);
    let fused = pass(&b, &varmap, &x, &c)?;
    set_fusion(false);
    let plain = pass(&b, &varmap, &x, &c)?;
    set_fusion(true);
    ensure!(fused.len() > 10, "too few variables");
    for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
        let err = (f - p)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        ensure!(err < 1e-10, "output {i} differs by {err:e}");
    }
    let back = (&fused[2] - &x)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    ensure!(back < 1e-10, "not inverted: {back:e}");
    Ok(())
}
