//! The importers read what the weights say, not what the fixtures happen to be:
//! every float dtype, other dimensions, widths, depths and layer counts, and
//! malformed state dicts are errors naming the key.

mod common;

use std::{collections::HashMap, path::PathBuf};

use anyhow::{ensure, Context, Result};
use candle::{DType, Device};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder};
use flow_io::{import, ImportOptions, Imported, IoError, Source};
use flow_models::LayerSpec;
use flow_nn::NetConfig;
use flow_realnvp::CouplingLayer;
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::Dtype;

use common::*;

fn write(path: &PathBuf, tensors: &HashMap<String, Raw>) -> Result<()> {
    std::fs::write(path, serialize(tensors)?)?;
    Ok(())
}

fn build(imported: &Imported) -> Result<flow_core::Flow> {
    let varmap = VarMap::new();
    let flow = imported
        .config
        .build(seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu))?;
    for (name, var) in varmap.data().lock().expect("lock").iter() {
        var.set(
            imported
                .tensors
                .get(name)
                .with_context(|| format!("no {name}"))?,
        )?;
    }
    Ok(flow)
}

const FIXTURES: [(Source, &str); 5] = [
    (Source::Seed, "seed_stacked3"),
    (Source::Normflows, "normflows_readme_realnvp_K4"),
    (Source::Nflows, "nflows_SimpleRealNVP_f2_h32_L4_B2"),
    (Source::Zuko, "zuko_RealNVP_f2_T4_h64x2"),
    (Source::Freia, "freia_GLOW_x3_clamp2"),
];

