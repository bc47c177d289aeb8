//! Spline couplings, masked autoregressive flows and autoregressive splines saved by
//! zuko, nflows and normflows import and reproduce the libraries' own numbers
//! (`tests/fixtures/interop`: weights plus `*_io` files with inputs `x`, the source's
//! `log_prob` and `z = f(x)`; the splines' first row lies in their linear tails); they
//! survive a checkpoint, masks included; damaged or mixed state dicts are one-line
//! errors naming a tensor.

mod common;

use std::{collections::HashMap, path::PathBuf};

use anyhow::{ensure, Result};
use candle::{DType, Device};
use flow_io::{import, import_bytes, ImportOptions, Imported, Source};
use rand::{rngs::StdRng, SeedableRng};

use common::*;

/// The fixtures that import: source, stem, the tail bound the source used where it is
/// not the library's default.
const FIXTURES: [(Source, &str, Option<f64>); 7] = [
    (Source::Zuko, "zuko_NSF_f2_T3_K8_h64x2", None),
    (Source::Zuko, "zuko_MAF_f3_T3_h64x2", None),
    (
        Source::Nflows,
        "nflows_RQcoupling_f2_L4_K8_h32_B2",
        Some(3.0),
    ),
    (
        Source::Normflows,
        "normflows_CoupledRQS_f3_L4_K8_h32_B2",
        None,
    ),
    (Source::Normflows, "normflows_ARQS_f3_L3_K8_h32_B2", None),
    (Source::Normflows, "normflows_MAF_f3_L4_h32_B2", None),
    (Source::Nflows, "nflows_MAF_f2_L4_h32", None),
];

fn options(tail_bound: Option<f64>) -> ImportOptions {
    ImportOptions {
        tail_bound,
        ..ImportOptions::default()
    }
}

/// Imports `stem` and compares log-probs and latents with the source's to 1e-4, in f32
/// and f64; returns the f32 errors.
fn check(source: Source, stem: &str, tail_bound: Option<f64>) -> Result<(f64, f64)> {
    let imported = import(
        source,
        &fixture(&format!("{stem}.safetensors")),
        &options(tail_bound),
    )?;
    let io = candle::safetensors::load(fixture(&format!("{stem}_io.safetensors")), &Device::Cpu)?;
    let x = &io["x"];
    let mut errors = (0.0, 0.0);
    for dtype in [DType::F64, DType::F32] {
        let flow = build(&imported.config, &imported.tensors, dtype)?;
        let x = x.to_dtype(dtype)?;
        let lp = max_abs(&flow.log_prob(&x)?, &io["log_prob"])?;
        let z = max_abs(&flow.encode(&x)?, &io["z"])?;
        eprintln!("{stem} {dtype:?}: log_prob off by {lp:.2e}, z by {z:.2e}");
        ensure!(lp <= 1e-4, "{stem} {dtype:?}: log_prob off by {lp}");
        ensure!(z <= 1e-4, "{stem} {dtype:?}: z off by {z}");
        // The inverse (d passes for the autoregressive layers) gives x back.
        let back = max_abs(&flow.decode(&flow.encode(&x)?)?, &x)?;
        ensure!(back <= 1e-3, "{stem} {dtype:?}: round trip off by {back}");
        let s = flow.sample(64, &mut StdRng::seed_from_u64(0))?;
        ensure!(s.dims() == [64, imported.config.dim]);
        errors = (lp, z);
    }
    Ok(errors)
}

#[test]
fn zuko_nsf() -> Result<()> {
    check(Source::Zuko, "zuko_NSF_f2_T3_K8_h64x2", None).map(drop)
}

#[test]
fn zuko_maf() -> Result<()> {
    check(Source::Zuko, "zuko_MAF_f3_T3_h64x2", None).map(drop)
}

#[test]
fn nflows_rational_quadratic_coupling() -> Result<()> {
    check(
        Source::Nflows,
        "nflows_RQcoupling_f2_L4_K8_h32_B2",
        Some(3.0),
    )
    .map(drop)
}

