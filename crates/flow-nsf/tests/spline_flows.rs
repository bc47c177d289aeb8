//! Neural spline flows through the family's public API: coupling (NSF-C) and
//! autoregressive (NSF-AR) stacks invert, their log-dets agree with numerical
//! Jacobians, the autoregressive layer reads only the features before each one, the
//! spline is the identity outside its tail bound, and a conditional flow depends on its
//! context.

#[path = "../../../tests/support/bijector_checks.rs"]
mod bijector_checks;

use anyhow::{ensure, Result};
use bijector_checks::{inputs, numerical_log_det};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Bijector, Chain, LayerFamily, LayerSpec};
use flow_nsf::{NsfConfig, NsfFamily, NsfKind, Spline, SplineLayer, SplineStyle};

const DEV: Device = Device::Cpu;
const BOUND: f64 = 2.0;

/// A small stack of `kind`, with conditioners that do not start at zero (so that every
/// layer is a real spline, not the identity).
fn config(kind: NsfKind, dim: usize, layers: usize) -> NsfConfig {
    NsfConfig::new(dim)
        .with_kind(kind)
        .with_layers(layers)
        .with_hidden(16)
        .with_spline(Spline::new(6, BOUND))
        .with_zero_init(false)
}

/// The stack of `cfg`, built through the family from its layers' specs, in f64.
fn build(cfg: &NsfConfig, seed: u64) -> Result<Chain> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &DEV);
    let mut layers = Vec::new();
    for (i, layer) in cfg.layers().iter().enumerate() {
        let spec = LayerSpec::tagged(layer).map_err(anyhow::Error::msg)?;
        NsfFamily
            .check(&spec, cfg.dim, cfg.context_dim)
            .map_err(anyhow::Error::msg)?;
        layers.push(NsfFamily.build(&spec, vb.pp(i))?);
    }
    Ok(Chain::new(layers))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

#[test]
fn stacks_invert() -> Result<()> {
    for kind in [NsfKind::Coupling, NsfKind::Autoregressive] {
        let flow = build(&config(kind, 3, 4), 1)?;
        // Inside the bound and, with spread 3, partly in the tails.
        let x = inputs(64, 3, 0.2, 3.0, DType::F64, 2)?;
        let (z, log_det) = flow.forward(&x)?;
        let (back, log_det_inverse) = flow.inverse(&z)?;
        let err = max_diff(&back, &x)?;
        ensure!(err < 1e-9, "{kind:?}: round trip off by {err:e}");
        let sum = (log_det + log_det_inverse)?
            .abs()?
            .max(0)?
            .to_scalar::<f64>()?;
        ensure!(sum < 1e-9, "{kind:?}: log-dets do not cancel: {sum:e}");
        ensure!(
            max_diff(&z, &x)? > 0.1,
            "{kind:?}: the stack is the identity"
        );
    }
    Ok(())
}

