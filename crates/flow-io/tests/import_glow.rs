//! normflows' Glow (`MultiscaleFlow` of `GlowBlock`s, `Squeeze`, `Merge` and a
//! `DiagGaussian` per level) imports as this crate's Glow and reproduces normflows'
//! `log_prob` (`tests/fixtures/interop/normflows_Glow_L2_K2_c1_8x8_h16`: two levels of
//! two blocks over 1×8×8 images, 16 hidden channels, LU 1×1 convolutions; the `_io`
//! file holds rows `x` of C·H·W values in [0, 1) and normflows' `log_prob`). The model
//! inverts, survives a checkpoint, and a damaged state dict is a one-line error naming
//! a tensor.

mod common;

use std::{collections::HashMap, path::PathBuf};

use anyhow::{ensure, Context, Result};
use candle::{DType, Device, Tensor};
use flow_glow::{ImageInfo, ImageShape};
use flow_io::{import, import_bytes, ImportOptions, Imported, Source};
use flow_models::ModelConfig;
use rand::{rngs::StdRng, SeedableRng};

use common::*;

const STEM: &str = "normflows_Glow_L2_K2_c1_8x8_h16";

fn imported() -> Result<Imported> {
    Ok(import(
        Source::Normflows,
        &fixture(&format!("{STEM}.safetensors")),
        &ImportOptions::default(),
    )?)
}

fn io() -> Result<HashMap<String, Tensor>> {
    Ok(candle::safetensors::load(
        fixture(&format!("{STEM}_io.safetensors")),
        &Device::Cpu,
    )?)
}

#[test]
fn log_probs_match_normflows() -> Result<()> {
    let imported = imported()?;
    let io = io()?;
    for dtype in [DType::F64, DType::F32] {
        let flow = build(&imported.config, &imported.tensors, dtype)?;
        let x = io["x"].to_dtype(dtype)?;
        let err = max_abs(&flow.log_prob(&x)?, &io["log_prob"])?;
        eprintln!("{STEM} {dtype:?}: log_prob off by {err:.2e}");
        ensure!(err <= 1e-4, "{STEM} {dtype:?}: log_prob off by {err}");
    }
    Ok(())
}

#[test]
fn the_architecture_is_read_from_the_weights() -> Result<()> {
    let cfg = imported()?.config;
    ensure!(cfg.dim == 64);
    let recipe = cfg.recipe.clone().context("a recipe")?;
    ensure!(recipe["family"] == "glow", "{recipe}");
    ensure!(recipe["levels"] == 2 && recipe["depth"] == 2, "{recipe}");
    ensure!(
        recipe["hidden_channels"] == 16 && recipe["lu"] == true,
        "{recipe}"
    );
    ensure!(recipe["exact_sigmoid"] == true, "{recipe}");
    // No logit layer: normflows' log_prob has none.
    ensure!(
        recipe["logit"].is_null() && cfg.layers.len() == 1,
        "{recipe}"
    );
    let info: ImageInfo = serde_json::from_value(recipe)?;
    ensure!(info.shape == ImageShape::new(1, 8, 8), "{:?}", info.shape);
    Ok(())
}

