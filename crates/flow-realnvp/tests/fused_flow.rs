//! A whole flow with the fused kernels against the same flow on plain candle ops.
//! (Its own test binary: the switch is process-wide.)

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Flow, StandardNormal};
use flow_realnvp::{set_fusion, RealNvp, RealNvpConfig};

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let scale = (b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64).max(1.0);
    Ok(diff / scale)
}

#[test]
fn fused_flow_matches_reference_log_probs_and_samples() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = RealNvpConfig::new(2);
    let flow = Flow::new(
        RealNvp::new(
            &cfg,
            seeded_var_builder(&VarMap::new(), 9, DType::F32, &dev),
        )?,
        StandardNormal::new(2, DType::F32, &dev),
    );
    let x = (Tensor::randn(0f32, 1.5, (4096, 2), &dev)? + 0.5)?;
    set_fusion(false);
    let reference = flow.log_prob(&x)?;
    let reference_z = flow.encode(&x)?;
    set_fusion(true);
    let fused = flow.log_prob(&x)?;
    let e = rel_err(&fused, &reference)?;
    ensure!(e < 1e-5, "log-probs differ by {e} (relative)");
    let e = rel_err(&flow.encode(&x)?, &reference_z)?;
    ensure!(e < 1e-5, "latents differ by {e}");
    Ok(())
}
