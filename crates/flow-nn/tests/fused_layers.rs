//! Every layer reaches its transform's kernel through the same door: MAF and IAF
//! (`Autoregressive<Affine>`), autoregressive NSF, and affine and spline couplings,
//! with the fused kernels on against the same layers on plain candle ops, for the
//! values, log-dets and gradients of both directions, in f64 and f32. (The fusion
//! switch is process-wide: the tests take turns through [`SWITCH`].)

use std::sync::Mutex;

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use flow_core::{sampling::randn, seeded_var_builder, Bijector, Inverse};
use flow_kernels::{fused, set_fusion};
use flow_nn::{
    Activation, Affine, Autoregressive, AutoregressiveConfig, ConditionerConfig, Coupling,
    CouplingConfig, NetConfig, Nets, ScaleMap, Spline, Transform,
};
use rand::{rngs::StdRng, SeedableRng};

/// Held by a test while it sets the fusion switch.
static SWITCH: Mutex<()> = Mutex::new(());

const DEV: Device = Device::Cpu;
const DIM: usize = 5;
const BATCH: usize = 64;

fn autoregressive<T: Transform>(transform: T) -> AutoregressiveConfig<T> {
    AutoregressiveConfig {
        order: vec![2, 0, 4, 1, 3],
        hidden: vec![24, 24],
        activation: Activation::Relu,
        transform,
        inverted: false,
        context_dim: 0,
        zero_init: false,
        residual_blocks: 0,
        stored_masks: false,
    }
}

/// A coupling keeping the even features: the transformed ones are not contiguous, so
/// the reference gathers and merges them.
fn coupling<T: Transform>(transform: T) -> CouplingConfig<T> {
    CouplingConfig {
        mask: (0..DIM).map(|j| j % 2 == 0).collect(),
        conditioner: ConditionerConfig {
            nets: Nets::Separate,
            layout: Default::default(),
            net: NetConfig::Mlp {
                hidden: vec![16],
                activation: Activation::Tanh,
            },
            zero_init: false,
        },
        transform,
        inverted: false,
        context_dim: 0,
    }
}

type Build = fn(VarBuilder) -> candle::Result<Box<dyn Bijector>>;

/// The layers compared, with the kernel each must take: MAF under every scale map
/// kind, IAF, autoregressive NSF and the two couplings.
fn layers() -> Vec<(&'static str, Option<flow_kernels::Op>, Build)> {
    let affine_op = Affine::default().kernel();
    let spline_op = Spline::new(6, 3.0).kernel();
    vec![
        ("maf soft-clamp", affine_op, |vb| {
            let c = autoregressive(Affine::new(ScaleMap::SoftClamp { clamp: 2.0 }));
            Ok(Box::new(Autoregressive::new(&c, vb)?))
        }),
        ("maf exp", affine_op, |vb| {
            let c = autoregressive(Affine::new(ScaleMap::Exp));
            Ok(Box::new(Autoregressive::new(&c, vb)?))
        }),
        ("maf softplus", affine_op, |vb| {
            let c = autoregressive(Affine::new(ScaleMap::Softplus));
            Ok(Box::new(Autoregressive::new(&c, vb)?))
        }),
        ("iaf", affine_op, |vb| {
            let c = autoregressive(Affine::new(ScaleMap::Tanh { clamp: 1.5 }));
            Ok(Box::new(Inverse(Autoregressive::new(&c, vb)?)))
        }),
        ("nsf-ar", spline_op, |vb| {
            let c = autoregressive(Spline::new(6, 3.0));
            Ok(Box::new(Autoregressive::new(&c, vb)?))
        }),
        ("affine coupling", affine_op, |vb| {
            let c = coupling(Affine::default());
            Ok(Box::new(Coupling::new(&c, vb)?))
        }),
        ("spline coupling", spline_op, |vb| {
            let c = coupling(Spline::new(6, 3.0));
            Ok(Box::new(Coupling::new(&c, vb)?))
        }),
    ]
}

/// Largest difference relative to the reference's size (at least 1).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
    Ok(diff / scale)
}

/// The layer's outputs both ways, then the gradients of weighted losses through each
/// direction to its input and every variable, by name.
fn outputs(
    layer: &dyn Bijector,
    varmap: &VarMap,
    x: &Var,
    z: &Var,
    w: &Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let (y, log_det) = layer.forward(x.as_tensor())?;
    let (back, log_det_inverse) = layer.inverse(z.as_tensor())?;
    let forward_loss = ((&y * w)?.sum_all()? + log_det.sum_all()?)?;
    let inverse_loss = ((&back * w)?.sum_all()? + log_det_inverse.sum_all()?)?;
    let mut out = vec![
        ("forward".to_string(), y),
        ("forward log-det".to_string(), log_det),
        ("inverse".to_string(), back),
        ("inverse log-det".to_string(), log_det_inverse),
    ];
    let mut vars: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (what, loss, input) in [("forward", forward_loss, x), ("inverse", inverse_loss, z)] {
        let grads = loss.backward()?;
        let named = std::iter::once(("input".to_string(), input.as_tensor().clone()));
        for (name, t) in named.chain(vars.iter().cloned()) {
            let Some(g) = grads.get(&t) else {
                anyhow::bail!("{what}: no gradient for {name}");
            };
            out.push((format!("{what} gradient of {name}"), g.clone()));
        }
    }
    Ok(out)
}

#[test]
fn layers_take_the_kernels_as_they_take_the_reference() -> Result<()> {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    for dtype in [DType::F64, DType::F32] {
        let (tol, grad_tol) = if dtype == DType::F64 {
            (1e-11, 1e-10)
        } else {
            (1e-5, 1e-3)
        };
        for (name, op, build) in layers() {
            let varmap = VarMap::new();
            let layer = build(seeded_var_builder(&varmap, 3, dtype, &DEV))?;
            let rng = &mut StdRng::seed_from_u64(7);
            let x = Var::from_tensor(&randn(BATCH, DIM, dtype, &DEV, rng)?)?;
            let z = Var::from_tensor(&randn(BATCH, DIM, dtype, &DEV, rng)?)?;
            let w = randn(BATCH, DIM, dtype, &DEV, rng)?;
            let Some(op) = op else {
                anyhow::bail!("{name}: its transform has no kernel");
            };
            set_fusion(false);
            ensure!(!fused(op, x.as_tensor()), "{name}: fusion is not off");
            let reference = outputs(layer.as_ref(), &varmap, &x, &z, &w)?;
            set_fusion(true);
            ensure!(fused(op, x.as_tensor()), "{name}: the kernel is not taken");
            let kernel = outputs(layer.as_ref(), &varmap, &x, &z, &w)?;
            ensure!(
                kernel.len() == reference.len() && kernel.len() > 4 + 2 * 4,
                "{name}: {} outputs against {}",
                kernel.len(),
                reference.len()
            );
            for ((what, a), (_, b)) in kernel.iter().zip(&reference) {
                let tol = if what.contains("gradient") {
                    grad_tol
                } else {
                    tol
                };
                let e = rel_err(a, b)?;
                ensure!(e < tol, "{dtype:?} {name}: {what} differs by {e:e}");
            }
        }
    }
    Ok(())
}
