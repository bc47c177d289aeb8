//! A TarFlow block with its fused kernels (each Transformer layer as one op, the
//! affine update) against the same block on plain candle ops: the same latents,
//! log-dets and gradients, in f64 and f32. A file of its own: the fusion switch is
//! process-wide.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Bijector};
use flow_nn::set_fusion;
use flow_tarflow::{ImageShape, TarFlowBlock, TarFlowBlockConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DEV: Device = Device::Cpu;

fn rows(n: usize, d: usize, seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n * d)
        .map(|_| rng.random::<f64>() * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (n, d), &DEV)?.to_dtype(dtype)?)
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
        out.push(g.cloned().unwrap_or(Tensor::zeros(1, x.dtype(), &DEV)?));
    }
    out.iter().map(|t| Ok(t.to_dtype(DType::F64)?)).collect()
}

/// The block of `cfg` on `batch` rows, fused and on plain ops, in `dtype`: each output
/// and gradient within `tol` of the other's largest value.
fn fused_is_plain(cfg: &TarFlowBlockConfig, batch: usize, dtype: DType, tol: f64) -> Result<()> {
    fused_is_plain_on(cfg, batch, dtype, tol, true)
}

/// [`fused_is_plain`], the inverse left out with `!inverse` (over a long sequence the
/// token-by-token inverse amplifies the two passes' rounding past any useful `tol`).
fn fused_is_plain_on(
    cfg: &TarFlowBlockConfig,
    batch: usize,
    dtype: DType,
    tol: f64,
    inverse: bool,
) -> Result<()> {
    let varmap = VarMap::new();
    let b = TarFlowBlock::new(cfg, seeded_var_builder(&varmap, 1, dtype, &DEV))?;
    let (x, c) = (
        rows(batch, cfg.dim(), 2, dtype)?,
        rows(batch, cfg.context_dim, 3, dtype)?,
    );
    set_fusion(true);
    let fused = pass(&b, &varmap, &x, &c)?;
    set_fusion(false);
    let plain = pass(&b, &varmap, &x, &c)?;
    set_fusion(true);
    ensure!(fused.len() > 10, "too few variables");
    let max =
        |t: &Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?) };
    for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
        if i == 2 && !inverse {
            continue;
        }
        let err = max(&(f - p)?)? / max(p)?.max(1.0);
        ensure!(err < tol, "{dtype:?}: output {i} differs by {err:e}");
    }
    if inverse {
        let back = max(&(&fused[2] - &x.to_dtype(DType::F64)?)?)?;
        ensure!(back < tol, "{dtype:?}: not inverted: {back:e}");
    }
    Ok(())
}

#[test]
fn a_block_computes_the_same_fused_and_on_plain_ops() -> Result<()> {
    let cfg = TarFlowBlockConfig::new(ImageShape::new(2, 4, 4), 2, 2, 8, 2)
        .with_reversed(true)
        .with_context_dim(3)
        .with_zero_init(false);
    fused_is_plain(&cfg, 6, DType::F64, 1e-10)?;
    // 19 sequences of 16 tokens: more than the attention kernel's 16 lanes, and more
    // rows than the kernels split across threads.
    let cfg = TarFlowBlockConfig::new(ImageShape::new(1, 8, 8), 2, 1, 8, 2)
        .with_context_dim(2)
        .with_zero_init(false);
    fused_is_plain(&cfg, 19, DType::F64, 1e-10)?;
    fused_is_plain(&cfg, 19, DType::F32, 1e-4)?;
    // 128 tokens: more than the attention keeps weights for, so that its backward pass
    // finds them again.
    let cfg = TarFlowBlockConfig::new(ImageShape::new(1, 8, 16), 1, 1, 8, 2)
        .with_context_dim(1)
        .with_zero_init(false);
    fused_is_plain_on(&cfg, 3, DType::F64, 1e-10, false)
}