#[test]
fn log_dets_match_numerical_jacobians() -> Result<()> {
    for kind in [NsfKind::Coupling, NsfKind::Autoregressive] {
        for style in [SplineStyle::Durkan, SplineStyle::Zuko] {
            let mut spline = Spline::new(6, BOUND);
            spline.style = style;
            let flow = build(&config(kind, 3, 3).with_spline(spline), 3)?;
            let x = inputs(12, 3, 0.0, 2.5, DType::F64, 4)?;
            let (_, log_det) = flow.forward(&x)?;
            let numerical = numerical_log_det(|x| flow.forward(x), &x)?;
            let (_, inverse_log_det) = flow.inverse(&x)?;
            let numerical_inverse = numerical_log_det(|z| flow.inverse(z), &x)?;
            for (got, want) in [
                (log_det.to_vec1::<f64>()?, numerical),
                (inverse_log_det.to_vec1::<f64>()?, numerical_inverse),
            ] {
                for (g, w) in got.iter().zip(&want) {
                    ensure!(
                        (g - w).abs() < 1e-6,
                        "{kind:?} {style:?}: log-det {g} against numerical {w}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The one autoregressive layer of order `order`, over 4 features.
fn autoregressive_layer(order: Vec<usize>) -> Result<Box<dyn Bijector>> {
    let cfg = config(NsfKind::Autoregressive, 4, 1);
    let SplineLayer::SplineAutoregressive(mut layer) = cfg.layers().remove(0) else {
        anyhow::bail!("not an autoregressive layer");
    };
    layer.order = order;
    let spec =
        LayerSpec::tagged(&SplineLayer::SplineAutoregressive(layer)).map_err(anyhow::Error::msg)?;
    NsfFamily.check(&spec, 4, 0).map_err(anyhow::Error::msg)?;
    let varmap = VarMap::new();
    Ok(NsfFamily.build(&spec, seeded_var_builder(&varmap, 5, DType::F64, &DEV))?)
}

#[test]
fn each_output_depends_only_on_the_inputs_before_it_in_the_order() -> Result<()> {
    let order = vec![2, 0, 3, 1];
    let layer = autoregressive_layer(order.clone())?;
    let x = inputs(8, 4, 0.0, 1.5, DType::F64, 6)?;
    let (z, _) = layer.forward(&x)?;
    let z = z.to_vec2::<f64>()?;
    for (k, &feature) in order.iter().enumerate() {
        let mut bumped = x.to_vec2::<f64>()?;
        for row in &mut bumped {
            row[feature] += 0.3;
        }
        let bumped = Tensor::new(bumped, &DEV)?;
        let (zb, _) = layer.forward(&bumped)?;
        let zb = zb.to_vec2::<f64>()?;
        for (j, &out) in order.iter().enumerate() {
            let moved = z
                .iter()
                .zip(&zb)
                .map(|(a, b)| (a[out] - b[out]).abs())
                .fold(0.0, f64::max);
            if j < k {
                ensure!(
                    moved == 0.0,
                    "z{out} (place {j}) moved by {moved:e} when x{feature} (place {k}) did"
                );
            } else if j == k {
                ensure!(moved > 1e-3, "z{out} ignores its own input x{feature}");
            }
        }
        // Some later output reads it (the network is not blind).
        if k + 1 < order.len() {
            let later = order[k + 1..]
                .iter()
                .map(|&out| {
                    z.iter()
                        .zip(&zb)
                        .map(|(a, b)| (a[out] - b[out]).abs())
                        .fold(0.0, f64::max)
                })
                .fold(0.0, f64::max);
            ensure!(later > 1e-6, "no output after x{feature} reads it");
        }
    }
    Ok(())
}

#[test]
fn coupling_keeps_its_conditioning_half() -> Result<()> {
    // The first layer keeps the features its mask marks (the first half).
    let cfg = config(NsfKind::Coupling, 4, 1);
    let SplineLayer::SplineCoupling(c) = &cfg.layers()[0] else {
        anyhow::bail!("not a coupling layer");
    };
    let mask = c.mask.clone();
    let flow = build(&cfg, 7)?;
    let x = inputs(16, 4, 0.0, 1.5, DType::F64, 8)?;
    let (z, _) = flow.forward(&x)?;
    let (x, z) = (x.to_vec2::<f64>()?, z.to_vec2::<f64>()?);
    for (j, &kept) in mask.iter().enumerate() {
        let moved = x
            .iter()
            .zip(&z)
            .map(|(a, b)| (a[j] - b[j]).abs())
            .fold(0.0, f64::max);
        ensure!(
            (moved == 0.0) == kept,
            "feature {j} (kept: {kept}) moved by {moved:e}"
        );
    }
    Ok(())
}

#[test]
fn splines_are_the_identity_outside_the_tail_bound() -> Result<()> {
    for kind in [NsfKind::Coupling, NsfKind::Autoregressive] {
        let flow = build(&config(kind, 3, 3), 9)?;
        // Every feature beyond ±BOUND, on both sides.
        let x = inputs(32, 3, 0.0, 1.0, DType::F64, 10)?;
        let x = ((x.sign()? * BOUND)? + (&x * 3.0)?)?;
        ensure!(
            x.abs()?.min_all()?.to_scalar::<f64>()? > BOUND,
            "inputs inside the bound"
        );
        let (z, log_det) = flow.forward(&x)?;
        ensure!(max_diff(&z, &x)? == 0.0, "{kind:?}: the tails moved");
        let ld = log_det.abs()?.max(0)?.to_scalar::<f64>()?;
        ensure!(ld == 0.0, "{kind:?}: log-det {ld} in the tails");
        // Inside the bound the spline maps the interval onto itself.
        let inside = inputs(32, 3, 0.0, 0.999 * BOUND, DType::F64, 11)?;
        let (z, _) = flow.forward(&inside)?;
        let top = z.abs()?.max_all()?.to_scalar::<f64>()?;
        ensure!(top <= BOUND, "{kind:?}: [-B, B] mapped to {top}");
        ensure!(max_diff(&z, &inside)? > 0.1, "{kind:?}: identity inside");
    }
    Ok(())
}

#[test]
fn conditional_flows_depend_on_their_context() -> Result<()> {
    // The conditional defaults (residual conditioners, LU layers between couplings),
    // made small and starting away from the identity.
    let default = NsfConfig::conditional(3, 2)
        .with_layers(2)
        .with_hidden(16)
        .with_spline(Spline::new(6, BOUND))
        .with_zero_init(false);
    let configs = [
        (
            "coupling",
            config(NsfKind::Coupling, 3, 2).with_context_dim(2),
        ),
        (
            "autoregressive",
            config(NsfKind::Autoregressive, 3, 2).with_context_dim(2),
        ),
        ("conditional default", default),
    ];
    for (kind, cfg) in configs {
        let flow = build(&cfg, 12)?;
        let x = inputs(16, 3, 0.0, 1.5, DType::F64, 13)?;
        let c0 = inputs(16, 2, 0.0, 1.0, DType::F64, 14)?;
        let c1 = (&c0 + 1.0)?;
        let (z0, ld0) = flow.forward_with_context(&x, &c0)?;
        let (z1, ld1) = flow.forward_with_context(&x, &c1)?;
        ensure!(max_diff(&z0, &z1)? > 1e-3, "{kind:?}: context ignored");
        ensure!(
            max_diff(&ld0, &ld1)? > 1e-6,
            "{kind:?}: log-det ignores the context"
        );
        let (back, _) = flow.inverse_with_context(&z1, &c1)?;
        let err = max_diff(&back, &x)?;
        ensure!(
            err < 1e-9,
            "{kind:?}: conditional round trip off by {err:e}"
        );
        let numerical = numerical_log_det(
            |x| {
                let c = c1.narrow(0, 0, 1)?.repeat((x.dim(0)?, 1))?;
                flow.forward_with_context(x, &c)
            },
            &x.narrow(0, 0, 1)?,
        )?;
        let got = ld1.to_vec1::<f64>()?[0];
        ensure!(
            (got - numerical[0]).abs() < 1e-6,
            "{kind:?}: conditional log-det {got} against {}",
            numerical[0]
        );
    }
    Ok(())
}

#[test]
fn specs_that_do_not_fit_the_model_are_refused_by_name() -> Result<()> {
    let layer = &config(NsfKind::Coupling, 3, 1).layers()[0];
    let spec = LayerSpec::tagged(layer).map_err(anyhow::Error::msg)?;
    let err = NsfFamily.check(&spec, 4, 0).expect_err("mask of 3 in 4");
    ensure!(err == "mask of 3 features in a model of 4", "{err}");
    let err = NsfFamily.check(&spec, 3, 2).expect_err("no context");
    ensure!(
        err == "a layer of 0 context features in a model of 2",
        "{err}"
    );
    let bad = config(NsfKind::Autoregressive, 3, 1).with_spline(Spline::new(0, BOUND));
    let spec = LayerSpec::tagged(&bad.layers()[0]).map_err(anyhow::Error::msg)?;
    let err = NsfFamily.check(&spec, 3, 0).expect_err("no bins");
    ensure!(err == "a spline needs at least 1 bin", "{err}");
    Ok(())
}