/// nflows 0.14's `MaskedAffineAutoregressiveTransform` scales by `softplus(raw) + 1e-3`
/// (normflows' copy by `sigmoid(raw + 2) + 1e-3`).
#[test]
fn nflows_masked_affine_autoregressive() -> Result<()> {
    check(Source::Nflows, "nflows_MAF_f2_L4_h32", None).map(drop)
}

#[test]
fn normflows_coupled_rational_quadratic_spline() -> Result<()> {
    check(
        Source::Normflows,
        "normflows_CoupledRQS_f3_L4_K8_h32_B2",
        None,
    )
    .map(drop)
}

#[test]
fn normflows_autoregressive_rational_quadratic_spline() -> Result<()> {
    check(Source::Normflows, "normflows_ARQS_f3_L3_K8_h32_B2", None).map(drop)
}

#[test]
fn normflows_masked_affine_autoregressive() -> Result<()> {
    check(Source::Normflows, "normflows_MAF_f3_L4_h32_B2", None).map(drop)
}

#[test]
fn imported_models_survive_a_checkpoint_with_their_masks() -> Result<()> {
    for (source, stem, bound) in FIXTURES {
        let imported = import(
            source,
            &fixture(&format!("{stem}.safetensors")),
            &options(bound),
        )?;
        let path = save_imported(&imported, &format!("{stem}.safetensors"))?;
        let loaded = flow_io::load_model(&path, DType::F32, &Device::Cpu)?;
        let io =
            candle::safetensors::load(fixture(&format!("{stem}_io.safetensors")), &Device::Cpu)?;
        let err = max_abs(&loaded.flow.log_prob(&io["x"])?, &io["log_prob"])?;
        ensure!(err <= 1e-4, "{stem}: reloaded log_prob off by {err}");
        // Masks are the model's buffers: a trainer leaves them alone.
        let masks = imported
            .tensors
            .keys()
            .filter(|k| k.ends_with(".mask"))
            .count();
        ensure!(
            loaded.flow.buffers().len() >= masks,
            "{stem}: {} buffers for {masks} masks",
            loaded.flow.buffers().len()
        );
    }
    Ok(())
}

/// Whether `tensors` import as `source` (a failure must name a tensor on one line).
fn ok_import(source: Source, tensors: &HashMap<String, Raw>, what: &str) -> Result<bool> {
    Ok(import_raw(source, tensors, what)?.is_none())
}

/// The layer index in a tensor name (`…_transforms.{l}.…`), if any.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.split("_transforms.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

