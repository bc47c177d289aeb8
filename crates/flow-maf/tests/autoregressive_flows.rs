//! MAF and IAF through the family's public API: stacks invert, their log-dets agree
//! with numerical Jacobians, each output reads only the inputs before it in the order,
//! IAF is MAF used the other way, and a conditional flow depends on its context.

#[path = "../../../tests/support/bijector_checks.rs"]
mod bijector_checks;

use anyhow::{ensure, Result};
use bijector_checks::{inputs, numerical_log_det};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{seeded_var_builder, Bijector, Chain, LayerFamily, LayerSpec};
use flow_maf::{MafConfig, MafFamily, MafLayer};
use flow_nn::{Order, ScaleMap};

const DEV: Device = Device::Cpu;

fn config(dim: usize, layers: usize) -> MafConfig {
    MafConfig::new(dim).with_layers(layers).with_hidden(16)
}

/// The stack of `cfg`, built through the family from its layers' specs, in f64.
fn build(cfg: &MafConfig, seed: u64) -> Result<Chain> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &DEV);
    let mut layers = Vec::new();
    for (i, layer) in cfg.layers().iter().enumerate() {
        let spec = LayerSpec::tagged(layer).map_err(anyhow::Error::msg)?;
        MafFamily
            .check(&spec, cfg.dim, cfg.context_dim)
            .map_err(anyhow::Error::msg)?;
        layers.push(MafFamily.build(&spec, vb.pp(i))?);
    }
    Ok(Chain::new(layers))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

#[test]
fn maf_and_iaf_stacks_invert() -> Result<()> {
    for inverse in [false, true] {
        for scale in [ScaleMap::default(), ScaleMap::Exp, ScaleMap::Sigmoid] {
            let cfg = config(3, 4).with_inverse(inverse).with_scale(scale);
            let flow = build(&cfg, 1)?;
            let x = inputs(64, 3, 0.3, 2.0, DType::F64, 2)?;
            let (z, log_det) = flow.forward(&x)?;
            let (back, log_det_inverse) = flow.inverse(&z)?;
            let what = format!("inverse {inverse}, {scale:?}");
            let err = max_diff(&back, &x)?;
            ensure!(err < 1e-9, "{what}: round trip off by {err:e}");
            let sum = (log_det + log_det_inverse)?
                .abs()?
                .max(0)?
                .to_scalar::<f64>()?;
            ensure!(sum < 1e-9, "{what}: log-dets do not cancel: {sum:e}");
            ensure!(max_diff(&z, &x)? > 0.1, "{what}: the stack is the identity");
        }
    }
    Ok(())
}

