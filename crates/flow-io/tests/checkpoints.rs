//! Checkpoints: save → load gives bit-identical log-probs; damaged files give typed
//! errors naming the file and tensor.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::seeded_var_builder;
use flow_io::{load, load_model, save, IoError};
use flow_models::{BaseConfig, ModelConfig};
use flow_realnvp::RealNvpConfig;

fn model() -> ModelConfig {
    ModelConfig {
        base: BaseConfig::DiagNormal { trainable: true },
        ..ModelConfig::realnvp(&RealNvpConfig::new(3).with_layers(3).with_hidden(16))
            .with_standardize(true)
    }
}

fn tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn saved(
    dir: &Path,
) -> Result<(
    std::path::PathBuf,
    candle::Result<Tensor>,
    HashMap<String, Tensor>,
)> {
    let varmap = VarMap::new();
    let cfg = model();
    let flow = cfg.build(seeded_var_builder(&varmap, 7, DType::F32, &Device::Cpu))?;
    // Non-trivial standardisation and base.
    let mut vm = varmap.clone();
    vm.set_one(
        "standardize.mean",
        Tensor::new(&[1f32, -2., 0.5], &Device::Cpu)?,
    )?;
    vm.set_one(
        "standardize.std",
        Tensor::new(&[2f32, 0.5, 3.], &Device::Cpu)?,
    )?;
    vm.set_one("base.loc", Tensor::new(&[0.1f32, 0.2, -0.3], &Device::Cpu)?)?;
    let flow = {
        drop(flow);
        cfg.build(seeded_var_builder(&varmap, 7, DType::F32, &Device::Cpu))?
    };
    let x = Tensor::new(
        &[[0.3f32, -1.0, 2.0], [4.0, 0.0, -3.0], [1.0, -2.0, 0.5]],
        &Device::Cpu,
    )?;
    let path = dir.join("m.safetensors");
    let t = tensors(&varmap);
    save(
        &path,
        &cfg,
        &t,
        Some(&serde_json::json!({"steps": 3})),
        &BTreeMap::new(),
    )?;
    Ok((path, flow.log_prob(&x), t))
}

fn probe() -> Result<Tensor> {
    Ok(Tensor::new(
        &[[0.3f32, -1.0, 2.0], [4.0, 0.0, -3.0], [1.0, -2.0, 0.5]],
        &Device::Cpu,
    )?)
}

#[test]
fn save_then_load_is_bit_identical() -> Result<()> {
    let dir = tempdir()?;
    let (path, lp, _) = saved(&dir)?;
    let loaded = load_model(&path, DType::F32, &Device::Cpu)?;
    let a = lp?.to_vec1::<f32>()?;
    let b = loaded.flow.log_prob(&probe()?)?.to_vec1::<f32>()?;
    ensure!(
        a.iter()
            .map(|v| v.to_bits())
            .eq(b.iter().map(|v| v.to_bits())),
        "{a:?} vs {b:?}"
    );
    ensure!(loaded.checkpoint.config == model());
    ensure!(loaded.checkpoint.summary == Some(serde_json::json!({"steps": 3})));
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(names.len() == 1, "{names:?}");
    Ok(())
}

