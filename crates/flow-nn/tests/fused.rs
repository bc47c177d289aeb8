//! The fused conditioner kernels (CPU, and CUDA with the `cuda` feature) against the
//! plain candle reference on the same device: same values and the same gradients (to
//! float rounding), for every supported activation and dtype.

use anyhow::{ensure, Result};
use candle::{backprop::GradStore, DType, Device, Module, Tensor, Var};
use std::collections::HashMap;

use candle_nn::{VarBuilder, VarMap};
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

/// The gradients of `x` and of every variable in `varmap`: each of `fused` (the first
/// backward pass, then a second through the same graph, which recomputes the kept
/// activations) against `reference`, to `tol`.
fn same_gradients(
    what: &str,
    x: &Var,
    varmap: &VarMap,
    fused: [&GradStore; 2],
    reference: &GradStore,
    tol: f64,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vec![("x".into(), x.as_tensor().clone())];
    for (name, v) in varmap.data().lock().expect("lock").iter() {
        tensors.push((name.clone(), v.as_tensor().clone()));
    }
    for (name, t) in tensors {
        let Some(r) = reference.get(&t) else {
            anyhow::bail!("{what}: missing reference gradient for {name}");
        };
        for (pass, grads) in ["first", "second"].into_iter().zip(fused) {
            let Some(g) = grads.get(&t) else {
                anyhow::bail!("{what}: missing gradient for {name}");
            };
            let e = rel_err(g, r)?;
            ensure!(
                e < tol,
                "{what}: {pass} backward pass, gradient of {name} differs by {e}"
            );
        }
    }
    Ok(())
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

/// The networks compared: every kernel's shapes. Narrow one-hidden-layer networks
/// (the AVX2 and portable kernels, and CUDA's narrow kernel), then the general kernels':
/// depths 0 (a linear map) to 4, widths up to 1 024, inputs and outputs up to 300, residual networks.
fn networks(activation: Activation) -> Vec<(NetConfig, usize, usize, usize)> {
    let mlp = |hidden: &[usize]| NetConfig::Mlp {
        hidden: hidden.to_vec(),
        activation,
    };
    let residual = |hidden, blocks| NetConfig::Residual {
        hidden,
        blocks,
        activation,
    };
    vec![
        // (network, inputs, outputs, batch)
        (mlp(&[512]), 1, 1, 512),
        (mlp(&[]), 3, 4, 50),
        (mlp(&[37]), 3, 5, 130),
        (mlp(&[64]), 2, 4, 1),
        (mlp(&[9]), 4, 2, 700),
        (mlp(&[24]), 2, 2, 70),
        (mlp(&[16]), 17, 3, 33),
        (mlp(&[64, 64]), 2, 2, 256),
        (mlp(&[32, 48, 16]), 5, 7, 100),
        (mlp(&[20, 20, 20, 20]), 3, 3, 90),
        (mlp(&[512]), 32, 32, 64),
        (mlp(&[128]), 256, 256, 40),
        (mlp(&[1024, 1024]), 8, 8, 24),
        (mlp(&[96, 1024, 64, 8]), 2, 300, 20),
        (residual(32, 2), 4, 6, 80),
        (residual(128, 1), 64, 64, 30),
    ]
}

fn matches_reference_on(dev: &Device) -> Result<()> {
    let dev = dev.clone();
    let rng = &mut StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for activation in [Activation::LeakyRelu, Activation::Relu, Activation::Tanh] {
            for (cfg, input, output, batch) in networks(activation) {
                let varmap = VarMap::new();
                let mlp = Mlp::new(
                    &cfg,
                    input,
                    output,
                    false,
                    seeded_var_builder(&varmap, 3, dtype, &dev),
                )?;
                let x = Var::from_tensor(&(randn(batch, input, dtype, &dev, rng)? * 2.)?)?;
                if !mlp.uses_fused(x.as_tensor()) {
                    // Only the narrow one-hidden-layer networks have CUDA kernels.
                    ensure!(
                        dev.is_cuda(),
                        "{cfg:?} {input}→{output}: fused path not taken"
                    );
                    continue;
                }
                let what = format!("{dtype:?} {cfg:?} {input}→{output}");
                let fused = mlp.forward(x.as_tensor())?;
                let reference = mlp.forward_reference(x.as_tensor())?;
                let e = rel_err(&fused, &reference)?;
                ensure!(e < tol, "{what}: values differ by {e}");

                // Without gradients to follow, the kernels keep nothing for a backward
                // pass: the same values from constant parameters and inputs.
                let constants: HashMap<String, Tensor> = varmap
                    .data()
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                    .collect();
                let vb = VarBuilder::from_tensors(constants, dtype, &dev);
                let frozen = Mlp::new(&cfg, input, output, false, vb)?;
                let inference = frozen.forward(&x.as_tensor().detach())?;
                let e = rel_err(&inference, &reference)?;
                ensure!(e < tol, "{what}: inference values differ by {e}");

                // A non-uniform upstream gradient.
                let w = randn(batch, output, dtype, &dev, rng)?;
                let gf = (&fused * &w)?.sum_all()?.backward()?;
                let gr = (reference * &w)?.sum_all()?.backward()?;
                // A second backward pass through the same graph: the first took the
                // kept activations, so this one recomputes them.
                let again = (fused * &w)?.sum_all()?.backward()?;
                same_gradients(&what, &x, &varmap, [&gf, &again], &gr, tol * 10.0)?;
            }
        }
    }
    Ok(())
}

