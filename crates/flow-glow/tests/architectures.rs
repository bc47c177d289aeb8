//! Glow and RealNVP's image architecture as whole models: round trips, numerical
//! log-dets, the multi-scale latent's layout, normalisation, gradients, data-dependent
//! initialisation through the levels, configuration errors and the recorded recipe.

mod common;

use anyhow::{ensure, Result};
use candle::{DType, Tensor};
use candle_nn::VarMap;
use common::{inputs, max_abs, max_diff, numerical_log_det, randomize, round_trip, tensors, DEV};
use flow_core::{seeded_var_builder, Bijector, Flow, LayerSpec};
use flow_glow::{
    GlowConfig, GlowLayer, ImageInfo, ImageShape, MultiScale, MultiScaleConfig, RealNvpImageConfig,
    Squeeze, SqueezeConfig,
};
use flow_models::{ModelConfig, Registry};
use rand::{rngs::StdRng, SeedableRng};

fn glow(shape: ImageShape) -> GlowConfig {
    GlowConfig::new(shape)
        .with_levels(2)
        .with_depth(2)
        .with_hidden_channels(8)
}

fn realnvp(shape: ImageShape) -> RealNvpImageConfig {
    RealNvpImageConfig::new(shape)
        .with_scales(2)
        .with_hidden_channels(8)
}

/// A fresh model; with `lively`, moved away from its identity start: ActNorm
/// initialised on data, the couplings' last convolutions given weights, batch norm's
/// running statistics taken from a few batches and its γ, β drawn.
fn build(cfg: &ModelConfig, dtype: DType, lively: bool, seed: u64) -> Result<(VarMap, Flow)> {
    let varmap = VarMap::new();
    let mut flow = cfg.build(seeded_var_builder(&varmap, seed, dtype, &DEV))?;
    if lively {
        let data = |s| inputs(64, cfg.dim, 0.5, 0.45, dtype, s);
        flow.initialize(&data(seed + 1)?, None)?;
        // Small enough that ten stacked couplings keep the latent of order one.
        randomize(
            &varmap,
            &["conv_out.weight", "conv_out.bias"],
            0.05,
            seed + 2,
        )?;
        flow.set_training(true);
        for s in 0..3 {
            flow.bijector().forward(&data(seed + 10 + s)?)?;
        }
        flow.set_training(false);
        randomize(&varmap, &["log_gamma", "beta"], 0.3, seed + 3)?;
    }
    Ok((varmap, flow))
}

fn models(shape: ImageShape) -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("glow", ModelConfig::glow(&glow(shape))),
        (
            "glow plain 1x1, logit",
            ModelConfig::glow(&glow(shape).with_lu(false).with_logit(Some(0.05))),
        ),
        ("realnvp-image", ModelConfig::realnvp_image(&realnvp(shape))),
        (
            "realnvp-image without batch norm",
            ModelConfig::realnvp_image(&realnvp(shape).with_batch_norm(false)),
        ),
    ]
}

#[test]
fn architectures_invert_in_f32_and_f64() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    for (name, cfg) in models(shape) {
        cfg.validate().map_err(anyhow::Error::msg)?;
        for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-3)] {
            let (_, flow) = build(&cfg, dtype, true, 1)?;
            let x = inputs(6, shape.dim(), 0.5, 0.45, dtype, 2)?;
            let (err, ld_err) = round_trip(flow.bijector(), &x)?;
            ensure!(err < tol, "{name} {dtype:?}: round trip off by {err}");
            ensure!(
                ld_err < tol * 10.0,
                "{name} {dtype:?}: log-dets off by {ld_err}"
            );
            let lp = flow.log_prob(&x)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            ensure!(lp.iter().all(|v| v.is_finite()), "{name}: log-probs {lp:?}");
        }
    }
    Ok(())
}