#[test]
fn truncated_state_dicts_are_errors_naming_a_tensor() -> Result<()> {
    for (source, stem, _) in FIXTURES {
        let full = raw(stem)?;
        let mut names: Vec<&String> = full.keys().collect();
        names.sort();
        for name in names {
            let mut t = full.clone();
            t.remove(name);
            let ok = ok_import(source, &t, &format!("{stem} without {name}"))?;
            // Only buffers derived from others may go missing: the hidden layers'
            // MADE degrees (the masks say it all) and a permutation's inverse. A last
            // layer held in one tensor (a permutation) leaves a valid, shorter flow.
            let derived = (name.ends_with(".degrees") && !name.contains("final_layer"))
                || name.ends_with("inv_perm");
            let whole_last_layer = name.ends_with("._permutation")
                && full.keys().all(|k| layer_of(k) <= layer_of(name))
                && full
                    .keys()
                    .filter(|k| layer_of(k) == layer_of(name))
                    .count()
                    == 1;
            ensure!(
                !ok || derived || whole_last_layer,
                "{stem} without `{name}` imported without an error"
            );
        }
        // A file cut short is an error too.
        let bytes = std::fs::read(fixture(&format!("{stem}.safetensors")))?;
        for cut in [bytes.len() / 3, bytes.len() - 1] {
            let r = import_bytes(
                source,
                &PathBuf::from("cut.safetensors"),
                &bytes[..cut],
                &ImportOptions::default(),
            );
            let Err(e) = r else {
                anyhow::bail!("{stem} cut at {cut} imported");
            };
            let e = e.to_string();
            ensure!(
                e.starts_with("cut.safetensors: not a safetensors file"),
                "{stem} cut at {cut}: {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn mixed_state_dicts_are_errors_naming_a_tensor() -> Result<()> {
    // A zuko NSF transform among MAF ones (other width, other dimension).
    let mut zuko = raw("zuko_MAF_f3_T3_h64x2")?;
    for (name, t) in raw("zuko_NSF_f2_T3_K8_h64x2")? {
        if name.starts_with("transform.transforms.1.") {
            zuko.insert(name, t);
        }
    }
    ensure!(!ok_import(Source::Zuko, &zuko, "zuko mixed")?);

    // A MADE beside an nflows coupling's network.
    let mut nflows = raw("nflows_RQcoupling_f2_L4_K8_h32_B2")?;
    for (name, t) in raw("nflows_MAF_f2_L4_h32")? {
        if let Some(rest) = name.strip_prefix("_transform._transforms.0.") {
            nflows.insert(format!("_transform._transforms.1.{rest}"), t);
        }
    }
    ensure!(!ok_import(Source::Nflows, &nflows, "nflows mixed")?);

    // normflows: a MAF's network under a spline coupling's index, and a block of each.
    let mut normflows = raw("normflows_CoupledRQS_f3_L4_K8_h32_B2")?;
    for (name, t) in raw("normflows_MAF_f3_L4_h32_B2")? {
        if name.starts_with("flows.0.") {
            normflows.insert(name, t);
        }
    }
    ensure!(!ok_import(
        Source::Normflows,
        &normflows,
        "normflows mixed"
    )?);
    let mut swapped = raw("normflows_ARQS_f3_L3_K8_h32_B2")?;
    swapped.retain(|k, _| !k.starts_with("flows.2."));
    for (name, t) in raw("normflows_MAF_f3_L4_h32_B2")? {
        if name.starts_with("flows.2.") {
            swapped.insert(name, t);
        }
    }
    // A MAF block in place of a spline one is a valid flow: it imports.
    ensure!(ok_import(
        Source::Normflows,
        &swapped,
        "normflows MAF among splines"
    )?);

    // The wrong importer for a file says what it expected.
    for (source, stem) in [
        (Source::Zuko, "nflows_MAF_f2_L4_h32"),
        (Source::Nflows, "zuko_NSF_f2_T3_K8_h64x2"),
        (Source::Normflows, "zuko_MAF_f3_T3_h64x2"),
    ] {
        ensure!(!ok_import(source, &raw(stem)?, stem)?);
    }
    Ok(())
}

#[test]
fn masks_that_break_the_order_do_not_load() -> Result<()> {
    // A MADE mask opened up: the weights are all there, but the model does not build,
    // so the import fails, naming the file it read, and says why.
    let mut t = raw("zuko_MAF_f3_T3_h64x2")?;
    let name = "transform.transforms.1.hyper.4.mask";
    let (dtype, shape, bytes) = t[name].clone();
    t.insert(name.into(), (dtype, shape, vec![1; bytes.len()]));
    let path = tmp("broken_mask.safetensors");
    std::fs::write(&path, serialize(&t)?)?;
    let e = import(Source::Zuko, &path, &ImportOptions::default()).expect_err("broken mask");
    let msg = e.to_string();
    // (Only the first line: with RUST_BACKTRACE set, candle appends a backtrace.)
    let first = msg.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with(&format!("{}: ", path.display()))
            && first.contains("does not come before"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn the_tail_bound_is_a_setting_and_must_be_positive() -> Result<()> {
    let path = fixture("nflows_RQcoupling_f2_L4_K8_h32_B2.safetensors");
    // nflows' own default bound, 1, unless told: the weights cannot say.
    let default = import(Source::Nflows, &path, &ImportOptions::default())?;
    let told = import(Source::Nflows, &path, &options(Some(3.0)))?;
    let bound = |i: &Imported| -> Result<f64> {
        let spec = &i.config.layers[0];
        let spline: flow_nn::Spline = spec.settings().map_err(anyhow::Error::msg)?;
        Ok(spline.bound)
    };
    ensure!(bound(&default)? == 1.0 && bound(&told)? == 3.0);
    for bad in [0.0, -1.0, f64::NAN] {
        let e = import(Source::Nflows, &path, &options(Some(bad))).expect_err("bad bound");
        ensure!(e.to_string().contains("tail bound"), "{e}");
    }
    Ok(())
}
