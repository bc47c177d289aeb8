//! The mathematics of every bijector: invertibility, log-determinants against a
//! numerical Jacobian, normalisation of the density, sampling consistency, gradients.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use flow_core::{
    seeded_var_builder, Bijector, Chain, Flow, Inverse, Permute, Reverse, StandardNormal,
    Standardize,
};
use flow_models::{BaseConfig, ModelConfig};
use flow_nn::{
    Activation, Affine, Autoregressive, AutoregressiveConfig, ConditionerConfig, Coupling,
    CouplingConfig, NetConfig, Nets, OutputLayout, ScaleMap, Shift, Spline, SplineStyle,
};
use flow_realnvp::{AdditiveCoupling, AffineCoupling, CouplingKind, RealNvp, RealNvpConfig};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

#[path = "../../../tests/support/bijector_checks.rs"]
mod bijector_checks;
use bijector_checks::{inputs, numerical_log_det};

fn net(hidden: usize, activation: Activation) -> NetConfig {
    NetConfig::Mlp {
        hidden: vec![hidden, hidden],
        activation,
    }
}

fn coupling(
    mask: Vec<bool>,
    nets: Nets,
    layout: OutputLayout,
    scale: ScaleMap,
) -> CouplingConfig<Affine> {
    CouplingConfig {
        mask,
        conditioner: ConditionerConfig {
            nets,
            layout,
            net: net(16, Activation::Tanh),
            zero_init: false,
        },
        transform: Affine::new(scale),
        inverted: false,
        context_dim: 0,
    }
}

/// The same layer with a shift for its transform (NICE).
fn additive(c: CouplingConfig<Affine>) -> CouplingConfig<Shift> {
    CouplingConfig {
        mask: c.mask,
        conditioner: c.conditioner,
        transform: Shift {},
        inverted: c.inverted,
        context_dim: c.context_dim,
    }
}

const SCALES: [ScaleMap; 5] = [
    ScaleMap::Exp,
    ScaleMap::SoftClamp { clamp: 3.0 },
    ScaleMap::Tanh { clamp: 2.0 },
    ScaleMap::Atan { clamp: 2.0 },
    ScaleMap::Sigmoid,
];

/// Every kind of mask over `dim` features: every first-k split, both checkerboards,
/// and an irregular one.
fn masks(dim: usize) -> Vec<Vec<bool>> {
    let mut out: Vec<Vec<bool>> = (1..dim)
        .map(|k| (0..dim).map(|j| j < k).collect())
        .collect();
    out.extend((1..dim).map(|k| (0..dim).map(|j| j >= k).collect::<Vec<_>>()));
    for parity in 0..2 {
        out.push((0..dim).map(|j| j % 2 == parity).collect());
    }
    if dim >= 3 {
        out.push((0..dim).map(|j| j % 3 == 1).collect());
    }
    out.dedup();
    out
}

