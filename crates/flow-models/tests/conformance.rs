//! Every registered layer kind passes the same checks, on the small layer its family
//! gives ([`LayerFamily::sample`]): it inverts, its log-dets agree with numerical
//! Jacobians, its density over a standard-normal base integrates to 1, the fused
//! kernels agree with the reference path, and its variables saved and loaded through
//! safetensors give the same layer. A kind whose family gives no sample fails every
//! check, so a new family is checked as soon as it is registered.
//!
//! Each layer has every trainable variable moved off its initial value first (a layer
//! that starts as the identity is checked as a real map), its data-dependent
//! initialisation and running statistics taken from points of its domain, and runs in
//! evaluation mode.

#[path = "../../../tests/support/bijector_checks.rs"]
mod bijector_checks;

use std::{collections::HashSet, sync::Mutex};

use anyhow::{ensure, Context, Result};
use bijector_checks::{inputs, numerical_log_det};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use flow_core::{
    sampling::randn, seeded_var_builder, Bijector, Flow, LayerFamily, LayerSpec, SampleLayer,
    StandardNormal,
};
use flow_kernels::set_fusion;
use flow_models::Registry;
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;
const DTYPE: DType = DType::F64;
/// Held by the checks that need the fusion switch to stay put (it is process-wide).
static SWITCH: Mutex<()> = Mutex::new(());
/// The largest sample the density check integrates on a grid.
const MAX_SAMPLE_DIM: usize = 4;

/// The sample layer of `kind`; an error naming the kind when its family gives none.
fn sample(registry: &Registry, kind: &str) -> Result<SampleLayer> {
    let s = registry.sample(kind).with_context(|| {
        format!("`{kind}` has no sample layer: its family's `LayerFamily::sample` gives none")
    })?;
    ensure!(
        s.spec.kind() == kind,
        "the sample of `{kind}` is a `{}` layer",
        s.spec.kind()
    );
    ensure!(
        (1..=MAX_SAMPLE_DIM).contains(&s.dim),
        "the sample of `{kind}` has {} features: the density check takes 1 to {MAX_SAMPLE_DIM}",
        s.dim
    );
    registry
        .check(&s.spec, s.dim, 0)
        .map_err(|e| anyhow::anyhow!("the sample of `{kind}` does not check: {e}"))?;
    Ok(s)
}

/// `n` rows inside the sample's domain: uniform on `[−2, 2]` on the real line, away
/// from the ends of a bounded interval.
fn points(s: &SampleLayer, n: usize, seed: u64) -> Result<Tensor> {
    let (lo, hi) = s.domain;
    let (mid, half) = if lo.is_finite() && hi.is_finite() {
        ((lo + hi) / 2.0, 0.45 * (hi - lo))
    } else {
        (0.0, 2.0)
    };
    inputs(n, s.dim, mid, half, DTYPE, seed)
}

/// The layer of a sample, ready for the checks.
struct Prepared {
    sample: SampleLayer,
    layer: Box<dyn Bijector>,
    varmap: VarMap,
}

