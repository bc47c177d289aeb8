//! Adam: the in-place kernels (per variable on the CPU, every variable in one launch on
//! CUDA, where the `cuda` feature and a GPU are present) against the tensor-op form, and
//! both against the update written out by hand as PyTorch documents it.

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use flow_train::{Adam, OptimizerConfig, OptimizerKind};

fn config(kind: OptimizerKind, weight_decay: f64) -> OptimizerConfig {
    OptimizerConfig {
        kind,
        weight_decay,
        ..OptimizerConfig::default()
    }
}

/// The devices to compare on: the CPU, and the GPU where there is one.
fn devices() -> Result<Vec<Device>> {
    let mut out = vec![Device::Cpu];
    if cfg!(feature = "cuda") {
        out.extend(flow_core::cuda_if_present()?);
    }
    Ok(out)
}

/// Variables of a few shapes, the same values in every call. The largest spans several
/// of the GPU launch's blocks and ends inside one.
fn vars(dtype: DType, dev: &Device) -> Result<Vec<Var>> {
    let mut out = Vec::new();
    for (i, shape) in [(7usize, 3usize), (1, 5), (4, 1), (97, 101)]
        .into_iter()
        .enumerate()
    {
        let n = shape.0 * shape.1;
        let values: Vec<f64> = (0..n)
            .map(|k| ((k * 7 + i * 3) % 11) as f64 / 5.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
        out.push(Var::from_tensor(&t)?);
    }
    Ok(out)
}

/// Step `k`'s gradients: deterministic, of both signs and varying scale. The first is
/// transposed (not contiguous) and the last is missing on odd steps.
fn grads(vars: &[Var], k: usize) -> Result<Vec<Option<Tensor>>> {
    let mut out = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        let (r, c) = v.dims2()?;
        let n = r * c;
        let values: Vec<f64> = (0..n)
            .map(|j| ((j * 5 + k * 3 + i) % 13) as f64 / 4.0 - 1.5)
            .map(|x| x * (1.0 + k as f64 / 3.0))
            .collect();
        let dev = v.device();
        let g = if i == 0 {
            Tensor::from_vec(values, (c, r), dev)?.t()?
        } else {
            Tensor::from_vec(values, (r, c), dev)?
        };
        let missing = i + 1 == vars.len() && k % 2 == 1;
        out.push((!missing).then(|| g.to_dtype(v.dtype())).transpose()?);
    }
    Ok(out)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// Largest difference relative to the value's size.
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (flat(a)?, flat(b)?);
    assert_eq!(a.len(), b.len());
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + x.abs().max(y.abs())))
        .fold(0.0, f64::max))
}

#[test]
fn in_place_steps_match_the_tensor_ops() -> Result<()> {
    for dev in devices()? {
        in_place_steps_match_the_tensor_ops_on(&dev)?;
    }
    Ok(())
}

fn in_place_steps_match_the_tensor_ops_on(dev: &Device) -> Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
        for (kind, wd) in [
            (OptimizerKind::Adam, 0.0),
            (OptimizerKind::Adam, 0.1),
            (OptimizerKind::AdamW, 0.1),
            (OptimizerKind::Adamax, 0.0),
            (OptimizerKind::Adamax, 0.1),
        ] {
            let (fast_vars, slow_vars) = (vars(dtype, dev)?, vars(dtype, dev)?);
            let mut fast = Adam::new(fast_vars.clone(), config(kind, wd))?;
            let mut slow = Adam::new(slow_vars.clone(), config(kind, wd))?.with_in_place(false);
            for k in 0..6 {
                let lr = 1e-2 * 0.9f64.powi(k as i32);
                fast.step(&grads(&fast_vars, k)?, lr)?;
                slow.step(&grads(&slow_vars, k)?, lr)?;
            }
            let what = format!("{dev:?} {dtype:?} {kind:?} wd {wd}");
            for (a, b) in fast_vars.iter().zip(&slow_vars) {
                let d = max_rel(a.as_tensor(), b.as_tensor())?;
                assert!(d < tol, "{what}: parameters differ by {d:e}");
            }
            let ((fm, fv), (sm, sv)) = (fast.moments(), slow.moments());
            for (a, b) in fm.iter().zip(sm).chain(fv.iter().zip(sv)) {
                let d = max_rel(a, b)?;
                assert!(d < tol, "{what}: moments differ by {d:e}");
            }
            // The variables moved: the comparison is not between two no-ops.
            let d = max_rel(fast_vars[0].as_tensor(), vars(dtype, dev)?[0].as_tensor())?;
            assert!(d > 1e-3, "{what}: the parameters did not move");
        }
    }
    Ok(())
}