#[test]
fn log_dets_match_numerical_jacobians() -> Result<()> {
    for inverse in [false, true] {
        let flow = build(&config(3, 3).with_inverse(inverse), 3)?;
        let x = inputs(12, 3, 0.0, 2.0, DType::F64, 4)?;
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
                    "inverse {inverse}: log-det {g} against numerical {w}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn iaf_is_maf_used_the_other_way() -> Result<()> {
    // One layer each, the same seed: the same network.
    let maf = build(&config(4, 1), 5)?;
    let iaf = build(&config(4, 1).with_inverse(true), 5)?;
    let x = inputs(20, 4, 0.0, 1.5, DType::F64, 6)?;
    let (a, la) = iaf.forward(&x)?;
    let (b, lb) = maf.inverse(&x)?;
    ensure!(max_diff(&a, &b)? == 0.0, "IAF forward is not MAF inverse");
    ensure!(max_diff(&la, &lb)? == 0.0, "their log-dets differ");
    let (a, la) = iaf.inverse(&x)?;
    let (b, lb) = maf.forward(&x)?;
    ensure!(max_diff(&a, &b)? == 0.0, "IAF inverse is not MAF forward");
    ensure!(max_diff(&la, &lb)? == 0.0, "their log-dets differ");
    Ok(())
}

/// The one MAF layer of `order`, over 4 features.
fn layer(order: Vec<usize>) -> Result<Box<dyn Bijector>> {
    let MafLayer::AffineAutoregressive(mut c) = config(4, 1).layers().remove(0);
    c.order = order;
    let spec = LayerSpec::tagged(&MafLayer::AffineAutoregressive(c)).map_err(anyhow::Error::msg)?;
    MafFamily.check(&spec, 4, 0).map_err(anyhow::Error::msg)?;
    let varmap = VarMap::new();
    Ok(MafFamily.build(&spec, seeded_var_builder(&varmap, 7, DType::F64, &DEV))?)
}

#[test]
fn each_output_depends_only_on_the_inputs_before_it_in_the_order() -> Result<()> {
    for order in [
        vec![0, 1, 2, 3],
        vec![2, 0, 3, 1],
        Order::Random { seed: 3 }.of(0, 4),
    ] {
        let layer = layer(order.clone())?;
        let x = inputs(8, 4, 0.0, 1.5, DType::F64, 8)?;
        let (z, _) = layer.forward(&x)?;
        let z = z.to_vec2::<f64>()?;
        let moved = |zb: &[Vec<f64>], out: usize| {
            z.iter()
                .zip(zb)
                .map(|(a, b)| (a[out] - b[out]).abs())
                .fold(0.0, f64::max)
        };
        for (k, &feature) in order.iter().enumerate() {
            let mut bumped = x.to_vec2::<f64>()?;
            for row in &mut bumped {
                row[feature] += 0.3;
            }
            let (zb, _) = layer.forward(&Tensor::new(bumped, &DEV)?)?;
            let zb = zb.to_vec2::<f64>()?;
            for (j, &out) in order.iter().enumerate().take(k) {
                let m = moved(&zb, out);
                ensure!(
                    m == 0.0,
                    "{order:?}: z{out} (place {j}) moved by {m:e} when x{feature} (place {k}) did"
                );
            }
            ensure!(moved(&zb, feature) > 1e-3, "z{feature} ignores x{feature}");
            if k + 1 < order.len() {
                let later = order[k + 1..]
                    .iter()
                    .map(|&out| moved(&zb, out))
                    .fold(0.0, f64::max);
                ensure!(
                    later > 1e-6,
                    "{order:?}: no output after x{feature} reads it"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn conditional_flows_depend_on_their_context() -> Result<()> {
    for inverse in [false, true] {
        let cfg = config(3, 2).with_context_dim(2).with_inverse(inverse);
        let flow = build(&cfg, 9)?;
        let x = inputs(16, 3, 0.0, 1.5, DType::F64, 10)?;
        let c0 = inputs(16, 2, 0.0, 1.0, DType::F64, 11)?;
        let c1 = (&c0 + 1.0)?;
        let (z0, ld0) = flow.forward_with_context(&x, &c0)?;
        let (z1, ld1) = flow.forward_with_context(&x, &c1)?;
        ensure!(
            max_diff(&z0, &z1)? > 1e-3,
            "inverse {inverse}: context ignored"
        );
        ensure!(
            max_diff(&ld0, &ld1)? > 1e-6,
            "inverse {inverse}: log-det ignores the context"
        );
        let (back, _) = flow.inverse_with_context(&z1, &c1)?;
        let err = max_diff(&back, &x)?;
        ensure!(err < 1e-9, "inverse {inverse}: round trip off by {err:e}");
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
            "inverse {inverse}: conditional log-det {got} against {}",
            numerical[0]
        );
    }
    Ok(())
}

#[test]
fn specs_that_do_not_fit_the_model_are_refused_by_name() -> Result<()> {
    let spec = LayerSpec::tagged(&config(3, 1).layers()[0]).map_err(anyhow::Error::msg)?;
    let err = MafFamily.check(&spec, 4, 0).expect_err("order of 3 in 4");
    ensure!(err == "an order of 3 features in a model of 4", "{err}");
    let err = MafFamily.check(&spec, 3, 1).expect_err("no context");
    ensure!(
        err == "a layer of 0 context features in a model of 1",
        "{err}"
    );
    let MafLayer::AffineAutoregressive(mut c) = config(3, 1).layers().remove(0);
    c.order = vec![0, 0, 2];
    let spec = LayerSpec::tagged(&MafLayer::AffineAutoregressive(c)).map_err(anyhow::Error::msg)?;
    let err = MafFamily.check(&spec, 3, 0).expect_err("repeated feature");
    ensure!(err == "not an order of 0..3: [0, 0, 2]", "{err}");
    Ok(())
}