fn prepare(registry: &Registry, kind: &str) -> Result<Prepared> {
    let sample = sample(registry, kind)?;
    let varmap = VarMap::new();
    let mut layer = registry.build(&sample.spec, seeded_var_builder(&varmap, 1, DTYPE, &DEV))?;
    let x = points(&sample, 64, 2)?;
    layer.set_training(true);
    layer.initialize(&x, None)?;
    // A pass in training mode updates running statistics.
    layer.forward(&x)?;
    let buffers: HashSet<_> = layer.buffers().iter().map(|t| t.id()).collect();
    {
        let data = varmap.data().lock().expect("variables");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let rng = &mut StdRng::seed_from_u64(3);
        for name in names {
            let var = &data[name];
            if buffers.contains(&var.as_tensor().id()) {
                continue;
            }
            let noise = (randn(1, var.elem_count(), DTYPE, &DEV, rng)? * 0.1)?;
            var.set(&(var.as_tensor() + noise.reshape(var.shape())?)?)?;
        }
    }
    // Built again over the moved variables, as a loaded model is.
    let mut layer = registry.build(&sample.spec, seeded_var_builder(&varmap, 1, DTYPE, &DEV))?;
    layer.set_training(false);
    Ok(Prepared {
        sample,
        layer,
        varmap,
    })
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Runs `check` on every registered kind; the error lists every kind that failed.
fn every_kind(check: impl Fn(&Registry, &str) -> Result<()>) -> Result<()> {
    let registry = Registry::builtin();
    let kinds = registry.kinds();
    ensure!(!kinds.is_empty(), "no kinds registered");
    let failures: Vec<String> = kinds
        .iter()
        .filter_map(|kind| {
            check(&registry, kind)
                .err()
                .map(|e| format!("{kind}: {e:#}"))
        })
        .collect();
    ensure!(failures.is_empty(), "\n{}", failures.join("\n"));
    Ok(())
}

fn round_trip(registry: &Registry, kind: &str) -> Result<()> {
    let p = prepare(registry, kind)?;
    let x = points(&p.sample, 32, 4)?;
    let (z, log_det) = p.layer.forward(&x)?;
    ensure!(z.dims() == x.dims(), "latent of shape {:?}", z.dims());
    ensure!(
        log_det.dims() == [32],
        "log-det of shape {:?}",
        log_det.dims()
    );
    let (back, log_det_inverse) = p.layer.inverse(&z)?;
    let err = max_abs(&(back - &x)?)?;
    ensure!(err < 1e-8, "inverse(forward(x)) is off by {err:e}");
    let sum = max_abs(&(log_det + log_det_inverse)?)?;
    ensure!(sum < 1e-8, "the two log-dets do not cancel: {sum:e}");
    Ok(())
}

fn log_det(registry: &Registry, kind: &str) -> Result<()> {
    let p = prepare(registry, kind)?;
    let x = points(&p.sample, 8, 5)?;
    let (z, log_det) = p.layer.forward(&x)?;
    let (_, log_det_inverse) = p.layer.inverse(&z)?;
    for (what, got, want) in [
        (
            "forward",
            log_det.to_vec1::<f64>()?,
            numerical_log_det(|x| p.layer.forward(x), &x)?,
        ),
        (
            "inverse",
            log_det_inverse.to_vec1::<f64>()?,
            numerical_log_det(|z| p.layer.inverse(z), &z)?,
        ),
    ] {
        for (g, w) in got.iter().zip(&want) {
            ensure!(
                (g - w).abs() < 1e-6 * w.abs().max(1.0),
                "{what} log-det {g} against numerical {w}"
            );
        }
    }
    Ok(())
}

/// The trapezoid rule's nodes and weights on `[lo, hi]`.
fn trapezoid(lo: f64, hi: f64, n: usize) -> Vec<(f64, f64)> {
    let h = (hi - lo) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            let w = if i == 0 || i == n - 1 { h / 2.0 } else { h };
            (lo + h * i as f64, w)
        })
        .collect()
}

fn density(registry: &Registry, kind: &str) -> Result<()> {
    let p = prepare(registry, kind)?;
    let dim = p.sample.dim;
    let flow = Flow::from_boxed(p.layer, Box::new(StandardNormal::new(dim, DTYPE, &DEV)));
    // The domain within [−8, 8]; nodes per axis so that the grid stays near 10⁵ points.
    let (lo, hi) = (p.sample.domain.0.max(-8.0), p.sample.domain.1.min(8.0));
    let per_axis = [1601, 161, 41, 21][dim - 1];
    let axis = trapezoid(lo, hi, per_axis);
    let total_points = per_axis.pow(dim as u32);
    let mut integral = 0.0;
    let chunk = 16_384;
    let mut start = 0;
    while start < total_points {
        let end = (start + chunk).min(total_points);
        let mut rows = Vec::with_capacity((end - start) * dim);
        let mut weights = Vec::with_capacity(end - start);
        for index in start..end {
            let mut rest = index;
            let mut w = 1.0;
            for _ in 0..dim {
                let (node, weight) = axis[rest % per_axis];
                rest /= per_axis;
                rows.push(node);
                w *= weight;
            }
            weights.push(w);
        }
        let x = Tensor::from_vec(rows, (end - start, dim), &DEV)?;
        let log_p = flow.log_prob(&x)?.to_vec1::<f64>()?;
        for (lp, w) in log_p.iter().zip(&weights) {
            ensure!(lp.is_finite(), "log p = {lp} inside the domain");
            integral += lp.exp() * w;
        }
        start = end;
    }
    ensure!(
        (integral - 1.0).abs() < 1e-2,
        "the density integrates to {integral} over [{lo}, {hi}]^{dim}"
    );
    Ok(())
}

