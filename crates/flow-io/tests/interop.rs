//! Weights saved by other tools import and reproduce the tools' own numbers
//! (`tests/fixtures/interop`: weights plus `*_io` files with inputs `x`, the source's
//! `log_prob` and, where it has one, `z = f(x)`).

mod common;

use anyhow::{ensure, Result};
use candle::{DType, Device};
use flow_io::{import, ImportOptions, Source};
use rand::{rngs::StdRng, SeedableRng};

use common::*;

/// Imports `stem` from `source` and compares log-probs (1e-4 absolute or 1e-5
/// relative) and latents (1e-4) with the source's.
fn check(source: Source, stem: &str, has_z: bool) -> Result<()> {
    let imported = import(
        source,
        &fixture(&format!("{stem}.safetensors")),
        &ImportOptions::default(),
    )?;
    let io = candle::safetensors::load(fixture(&format!("{stem}_io.safetensors")), &Device::Cpu)?;
    let x = io["x"].to_dtype(DType::F64)?;
    let expected = io["log_prob"].to_dtype(DType::F64)?.to_vec1::<f64>()?;
    for dtype in [DType::F32, DType::F64] {
        let flow = build(&imported.config, &imported.tensors, dtype)?;
        let lp = flow
            .log_prob(&x.to_dtype(dtype)?)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (a, b) in lp.iter().zip(&expected) {
            ensure!(
                (a - b).abs() <= 1e-4_f64.max(1e-5 * b.abs()),
                "{stem} {dtype:?}: log_prob {a} vs {b}"
            );
        }
        if has_z {
            let z = flow.encode(&x.to_dtype(dtype)?)?.to_dtype(DType::F64)?;
            let err = (z - io["z"].to_dtype(DType::F64)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            ensure!(err <= 1e-4, "{stem} {dtype:?}: z off by {err}");
        }
        let s = flow.sample(64, &mut StdRng::seed_from_u64(0))?;
        ensure!(s.dims() == [64, imported.config.dim]);
    }
    Ok(())
}

#[test]
fn seed() -> Result<()> {
    check(Source::Seed, "seed_stacked3", true)
}

#[test]
fn normflows() -> Result<()> {
    check(Source::Normflows, "normflows_readme_realnvp_K4", false)
}

#[test]
fn nflows() -> Result<()> {
    check(Source::Nflows, "nflows_SimpleRealNVP_f2_h32_L4_B2", true)
}

#[test]
fn zuko() -> Result<()> {
    check(Source::Zuko, "zuko_RealNVP_f2_T4_h64x2", true)
}

#[test]
fn freia() -> Result<()> {
    check(Source::Freia, "freia_GLOW_x3_clamp2", true)
}
