//! Every layer on its own: round trips in f32 and f64, log-dets against numerical
//! Jacobians, the squeeze's channel order, what each coupling mask leaves unchanged,
//! and construction errors.

mod common;

use anyhow::{ensure, Result};
use candle::{DType, Tensor};
use candle_nn::VarMap;
use common::{inputs, max_diff, numerical_log_det, randomize, round_trip, DEV};
use flow_core::{seeded_var_builder, Bijector};
use flow_glow::{
    bits_per_dim, ActNorm, ActNormConfig, BatchNorm, BatchNormConfig, ConvCoupling,
    ConvCouplingConfig, CouplingMask, ImageShape, InvConv1x1, InvConv1x1Config, Logit, LogitConfig,
    Squeeze, SqueezeConfig, Unsqueeze,
};
use flow_nn::ScaleMap;

const MASKS: [CouplingMask; 4] = [
    CouplingMask::Checkerboard,
    CouplingMask::CheckerboardInv,
    CouplingMask::Channel,
    CouplingMask::ChannelInv,
];

const SCALES: [ScaleMap; 3] = [
    ScaleMap::Sigmoid,
    ScaleMap::Tanh { clamp: 2.0 },
    ScaleMap::Exp,
];

/// A named layer over `shape` images with non-trivial parameters, and whether its
/// inputs must lie in (0, 1).
type Zoo = Vec<(String, Box<dyn Bijector>, bool)>;

fn zoo(shape: ImageShape, dtype: DType, seed: u64) -> Result<Zoo> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, dtype, &DEV);
    let d = shape.dim();
    let mut out: Zoo = Vec::new();

    let act = ActNorm::new(&ActNormConfig::new(shape), vb.pp("actnorm"))?;
    act.initialize(&inputs(16, d, 0.7, 2.0, dtype, seed + 1)?, None)?;
    out.push(("actnorm".into(), Box::new(act), false));

    for lu in [false, true] {
        let cfg = InvConv1x1Config::new(shape).with_lu(lu);
        let conv = InvConv1x1::new(&cfg, vb.pp(format!("conv_lu{lu}")))?;
        out.push((format!("inv-conv1x1 lu={lu}"), Box::new(conv), false));
    }

    for (m, mask) in MASKS.into_iter().enumerate() {
        for (s, scale) in SCALES.into_iter().enumerate() {
            let cfg = ConvCouplingConfig::new(shape, mask)
                .with_hidden_channels(6)
                .with_scale(scale)
                .with_zero_init(false);
            let layer = ConvCoupling::new(&cfg, vb.pp(format!("coupling{m}_{s}")))?;
            out.push((
                format!("coupling {mask:?} {scale:?}"),
                Box::new(layer),
                false,
            ));
        }
    }
    // The couplings' last convolutions carry weights of the default scale, too small to
    // make the maps far from the identity: make them larger.
    randomize(
        &varmap,
        &["conv_out.weight", "conv_out.bias"],
        0.3,
        seed + 2,
    )?;

    out.push((
        "squeeze".into(),
        Box::new(Squeeze::new(&SqueezeConfig::new(shape))?),
        false,
    ));

    let mut bn = BatchNorm::new(&BatchNormConfig::new(shape), vb.pp("bn"))?;
    bn.set_training(true);
    for k in 0..3 {
        bn.forward(&inputs(8, d, 0.3, 1.5, dtype, seed + 10 + k)?)?;
    }
    bn.set_training(false);
    randomize(&varmap, &["bn.log_gamma", "bn.beta"], 0.5, seed + 3)?;
    out.push(("batch-norm (evaluation)".into(), Box::new(bn), false));

    out.push((
        "logit".into(),
        Box::new(Logit::new(&LogitConfig::new(d).with_alpha(0.05))?),
        true,
    ));
    Ok(out)
}

fn layer_inputs(unit: bool, n: usize, d: usize, dtype: DType, seed: u64) -> Result<Tensor> {
    if unit {
        inputs(n, d, 0.5, 0.45, dtype, seed)
    } else {
        inputs(n, d, 0.3, 1.5, dtype, seed)
    }
}

#[test]
fn every_layer_inverts_in_f32_and_f64() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        for (name, layer, unit) in zoo(shape, dtype, 3)? {
            let x = layer_inputs(unit, 5, shape.dim(), dtype, 7)?;
            let (err, ld_err) = round_trip(layer.as_ref(), &x)?;
            ensure!(err < tol, "{name} {dtype:?}: round trip off by {err}");
            ensure!(
                ld_err < tol * 10.0,
                "{name} {dtype:?}: log-dets off by {ld_err}"
            );
        }
    }
    // An unsqueeze needs a multiple of 4 channels.
    let un = Unsqueeze::new(&SqueezeConfig::new(ImageShape::new(4, 2, 2)))?;
    let x = inputs(3, 16, 0.0, 1.0, DType::F32, 1)?;
    let (err, _) = round_trip(&un, &x)?;
    ensure!(err == 0.0, "unsqueeze round trip off by {err}");
    Ok(())
}

