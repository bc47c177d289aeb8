//! The fused conditioner kernels (CPU, and CUDA with the `cuda` feature) against the
//! plain candle reference on the same device: same values and the same gradients (to
//! float rounding), for every supported activation and dtype.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder};
use flow_nn::{Activation, Mlp, NetConfig};
use rand::{rngs::StdRng, SeedableRng};

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
    Ok(diff / scale)
}

#[test]
fn fused_mlp_matches_reference_values_and_gradients() -> Result<()> {
    matches_reference_on(&Device::Cpu)
}

/// The CUDA kernels against candle's own CUDA ops. Without a GPU this is skipped,
/// unless `FLOWS_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) makes that a failure.
#[cfg(feature = "cuda")]
#[test]
fn fused_cuda_mlp_matches_reference_values_and_gradients() -> Result<()> {
    match flow_core::cuda_if_present()? {
        Some(dev) => matches_reference_on(&dev),
        None => Ok(()),
    }
}

fn matches_reference_on(dev: &Device) -> Result<()> {
    let dev = dev.clone();
    let rng = &mut StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for activation in [Activation::LeakyRelu, Activation::Relu, Activation::Tanh] {
            for (input, hidden, output, batch) in [
                (1, 512, 1, 512),
                (3, 37, 5, 130),
                (2, 64, 4, 1),
                (4, 9, 2, 700),
                // Specialised and unusual widths of the vectorised kernel.
                (2, 24, 2, 70),
                (17, 16, 3, 33),
            ] {
                if dev.is_cuda() && input.max(output) > flow_kernels::CUDA_MAX_IO {
                    continue; // wider networks take candle's ops on the GPU
                }
                let varmap = VarMap::new();
                let cfg = NetConfig::Mlp {
                    hidden: vec![hidden],
                    activation,
                };
                let mlp = Mlp::new(
                    &cfg,
                    input,
                    output,
                    false,
                    seeded_var_builder(&varmap, 3, dtype, &dev),
                )?;
                let x = Var::from_tensor(&(randn(batch, input, dtype, &dev, rng)? * 2.)?)?;
                ensure!(mlp.uses_fused(x.as_tensor()), "fused path not taken");
                let fused = mlp.forward(x.as_tensor())?;
                let reference = mlp.forward_reference(x.as_tensor())?;
                let e = rel_err(&fused, &reference)?;
                ensure!(
                    e < tol,
                    "{dtype:?} {activation:?} {input}x{hidden}x{output}: values differ by {e}"
                );

                // A non-uniform upstream gradient.
                let w = randn(batch, output, dtype, &dev, rng)?;
                let gf = (fused * &w)?.sum_all()?.backward()?;
                let gr = (reference * &w)?.sum_all()?.backward()?;
                let mut tensors: Vec<(String, Tensor)> = vec![("x".into(), x.as_tensor().clone())];
                for (name, v) in varmap.data().lock().expect("lock").iter() {
                    tensors.push((name.clone(), v.as_tensor().clone()));
                }
                for (name, t) in tensors {
                    let (a, b) = (gf.get(&t), gr.get(&t));
                    let (Some(a), Some(b)) = (a, b) else {
                        anyhow::bail!("missing gradient for {name}");
                    };
                    let e = rel_err(a, b)?;
                    ensure!(
                        e < tol * 10.0,
                        "{dtype:?} {activation:?}: gradient of {name} differs by {e}"
                    );
                }
            }
        }
    }
    Ok(())
}