#[test]
fn every_family_saves_and_loads_bit_identically() -> Result<()> {
    use flow_maf::MafConfig;
    use flow_nsf::{NsfConfig, NsfKind};
    let dir = tempdir()?;
    let nsf = NsfConfig::new(3).with_layers(2).with_hidden(16);
    let maf = MafConfig::new(3).with_layers(2).with_hidden(16);
    for cfg in [
        ModelConfig::nsf(&nsf),
        ModelConfig::nsf(&nsf.clone().with_kind(NsfKind::Autoregressive)),
        ModelConfig::maf(&maf),
        ModelConfig::maf(&maf.clone().with_inverse(true)),
    ] {
        let cfg = cfg.with_base(BaseConfig::Mixture { components: 3 });
        let varmap = VarMap::new();
        let flow = cfg.build(seeded_var_builder(&varmap, 2, DType::F32, &Device::Cpu))?;
        let path = dir.join("family.safetensors");
        save(&path, &cfg, &tensors(&varmap), None, &BTreeMap::new())?;
        let loaded = load_model(&path, DType::F32, &Device::Cpu)?;
        ensure!(loaded.checkpoint.config == cfg);
        let a = flow.log_prob(&probe()?)?.to_vec1::<f32>()?;
        let b = loaded.flow.log_prob(&probe()?)?.to_vec1::<f32>()?;
        ensure!(
            a.iter().all(|v| v.is_finite())
                && a.iter()
                    .map(|v| v.to_bits())
                    .eq(b.iter().map(|v| v.to_bits())),
            "{:?}: {a:?} vs {b:?}",
            cfg.recipe
        );
    }
    Ok(())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("flows-io-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn damaged_checkpoints_give_typed_errors() -> Result<()> {
    let dir = tempdir()?;
    let (path, _, t) = saved(&dir)?;
    let cfg = model();
    let write = |name: &str, tensors: &HashMap<String, Tensor>| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        save(&p, &cfg, tensors, None, &BTreeMap::new())?;
        Ok(p)
    };
    let check = |p: &Path, want: &dyn Fn(&IoError) -> bool| -> Result<()> {
        let e = load_model(p, DType::F32, &Device::Cpu).expect_err("must fail");
        ensure!(want(&e), "{}: unexpected error {e}", p.display());
        ensure!(
            e.to_string().contains(&p.display().to_string()),
            "error does not name the file: {e}"
        );
        Ok(())
    };

    let mut missing = t.clone();
    missing.remove("layers.1.s.0.weight");
    check(
        &write("missing.safetensors", &missing)?,
        &|e| matches!(e, IoError::MissingTensor { name, .. } if name == "layers.1.s.0.weight"),
    )?;

    let mut extra = t.clone();
    extra.insert(
        "layers.9.s.0.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    check(&write("extra.safetensors", &extra)?, &|e| {
        matches!(e, IoError::UnexpectedTensor { .. })
    })?;

    let mut shape = t.clone();
    shape.insert(
        "layers.0.t.2.bias".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu)?,
    );
    check(
        &write("shape.safetensors", &shape)?,
        &|e| matches!(e, IoError::ShapeMismatch { expected, found, .. } if expected != found),
    )?;

    let mut nan = t.clone();
    nan.insert(
        "layers.0.t.2.bias".into(),
        Tensor::new(&[f32::NAN, 0.0], &Device::Cpu)?,
    );
    check(&write("nan.safetensors", &nan)?, &|e| {
        matches!(e, IoError::NonFinite { .. })
    })?;

    let bytes = std::fs::read(&path)?;
    let trunc = dir.join("truncated.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2])?;
    check(&trunc, &|e| matches!(e, IoError::NotSafetensors { .. }))?;

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file at all")?;
    check(&junk, &|e| matches!(e, IoError::NotSafetensors { .. }))?;

    let plain = dir.join("plain.safetensors");
    candle::safetensors::save(&t, &plain)?;
    check(&plain, &|e| matches!(e, IoError::MissingMetadata { .. }))?;

    check(&dir.join("absent.safetensors"), &|e| {
        matches!(e, IoError::Io { .. })
    })?;

    // A future format version is refused.
    let key = b"\"format_version\":\"1\"";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("version in header");
    let mut future_bytes = bytes.clone();
    future_bytes[at + key.len() - 2] = b'9';
    let future = dir.join("future.safetensors");
    std::fs::write(&future, &future_bytes)?;
    check(&future, &|e| {
        matches!(e, IoError::UnsupportedVersion { .. })
    })?;
    ensure!(load(&path).is_ok());
    Ok(())
}
