//! Autoregressive layers (MAF's affine, autoregressive NSF's spline; IAF as their
//! inverse): the Jacobian is triangular in the layer's order, the `d`-pass inverse
//! inverts the one-pass forward map, the MADE network runs fused as it does plain, and a
//! flow of them integrates to one.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder, Bijector, Inverse};
use flow_nn::{
    made_masks, Activation, Affine, Autoregressive, AutoregressiveConfig, Mlp, NetConfig, ScaleMap,
    Spline,
};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

fn config<T>(order: Vec<usize>, transform: T) -> AutoregressiveConfig<T> {
    AutoregressiveConfig {
        order,
        hidden: vec![24, 24],
        activation: Activation::Tanh,
        transform,
        inverted: false,
        context_dim: 0,
        zero_init: false,
        residual_blocks: 0,
        stored_masks: false,
    }
}

/// Layers over `dim` features with random weights: affine and spline, two orders.
fn layers(dim: usize, seed: u64) -> Result<Vec<(String, Box<dyn Bijector>)>> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &DEV);
    let orders = [
        (0..dim).collect::<Vec<_>>(),
        (0..dim).rev().collect::<Vec<_>>(),
    ];
    let mut out: Vec<(String, Box<dyn Bijector>)> = Vec::new();
    for (o, order) in orders.into_iter().enumerate() {
        let affine = config(
            order.clone(),
            Affine::new(ScaleMap::SoftClamp { clamp: 2.0 }),
        );
        let spline = config(order.clone(), Spline::new(5, 3.0));
        out.push((
            format!("maf {order:?}"),
            Box::new(Autoregressive::new(&affine, vb.pp(format!("maf{o}")))?),
        ));
        out.push((
            format!("nsf-ar {order:?}"),
            Box::new(Autoregressive::new(&spline, vb.pp(format!("nsf{o}")))?),
        ));
        out.push((
            format!("iaf {order:?}"),
            Box::new(Inverse(Autoregressive::new(
                &affine,
                vb.pp(format!("iaf{o}")),
            )?)),
        ));
    }
    Ok(out)
}

/// The Jacobian `∂z/∂x` `(dim, dim)` at one point, by central differences.
fn jacobian(b: &dyn Bijector, x: &[f64]) -> Result<Vec<Vec<f64>>> {
    let dim = x.len();
    let eps = 1e-6;
    let mut rows = Vec::new();
    for j in 0..dim {
        let mut hi = x.to_vec();
        let mut lo = x.to_vec();
        hi[j] += eps;
        lo[j] -= eps;
        let t = Tensor::from_vec([hi, lo].concat(), (2, dim), &DEV)?;
        let z = b.forward(&t)?.0.to_vec2::<f64>()?;
        rows.push(
            (0..dim)
                .map(|i| (z[0][i] - z[1][i]) / (2.0 * eps))
                .collect::<Vec<_>>(),
        );
    }
    // rows[j][i] = ∂z_i/∂x_j; return J[i][j].
    Ok((0..dim)
        .map(|i| (0..dim).map(|j| rows[j][i]).collect())
        .collect())
}