#[test]
fn architecture_log_dets_match_numerical_jacobians() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    for (name, cfg) in models(shape) {
        let (_, flow) = build(&cfg, DType::F64, true, 3)?;
        let x = inputs(2, shape.dim(), 0.5, 0.4, DType::F64, 4)?;
        let b = flow.bijector();
        let analytic = b.forward(&x)?.1.to_vec1::<f64>()?;
        let numeric = numerical_log_det(|t| b.forward(t), &x)?;
        for (a, n) in analytic.iter().zip(&numeric) {
            ensure!(
                (a - n).abs() < 1e-6 * (1.0 + a.abs()),
                "{name}: analytic {a} vs numerical {n}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_latent_lists_factored_out_channels_level_by_level() -> Result<()> {
    // Two levels of a bare squeeze: 1×4×4 → 4×2×2, of which channels 2 and 3 leave;
    // channels 0 and 1 (2×2×2) squeeze to 8×1×1, the last part.
    let shape = ImageShape::new(1, 4, 4);
    let s0 = SqueezeConfig::new(shape);
    let s1 = SqueezeConfig::new(ImageShape::new(2, 2, 2));
    let cfg = MultiScaleConfig::new(
        shape,
        vec![
            vec![GlowLayer::Squeeze(s0).spec()],
            vec![GlowLayer::Squeeze(s1).spec()],
        ],
    );
    ensure!(
        cfg.latent_shapes().map_err(anyhow::Error::msg)?
            == [ImageShape::new(2, 2, 2), ImageShape::new(8, 1, 1)],
        "{:?}",
        cfg.latent_shapes()
    );
    let varmap = VarMap::new();
    let ms = MultiScale::new(&cfg, seeded_var_builder(&varmap, 0, DType::F64, &DEV))?;
    let x = inputs(3, 16, 0.0, 1.0, DType::F64, 5)?;
    let (z, ld) = ms.forward(&x)?;
    ensure!(max_abs(&ld)? == 0.0);
    let y0 = Squeeze::new(&s0)?.forward(&x)?.0;
    // The first 8 latent features: level 0's channels 2..4, in (C, H, W) order.
    ensure!(max_diff(&z.narrow(1, 0, 8)?, &y0.narrow(1, 8, 8)?)? == 0.0);
    let y1 = Squeeze::new(&s1)?.forward(&y0.narrow(1, 0, 8)?)?.0;
    ensure!(max_diff(&z.narrow(1, 8, 8)?, &y1)? == 0.0);
    ensure!(max_diff(&ms.inverse(&z)?.0, &x)? == 0.0);

    // Glow's: L = 3 on 1×8×8 leaves 2×4×4, 4×2×2, then 16×1×1.
    let shapes = GlowConfig::new(ImageShape::new(1, 8, 8))
        .with_levels(3)
        .latent_shapes()
        .map_err(anyhow::Error::msg)?;
    ensure!(
        shapes
            == [
                ImageShape::new(2, 4, 4),
                ImageShape::new(4, 2, 2),
                ImageShape::new(16, 1, 1)
            ],
        "{shapes:?}"
    );
    Ok(())
}

#[test]
fn a_small_glow_density_integrates_to_one() -> Result<()> {
    // 1×2×2 images: one level (a squeeze to 4×1×1, so the couplings see 1×1 images)
    // of 4 features, few enough for an importance-sampling estimate of ∫p with a
    // Gaussian proposal g: E_g[p/g] = 1.
    let shape = ImageShape::new(1, 2, 2);
    let cfg = ModelConfig::glow(
        &GlowConfig::new(shape)
            .with_levels(1)
            .with_depth(2)
            .with_hidden_channels(8)
            .with_zero_init(false),
    );
    let varmap = VarMap::new();
    let flow = cfg.build(seeded_var_builder(&varmap, 7, DType::F64, &DEV))?;
    randomize(&varmap, &["log_scale", "bias"], 0.3, 8)?;
    let (n, sigma) = (100_000, 2.0);
    let mut rng = StdRng::seed_from_u64(9);
    let z = flow_core::sampling::randn(n, 4, DType::F64, &DEV, &mut rng)?;
    let x = z.affine(sigma, 0.0)?;
    let log_g = z.sqr()?.sum(1)?.affine(
        -0.5,
        -2.0 * (2.0 * std::f64::consts::PI).ln() - 4.0 * sigma.ln(),
    )?;
    let w = (flow.log_prob(&x)? - log_g)?.exp()?.to_vec1::<f64>()?;
    let mean = w.iter().sum::<f64>() / n as f64;
    let se = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n * n) as f64).sqrt();
    ensure!(se < 0.01, "standard error {se}");
    ensure!((mean - 1.0).abs() < 4.0 * se, "∫p ≈ {mean} ± {se}");

    // Sampling agrees with the density: log p of a sample from its inverse pass equals
    // log_prob of it.
    let (x, lp) = flow.sample_and_log_prob(16, &mut rng)?;
    ensure!(max_diff(&lp, &flow.log_prob(&x)?)? < 1e-9);
    Ok(())
}