/// The `1e-3` that this crate's sigmoid scale otherwise adds inside the log is why the
/// imported couplings say `exact_sigmoid`: without it the log-probs move far beyond
/// the tolerance.
#[test]
fn the_exact_sigmoid_matters() -> Result<()> {
    let imported = imported()?;
    let json = serde_json::to_string(&imported.config)?;
    ensure!(json.contains(r#""exact_sigmoid":true"#));
    let loose: ModelConfig =
        serde_json::from_str(&json.replace(r#""exact_sigmoid":true"#, "\"exact_sigmoid\":false"))?;
    let io = io()?;
    let flow = build(&loose, &imported.tensors, DType::F64)?;
    let err = max_abs(
        &flow.log_prob(&io["x"].to_dtype(DType::F64)?)?,
        &io["log_prob"],
    )?;
    ensure!(err > 1e-3, "log_prob off by only {err} with the 1e-3");
    Ok(())
}

#[test]
fn the_imported_model_inverts_samples_and_survives_a_checkpoint() -> Result<()> {
    let imported = imported()?;
    let io = io()?;
    for dtype in [DType::F64, DType::F32] {
        let flow = build(&imported.config, &imported.tensors, dtype)?;
        let x = io["x"].to_dtype(dtype)?;
        let z = flow.encode(&x)?;
        let back = max_abs(&flow.decode(&z)?, &x)?;
        ensure!(back <= 1e-4, "{dtype:?}: x → z → x off by {back}");
        let z_again = max_abs(&flow.encode(&flow.decode(&z)?)?, &z)?;
        ensure!(z_again <= 1e-3, "{dtype:?}: z → x → z off by {z_again}");
        let s = flow.sample(8, &mut StdRng::seed_from_u64(0))?;
        ensure!(s.dims() == [8, 64]);
    }
    let path = save_imported(&imported, &format!("{STEM}.safetensors"))?;
    let loaded = flow_io::load_model(&path, DType::F32, &Device::Cpu)?;
    let err = max_abs(&loaded.flow.log_prob(&io["x"])?, &io["log_prob"])?;
    ensure!(err <= 1e-4, "reloaded log_prob off by {err}");
    Ok(())
}

/// Imports `tensors` as normflows' (see [`common::import_raw`]).
fn import_raw(tensors: &HashMap<String, Raw>, what: &str) -> Result<Option<String>> {
    common::import_raw(Source::Normflows, tensors, what)
}

/// f32 `values` as raw bytes of `shape`.
fn f32_raw(shape: &[usize], values: &[f32]) -> Raw {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    (safetensors::Dtype::F32, shape.to_vec(), bytes)
}

#[test]
fn a_missing_tensor_is_an_error_naming_it() -> Result<()> {
    let full = raw(STEM)?;
    ensure!(import_raw(&full, "the fixture")?.is_none());
    let mut names: Vec<&String> = full.keys().collect();
    names.sort();
    for name in names {
        let mut t = full.clone();
        t.remove(name);
        let err = import_raw(&t, &format!("without {name}"))?;
        // Only the 1×1 convolutions' `eye` (the identity, derived data) may go.
        ensure!(
            err.is_some() || name.ends_with(".eye"),
            "without `{name}` imported without an error"
        );
    }
    // A whole block or level gone is an error too (a depth or level count the other
    // parts disagree with).
    for prefix in ["flows.1.1.", "flows.0.", "q0.1."] {
        let mut t = full.clone();
        t.retain(|k, _| !k.starts_with(prefix));
        ensure!(import_raw(&t, &format!("without {prefix}*"))?.is_some());
    }
    Ok(())
}

#[test]
fn a_wrong_shape_is_an_error_naming_the_tensor() -> Result<()> {
    let full = raw(STEM)?;
    for (name, shape) in [
        ("q0.0.loc", vec![1, 8, 4, 1]),
        ("q0.1.log_scale", vec![1, 2, 2, 8]),
        ("flows.1.0.flows.2.s", vec![1, 2, 2, 1]),
        ("flows.0.1.flows.1.L", vec![4, 16]),
        ("flows.1.1.flows.1.log_S", vec![2, 2]),
        (
            "flows.0.0.flows.0.flows.1.param_map.net.2.weight",
            vec![16, 16, 1, 1, 1],
        ),
        (
            "flows.1.0.flows.0.flows.1.param_map.net.4.weight",
            vec![2, 16, 6, 3],
        ),
    ] {
        let mut t = full.clone();
        let entry = t.get_mut(name).context(name)?;
        ensure!(
            shape.iter().product::<usize>() == entry.1.iter().product::<usize>(),
            "{name}: the same number of values in another shape"
        );
        entry.1 = shape;
        let msg = import_raw(&t, &format!("{name} reshaped"))?
            .with_context(|| format!("{name} in a wrong shape imported"))?;
        ensure!(msg.contains(name), "{name}: {msg}");
    }
    // A base that is not (1, C, H, W), and an odd channel count no squeeze gives.
    for (shape, values) in [(vec![2, 4, 4], 32), (vec![1, 3, 4, 4], 48)] {
        let mut t = full.clone();
        let v = vec![0.0; values];
        t.insert("q0.1.loc".into(), f32_raw(&shape, &v));
        t.insert("q0.1.log_scale".into(), f32_raw(&shape, &v));
        let msg = import_raw(&t, &format!("q0.1 of shape {shape:?}"))?
            .context("a malformed base imported")?;
        ensure!(msg.contains("q0.1"), "{msg}");
    }
    Ok(())
}

#[test]
fn an_uninitialised_actnorm_and_a_cut_file_are_errors() -> Result<()> {
    let mut t = raw(STEM)?;
    let name = "flows.1.0.flows.2.data_dep_init_done";
    t.insert(name.into(), f32_raw(&[], &[0.0]));
    let msg = import_raw(&t, "uninitialised ActNorm")?.context("imported")?;
    ensure!(
        msg.contains(name) && msg.contains("never initialised"),
        "{msg}"
    );

    let bytes = std::fs::read(fixture(&format!("{STEM}.safetensors")))?;
    for cut in [bytes.len() / 3, bytes.len() - 1] {
        let r = import_bytes(
            Source::Normflows,
            &PathBuf::from("cut.safetensors"),
            &bytes[..cut],
            &ImportOptions::default(),
        );
        let Err(e) = r else {
            anyhow::bail!("cut at {cut} imported");
        };
        let e = e.to_string();
        ensure!(
            e.starts_with("cut.safetensors: not a safetensors file"),
            "cut at {cut}: {e}"
        );
    }
    Ok(())
}