#[test]
fn every_float_dtype_converts_exactly() -> Result<()> {
    for (source, stem) in FIXTURES {
        let bytes = std::fs::read(fixture(&format!("{stem}.safetensors")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let reference = import(
            source,
            &fixture(&format!("{stem}.safetensors")),
            &ImportOptions::default(),
        )?;
        for (dtype, candle_dtype) in [
            (Dtype::F16, DType::F16),
            (Dtype::BF16, DType::BF16),
            (Dtype::F64, DType::F64),
        ] {
            let mut out = HashMap::new();
            for (name, view) in st.tensors() {
                let raw = if view.dtype() == Dtype::F32 {
                    let v: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let b: Vec<u8> = match dtype {
                        Dtype::F16 => v
                            .iter()
                            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                            .collect(),
                        Dtype::BF16 => v
                            .iter()
                            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                            .collect(),
                        _ => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
                    };
                    (dtype, view.shape().to_vec(), b)
                } else {
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec())
                };
                out.insert(name, raw);
            }
            let path = tmp(&format!("{stem}_{dtype:?}.safetensors"));
            write(&path, &out)?;
            let got = import(source, &path, &ImportOptions::default())?;
            ensure!(
                got.config == reference.config,
                "{stem} {dtype:?}: different architecture"
            );
            for (name, t) in &reference.tensors {
                let want = t
                    .to_dtype(candle_dtype)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let have = got.tensors[name].flatten_all()?.to_vec1::<f32>()?;
                ensure!(want == have, "{stem} {dtype:?}: `{name}` converted wrongly");
            }
            let x = randn(
                8,
                got.config.dim,
                DType::F32,
                &Device::Cpu,
                &mut StdRng::seed_from_u64(21),
            )?;
            let lp = build(&got)?.log_prob(&x)?.to_vec1::<f32>()?;
            ensure!(lp.iter().all(|v| v.is_finite()), "{stem} {dtype:?}: {lp:?}");
        }
    }
    Ok(())
}

struct Dict {
    rng: StdRng,
    t: HashMap<String, Raw>,
}

impl Dict {
    fn new() -> Self {
        Self {
            rng: StdRng::seed_from_u64(1),
            t: HashMap::new(),
        }
    }
    fn float(&mut self, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let b: Vec<u8> = (0..n)
            .flat_map(|_| (self.rng.random_range(-0.3f32..0.3)).to_le_bytes())
            .collect();
        self.t.insert(name.into(), (Dtype::F32, shape.to_vec(), b));
    }
    fn linear(&mut self, prefix: &str, o: usize, i: usize) {
        self.float(&format!("{prefix}.weight"), &[o, i]);
        self.float(&format!("{prefix}.bias"), &[o]);
    }
    fn mlp(&mut self, prefix: &str, widths: &[usize]) {
        for (k, w) in widths.windows(2).enumerate() {
            self.linear(&format!("{prefix}.{}", 2 * k), w[1], w[0]);
        }
    }
    fn ints(&mut self, name: &str, v: &[i64]) {
        self.t.insert(
            name.into(),
            (
                Dtype::I64,
                vec![v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        );
    }
    fn bools(&mut self, name: &str, v: &[bool]) {
        self.t.insert(
            name.into(),
            (
                Dtype::BOOL,
                vec![v.len()],
                v.iter().map(|b| *b as u8).collect(),
            ),
        );
    }
    fn import(&self, source: Source, name: &str) -> Result<Imported, IoError> {
        let p = tmp(name);
        write(&p, &self.t).expect("write");
        import(source, &p, &ImportOptions::default())
    }
}

/// The model works: invertible, finite densities.
fn works(imported: &Imported) -> Result<()> {
    let flow = build(imported)?;
    let x = randn(
        32,
        imported.config.dim,
        DType::F32,
        &Device::Cpu,
        &mut StdRng::seed_from_u64(22),
    )?;
    let back = flow.decode(&flow.encode(&x)?)?;
    let err = (back - &x)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    ensure!(err < 1e-4, "round trip off by {err}");
    ensure!(flow
        .log_prob(&x)?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    Ok(())
}

fn hidden(l: &LayerSpec) -> Option<NetConfig> {
    match l.tagged_as::<CouplingLayer>().ok()? {
        CouplingLayer::Affine(c) => Some(c.conditioner.net.clone()),
        CouplingLayer::Additive(c) => Some(c.conditioner.net.clone()),
    }
}

#[test]
fn other_dims_widths_depths_and_counts() -> Result<()> {
    // zuko: 4 features, 3 transforms, hidden (32, 16).
    let mut d = Dict::new();
    for t in 0..3 {
        let mask: Vec<bool> = (0..4).map(|j| j % 2 == t % 2).collect();
        d.bools(&format!("transform.transforms.{t}.mask"), &mask);
        d.mlp(&format!("transform.transforms.{t}.hyper"), &[2, 32, 16, 4]);
    }
    d.float("base.loc", &[4]);
    d.t.insert(
        "base.scale".into(),
        (
            Dtype::F32,
            vec![4],
            [1f32, 2., 0.5, 1.]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    );
    let z = d.import(Source::Zuko, "zuko4.safetensors")?;
    ensure!(z.config.dim == 4 && z.config.layers.len() == 3);
    ensure!(
        matches!(hidden(&z.config.layers[0]), Some(NetConfig::Mlp { hidden, .. }) if hidden == vec![32, 16])
    );
    works(&z)?;

    // nflows: 3 features, 5 layers, 3 residual blocks of width 20.
    let mut d = Dict::new();
    for l in 0..5 {
        let (keep, change): (Vec<i64>, Vec<i64>) = if l % 2 == 0 {
            (vec![1], vec![0, 2])
        } else {
            (vec![0, 2], vec![1])
        };
        let p = format!("_transform._transforms.{l}");
        d.ints(&format!("{p}.identity_features"), &keep);
        d.ints(&format!("{p}.transform_features"), &change);
        d.linear(&format!("{p}.transform_net.initial_layer"), 20, keep.len());
        for b in 0..3 {
            for j in 0..2 {
                d.linear(
                    &format!("{p}.transform_net.blocks.{b}.linear_layers.{j}"),
                    20,
                    20,
                );
            }
        }
        d.linear(
            &format!("{p}.transform_net.final_layer"),
            2 * change.len(),
            20,
        );
    }
    let n = d.import(Source::Nflows, "nflows3.safetensors")?;
    ensure!(n.config.dim == 3 && n.config.layers.len() == 5);
    ensure!(matches!(
        hidden(&n.config.layers[0]),
        Some(NetConfig::Residual {
            hidden: 20,
            blocks: 3,
            ..
        })
    ));
    works(&n)?;

    // FrEIA: 5 features (split 3 | 2), 2 blocks with one hidden layer of 24, 2 permutations.
    let mut d = Dict::new();
    for b in 0..2 {
        d.mlp(&format!("module_list.{}.subnet1", 2 * b), &[3, 24, 4]);
        d.mlp(&format!("module_list.{}.subnet2", 2 * b), &[2, 24, 6]);
        d.ints(&format!("module_list.{}.perm", 2 * b + 1), &[4, 2, 0, 1, 3]);
        d.ints(
            &format!("module_list.{}.perm_inv", 2 * b + 1),
            &[2, 3, 1, 4, 0],
        );
    }
    let f = d.import(Source::Freia, "freia5.safetensors")?;
    ensure!(
        f.config.dim == 5 && f.config.layers.len() == 6,
        "{:?}",
        f.config.layers.len()
    );
    works(&f)?;

    // normflows: 3 features (chunk 2 | 1), 3 blocks with hidden (16, 16, 16).
    let mut d = Dict::new();
    for j in 0..3 {
        d.mlp(
            &format!("flows.{}.flows.1.param_map.net", 2 * j),
            &[2, 16, 16, 16, 2],
        );
    }
    d.float("q0.loc", &[1, 3]);
    d.float("q0.log_scale", &[1, 3]);
    let m = d.import(Source::Normflows, "normflows3.safetensors")?;
    ensure!(m.config.dim == 3 && m.config.layers.len() == 6);
    works(&m)?;

    // seed: 4 features, 6 layers, two hidden layers of 40.
    let mut d = Dict::new();
    for i in 0..6 {
        for net in ["sig_net", "mu_net"] {
            d.mlp(&format!("bijectors.{i}.{net}"), &[2, 40, 40, 2]);
        }
    }
    let s = d.import(Source::Seed, "seed4.safetensors")?;
    ensure!(s.config.dim == 4 && s.config.layers.len() == 6);
    works(&s)?;
    Ok(())
}

#[test]
fn malformed_state_dicts_name_the_key() -> Result<()> {
    let base = || {
        let mut d = Dict::new();
        for i in 0..2 {
            for net in ["sig_net", "mu_net"] {
                d.mlp(&format!("bijectors.{i}.{net}"), &[1, 8, 1]);
            }
        }
        d
    };
    let mut missing = base();
    missing.t.remove("bijectors.1.mu_net.2.bias");
    let e = missing
        .import(Source::Seed, "m1.safetensors")
        .expect_err("missing");
    ensure!(
        matches!(&e, IoError::MissingTensor { name, .. } if name == "bijectors.1.mu_net.2.bias"),
        "{e}"
    );

    let mut extra = base();
    extra.float("bijectors.0.sig_net.2.extra", &[3]);
    let e = extra
        .import(Source::Seed, "m2.safetensors")
        .expect_err("extra");
    ensure!(
        matches!(&e, IoError::UnexpectedTensor { name, .. } if name == "bijectors.0.sig_net.2.extra"),
        "{e}"
    );

    let mut shape = base();
    shape.float("bijectors.0.sig_net.2.bias", &[3]);
    let e = shape
        .import(Source::Seed, "m3.safetensors")
        .expect_err("shape");
    ensure!(
        matches!(&e, IoError::ShapeMismatch { name, .. } if name == "bijectors.0.sig_net.2.bias"),
        "{e}"
    );

    // The wrong importer for a file says what it expected.
    let e = base()
        .import(Source::Zuko, "m4.safetensors")
        .expect_err("wrong source");
    ensure!(e.to_string().contains("not a zuko flow"), "{e}");
    Ok(())
}

#[test]
fn export_to_seed_then_import_is_identical() -> Result<()> {
    let imported = import(
        Source::Seed,
        &fixture("seed_stacked3.safetensors"),
        &ImportOptions::default(),
    )?;
    let out = tmp("exported_seed.safetensors");
    flow_io::export_seed(&out, &imported.config, &imported.tensors)?;
    let again = import(Source::Seed, &out, &ImportOptions::default())?;
    ensure!(again.config == imported.config);
    let x = (randn(
        16,
        2,
        DType::F32,
        &Device::Cpu,
        &mut StdRng::seed_from_u64(23),
    )? * 2.0)?;
    let (a, b) = (
        build(&imported)?.log_prob(&x)?.to_vec1::<f32>()?,
        build(&again)?.log_prob(&x)?.to_vec1::<f32>()?,
    );
    ensure!(a == b, "{a:?} vs {b:?}");
    // The exported names are exactly the seed's.
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&std::fs::read(&out)?)?
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    let original: Vec<String> = safetensors::SafeTensors::deserialize(&std::fs::read(fixture(
        "seed_stacked3.safetensors",
    ))?)?
    .names()
    .into_iter()
    .map(String::from)
    .collect();
    let (mut names, mut original) = (names, original);
    names.sort();
    original.sort();
    ensure!(names == original);
    Ok(())
}