#[test]
fn gradients_reach_every_trainable_tensor() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    for (name, cfg) in models(shape) {
        let (varmap, mut flow) = build(&cfg, DType::F64, false, 5)?;
        ensure!(
            !flow.batch_statistics(),
            "{name}: batch statistics while evaluating"
        );
        flow.set_training(true);
        // Only batch norm, while training, computes with the whole batch (so a trainer
        // must not split it).
        let batch_norm = name == "realnvp-image";
        ensure!(
            flow.batch_statistics() == batch_norm,
            "{name}: batch statistics {} while training",
            flow.batch_statistics()
        );
        let x = inputs(8, shape.dim(), 0.5, 0.4, DType::F64, 6)?;
        let buffers: Vec<_> = flow.buffers().iter().map(Tensor::id).collect();
        let grad_norms = |flow: &Flow| -> Result<Vec<(String, f64)>> {
            let grads = flow.log_prob(&x)?.mean_all()?.neg()?.backward()?;
            let mut out = Vec::new();
            for (k, v) in tensors(&varmap) {
                if buffers.contains(&v.id()) {
                    ensure!(grads.get(&v).is_none(), "{name}: buffer {k} has a gradient");
                    continue;
                }
                let g = grads
                    .get(&v)
                    .ok_or_else(|| anyhow::anyhow!("{name}: no gradient for {k}"))?;
                out.push((k, max_abs(g)?));
            }
            Ok(out)
        };
        // At the start the last convolutions are zero: they get gradients (the ones
        // before them cannot yet, their effect is multiplied by zero).
        for (k, g) in grad_norms(&flow)? {
            if k.contains("conv_out") {
                ensure!(g > 0.0, "{name}: zero gradient for {k} at the start");
            }
        }
        // Once they are not zero, every trainable tensor gets a gradient.
        randomize(&varmap, &["conv_out.weight"], 0.1, 7)?;
        for (k, g) in grad_norms(&flow)? {
            ensure!(g > 0.0, "{name}: zero gradient for {k}");
        }
    }
    Ok(())
}

#[test]
fn initialisation_and_training_mode_reach_every_level() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    let cfg = ModelConfig::glow(&glow(shape));
    let (varmap, flow) = build(&cfg, DType::F64, false, 1)?;
    flow.initialize(&inputs(32, shape.dim(), 0.5, 0.45, DType::F64, 2)?, None)?;
    let vars = tensors(&varmap);
    let actnorms: Vec<&String> = vars.keys().filter(|k| k.ends_with(".bias")).collect();
    let mut seen = 0;
    for k in actnorms {
        if k.contains("conv_") {
            continue;
        }
        seen += 1;
        ensure!(max_abs(&vars[k])? > 0.0, "{k} not initialised");
    }
    ensure!(seen == 4, "2 levels × 2 steps of actnorm, got {seen}");

    let cfg = ModelConfig::realnvp_image(&realnvp(shape));
    let (varmap, mut flow) = build(&cfg, DType::F64, false, 1)?;
    flow.set_training(true);
    flow.bijector()
        .forward(&inputs(8, shape.dim(), 0.5, 0.45, DType::F64, 3)?)?;
    for (k, v) in tensors(&varmap) {
        if k.ends_with("running_mean") {
            ensure!(max_abs(&v)? > 0.0, "{k} not updated in training mode");
        }
    }
    Ok(())
}