#[test]
fn log_dets_match_numerical_jacobians() -> Result<()> {
    let shape = ImageShape::new(2, 4, 4);
    for (name, layer, unit) in zoo(shape, DType::F64, 11)? {
        let x = layer_inputs(unit, 2, shape.dim(), DType::F64, 13)?;
        let analytic = layer.forward(&x)?.1.to_vec1::<f64>()?;
        let numeric = numerical_log_det(|t| layer.forward(t), &x)?;
        for (a, n) in analytic.iter().zip(&numeric) {
            ensure!(
                (a - n).abs() < 1e-6 * (1.0 + a.abs()),
                "{name}: analytic {a} vs numerical {n}"
            );
        }
        // And the inverse's, at the latent points.
        let z = layer.forward(&x)?.0;
        let analytic = layer.inverse(&z)?.1.to_vec1::<f64>()?;
        let numeric = numerical_log_det(|t| layer.inverse(t), &z)?;
        for (a, n) in analytic.iter().zip(&numeric) {
            ensure!(
                (a - n).abs() < 1e-6 * (1.0 + a.abs()),
                "{name} inverse: analytic {a} vs numerical {n}"
            );
        }
    }
    Ok(())
}

#[test]
fn squeeze_puts_each_two_by_two_block_into_channels() -> Result<()> {
    let shape = ImageShape::new(2, 4, 6);
    let (c, h, w) = (shape.channels, shape.height, shape.width);
    let x: Vec<f64> = (0..shape.dim()).map(|k| k as f64).collect();
    let xt = Tensor::from_vec(x.clone(), (1, shape.dim()), &DEV)?;
    let sq = Squeeze::new(&SqueezeConfig::new(shape))?;
    let out = sq.output_shape();
    ensure!(out == ImageShape::new(8, 2, 3), "squeezed shape {out}");
    let (z, ld) = sq.forward(&xt)?;
    ensure!(ld.to_vec1::<f64>()? == [0.0]);
    let z = z.flatten_all()?.to_vec1::<f64>()?;
    for ci in 0..c {
        for i in 0..2 {
            for j in 0..2 {
                for hh in 0..h / 2 {
                    for ww in 0..w / 2 {
                        let zc = 4 * ci + 2 * i + j;
                        let zi = (zc * (h / 2) + hh) * (w / 2) + ww;
                        let xi = (ci * h + 2 * hh + i) * w + 2 * ww + j;
                        ensure!(z[zi] == x[xi], "z[{zc}, {hh}, {ww}] is not x[{ci}, ..]");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn couplings_keep_what_their_mask_keeps() -> Result<()> {
    let shape = ImageShape::new(3, 4, 4);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 5, DType::F64, &DEV);
    let x = inputs(2, shape.dim(), 0.0, 1.0, DType::F64, 3)?;
    for (m, mask) in MASKS.into_iter().enumerate() {
        let cfg = ConvCouplingConfig::new(shape, mask)
            .with_hidden_channels(4)
            .with_zero_init(false);
        let layer = ConvCoupling::new(&cfg, vb.pp(m))?;
        let (z, _) = layer.forward(&x)?;
        let (xs, zs) = (x.to_vec2::<f64>()?, z.to_vec2::<f64>()?);
        for k in 0..shape.dim() {
            let (ch, pix) = (k / shape.pixels(), k % shape.pixels());
            let (hh, ww) = (pix / shape.width, pix % shape.width);
            let kept = match mask {
                CouplingMask::Checkerboard => (hh + ww) % 2 == 0,
                CouplingMask::CheckerboardInv => (hh + ww) % 2 == 1,
                // ⌈3/2⌉ = 2 channels kept, then the other way round.
                CouplingMask::Channel => ch < 2,
                CouplingMask::ChannelInv => ch >= 2,
            };
            for (xr, zr) in xs.iter().zip(&zs) {
                ensure!(
                    (xr[k] == zr[k]) == kept,
                    "{mask:?}: feature {k} (channel {ch}, pixel {hh},{ww}) kept={kept}"
                );
            }
        }
    }
    // Zero-initialised with the exp scale map (log-scale = raw output), a coupling is
    // exactly the identity (with Glow's sigmoid it starts as a scaling by σ(2)).
    let cfg = ConvCouplingConfig::new(shape, CouplingMask::Channel)
        .with_hidden_channels(4)
        .with_scale(ScaleMap::Exp);
    let layer = ConvCoupling::new(&cfg, vb.pp("zero"))?;
    let (z, ld) = layer.forward(&x)?;
    ensure!(max_diff(&z, &x)? == 0.0 && ld.abs()?.sum_all()?.to_scalar::<f64>()? == 0.0);
    Ok(())
}

#[test]
fn invalid_layers_are_errors_not_panics() -> Result<()> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, &DEV);
    let odd = ImageShape::new(1, 3, 4);
    let err = Squeeze::new(&SqueezeConfig::new(odd)).expect_err("odd height");
    ensure!(
        err.to_string() == "squeezing a 1×3×4 image needs an even height and width",
        "{err}"
    );
    let err =
        Unsqueeze::new(&SqueezeConfig::new(ImageShape::new(3, 2, 2))).expect_err("three channels");
    ensure!(
        err.to_string() == "unsqueezing a 3×2×2 image needs a multiple of 4 channels",
        "{err}"
    );
    let one_channel = ConvCouplingConfig::new(ImageShape::new(1, 4, 4), CouplingMask::Channel);
    let err = ConvCoupling::new(&one_channel, vb.pp("c")).expect_err("one channel");
    ensure!(!err.to_string().contains('\n'), "{err}");
    let one_pixel = ConvCouplingConfig::new(ImageShape::new(4, 1, 1), CouplingMask::Checkerboard);
    let err = ConvCoupling::new(&one_pixel, vb.pp("p")).expect_err("one pixel");
    ensure!(
        err.to_string()
            .contains("a checkerboard coupling needs at least 2 pixels"),
        "{err}"
    );
    let err = Logit::new(&LogitConfig::new(4).with_alpha(0.5)).expect_err("alpha 0.5");
    ensure!(
        err.to_string() == "logit alpha must lie in [0, 0.5), got 0.5",
        "{err}"
    );
    let err = ActNorm::new(&ActNormConfig::new(ImageShape::new(0, 2, 2)), vb.pp("a"))
        .expect_err("no channels");
    ensure!(
        err.to_string() == "an image needs non-zero sides, got 0×2×2",
        "{err}"
    );
    // A row of the wrong width is an error naming the layer.
    let act = ActNorm::new(&ActNormConfig::new(ImageShape::new(2, 2, 2)), vb.pp("b"))?;
    let err = act
        .forward(&Tensor::zeros((2, 7), DType::F32, &DEV)?)
        .expect_err("wrong width");
    ensure!(err.to_string().contains("actnorm"), "{err}");
    Ok(())
}

#[test]
fn logit_and_bits_per_dim() -> Result<()> {
    let logit = Logit::new(&LogitConfig::new(3).with_alpha(0.05))?;
    let x = Tensor::new(&[[0.0f64, 0.5, 0.999]], &DEV)?;
    let (y, ld) = logit.forward(&x)?;
    let y = y.to_vec2::<f64>()?;
    let p = |v: f64| 0.05 + 0.9 * v;
    for (v, yv) in [0.0, 0.5, 0.999].iter().zip(&y[0]) {
        let want = (p(*v) / (1.0 - p(*v))).ln();
        ensure!((yv - want).abs() < 1e-12, "{yv} vs {want}");
    }
    let want: f64 = [0.0, 0.5, 0.999]
        .iter()
        .map(|v| 0.9f64.ln() - p(*v).ln() - (1.0 - p(*v)).ln())
        .sum();
    ensure!((ld.to_vec1::<f64>()?[0] - want).abs() < 1e-12);
    // Large latents invert to finite values and log-dets.
    let (x, ld) = logit.inverse(&Tensor::new(&[[-80.0f64, 0.0, 80.0]], &DEV)?)?;
    ensure!(x.to_vec2::<f64>()?[0].iter().all(|v| v.is_finite()));
    ensure!(ld.to_vec1::<f64>()?[0].is_finite());
    // A uniform density on [0, 1)^D costs exactly 8 bits per 8-bit pixel value.
    ensure!((bits_per_dim(0.0, 12, 256) - 8.0).abs() < 1e-12);
    // log p = −D·ln 2 adds one bit per dimension.
    let d = 12;
    let lp = -(d as f64) * std::f64::consts::LN_2;
    ensure!((bits_per_dim(lp, d, 256) - 9.0).abs() < 1e-12);
    Ok(())
}