/// Networks of one shape over the same input (a coupling's separate scale and shift
/// networks) run as one op when there are at least as many as threads: on a pool of two
/// threads, three networks of the general kernel's shapes against each network's
/// reference, for values and the gradients of the input and every parameter, and with
/// no gradients to follow.
#[test]
fn networks_sharing_an_input_run_as_one_op() -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    pool.install(|| -> Result<()> {
        let dev = Device::Cpu;
        let rng = &mut StdRng::seed_from_u64(5);
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for (hidden, input, output, batch) in [
                (vec![64, 64], 1, 1, 256),
                (vec![40, 24, 16], 7, 5, 90),
                (vec![300], 20, 20, 33),
            ] {
                let cfg = NetConfig::Mlp {
                    hidden: hidden.clone(),
                    activation: Activation::Relu,
                };
                let varmap = VarMap::new();
                let vb = seeded_var_builder(&varmap, 8, dtype, &dev);
                let nets = (0..3)
                    .map(|i| Mlp::new(&cfg, input, output, false, vb.pp(format!("n{i}"))))
                    .collect::<candle::Result<Vec<_>>>()?;
                let x = Var::from_tensor(&randn(batch, input, dtype, &dev, rng)?)?;
                ensure!(
                    Mlp::runs_as_one_op(&nets, x.as_tensor())?,
                    "{hidden:?}: the networks did not run as one op"
                );
                let what = format!("{dtype:?} {hidden:?} {input}→{output}");
                let together = Mlp::forward_all(&nets, x.as_tensor())?;
                let alone = nets
                    .iter()
                    .map(|n| n.forward_reference(x.as_tensor()))
                    .collect::<candle::Result<Vec<_>>>()?;
                let detached = x.as_tensor().detach();
                let frozen = Mlp::forward_all(&nets, &detached)?;
                let mut loss_t = Tensor::zeros((), dtype, &dev)?;
                let mut loss_a = Tensor::zeros((), dtype, &dev)?;
                for ((t, a), f) in together.iter().zip(&alone).zip(&frozen) {
                    ensure!(t.dims() == [batch, output], "{what}: shape {:?}", t.dims());
                    let e = rel_err(t, a)?;
                    ensure!(e < tol, "{what}: values differ by {e}");
                    let e = rel_err(f, a)?;
                    ensure!(e < tol, "{what}: values without gradients differ by {e}");
                    let w = randn(batch, output, dtype, &dev, rng)?;
                    loss_t = (loss_t + (t * &w)?.sum_all()?)?;
                    loss_a = (loss_a + (a * &w)?.sum_all()?)?;
                }
                let (gt, ga) = (loss_t.backward()?, loss_a.backward()?);
                // Again through the same graph, the activations recomputed.
                let again = loss_t.backward()?;
                same_gradients(&what, &x, &varmap, [&gt, &again], &ga, tol * 10.0)?;
            }
        }
        Ok(())
    })
}
