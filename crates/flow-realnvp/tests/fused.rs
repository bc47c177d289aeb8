//! The fused CPU conditioner against the plain candle reference: same values and the
//! same gradients (to float rounding), for every supported activation and dtype.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use flow_core::seeded_var_builder;
use flow_realnvp::{Activation, Mlp, NetConfig};

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

/// The CUDA kernels against candle's own CUDA ops, where a GPU is present.
#[cfg(feature = "cuda")]
#[test]
fn fused_cuda_mlp_matches_reference_values_and_gradients() -> Result<()> {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: nothing to compare");
        return Ok(());
    };
    flow_realnvp::set_cuda_fusion(true);
    matches_reference_on(&dev)
}

fn matches_reference_on(dev: &Device) -> Result<()> {
    let dev = dev.clone();
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
                if dev.is_cuda() && input.max(output) > 16 {
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
                let x = Var::from_tensor(
                    &Tensor::randn(0f64, 2., (batch, input), &dev)?.to_dtype(dtype)?,
                )?;
                ensure!(mlp.uses_fused(x.as_tensor()), "fused path not taken");
                let fused = mlp.forward(x.as_tensor())?;
                let reference = mlp.forward_reference(x.as_tensor())?;
                let e = rel_err(&fused, &reference)?;
                ensure!(
                    e < tol,
                    "{dtype:?} {activation:?} {input}x{hidden}x{output}: values differ by {e}"
                );

                // A non-uniform upstream gradient.
                let w = Tensor::randn(0f64, 1., (batch, output), &dev)?.to_dtype(dtype)?;
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
