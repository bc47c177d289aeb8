//! Whole flows with the fused kernels (conditioner networks and the coupling's
//! element-wise part) against the same flows on plain candle ops: log-probs, latents,
//! samples and the gradients of both directions, for every scale map, both mask
//! patterns and both float dtypes. With the `cuda` feature, the same flows on a GPU,
//! with its fused kernels on and off, against the CPU. (The fusion switch is
//! process-wide: the tests take turns through [`SWITCH`].)

use std::sync::Mutex;

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow, StandardNormal};
use flow_kernels::set_fusion;
use flow_nn::ScaleMap;
use flow_realnvp::{MaskPattern, RealNvp, RealNvpConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Held by a test while it sets the fusion switch.
static SWITCH: Mutex<()> = Mutex::new(());

/// Largest difference relative to the reference's size, over the entries finite in
/// both; an entry finite in one result only is an error (the unbounded `exp` scale can
/// overflow f32 in both).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    ensure!(a.len() == b.len(), "sizes differ");
    let mut scale = 1.0f64;
    let mut diff = 0.0f64;
    for (x, y) in a.iter().zip(&b) {
        ensure!(x.is_finite() == y.is_finite(), "{x} against {y}");
        if y.is_finite() {
            scale = scale.max(y.abs());
            diff = diff.max((x - y).abs());
        }
    }
    Ok(diff / scale)
}

/// `(n, dim)` normal draws with mean `mean` and deviation `std` (Box–Muller on a seeded
/// generator, so that every run compares the same points).
fn normal(rng: &mut StdRng, n: usize, dim: usize, mean: f64, std: f64) -> Result<Tensor> {
    let v: Vec<f64> = (0..n * dim)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random(), rng.random());
            let r = (-2.0 * (1.0 - u).ln()).sqrt();
            mean + std * r * (std::f64::consts::TAU * v).cos()
        })
        .collect();
    Ok(Tensor::from_vec(v, (n, dim), &Device::Cpu)?)
}

/// Everything compared between the two paths, by name.
fn outputs(
    flow: &Flow,
    varmap: &VarMap,
    x: &Var,
    z: &Var,
    w: &Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let log_p = flow.log_prob(x.as_tensor())?;
    let (encoded, _) = flow.bijector().forward(x.as_tensor())?;
    let (decoded, log_det_inverse) = flow.bijector().inverse(z.as_tensor())?;
    // Scalar losses through each direction, with non-uniform weights.
    let forward_loss = ((&encoded * w)?.sum_all()? + log_p.sum_all()?)?;
    let inverse_loss = ((&decoded * w)?.sum_all()? + log_det_inverse.sum_all()?)?;
    let mut out = vec![
        ("log-prob".to_string(), log_p),
        ("latent".to_string(), encoded),
        ("sample".to_string(), decoded),
        ("inverse log-det".to_string(), log_det_inverse),
    ];
    let vars = varmap.data().lock().expect("lock").clone();
    for (what, loss, input) in [("forward", forward_loss, x), ("inverse", inverse_loss, z)] {
        let grads = loss.backward()?;
        let mut named: Vec<(String, Tensor)> = vec![("input".into(), input.as_tensor().clone())];
        named.extend(vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())));
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in named {
            let Some(g) = grads.get(&t) else {
                anyhow::bail!("{what}: no gradient for {name}");
            };
            out.push((format!("{what} gradient of {name}"), g.clone()));
        }
    }
    Ok(out)
}

/// Every output of `a` within `(tol, grad_tol)` (values, gradients) of `b`'s.
fn agree(
    a: &[(String, Tensor)],
    b: &[(String, Tensor)],
    (tol, grad_tol): (f64, f64),
    what: &str,
) -> Result<()> {
    ensure!(
        a.len() == b.len(),
        "{what}: {} outputs against {}",
        a.len(),
        b.len()
    );
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let e = rel_err(a, b)?;
        let tol = if name.contains("gradient") {
            grad_tol
        } else {
            tol
        };
        ensure!(e < tol, "{what}: {name} differs by {e:e}");
    }
    Ok(())
}