/// Outputs and gradients of both directions, by name: a loss through each direction
/// (weighted outputs plus the log-det) differentiated to the input and every variable.
fn outputs(p: &Prepared) -> Result<Vec<(String, Tensor)>> {
    let x = Var::from_tensor(&points(&p.sample, 16, 6)?)?;
    let (z, _) = p.layer.forward(x.as_tensor())?;
    let z = Var::from_tensor(&z.detach())?;
    let w = inputs(16, p.sample.dim, 0.0, 1.0, DTYPE, 7)?;
    let vars = p.varmap.data().lock().expect("variables").clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for (what, input) in [("forward", &x), ("inverse", &z)] {
        let (y, log_det) = if what == "forward" {
            p.layer.forward(input.as_tensor())?
        } else {
            p.layer.inverse(input.as_tensor())?
        };
        let loss = ((&y * &w)?.sum_all()? + log_det.sum_all()?)?;
        let grads = loss.backward()?;
        out.push((format!("{what} output"), y));
        out.push((format!("{what} log-det"), log_det));
        // No gradient reads as zeros: then one path without a gradient the other
        // has is a difference.
        let gradient = |t: &Tensor| -> Result<Tensor> {
            Ok(match grads.get(t) {
                Some(g) => g.clone(),
                None => t.zeros_like()?,
            })
        };
        out.push((
            format!("{what} gradient of the input"),
            gradient(input.as_tensor())?,
        ));
        for name in &names {
            out.push((
                format!("{what} gradient of {name}"),
                gradient(vars[*name].as_tensor())?,
            ));
        }
    }
    Ok(out)
}

fn fused(registry: &Registry, kind: &str) -> Result<()> {
    let p = prepare(registry, kind)?;
    set_fusion(false);
    let reference = outputs(&p);
    set_fusion(true);
    let (reference, fused) = (reference?, outputs(&p)?);
    for ((name, a), (_, b)) in fused.iter().zip(&reference) {
        let scale = max_abs(b)?.max(1.0);
        let err = max_abs(&(a - b)?)? / scale;
        ensure!(
            err < 1e-10,
            "fused {name} differs from the reference by {err:e}"
        );
    }
    Ok(())
}

fn save_and_load(registry: &Registry, kind: &str) -> Result<()> {
    let p = prepare(registry, kind)?;
    let path = std::env::temp_dir().join(format!(
        "flows-conformance-{}-{kind}.safetensors",
        std::process::id()
    ));
    p.varmap.save(&path)?;
    let loaded = candle::safetensors::load(&path, &DEV);
    std::fs::remove_file(&path)?;
    let loaded = loaded?;
    let mut saved: Vec<String> = p
        .varmap
        .data()
        .lock()
        .expect("variables")
        .keys()
        .cloned()
        .collect();
    let mut read: Vec<String> = loaded.keys().cloned().collect();
    saved.sort();
    read.sort();
    ensure!(saved == read, "saved {saved:?}, read back {read:?}");
    // Built from the file's tensors alone: a tensor the layer needs and the file lacks
    // is an error.
    let mut again = registry.build(
        &p.sample.spec,
        VarBuilder::from_tensors(loaded, DTYPE, &DEV),
    )?;
    again.set_training(false);
    let x = points(&p.sample, 16, 8)?;
    let (z, ld) = p.layer.forward(&x)?;
    let (z2, ld2) = again.forward(&x)?;
    let (back, ild) = p.layer.inverse(&z)?;
    let (back2, ild2) = again.inverse(&z)?;
    for (what, a, b) in [
        ("latent", z, z2),
        ("log-det", ld, ld2),
        ("inverse", back, back2),
        ("inverse log-det", ild, ild2),
    ] {
        let err = max_abs(&(a - b)?)?;
        ensure!(err == 0.0, "the loaded layer's {what} differs by {err:e}");
    }
    Ok(())
}

#[test]
fn every_kind_inverts() -> Result<()> {
    every_kind(round_trip)
}

#[test]
fn every_kind_has_the_log_det_of_its_jacobian() -> Result<()> {
    every_kind(log_det)
}

#[test]
fn every_kind_has_a_density_that_integrates_to_one() -> Result<()> {
    every_kind(density)
}

#[test]
fn every_kind_computes_the_same_with_fused_kernels() -> Result<()> {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    every_kind(fused)
}

#[test]
fn every_kind_saves_and_loads() -> Result<()> {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    every_kind(save_and_load)
}

/// A family that registers a kind but gives no sample.
struct Unsampled;

impl LayerFamily for Unsampled {
    fn kinds(&self) -> &[&'static str] {
        &["unsampled"]
    }

    fn check(&self, _: &LayerSpec, _: usize, _: usize) -> Result<(), String> {
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        flow_core::FixedLayers.build(spec, vb)
    }
}

#[test]
fn a_kind_without_a_sample_fails_the_checks() -> Result<()> {
    let registry = Registry::builtin().with(Unsampled);
    let checks: [fn(&Registry, &str) -> Result<()>; 5] =
        [round_trip, log_det, density, fused, save_and_load];
    for check in checks {
        let err = check(&registry, "unsampled").expect_err("checked without a sample");
        ensure!(
            err.to_string()
                == "`unsampled` has no sample layer: its family's `LayerFamily::sample` gives none",
            "{err}"
        );
    }
    Ok(())
}
