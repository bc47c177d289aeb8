//! The maths of a TarFlow block and of a stack of them, in f64 on small images with
//! random weights: inversion, log-dets against numerical Jacobians, causality, a
//! density that integrates to one, the cached inverse against the uncached one.

#[path = "../../../tests/support/bijector_checks.rs"]
mod bijector_checks;

use anyhow::{ensure, Result};
use bijector_checks::{inputs, numerical_log_det};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{
    sampling::randn, seeded_var_builder, Bijector, Chain, Flow, LayerConfig, StandardNormal,
};
use flow_tarflow::{
    Activation, ImageShape, ScaleMap, TarFlowBlock, TarFlowBlockConfig, TarFlowConfig,
};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

/// Every variable of `varmap` moved by `N(0, spread²)` draws from `seed`, so that a
/// block that starts as the identity is checked as a real map.
fn perturb(varmap: &VarMap, spread: f64, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("variables");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let rng = &mut StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let noise = (randn(1, var.elem_count(), var.dtype(), &DEV, rng)? * spread)?;
        var.set(&(var.as_tensor() + noise.reshape(var.shape())?)?)?;
    }
    Ok(())
}

/// A block of `cfg` with its variables perturbed by `spread` (built again over them, as
/// a loaded model is).
fn block(cfg: &TarFlowBlockConfig, dtype: DType, spread: f64) -> Result<(TarFlowBlock, VarMap)> {
    let varmap = VarMap::new();
    TarFlowBlock::new(cfg, seeded_var_builder(&varmap, 1, dtype, &DEV))?;
    perturb(&varmap, spread, 2)?;
    let b = TarFlowBlock::new(cfg, seeded_var_builder(&varmap, 1, dtype, &DEV))?;
    Ok((b, varmap))
}

