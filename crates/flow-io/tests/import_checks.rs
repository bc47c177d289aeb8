//! An import is checked before it is returned (and so before anything is written):
//! non-finite weights, oversized settings and models that do not evaluate are errors
//! naming the file read; and the settings taken as the source's defaults are reported.

mod common;

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use flow_io::{import, import_bytes, Assumption, ImportOptions, Source};
use safetensors::Dtype;

use common::*;

fn values(raw: &Raw) -> Vec<f32> {
    raw.2
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// The error of importing `tensors` as `source` from a file named `name`.
fn import_error(source: Source, tensors: &HashMap<String, Raw>, name: &str) -> Result<String> {
    let path = std::path::PathBuf::from(name);
    match import_bytes(
        source,
        &path,
        &serialize(tensors)?,
        &ImportOptions::default(),
    ) {
        Ok(_) => anyhow::bail!("{name} imported"),
        Err(e) => Ok(e.to_string()),
    }
}

fn lines(assumptions: &[Assumption]) -> Vec<String> {
    assumptions.iter().map(ToString::to_string).collect()
}

#[test]
fn nan_weights_are_refused_naming_the_file_and_the_tensor() -> Result<()> {
    let mut t = raw("zuko_RealNVP_f2_T4_h64x2")?;
    let name = "transform.transforms.2.hyper.0.bias";
    let mut v = values(&t[name]);
    v[0] = f32::NAN;
    let shape = t[name].1.clone();
    t.insert(name.into(), (Dtype::F32, shape, f32s(v)));
    let err = import_error(Source::Zuko, &t, "zuko_nan.safetensors")?;
    ensure!(
        err == format!("zuko_nan.safetensors: tensor `{name}` holds NaN or infinite values"),
        "{err}"
    );
    Ok(())
}

#[test]
fn splines_of_more_bins_than_the_limit_are_refused() -> Result<()> {
    let mut t = raw("zuko_NSF_f2_T3_K8_h64x2")?;
    let rows = 2 * (3 * 1001 - 1);
    for l in 0..3 {
        let p = format!("transform.transforms.{l}.hyper.4");
        let w = f32s((0..rows * 64).map(|i| ((i % 5) as f32 - 2.0) * 0.01));
        t.insert(format!("{p}.weight"), (Dtype::F32, vec![rows, 64], w));
        t.insert(
            format!("{p}.bias"),
            (Dtype::F32, vec![rows], f32s(vec![0.0; rows])),
        );
        t.insert(
            format!("{p}.mask"),
            (Dtype::BOOL, vec![rows, 64], vec![0; rows * 64]),
        );
    }
    let err = import_error(Source::Zuko, &t, "zuko_bins.safetensors")?;
    ensure!(
        err == "zuko_bins.safetensors: invalid model configuration: layer 0: 1001 spline bins: more than the limit of 1000",
        "{err}"
    );
    Ok(())
}

#[test]
fn a_model_that_does_not_evaluate_is_refused() -> Result<()> {
    // Finite weights, 1e30 times too large: the couplings' exp scales overflow.
    let mut t = raw("seed_stacked3")?;
    for raw in t.values_mut() {
        raw.2 = f32s(values(raw).into_iter().map(|v| v * 1e30));
    }
    let err = import_error(Source::Seed, &t, "seed_huge.safetensors")?;
    ensure!(
        err.starts_with("seed_huge.safetensors: the model ")
            && err.ends_with("its weights do not make a working flow"),
        "{err}"
    );
    // The same weights at their size import.
    import(
        Source::Seed,
        &fixture("seed_stacked3.safetensors"),
        &ImportOptions::default(),
    )?;
    Ok(())
}

#[test]
fn an_imported_model_changed_afterwards_fails_its_check() -> Result<()> {
    let path = fixture("nflows_SimpleRealNVP_f2_h32_L4_B2.safetensors");
    let mut imported = import(Source::Nflows, &path, &ImportOptions::default())?;
    imported.check(&path)?;
    let name = imported
        .tensors
        .keys()
        .find(|k| k.starts_with("layers.0."))
        .context("a layer tensor")?
        .clone();
    imported.tensors.remove(&name);
    let err = imported.check(&path).expect_err("a tensor is missing");
    ensure!(
        err.to_string() == format!("{}: tensor `{name}` is missing", path.display()),
        "{err}"
    );
    Ok(())
}

#[test]
fn tail_bounds_beyond_f32_are_refused() -> Result<()> {
    let path = fixture("nflows_RQcoupling_f2_L4_K8_h32_B2.safetensors");
    let opts = ImportOptions {
        tail_bound: Some(1e300),
        ..Default::default()
    };
    let err = import(Source::Nflows, &path, &opts).expect_err("1e300 is infinite in f32");
    ensure!(
        err.to_string()
            == format!(
                "{}: the tail bound must be positive and finite in f32, got 1e300",
                path.display()
            ),
        "{err}"
    );
    Ok(())
}

#[test]
fn settings_taken_as_defaults_are_reported() -> Result<()> {
    let tail = |source: &str, bound: &str| {
        format!("assumed tail bound {bound} ({source} default); the weights do not record it: give --tail-bound if the model was built with another")
    };
    let activation = |source: &str, name: &str| {
        format!("assumed hidden activation {name} ({source} default); the weights do not record it: give --activation if the model was built with another")
    };
    let cases: [(Source, &str, Vec<String>); 5] = [
        (
            Source::Nflows,
            "nflows_RQcoupling_f2_L4_K8_h32_B2",
            vec![tail("nflows'", "1"), activation("nflows'", "relu")],
        ),
        (
            Source::Normflows,
            "normflows_CoupledRQS_f3_L4_K8_h32_B2",
            vec![tail("normflows'", "3"), activation("normflows'", "relu")],
        ),
        (
            Source::Zuko,
            "zuko_NSF_f2_T3_K8_h64x2",
            vec![tail("zuko's", "5"), activation("zuko's", "relu")],
        ),
        (
            Source::Zuko,
            "zuko_RealNVP_f2_T4_h64x2",
            vec![
                activation("zuko's", "relu"),
                "assumed clamp 6.907755278982137 (zuko's default); the weights do not record it: give --clamp if the model was built with another".into(),
            ],
        ),
        (
            Source::Seed,
            "seed_stacked3",
            vec![activation("seed's", "leaky-relu")],
        ),
    ];
    for (source, stem, expected) in cases {
        let path = fixture(&format!("{stem}.safetensors"));
        let imported = import(source, &path, &ImportOptions::default())?;
        ensure!(
            lines(&imported.assumptions) == expected,
            "{stem}: {:?}",
            lines(&imported.assumptions)
        );
    }
    // What is given is not assumed.
    let path = fixture("nflows_RQcoupling_f2_L4_K8_h32_B2.safetensors");
    let opts = ImportOptions {
        tail_bound: Some(3.0),
        activation: Some(flow_nn::Activation::Relu),
        ..Default::default()
    };
    let imported = import(Source::Nflows, &path, &opts)?;
    ensure!(
        imported.assumptions.is_empty(),
        "{:?}",
        imported.assumptions
    );
    Ok(())
}