#[test]
fn configurations_that_do_not_fit_the_image_are_one_line_errors() -> Result<()> {
    let build_err = |cfg: &ModelConfig| -> Result<String> {
        let varmap = VarMap::new();
        match cfg.build(seeded_var_builder(&varmap, 0, DType::F32, &DEV)) {
            Ok(_) => anyhow::bail!("built"),
            Err(e) => Ok(e.to_string()),
        }
    };
    let one_pixel = "multiscale level 1, layer 0: a checkerboard coupling needs at least 2 \
                     pixels, got a 2×1×1 image";
    let cases = [
        // Three squeezes of a 4×4 image.
        (
            ModelConfig::glow(&glow(ImageShape::new(2, 4, 4)).with_levels(3)),
            "multiscale level 2, layer 0: squeezing a 8×1×1 image needs an even height and width",
        ),
        // An odd side.
        (
            ModelConfig::glow(&glow(ImageShape::new(1, 5, 4)).with_levels(1)),
            "multiscale level 0, layer 0: squeezing a 1×5×4 image needs an even height and width",
        ),
        // RealNVP: two squeezes of 2×2, and a last scale of one pixel.
        (
            ModelConfig::realnvp_image(&realnvp(ImageShape::new(1, 2, 2)).with_scales(3)),
            one_pixel,
        ),
        (
            ModelConfig::realnvp_image(&realnvp(ImageShape::new(1, 2, 2)).with_scales(2)),
            one_pixel,
        ),
    ];
    for (cfg, fault) in &cases {
        // The message is one line (candle appends a backtrace when RUST_BACKTRACE asks).
        let err = build_err(cfg)?;
        let first = err.lines().next().unwrap_or_default();
        ensure!(
            first.len() > 20 && (err == first || err[first.len()..].contains("candle")),
            "{err}"
        );
        // Checking alone finds the same fault, before any tensor is made.
        let invalid = cfg.validate().err();
        ensure!(
            invalid.as_deref() == Some(first),
            "{invalid:?} against {err}"
        );
        ensure!(first.ends_with(fault), "{first}");
    }
    let direct = glow(ImageShape::new(2, 4, 4)).with_levels(3).validate();
    ensure!(
        direct
            == Err("3 squeezes need a height and width divisible by 2^3, got a 2×4×4 image".into()),
        "{direct:?}"
    );
    // Image layers take no context.
    let with_context = ModelConfig::glow(&glow(ImageShape::new(2, 4, 4))).with_context_dim(1);
    ensure!(build_err(&with_context)?.contains("no context"));
    // A layer of the wrong size for the model.
    let wrong = ModelConfig::new(
        31,
        ModelConfig::glow(&glow(ImageShape::new(2, 4, 4))).layers,
    );
    ensure!(build_err(&wrong)?.contains("32 features"));
    Ok(())
}

#[test]
fn models_record_their_images_and_read_back_from_json() -> Result<()> {
    let shape = ImageShape::new(3, 8, 8);
    for (family, cfg) in [
        (
            "glow",
            ModelConfig::glow(&glow(shape).with_pixel_levels(32)),
        ),
        (
            "realnvp-image",
            ModelConfig::realnvp_image(&realnvp(shape).with_pixel_levels(32)),
        ),
    ] {
        let recipe = cfg.recipe.clone().expect("a recipe");
        ensure!(recipe["family"] == family);
        let info: ImageInfo = serde_json::from_value(recipe)?;
        ensure!(
            info == ImageInfo {
                shape,
                pixel_levels: 32
            }
        );
        let json = serde_json::to_string(&cfg)?;
        let back: ModelConfig = serde_json::from_str(&json)?;
        ensure!(back == cfg, "{family}: JSON round trip");
        back.validate().map_err(anyhow::Error::msg)?;
    }
    // The registry knows the kinds, and a layer reads back from its JSON.
    let kinds = Registry::builtin().kinds();
    for kind in GlowLayer::KINDS {
        ensure!(kinds.contains(&kind), "{kind} not registered");
    }
    let spec: LayerSpec = serde_json::from_str(
        r#"{"type": "conv-coupling", "shape": {"channels": 4, "height": 2, "width": 2},
            "mask": "channel-inv", "hidden_channels": 16}"#,
    )?;
    let layer = spec.tagged_as::<GlowLayer>().map_err(anyhow::Error::msg)?;
    ensure!(matches!(layer, GlowLayer::ConvCoupling(c) if c.zero_init && c.hidden_channels == 16));
    Ok(())
}