/// A stack of `cfg`'s blocks, perturbed by `spread`, with `log_scale` added to the
/// bias of every raw log-scale and `N(0, position²)` draws to the positional
/// embeddings.
fn stack(cfg: &TarFlowConfig, spread: f64, log_scale: f64, position: f64) -> Result<Chain> {
    let varmap = VarMap::new();
    let build = |varmap: &VarMap| -> Result<Chain> {
        let vb = seeded_var_builder(varmap, 3, DType::F64, &DEV);
        let mut chain = Chain::default();
        for (i, layer) in cfg.layers().iter().enumerate() {
            chain.push(layer.build(vb.pp(i))?);
        }
        Ok(chain)
    };
    build(&varmap)?;
    perturb(&varmap, spread, 4)?;
    let d = cfg.block(0).patches().token_dim();
    let data = varmap.data().lock().expect("variables");
    let rng = &mut StdRng::seed_from_u64(5);
    for i in 0..cfg.blocks {
        let bias = &data[&format!("{i}.transformer.output.0.bias")];
        let shift: Vec<f64> = (0..2 * d)
            .map(|j| if j < d { log_scale } else { 0.0 })
            .collect();
        bias.set(&(bias.as_tensor() + Tensor::from_vec(shift, 2 * d, &DEV)?)?)?;
        let p = &data[&format!("{i}.transformer.position")];
        let noise = (randn(1, p.elem_count(), DType::F64, &DEV, rng)? * position)?;
        p.set(&(p.as_tensor() + noise.reshape(p.shape())?)?)?;
    }
    drop(data);
    build(&varmap)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    let t = t.to_dtype(DType::F64)?;
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// A 1×4×4 image in 2×2 patches: 4 tokens of 4 values.
fn small(reversed: bool) -> TarFlowBlockConfig {
    TarFlowBlockConfig::new(ImageShape::new(1, 4, 4), 2, 2, 8, 2).with_reversed(reversed)
}

#[test]
fn a_block_inverts_and_its_log_dets_cancel() -> Result<()> {
    for reversed in [false, true] {
        let (b, _) = block(&small(reversed), DType::F64, 0.3)?;
        let x = inputs(16, 16, 0.5, 1.0, DType::F64, 5)?;
        let (z, ld) = b.forward(&x)?;
        ensure!(
            max_abs(&(&z - &x)?)? > 0.1,
            "the block is near the identity"
        );
        let (back, ld_inv) = b.inverse(&z)?;
        let err = max_abs(&(back - &x)?)?;
        ensure!(err < 1e-10, "inverse(forward(x)) is off by {err:e}");
        let sum = max_abs(&(ld + ld_inv)?)?;
        ensure!(sum < 1e-10, "log-dets do not cancel: {sum:e}");
    }
    Ok(())
}

#[test]
fn log_dets_agree_with_numerical_jacobians() -> Result<()> {
    let cfg = TarFlowConfig::new(ImageShape::new(1, 4, 4))
        .with_blocks(2)
        .with_layers_per_block(1)
        .with_width(8)
        .with_heads(2);
    let flow = stack(&cfg, 0.3, 0.0, 0.0)?;
    let x = inputs(6, 16, 0.5, 1.0, DType::F64, 6)?;
    let (z, ld) = flow.forward(&x)?;
    let (_, ld_inv) = flow.inverse(&z)?;
    let checks = [
        ("forward", ld, numerical_log_det(|x| flow.forward(x), &x)?),
        (
            "inverse",
            ld_inv,
            numerical_log_det(|z| flow.inverse(z), &z)?,
        ),
    ];
    for (what, got, want) in checks {
        let got = got.to_vec1::<f64>()?;
        ensure!(
            want.iter().any(|w| w.abs() > 0.1),
            "{what}: log-dets {want:?} too near 0 to tell"
        );
        for (g, w) in got.iter().zip(&want) {
            ensure!(
                (g - w).abs() < 1e-6,
                "{what} log-det {g} against numerical {w}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_token_depends_on_itself_and_the_tokens_before_it_only() -> Result<()> {
    for reversed in [false, true] {
        let cfg = small(reversed);
        let (b, _) = block(&cfg, DType::F64, 0.3)?;
        let order = cfg.patches().order(reversed);
        let d = cfg.patches().token_dim();
        let x = inputs(1, 16, 0.5, 1.0, DType::F64, 7)?;
        let z = b.forward(&x)?.0.to_vec2::<f64>()?.remove(0);
        // Perturb each value of the sequence in turn; compare outputs in sequence order.
        for (j, &feature) in order.iter().enumerate() {
            let mut moved = x.to_vec2::<f64>()?.remove(0);
            moved[feature as usize] += 0.5;
            let moved = Tensor::from_vec(moved, (1, 16), &DEV)?;
            let z2 = b.forward(&moved)?.0.to_vec2::<f64>()?.remove(0);
            for (i, &f) in order.iter().enumerate() {
                let changed = (z2[f as usize] - z[f as usize]).abs() > 1e-12;
                let earlier = i / d < j / d;
                let same_token_other_value = i / d == j / d && i != j;
                if earlier || same_token_other_value {
                    ensure!(
                        !changed,
                        "position {i} changed when position {j} moved (reversed: {reversed})"
                    );
                } else if i == j || i / d == j / d + 1 {
                    // Its own value, and the next token's through the Transformer.
                    ensure!(
                        changed,
                        "position {i} ignores position {j} (reversed: {reversed})"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The trapezoid rule's nodes and weights with spacing `h` on `[−h·n, h·n]`.
fn trapezoid(h: f64, n: i32) -> Vec<(f64, f64)> {
    (-n..=n)
        .map(|i| (h * i as f64, if i.abs() == n { h / 2.0 } else { h }))
        .collect()
}

#[test]
fn the_density_of_a_2x1x2_image_in_two_tokens_integrates_to_one() -> Result<()> {
    // Two blocks (the second reversed) over 2 tokens of 2 values, with smooth maps
    // (GELU, tanh-bounded log-scales), weights a little off their initial values,
    // log-scales near −0.1 (the density a little wider than the base) and positional
    // embeddings large enough that no layer norm divides by a near-zero spread. The
    // trapezoid rule on a smooth density that decays like a Gaussian converges
    // exponentially in the spacing: h = 0.8 on [−8, 8]⁴ (194 481 points) is within
    // 1e-4, while the same density with its log-det 10% off is not within 1e-2.
    let cfg = TarFlowConfig::new(ImageShape::new(2, 1, 2))
        .with_patch(1)
        .with_blocks(2)
        .with_layers_per_block(1)
        .with_width(8)
        .with_heads(2)
        .with_activation(Activation::Gelu)
        .with_scale(ScaleMap::Tanh { clamp: 3.0 });
    let flow = Flow::new(
        stack(&cfg, 0.05, -0.1, 1.0)?,
        StandardNormal::new(4, DType::F64, &DEV),
    );
    let axis = trapezoid(0.8, 10);
    let n = axis.len();
    let total = n.pow(4);
    let (mut integral, mut off, chunk) = (0.0, 0.0, 16_384);
    let mut start = 0;
    while start < total {
        let end = (start + chunk).min(total);
        let mut rows = Vec::with_capacity((end - start) * 4);
        let mut weights = Vec::with_capacity(end - start);
        for index in start..end {
            let (mut rest, mut w) = (index, 1.0);
            for _ in 0..4 {
                let (node, weight) = axis[rest % n];
                rest /= n;
                rows.push(node);
                w *= weight;
            }
            weights.push(w);
        }
        let x = Tensor::from_vec(rows, (end - start, 4), &DEV)?;
        let log_p = flow.log_prob(&x)?.to_vec1::<f64>()?;
        let log_det = flow.bijector().forward(&x)?.1.to_vec1::<f64>()?;
        for ((lp, ld), w) in log_p.iter().zip(&log_det).zip(&weights) {
            integral += lp.exp() * w;
            off += (lp + 0.1 * ld).exp() * w;
        }
        start = end;
    }
    ensure!(
        (integral - 1.0).abs() < 1e-4,
        "the density integrates to {integral}"
    );
    ensure!(
        (off - 1.0).abs() > 1e-2,
        "a log-det 10% off integrates to {off}: the test would not tell"
    );
    Ok(())
}

#[test]
fn the_cached_inverse_is_the_uncached_one() -> Result<()> {
    let cfg = TarFlowBlockConfig::new(ImageShape::new(2, 4, 4), 1, 2, 8, 4)
        .with_reversed(true)
        .with_context_dim(3);
    let (b, _) = block(&cfg, DType::F64, 0.3)?;
    let z = inputs(5, 32, 0.0, 1.0, DType::F64, 9)?;
    let c = inputs(5, 3, 0.0, 1.0, DType::F64, 10)?;
    let (x, ld) = b.inverse_with_context(&z, &c)?;
    let (x_ref, ld_ref) = b.inverse_uncached(&z, Some(&c))?;
    ensure!(max_abs(&(&x - &x_ref)?)? < 1e-12, "samples differ");
    ensure!(max_abs(&(&ld - ld_ref)?)? < 1e-12, "log-dets differ");
    let (back, _) = b.forward_with_context(&x, &c)?;
    ensure!(max_abs(&(back - &z)?)? < 1e-10, "not an inverse");
    // The context matters.
    let other = (c + 1.0)?;
    let (x_other, _) = b.inverse_with_context(&z, &other)?;
    ensure!(max_abs(&(x_other - &x)?)? > 1e-3, "the context is ignored");
    Ok(())
}

#[test]
fn long_sequences_attend_in_chunks_as_in_one() -> Result<()> {
    // 1×12×12 in 1×1 patches: 144 tokens, three chunks of queries; the cached inverse
    // (no chunks, no mask) inverts the chunked forward pass.
    let cfg = TarFlowBlockConfig::new(ImageShape::new(1, 12, 12), 1, 1, 8, 2);
    assert!(cfg.patches().tokens() > 2 * flow_tarflow::QUERY_CHUNK);
    let (b, _) = block(&cfg, DType::F64, 0.3)?;
    let x = inputs(3, 144, 0.5, 1.0, DType::F64, 11)?;
    let (z, ld) = b.forward(&x)?;
    let (back, ld_inv) = b.inverse(&z)?;
    ensure!(
        max_abs(&(back - &x)?)? < 1e-10,
        "chunked attention does not invert"
    );
    ensure!(max_abs(&(ld + ld_inv)?)? < 1e-10, "log-dets do not cancel");
    Ok(())
}

#[test]
fn hostile_sizes_are_one_line_errors() {
    let image = ImageShape::new(1, 8, 8);
    let err = |cfg: TarFlowConfig| cfg.validate().expect_err("refused");
    assert_eq!(
        err(TarFlowConfig::new(image).with_patch(3)),
        "patch size 3 does not divide the height and width of a 1×8×8 image"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_width(30).with_heads(4)),
        "4 heads do not divide an embedding width of 30"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_blocks(0)),
        "a TarFlow needs at least one block"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_heads(0)),
        "a TarFlow block needs `heads` of at least 1"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_width(1 << 20).with_heads(1)),
        "1048576 embedding width: more than the limit of 65536"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_blocks(5000)),
        "5000 blocks: more than the limit of 1024"
    );
    assert_eq!(
        err(TarFlowConfig::new(ImageShape::new(1, 1 << 20, 1 << 20)).with_patch(1)),
        "an image of 1 × 1048576 × 1048576 values: more than the limit of 16777216"
    );
    assert_eq!(
        err(TarFlowConfig::new(image).with_noise_std(f64::NAN)),
        "the noise's standard deviation must be finite and at least 0, got NaN"
    );
    // A block in a model of another size, as a hostile file would have it.
    let block = TarFlowConfig::new(image).block(0);
    assert_eq!(
        LayerConfig::check(&block, 63, 0),
        Err("a TarFlow block over 1×8×8 images (64 features) in a model of 63 features".into())
    );
}