/// A named bijector over `dim` features with random (non-zero) weights.
fn zoo(dim: usize, dtype: DType, seed: u64) -> Result<Vec<(String, Box<dyn Bijector>)>> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, dtype, &DEV);
    let mut out: Vec<(String, Box<dyn Bijector>)> = Vec::new();
    for (m, mask) in masks(dim).into_iter().enumerate() {
        for (s, scale) in SCALES.iter().enumerate() {
            let c = coupling(
                mask.clone(),
                Nets::Separate,
                OutputLayout::ScaleShift,
                *scale,
            );
            let vb = vb.pp(format!("affine{m}_{s}"));
            out.push((
                format!("affine {mask:?} {scale:?}"),
                Box::new(AffineCoupling::new(&c, vb)?),
            ));
        }
        for (l, layout) in [
            OutputLayout::ScaleShift,
            OutputLayout::ShiftScale,
            OutputLayout::Interleaved,
        ]
        .into_iter()
        .enumerate()
        {
            let c = coupling(mask.clone(), Nets::Joint, layout, ScaleMap::default());
            let vb = vb.pp(format!("joint{m}_{l}"));
            out.push((
                format!("joint {mask:?} {layout:?}"),
                Box::new(AffineCoupling::new(&c, vb)?),
            ));
        }
        let mut c = coupling(
            mask.clone(),
            Nets::Separate,
            OutputLayout::ScaleShift,
            ScaleMap::default(),
        );
        c.conditioner.net = NetConfig::Residual {
            hidden: 12,
            blocks: 2,
            activation: Activation::Relu,
        };
        out.push((
            format!("residual {mask:?}"),
            Box::new(AffineCoupling::new(&c, vb.pp(format!("res{m}")))?),
        ));
        out.push((
            format!("inverted {mask:?}"),
            Box::new(Inverse(AffineCoupling::new(&c, vb.pp(format!("inv{m}")))?)),
        ));
        let c = coupling(
            mask.clone(),
            Nets::Separate,
            OutputLayout::ScaleShift,
            ScaleMap::Exp,
        );
        out.push((
            format!("additive {mask:?}"),
            Box::new(AdditiveCoupling::new(
                &additive(c),
                vb.pp(format!("add{m}")),
            )?),
        ));
    }
    for (m, mask) in masks(dim).into_iter().enumerate().step_by(2) {
        for style in [SplineStyle::Durkan, SplineStyle::Zuko] {
            let c = coupling(
                mask.clone(),
                Nets::Joint,
                OutputLayout::ByFeature,
                ScaleMap::Exp,
            );
            let spline = Spline {
                style,
                ..Spline::new(5, 2.5)
            };
            let c = CouplingConfig {
                mask: c.mask,
                conditioner: c.conditioner,
                transform: spline,
                inverted: false,
                context_dim: 0,
            };
            out.push((
                format!("spline {mask:?} {style:?}"),
                Box::new(Coupling::new(&c, vb.pp(format!("spline{m}_{style:?}")))?),
            ));
        }
    }
    let forward: Vec<usize> = (0..dim).collect();
    let backward: Vec<usize> = (0..dim).rev().collect();
    for (o, order) in [forward, backward].into_iter().enumerate() {
        let ar = |transform| AutoregressiveConfig {
            order: order.clone(),
            hidden: vec![16, 16],
            activation: Activation::Tanh,
            transform,
            inverted: false,
            context_dim: 0,
            zero_init: false,
            residual_blocks: 0,
            stored_masks: false,
        };
        let maf = ar(Affine::new(ScaleMap::SoftClamp { clamp: 3.0 }));
        out.push((
            format!("maf {order:?}"),
            Box::new(Autoregressive::new(&maf, vb.pp(format!("maf{o}")))?),
        ));
        out.push((
            format!("iaf {order:?}"),
            Box::new(Inverse(Autoregressive::new(
                &maf,
                vb.pp(format!("iaf{o}")),
            )?)),
        ));
        let nsf = AutoregressiveConfig {
            order: order.clone(),
            hidden: vec![16, 16],
            activation: Activation::Tanh,
            transform: Spline::new(6, 3.0),
            inverted: false,
            context_dim: 0,
            zero_init: false,
            residual_blocks: 0,
            stored_masks: false,
        };
        out.push((
            format!("nsf-ar {order:?}"),
            Box::new(Autoregressive::new(&nsf, vb.pp(format!("nsfar{o}")))?),
        ));
    }
    out.push(("reverse".into(), Box::new(Reverse::new(dim, &DEV)?)));
    let mut perm: Vec<usize> = (0..dim).collect();
    perm.rotate_left(1);
    out.push(("permute".into(), Box::new(Permute::new(perm, &DEV)?)));
    let mean = Tensor::arange(0.0, dim as f64, &DEV)?.to_dtype(dtype)?;
    let std = Tensor::arange(1.0, dim as f64 + 1.0, &DEV)?
        .affine(0.5, 0.0)?
        .to_dtype(dtype)?;
    out.push((
        "standardize".into(),
        Box::new(Standardize::new(&mean, &std)?),
    ));
    for activation in [
        Activation::LeakyRelu,
        Activation::Relu,
        Activation::Tanh,
        Activation::Gelu,
    ] {
        // Each layer may scale by up to exp(clamp); the clamp keeps 8 layers' worth of
        // amplification inside what f32 resolves (the default clamp is checked in f64).
        let cfg = RealNvpConfig::new(dim)
            .with_layers(8)
            .with_hidden(24)
            .with_activation(activation)
            .with_scale(ScaleMap::SoftClamp { clamp: 2.0 });
        let vb = vb.pp(format!("deep_{activation:?}"));
        out.push((
            format!("deep realnvp {activation:?}"),
            Box::new(RealNvp::new(&cfg, vb)?),
        ));
    }
    let mut chain = Chain::default();
    chain.push(Standardize::new(&mean, &std)?);
    for i in 0..6 {
        let mask: Vec<bool> = (0..dim).map(|j| (j + i) % 2 == 0).collect();
        let c = coupling(mask, Nets::Joint, OutputLayout::Interleaved, SCALES[i % 5]);
        chain.push(AffineCoupling::new(&c, vb.pp(format!("chain{i}")))?);
        chain.push(Reverse::new(dim, &DEV)?);
    }
    out.push(("mixed chain".into(), Box::new(chain)));
    for (m, mask) in masks(dim).into_iter().enumerate() {
        let c = coupling(
            mask.clone(),
            Nets::Joint,
            OutputLayout::Interleaved,
            ScaleMap::Softplus,
        );
        out.push((
            format!("softplus {mask:?}"),
            Box::new(AffineCoupling::new(&c, vb.pp(format!("softplus{m}")))?),
        ));
    }
    Ok(out)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