#[test]
fn fused_flows_match_reference_values_and_gradients() -> Result<()> {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let scales = [
        ScaleMap::Exp,
        ScaleMap::SoftClamp { clamp: 3.0 },
        ScaleMap::Tanh { clamp: 2.0 },
        ScaleMap::Atan { clamp: 1.5 },
        ScaleMap::Sigmoid,
        ScaleMap::Softplus,
    ];
    // (features, mask, layers, hidden units, batch); the last is the reference job's
    // network at a batch the kernels split across threads.
    let cases = [
        (2, MaskPattern::Halves, 3, 24, 300),
        (5, MaskPattern::Halves, 3, 24, 300),
        (5, MaskPattern::Checkerboard, 3, 24, 300),
        (2, MaskPattern::Halves, 5, 512, 1024),
    ];
    // f64 checks the arithmetic tightly; f32 gradients, sums over the batch with
    // cancellation, only catch gross errors.
    for dtype in [DType::F64, DType::F32] {
        let (tol, grad_tol) = if dtype == DType::F32 {
            (1e-5, 1e-2)
        } else {
            (1e-11, 1e-10)
        };
        for scale in scales {
            // The reference job's soft clamp keeps f32 log-probs within 1e-5; the
            // unbounded and steeper maps reach larger values.
            let tol = if dtype == DType::F32 && scale != ScaleMap::default() {
                1e-4
            } else {
                tol
            };
            for (dim, mask, layers, hidden, batch) in cases {
                let cfg = RealNvpConfig::new(dim)
                    .with_layers(layers)
                    .with_hidden(hidden)
                    .with_scale(scale)
                    .with_mask(mask);
                let varmap = VarMap::new();
                let bijector = RealNvp::new(&cfg, seeded_var_builder(&varmap, 9, dtype, &dev))?;
                let flow = Flow::new(bijector, StandardNormal::new(dim, dtype, &dev));
                let rng = &mut StdRng::seed_from_u64(5);
                let x = normal(rng, batch, dim, 0.5, 1.5)?;
                let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let z = normal(rng, batch, dim, 0.0, 1.0)?;
                let z = Var::from_tensor(&z.to_dtype(dtype)?)?;
                // Non-uniform weights for the losses, the same for both paths.
                let w = normal(rng, batch, dim, 0.0, 1.0)?.to_dtype(dtype)?;
                set_fusion(false);
                let reference = outputs(&flow, &varmap, &x, &z, &w)?;
                set_fusion(true);
                let fused = outputs(&flow, &varmap, &x, &z, &w)?;
                ensure!(reference.len() > 4 + 2 * 12);
                let what = format!("{dtype:?} {scale:?} dim {dim} {mask:?}");
                agree(&fused, &reference, (tol, grad_tol), &what)?;
            }
        }
    }
    Ok(())
}

/// Flows on a GPU, fused CUDA kernels off and on, against the same flows on the CPU
/// (plain ops): every output of [`outputs`], for the reference job, zuko's default
/// conditioner depth, NICE, wider features and a checkerboard mask. Without a GPU this
/// is skipped, unless `FLOWS_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) makes that
/// a failure.
#[cfg(feature = "cuda")]
#[test]
fn cuda_flows_match_the_cpu() -> Result<()> {
    use flow_nn::Activation;
    use flow_realnvp::CouplingKind;
    let Some(gpu) = flow_core::cuda_if_present()? else {
        return Ok(());
    };
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        (RealNvpConfig::new(2), 1024),
        (
            RealNvpConfig::new(2)
                .with_layers(6)
                .with_hidden(64)
                .with_hidden_layers(2)
                .with_activation(Activation::Relu),
            256,
        ),
        (
            RealNvpConfig::new(2).with_coupling(CouplingKind::Additive),
            512,
        ),
        (
            RealNvpConfig::new(6)
                .with_layers(3)
                .with_hidden(40)
                .with_activation(Activation::Tanh)
                .with_mask(MaskPattern::Checkerboard),
            300,
        ),
        // Wider than the CUDA kernels take: candle's ops on the GPU.
        (RealNvpConfig::new(40).with_layers(2).with_hidden(32), 100),
    ];
    for dtype in [DType::F64, DType::F32] {
        let (tol, grad_tol) = if dtype == DType::F32 {
            (1e-4, 1e-2)
        } else {
            (1e-10, 1e-9)
        };
        for (cfg, batch) in &cases {
            let dim = cfg.dim;
            let build = |dev: &Device| -> Result<(Flow, VarMap)> {
                let varmap = VarMap::new();
                let bijector = RealNvp::new(cfg, seeded_var_builder(&varmap, 9, dtype, dev))?;
                Ok((
                    Flow::new(bijector, StandardNormal::new(dim, dtype, dev)),
                    varmap,
                ))
            };
            let inputs = |dev: &Device| -> Result<(Var, Var, Tensor)> {
                let rng = &mut StdRng::seed_from_u64(5);
                let x = normal(rng, *batch, dim, 0.5, 1.5)?.to_dtype(dtype)?;
                let z = normal(rng, *batch, dim, 0.0, 1.0)?.to_dtype(dtype)?;
                let w = normal(rng, *batch, dim, 0.0, 1.0)?.to_dtype(dtype)?;
                Ok((
                    Var::from_tensor(&x.to_device(dev)?)?,
                    Var::from_tensor(&z.to_device(dev)?)?,
                    w.to_device(dev)?,
                ))
            };
            set_fusion(false);
            let (flow, varmap) = build(&Device::Cpu)?;
            let (x, z, w) = inputs(&Device::Cpu)?;
            let reference = outputs(&flow, &varmap, &x, &z, &w)?;
            for fused in [false, true] {
                set_fusion(fused);
                let (flow, varmap) = build(&gpu)?;
                let (x, z, w) = inputs(&gpu)?;
                let on_gpu = outputs(&flow, &varmap, &x, &z, &w)?;
                let what = format!("{dtype:?} {cfg:?} fusion {fused}");
                agree(&on_gpu, &reference, (tol, grad_tol), &what)?;
            }
        }
    }
    Ok(())
}