/// PyTorch's Adam / AdamW / Adamax for one scalar, as its documentation writes it.
fn by_hand(kind: OptimizerKind, wd: f64, theta0: f64, g: &[f64], lr: f64) -> f64 {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let (mut theta, mut m, mut v) = (theta0, 0.0, 0.0);
    for (t, &g) in g.iter().enumerate() {
        let t = t as i32 + 1;
        let g = match kind {
            OptimizerKind::Adam | OptimizerKind::Adamax => g + wd * theta,
            OptimizerKind::AdamW => {
                theta *= 1.0 - lr * wd;
                g
            }
        };
        if kind == OptimizerKind::Adamax {
            m = b1 * m + (1.0 - b1) * g;
            v = f64::max(b2 * v, g.abs() + eps);
            theta -= lr / (1.0 - b1.powi(t)) * m / v;
            continue;
        }
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let (m_hat, v_hat) = (m / (1.0 - b1.powi(t)), v / (1.0 - b2.powi(t)));
        theta -= lr * m_hat / (v_hat.sqrt() + eps);
    }
    theta
}

#[test]
fn both_forms_follow_the_documented_update() -> Result<()> {
    let g = [0.3, -1.2, 0.05, 2.0, -0.7, 0.0, 0.4];
    for in_place in [true, false] {
        for (kind, wd) in [
            (OptimizerKind::Adam, 0.0),
            (OptimizerKind::Adam, 0.05),
            (OptimizerKind::AdamW, 0.05),
            (OptimizerKind::Adamax, 0.0),
            (OptimizerKind::Adamax, 0.05),
        ] {
            let var = Var::new(&[0.8f64], &Device::Cpu)?;
            let mut adam = Adam::new(vec![var.clone()], config(kind, wd))?.with_in_place(in_place);
            for &gk in &g {
                adam.step(&[Some(Tensor::new(&[gk], &Device::Cpu)?)], 0.01)?;
            }
            let got = flat(var.as_tensor())?[0];
            let want = by_hand(kind, wd, 0.8, &g, 0.01);
            assert!(
                (got - want).abs() < 1e-14,
                "in place {in_place}, {kind:?} wd {wd}: {got} vs {want}"
            );
            assert!((got - 0.8).abs() > 1e-3, "the parameter did not move");
        }
    }
    Ok(())
}

#[test]
fn restored_state_is_copied_not_shared() -> Result<()> {
    let var = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
    let m = Tensor::new(&[0.1f32, 0.2], &Device::Cpu)?;
    let v = Tensor::new(&[0.01f32, 0.04], &Device::Cpu)?;
    let mut adam = Adam::new(vec![var.clone()], OptimizerConfig::default())?;
    adam.set_state(3, vec![m.clone()], vec![v.clone()])?;
    adam.step(&[Some(Tensor::new(&[1.0f32, 1.0], &Device::Cpu)?)], 0.1)?;
    assert_eq!(m.to_vec1::<f32>()?, [0.1, 0.2]);
    assert_eq!(v.to_vec1::<f32>()?, [0.01, 0.04]);
    let (m2, _) = adam.moments();
    assert_ne!(
        m2[0].to_vec1::<f32>()?,
        [0.1, 0.2],
        "the moments did not move"
    );
    assert_eq!(adam.step_count(), 4);
    Ok(())
}

#[test]
fn mismatched_gradients_are_errors() -> Result<()> {
    let var = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
    let mut adam = Adam::new(vec![var], OptimizerConfig::default())?;
    let wrong = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
    let err = adam.step(&[Some(wrong)], 0.1).expect_err("wrong shape");
    assert!(
        err.to_string()
            .contains("gradient of shape [3] for a variable of shape [2]"),
        "{err}"
    );
    let err = adam.step(&[], 0.1).expect_err("no gradients");
    assert!(
        err.to_string().contains("0 gradients for 1 variables"),
        "{err}"
    );
    assert_eq!(adam.step_count(), 0, "a refused step counts");
    Ok(())
}

/// The one-launch step on a GPU refuses a variable given twice, or a gradient that is
/// another group's variable, where its blocks would race on one element.
#[test]
fn the_one_launch_step_refuses_tensors_that_share_memory() -> Result<()> {
    use flow_kernels::adam::{step_all, Step, Update};
    let step = Step {
        beta1: 0.9,
        beta2: 0.999,
        l2: 0.0,
        update: Update {
            alpha: 1e-3,
            kappa: 1.0,
            eps: 1e-8,
            decay: 0.0,
            infinity_norm: false,
        },
    };
    for dev in devices()?.iter().filter(|d| d.is_cuda()) {
        let t = |v: f32| Tensor::full(v, 5, dev);
        let (a, b, m, v, g) = (t(1.0)?, t(2.0)?, t(0.0)?, t(0.0)?, t(0.5)?);
        let (m2, v2) = (t(0.0)?, t(0.0)?);
        step_all(&step, &[[&a, &m, &v, &g], [&b, &m2, &v2, &g]])?;
        let twice = step_all(&step, &[[&a, &m, &v, &g], [&a, &m2, &v2, &g]]);
        let read_written = step_all(&step, &[[&a, &m, &v, &g], [&b, &m2, &v2, &a]]);
        for (what, r) in [
            ("a variable twice", twice),
            ("a gradient written", read_written),
        ] {
            let err = r.expect_err(what).to_string();
            assert!(err.contains("shares memory"), "{what}: {err}");
        }
    }
    Ok(())
}