#[test]
fn round_trips_in_f32() -> Result<()> {
    for dim in [2, 3, 5, 8] {
        for (name, b) in zoo(dim, DType::F32, 1)? {
            // Single layers are checked far from the origin; deep random stacks compound
            // f32 rounding through every layer's conditioner, so they go less far here and
            // much further in f64 below.
            let deep = name.starts_with("deep") || name == "mixed chain";
            let cases: &[(f64, f64)] = if deep {
                &[(0.0, 2.0), (3.0, 1.0), (-3.0, 1.0)]
            } else {
                &[(0.0, 2.0), (6.0, 1.0), (-5.0, 3.0)]
            };
            for &(offset, spread) in cases {
                let x = inputs(64, dim, offset, spread, DType::F32, 2)?;
                let (z, ld) = b.forward(&x)?;
                let (x2, ld_inv) = b.inverse(&z)?;
                // Single layers: 1e-5 absolute near the origin, relative for large values.
                // Deep stacks: 1e-5 relative to the largest magnitude the stack produces,
                // since f32 rounding at that magnitude feeds every later conditioner.
                let scale = if deep {
                    max_abs(&z)?.max(max_abs(&x)?)
                } else {
                    0.0
                };
                let tol = x.abs()?.affine(1e-5, 1e-5 * (1.0 + scale))?;
                let err = (x2 - &x)?.abs()?;
                let ok = err.le(&tol)?.flatten_all()?.min(0)?.to_scalar::<u8>()?;
                ensure!(
                    ok == 1,
                    "{name} dim {dim} offset {offset}: inverse(forward(x)) != x (max error {}, max |z| {})",
                    max_abs(&err)?,
                    max_abs(&z)?
                );
                let ld_err = max_abs(&(ld + ld_inv)?)?;
                ensure!(
                    ld_err < 1e-4,
                    "{name} dim {dim}: log-dets differ by {ld_err}"
                );
            }
            // And the other way round.
            let z = inputs(64, dim, 0.0, 2.5, DType::F32, 3)?;
            let z2 = b.forward(&b.inverse(&z)?.0)?.0;
            let err = max_abs(&(z2 - &z)?)?;
            ensure!(
                err < 1e-5 * 10.0,
                "{name} dim {dim}: forward(inverse(z)) off by {err}"
            );
        }
    }
    Ok(())
}

#[test]
fn deep_default_stacks_round_trip_in_f64() -> Result<()> {
    for dim in [2, 5] {
        let cfg = RealNvpConfig::new(dim).with_layers(12).with_hidden(32);
        let nvp = RealNvp::new(
            &cfg,
            seeded_var_builder(&VarMap::new(), 3, DType::F64, &DEV),
        )?;
        for offset in [0.0, 8.0, -10.0] {
            let x = inputs(64, dim, offset, 3.0, DType::F64, 4)?;
            let (z, _) = nvp.forward(&x)?;
            let err = max_abs(&(nvp.inverse(&z)?.0 - &x)?)?;
            let zmax = max_abs(&z)?;
            ensure!(
                err < 1e-10 * (1.0 + zmax),
                "dim {dim} offset {offset}: error {err}, |z| {zmax}"
            );
        }
    }
    Ok(())
}

