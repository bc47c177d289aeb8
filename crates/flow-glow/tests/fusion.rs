//! Whole Glow and RealNVP image models with the fused kernels (convolutions, the
//! invertible 1×1 convolution; on CUDA also activation normalisation, the 1×1
//! convolution's LU weight and the coupling's element-wise work) against the reference
//! path of plain candle ops: the
//! same log-probabilities and the same gradients for every trainable tensor, in f32
//! and f64, forward (training) and inverse (sampling) directions. With the `cuda`
//! feature, the same on a GPU: its convolution kernels against candle's CUDA ops.

mod common;

use anyhow::{ensure, Result};
use candle::{DType, Device};
use candle_nn::VarMap;
use common::{inputs, max_abs, max_diff, randomize, tensors, DEV};
use flow_core::{seeded_var_builder, Flow};
use flow_glow::{GlowConfig, ImageShape, RealNvpImageConfig};
use flow_models::ModelConfig;
use flow_nn::Activation;

/// The fusion switch is process-wide: the tests in this file take turns.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lively(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<(VarMap, Flow)> {
    let varmap = VarMap::new();
    let flow = cfg.build(seeded_var_builder(&varmap, 3, dtype, dev))?;
    let x = inputs(32, cfg.dim, 0.5, 0.45, dtype, 4)?.to_device(dev)?;
    flow.initialize(&x, None)?;
    randomize(&varmap, &["conv_out.weight", "conv_out.bias"], 0.05, 5)?;
    Ok((varmap, flow))
}

/// `(mean log p, [(name, ∂)], inverse of a latent)` with fusion on or off.
#[allow(clippy::type_complexity)]
fn run(
    varmap: &VarMap,
    flow: &Flow,
    x: &candle::Tensor,
    fused: bool,
) -> Result<(
    candle::Tensor,
    Vec<(String, candle::Tensor)>,
    candle::Tensor,
)> {
    flow_kernels::set_fusion(fused);
    let lp = flow.log_prob(x)?;
    let grads = lp.mean_all()?.neg()?.backward()?;
    let mut g: Vec<(String, candle::Tensor)> = tensors(varmap)
        .into_iter()
        .filter_map(|(k, v)| grads.get(&v).map(|g| (k, g.clone())))
        .collect();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    let (back, _) = flow.bijector().inverse(&x.affine(0.5, -0.2)?)?;
    flow_kernels::set_fusion(true);
    Ok((lp, g, back))
}

#[test]
fn fused_models_match_the_reference_path() -> Result<()> {
    models_match_the_reference_path_on(&DEV)
}

/// The CUDA kernels against candle's own CUDA ops. Without a GPU this is skipped,
/// unless `FLOWS_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) makes that a failure.
#[cfg(feature = "cuda")]
#[test]
fn fused_models_match_the_reference_path_on_cuda() -> Result<()> {
    match flow_core::cuda_if_present()? {
        Some(dev) => models_match_the_reference_path_on(&dev),
        None => Ok(()),
    }
}

fn models_match_the_reference_path_on(dev: &Device) -> Result<()> {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let shape = ImageShape::new(1, 8, 8);
    let glow = |a: Activation| {
        GlowConfig::new(shape)
            .with_levels(2)
            .with_depth(2)
            .with_hidden_channels(16)
            .with_activation(a)
    };
    let models = [
        ("glow", ModelConfig::glow(&glow(Activation::Relu))),
        ("glow tanh", ModelConfig::glow(&glow(Activation::Tanh))),
        (
            "glow plain 1x1, gelu",
            ModelConfig::glow(&glow(Activation::Gelu).with_lu(false)),
        ),
        (
            "realnvp-image",
            ModelConfig::realnvp_image(
                &RealNvpImageConfig::new(shape)
                    .with_scales(2)
                    .with_hidden_channels(8),
            ),
        ),
    ];
    for (name, cfg) in models {
        for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 2e-3)] {
            let (varmap, flow) = lively(&cfg, dtype, dev)?;
            let x = inputs(24, cfg.dim, 0.5, 0.45, dtype, 6)?.to_device(dev)?;
            let (lp_f, g_f, inv_f) = run(&varmap, &flow, &x, true)?;
            let (lp_r, g_r, inv_r) = run(&varmap, &flow, &x, false)?;
            let scale = 1.0 + max_abs(&lp_r)?;
            ensure!(
                max_diff(&lp_f, &lp_r)? <= tol * scale,
                "{name} {dtype:?}: log-probs differ by {}",
                max_diff(&lp_f, &lp_r)?
            );
            ensure!(
                max_diff(&inv_f, &inv_r)? <= tol,
                "{name} {dtype:?}: inverses differ"
            );
            ensure!(
                g_f.len() == g_r.len() && !g_r.is_empty(),
                "{name}: gradient sets differ"
            );
            for ((k, a), (k2, b)) in g_f.iter().zip(&g_r) {
                ensure!(k == k2, "{name}: gradient sets differ at {k} / {k2}");
                let d = max_diff(a, b)?;
                ensure!(
                    d <= tol * (1.0 + max_abs(b)?),
                    "{name} {dtype:?}: gradient of {k} differs by {d:e}"
                );
            }
        }
    }
    Ok(())
}