/// (The log-dets against numerical Jacobians: the bijector zoo in flow-realnvp's tests.)
#[test]
fn jacobians_are_triangular_in_the_order() -> Result<()> {
    let dim = 4;
    let rng = &mut StdRng::seed_from_u64(3);
    let points = (randn(3, dim, DType::F64, &DEV, rng)? * 1.2)?.to_vec2::<f64>()?;
    for (name, layer) in layers(dim, 1)? {
        for x in &points {
            if name.starts_with("iaf") {
                continue; // the inverse of a triangular map
            }
            let jac = jacobian(layer.as_ref(), x)?;
            // z_i depends on x_j only where j comes before i in the order.
            let order: Vec<usize> = if name.contains("[3, 2") {
                (0..dim).rev().collect()
            } else {
                (0..dim).collect()
            };
            let rank = |f: usize| order.iter().position(|&o| o == f).unwrap_or(0);
            for (i, row) in jac.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    if i != j && rank(j) > rank(i) {
                        ensure!(v.abs() < 1e-8, "{name}: ∂z{i}/∂x{j} = {v}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn inverses_invert_in_d_passes() -> Result<()> {
    for dim in [1, 3, 6] {
        let rng = &mut StdRng::seed_from_u64(5);
        let x = (randn(50, dim, DType::F64, &DEV, rng)? * 2.0)?;
        for (name, layer) in layers(dim, 2)? {
            let (z, ld) = layer.forward(&x)?;
            let (back, ld_inv) = layer.inverse(&z)?;
            let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
            ensure!(
                err < 1e-9,
                "{name} ({dim} features): round trip off by {err:e}"
            );
            let sum = (ld + ld_inv)?.abs()?.max_all()?.to_scalar::<f64>()?;
            ensure!(sum < 1e-9, "{name}: log-dets do not cancel ({sum:e})");
        }
    }
    Ok(())
}

#[test]
fn masked_networks_run_fused_as_they_do_plain() -> Result<()> {
    // The MADE network through the fused kernel (weights masked before packing) and
    // through plain ops: the same values and gradients, f32 and f64.
    for dtype in [DType::F32, DType::F64] {
        let varmap = VarMap::new();
        let (dim, params) = (5, 3);
        let cfg = NetConfig::Mlp {
            hidden: vec![32, 16],
            activation: Activation::Relu,
        };
        let vb = seeded_var_builder(&varmap, 4, dtype, &DEV);
        let masks = made_masks(&[2, 5, 1, 4, 3], 0, &[32, 16], params, &DEV)?
            .into_iter()
            .map(|m| m.to_dtype(dtype))
            .collect::<candle::Result<Vec<_>>>()?;
        let mlp = Mlp::new(&cfg, dim, dim * params, false, vb)?.with_masks(masks)?;
        let rng = &mut StdRng::seed_from_u64(6);
        let x = candle::Var::from_tensor(&randn(40, dim, dtype, &DEV, rng)?)?;
        ensure!(mlp.uses_fused(x.as_tensor()));
        let fused = mlp.forward(x.as_tensor())?;
        let plain = mlp.forward_reference(x.as_tensor())?;
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        let e = (&fused - &plain)?.abs()?.max_all()?.to_dtype(DType::F64)?;
        ensure!(e.to_scalar::<f64>()? < tol, "{dtype:?}: values differ");
        let w = randn(40, dim * params, dtype, &DEV, rng)?;
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gp = (plain * &w)?.sum_all()?.backward()?;
        for (name, v) in varmap.data().lock().expect("lock").iter() {
            let (a, b) = (gf.get(v.as_tensor()), gp.get(v.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                anyhow::bail!("no gradient for {name}");
            };
            let e = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            ensure!(
                e < tol * 10.0,
                "{dtype:?}: gradient of {name} differs by {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn an_autoregressive_flow_integrates_to_one() -> Result<()> {
    // Two layers over 2 features on a standard normal, integrated over a grid.
    for spline in [false, true] {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 8, DType::F64, &DEV);
        let mut chain = flow_core::Chain::default();
        for (i, order) in [vec![0, 1], vec![1, 0]].into_iter().enumerate() {
            let vb = vb.pp(i);
            if spline {
                chain.push(Autoregressive::new(
                    &config(order, Spline::new(4, 3.0)),
                    vb,
                )?);
            } else {
                let affine = Affine::new(ScaleMap::SoftClamp { clamp: 1.5 });
                chain.push(Autoregressive::new(&config(order, affine), vb)?);
            }
        }
        let flow = flow_core::Flow::new(chain, flow_core::StandardNormal::new(2, DType::F64, &DEV));
        let (n, half) = (500usize, 9.0f64);
        let h = 2.0 * half / n as f64;
        let axis: Vec<f64> = (0..n).map(|i| -half + (i as f64 + 0.5) * h).collect();
        let grid: Vec<f64> = axis
            .iter()
            .flat_map(|&a| axis.iter().flat_map(move |&b| [a, b]))
            .collect();
        let grid = Tensor::from_vec(grid, (n * n, 2), &DEV)?;
        let mass = flow.log_prob(&grid)?.exp()?.sum_all()?.to_scalar::<f64>()? * h * h;
        ensure!(
            (mass - 1.0).abs() < 2e-3,
            "spline {spline}: integrates to {mass}"
        );
    }
    Ok(())
}

/// Masks `(out, in)` of a MADE from explicit degrees: `inputs` per input feature,
/// `hidden` per hidden unit of each layer, `outputs` per output (a unit sees the units
/// of the layer before of degree at most its own, an output those of lower degree).
fn masks_from_degrees(inputs: &[usize], hidden: &[Vec<usize>], outputs: &[usize]) -> Vec<Tensor> {
    let mask = |after: &[usize], before: &[usize], strict: bool| {
        let v: Vec<f64> = after
            .iter()
            .flat_map(|&a| {
                before
                    .iter()
                    .map(move |&b| f64::from(u8::from(if strict { a > b } else { a >= b })))
            })
            .collect();
        Tensor::from_vec(v, (after.len(), before.len()), &DEV).expect("mask")
    };
    let mut before = inputs.to_vec();
    let mut out = Vec::new();
    for h in hidden {
        out.push(mask(h, &before, false));
        before = h.clone();
    }
    out.push(mask(outputs, &before, true));
    out
}

/// Checks that `∂z/∂x` is triangular in `order` at a few points, and that the layer
/// inverts in `d` passes.
fn autoregressive_in(name: &str, layer: &dyn Bijector, order: &[usize]) -> Result<()> {
    let dim = order.len();
    let rank = |f: usize| order.iter().position(|&o| o == f).unwrap_or(0);
    let rng = &mut StdRng::seed_from_u64(11);
    let x = (randn(20, dim, DType::F64, &DEV, rng)? * 1.5)?;
    for point in x.to_vec2::<f64>()?.iter().take(3) {
        for (i, row) in jacobian(layer, point)?.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                if i != j && rank(j) > rank(i) {
                    ensure!(v.abs() < 1e-8, "{name}: ∂z{i}/∂x{j} = {v}");
                }
            }
        }
    }
    let (z, ld) = layer.forward(&x)?;
    let (back, ld_inv) = layer.inverse(&z)?;
    let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(err < 1e-9, "{name}: round trip off by {err:e}");
    let sum = (ld + ld_inv)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(sum < 1e-9, "{name}: log-dets do not cancel ({sum:e})");
    Ok(())
}

#[test]
fn stored_masks_are_kept_checked_and_used() -> Result<()> {
    // The settings are absent from the JSON of a default layer, and optional in it.
    let plain = config(vec![0, 1, 2], Affine::new(ScaleMap::Exp));
    let spec =
        flow_core::LayerSpec::new("affine-autoregressive", &plain).map_err(anyhow::Error::msg)?;
    let json = format!("{spec:?}");
    ensure!(
        !json.contains("stored_masks") && !json.contains("residual_blocks"),
        "{json}"
    );
    let back: AutoregressiveConfig<Affine> = spec.settings().map_err(anyhow::Error::msg)?;
    ensure!(back == plain);

    let order = vec![2, 0, 3, 1];
    let rank = [2, 4, 1, 3]; // rank[f]: 1-based position of feature f in the order
    let mut cfg = config(order.clone(), Spline::new(4, 3.0));
    cfg.stored_masks = true;
    let params = 3 * 4 - 1;
    let varmap = VarMap::new();
    let layer = Autoregressive::new(&cfg, seeded_var_builder(&varmap, 1, DType::F64, &DEV))?;
    // A fresh layer holds the masks its order gives, as its buffers and variables.
    let computed = made_masks(&rank, 0, &[24, 24], params, &DEV)?;
    let buffers = layer.buffers();
    ensure!(buffers.len() == 3);
    let vars = varmap.data().lock().expect("lock").clone();
    for (i, (b, c)) in buffers.iter().zip(&computed).enumerate() {
        let var = &vars[&format!("made.{}.mask", 2 * i)];
        ensure!(
            var.as_tensor().id() == b.id(),
            "mask {i} is not its variable"
        );
        let diff = (b - c.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        ensure!(diff == 0.0, "fresh mask {i} differs from the order's");
    }
    autoregressive_in("fresh stored masks", &layer, &order)?;
    let x = randn(8, 4, DType::F64, &DEV, &mut StdRng::seed_from_u64(2))?;
    let before = layer.forward(&x)?.0;

    // Another valid degree assignment (as another library's MADE would have): rebuilt
    // over it, the layer uses it and stays autoregressive.
    let cycle = |offset: usize| -> Vec<usize> { (0..24).map(|j| 1 + (j + offset) % 3).collect() };
    let outputs: Vec<usize> = rank.iter().flat_map(|&r| vec![r; params]).collect();
    let other = masks_from_degrees(&rank, &[cycle(1), cycle(2)], &outputs);
    for (i, m) in other.iter().enumerate() {
        vars[&format!("made.{}.mask", 2 * i)].set(m)?;
    }
    let layer = Autoregressive::new(&cfg, seeded_var_builder(&varmap, 1, DType::F64, &DEV))?;
    autoregressive_in("other stored masks", &layer, &order)?;
    let after = layer.forward(&x)?.0;
    ensure!(
        (after - before)?.abs()?.max_all()?.to_scalar::<f64>()? > 1e-6,
        "the stored masks are not used"
    );

    // Masks that let a feature see itself are refused when the layer is built.
    vars["made.4.mask"].set(&Tensor::ones((4 * params, 24), DType::F64, &DEV)?)?;
    let e = Autoregressive::new(&cfg, seeded_var_builder(&varmap, 1, DType::F64, &DEV))
        .expect_err("masks that break the order");
    ensure!(e.to_string().contains("does not come before"), "{e}");
    Ok(())
}

#[test]
fn residual_made_networks_are_autoregressive() -> Result<()> {
    let order = vec![1, 3, 0, 2];
    for stored in [false, true] {
        let mut cfg = config(
            order.clone(),
            Affine::new(ScaleMap::SoftClamp { clamp: 2.0 }),
        );
        cfg.hidden = vec![16];
        cfg.residual_blocks = 2;
        cfg.stored_masks = stored;
        ensure!(cfg.check(4).is_ok());
        let varmap = VarMap::new();
        let layer = Autoregressive::new(&cfg, seeded_var_builder(&varmap, 3, DType::F64, &DEV))?;
        let names: Vec<String> = varmap
            .data()
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect();
        for n in [
            "made.input.weight",
            "made.blocks.1.1.bias",
            "made.output.weight",
        ] {
            ensure!(names.iter().any(|k| k == n), "no {n} in {names:?}");
        }
        ensure!(names.iter().any(|k| k.ends_with(".mask")) == stored);
        ensure!(layer.buffers().len() == if stored { 6 } else { 0 });
        autoregressive_in(&format!("residual, stored {stored}"), &layer, &order)?;
    }
    let mut bad = config(order, Affine::new(ScaleMap::Exp));
    bad.residual_blocks = 1;
    let err = bad
        .check(4)
        .expect_err("two hidden widths in a residual MADE");
    ensure!(
        err.contains("a residual MADE has one hidden width"),
        "{err}"
    );
    Ok(())
}

#[test]
fn configs_check_against_the_model_and_build_inverted_layers_turned_around() -> Result<()> {
    use flow_core::LayerConfig;
    let affine = config(vec![1, 0, 2], Affine::new(ScaleMap::Tanh { clamp: 2.0 }));
    // Checked against the model: its features, its context, the transform's settings.
    ensure!(LayerConfig::check(&affine, 3, 0).is_ok());
    let e = LayerConfig::check(&affine, 4, 0).err();
    ensure!(
        e.as_deref() == Some("an order of 3 features in a model of 4"),
        "{e:?}"
    );
    let e = LayerConfig::check(&affine, 3, 2).err();
    ensure!(
        e.as_deref() == Some("a layer of 0 context features in a model of 2"),
        "{e:?}"
    );
    let bad = config(vec![1, 0, 2], Affine::new(ScaleMap::Tanh { clamp: 0.0 }));
    let e = LayerConfig::check(&bad, 3, 0).err();
    ensure!(
        e.as_deref() == Some("clamp must be positive, got 0"),
        "{e:?}"
    );
    // `inverted` is honoured where the layer is built: the same weights, the directions
    // swapped.
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 8, DType::F64, &DEV);
    let plain = affine.build(vb.pp("layer"))?;
    let inverted = AutoregressiveConfig {
        inverted: true,
        ..affine.clone()
    }
    .build(vb.pp("layer"))?;
    let rng = &mut StdRng::seed_from_u64(9);
    let x = randn(20, 3, DType::F64, &DEV, rng)?;
    for (a, b) in [
        (plain.forward(&x)?, inverted.inverse(&x)?),
        (plain.inverse(&x)?, inverted.forward(&x)?),
    ] {
        let e = (&a.0 - &b.0)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let l = (&a.1 - &b.1)?.abs()?.max_all()?.to_scalar::<f64>()?;
        ensure!(
            e == 0.0 && l == 0.0,
            "inverted layer differs by {e:e}, {l:e}"
        );
    }
    let (y, _) = plain.forward(&x)?;
    let moved = (&y - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(
        moved > 1e-3,
        "the layer is the identity: the test cannot tell directions"
    );
    Ok(())
}