#[test]
fn log_dets_match_numerical_jacobians() -> Result<()> {
    for dim in [2, 3, 5, 8] {
        for (name, b) in zoo(dim, DType::F64, 4)? {
            let x = inputs(4, dim, 0.5, 2.0, DType::F64, 5)?;
            let analytic = b.forward(&x)?.1.to_vec1::<f64>()?;
            let numeric = numerical_log_det(|t| b.forward(t), &x)?;
            for (a, n) in analytic.iter().zip(&numeric) {
                ensure!(
                    (a - n).abs() < 1e-6,
                    "{name} dim {dim}: forward log-det {a} vs numerical {n}"
                );
            }
            let z = inputs(4, dim, -0.5, 2.0, DType::F64, 6)?;
            let analytic = b.inverse(&z)?.1.to_vec1::<f64>()?;
            let numeric = numerical_log_det(|t| b.inverse(t), &z)?;
            for (a, n) in analytic.iter().zip(&numeric) {
                ensure!(
                    (a - n).abs() < 1e-6,
                    "{name} dim {dim}: inverse log-det {a} vs numerical {n}"
                );
            }
        }
    }
    Ok(())
}

fn moons_like_flow(kind: CouplingKind, scale: ScaleMap, seed: u64) -> Result<(Flow, VarMap)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F64, &DEV);
    let cfg = RealNvpConfig::new(2)
        .with_layers(4)
        .with_hidden(32)
        .with_scale(scale)
        .with_coupling(kind);
    let flow = Flow::new(
        RealNvp::new(&cfg, vb)?,
        StandardNormal::new(2, DType::F64, &DEV),
    );
    Ok((flow, varmap))
}

#[test]
fn densities_integrate_to_one() -> Result<()> {
    for (kind, scale, seed) in [
        (CouplingKind::Affine, ScaleMap::default(), 11),
        (CouplingKind::Affine, ScaleMap::Tanh { clamp: 2.0 }, 12),
        (CouplingKind::Additive, ScaleMap::default(), 13),
    ] {
        let (flow, _vars) = moons_like_flow(kind, scale, seed)?;
        // The layers must really deform the density for the check to mean anything.
        let probe = inputs(256, 2, 0.0, 2.0, DType::F64, 14)?;
        let base = StandardNormal::new(2, DType::F64, &DEV);
        let moved = max_abs(
            &(flow.log_prob(&probe)? - flow_core::Distribution::log_prob(&base, &probe)?)?,
        )?;
        ensure!(
            moved > 0.1,
            "{scale:?}: flow is too close to the identity ({moved})"
        );

        // Cover the mass: the extent of many samples, with a wide margin.
        let mut rng = StdRng::seed_from_u64(seed);
        let s = flow.sample(20_000, &mut rng)?;
        let lo = s.min(0)?.to_vec1::<f64>()?;
        let hi = s.max(0)?.to_vec1::<f64>()?;
        let n = 800;
        let (x0, x1) = (lo[0] - 0.5 * (hi[0] - lo[0]), hi[0] + 0.5 * (hi[0] - lo[0]));
        let (y0, y1) = (lo[1] - 0.5 * (hi[1] - lo[1]), hi[1] + 0.5 * (hi[1] - lo[1]));
        let (dx, dy) = ((x1 - x0) / n as f64, (y1 - y0) / n as f64);
        let mut total = 0.0;
        for i in 0..n {
            let x = x0 + (i as f64 + 0.5) * dx;
            let pts: Vec<f64> = (0..n)
                .flat_map(|j| [x, y0 + (j as f64 + 0.5) * dy])
                .collect();
            let lp = flow.log_prob(&Tensor::from_vec(pts, (n, 2), &DEV)?)?;
            total += lp.exp()?.sum_all()?.to_scalar::<f64>()? * dx * dy;
        }
        ensure!(
            (total - 1.0).abs() < 1e-3,
            "{kind:?} {scale:?}: density integrates to {total}"
        );
    }
    Ok(())
}

#[test]
fn sampling_agrees_with_log_prob_and_encoding_inverts() -> Result<()> {
    let (flow, _vars) = moons_like_flow(CouplingKind::Affine, ScaleMap::default(), 21)?;
    let mut rng = StdRng::seed_from_u64(3);
    let (x, lp) = flow.sample_and_log_prob(500, &mut rng)?;
    let err = max_abs(&(flow.log_prob(&x)? - &lp)?)?;
    ensure!(err < 1e-9, "sample_and_log_prob log-probs off by {err}");

    let z = flow.encode(&x)?;
    let err = max_abs(&(flow.decode(&z)? - &x)?)?;
    ensure!(err < 1e-10, "decode(encode(x)) off by {err}");

    // Same seed, same samples; a lower temperature concentrates them.
    let a = flow.sample(100, &mut StdRng::seed_from_u64(9))?;
    let b = flow.sample(100, &mut StdRng::seed_from_u64(9))?;
    ensure!(
        max_abs(&(a - b)?)? == 0.0,
        "sampling is not reproducible from a seed"
    );
    let cold = flow.sample_with_temperature(2000, 0.3, &mut StdRng::seed_from_u64(1))?;
    let hot = flow.sample_with_temperature(2000, 1.0, &mut StdRng::seed_from_u64(1))?;
    let cold_lp = flow.log_prob(&cold)?.mean_all()?.to_scalar::<f64>()?;
    let hot_lp = flow.log_prob(&hot)?.mean_all()?.to_scalar::<f64>()?;
    ensure!(
        cold_lp > hot_lp,
        "temperature 0.3 should give likelier samples ({cold_lp} vs {hot_lp})"
    );
    Ok(())
}

#[test]
fn gradients_reach_every_trainable_tensor() -> Result<()> {
    for nets in [Nets::Separate, Nets::Joint] {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 5, DType::F32, &DEV);
        let model = ModelConfig::realnvp(
            &RealNvpConfig::new(3)
                .with_layers(3)
                .with_hidden(8)
                .with_nets(nets),
        )
        .with_base(BaseConfig::DiagNormal { trainable: true });
        let flow = model.build(vb)?;
        let x = inputs(32, 3, 0.0, 2.0, DType::F32, 8)?;
        let loss = flow.log_prob(&x)?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        let vars = varmap.data().lock().expect("lock").clone();
        ensure!(
            vars.len() == 3 * 8 / (if nets == Nets::Joint { 2 } else { 1 }) + 2,
            "unexpected tensors: {:?}",
            vars.keys()
        );
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
            ensure!(max_abs(g)? > 0.0, "zero gradient for {name}");
        }
    }
    Ok(())
}

#[test]
fn zero_initialised_stack_is_the_identity() -> Result<()> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &DEV);
    let cfg = RealNvpConfig::new(4)
        .with_layers(3)
        .with_hidden(8)
        .with_zero_init(true);
    let nvp = RealNvp::new(&cfg, vb)?;
    let x = inputs(16, 4, 1.0, 3.0, DType::F32, 1)?;
    let (z, ld) = nvp.forward(&x)?;
    ensure!(
        max_abs(&(z - &x)?)? == 0.0 && max_abs(&ld)? == 0.0,
        "zero-init is not the identity"
    );
    Ok(())
}

#[test]
fn seed_layout_alternates_halves_and_keys_are_stable() -> Result<()> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &DEV);
    let cfg = RealNvpConfig::new(2);
    let _ = RealNvp::new(&cfg, vb.pp("layers"))?;
    let mut keys: Vec<String> = varmap
        .data()
        .lock()
        .expect("lock")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    ensure!(keys.len() == 5 * 8, "{keys:?}");
    ensure!(
        keys.contains(&"layers.0.s.0.weight".to_string()),
        "{keys:?}"
    );
    ensure!(keys.contains(&"layers.4.t.2.bias".to_string()), "{keys:?}");
    ensure!(cfg.mask_of(0) == vec![true, false] && cfg.mask_of(1) == vec![false, true]);
    // Layer 0 leaves feature 0 untouched, layer 1 feature 1.
    let x = inputs(8, 2, 0.0, 2.0, DType::F32, 1)?;
    let nvp = RealNvp::new(
        &cfg.clone().with_layers(1),
        seeded_var_builder(&VarMap::new(), 1, DType::F32, &DEV),
    )?;
    let z = nvp.forward(&x)?.0;
    ensure!(max_abs(&(z.narrow(D::Minus1, 0, 1)? - x.narrow(1, 0, 1)?)?)? == 0.0);
    Ok(())
}
