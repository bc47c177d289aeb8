//! Gradients computed layer by layer ([`LayerwiseBackprop`]: each layer's input
//! recomputed from its output) against standard backpropagation
//! ([`nll_and_gradients`]): every registered layer kind and whole flows of every
//! family, in f64 to 1e-8 and f32 to 1e-3 relative; chains with layers that cannot be
//! recomputed or whose inverse drifts; and the trainer with low memory: the same run as
//! without, resumed bit for bit, stopped by a non-finite loss.

use anyhow::{ensure, Context, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder, Bijector, Chain, Flow, StandardNormal};
use flow_glow::{ActNormConfig, GlowConfig, GlowLayer, ImageShape, RealNvpImageConfig};
use flow_maf::MafConfig;
use flow_models::{ModelConfig, Registry};
use flow_nsf::{NsfConfig, NsfKind};
use flow_realnvp::{CouplingKind, RealNvpConfig};
use flow_train::{
    data::{generate_labeled, Dataset, Toy},
    nll_and_gradients, Control, Duration, LayerwiseBackprop, LowMemory, Reconstruction, Report,
    Reporter, TrainConfig, Trained, Trainer,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DEV: Device = Device::Cpu;

/// `(n, dim)` values uniform on `[mid − half, mid + half)`, drawn from `seed`.
fn inputs(n: usize, dim: usize, mid: f64, half: f64, dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n * dim)
        .map(|_| mid + half * (rng.random::<f64>() * 2.0 - 1.0))
        .collect();
    Ok(Tensor::from_vec(v, (n, dim), &DEV)?.to_dtype(dtype)?)
}

/// A model's flow with its trainable variables (sorted by name, with the names) and
/// its buffers, every trainable variable moved off its initial value so that layers
/// that start as the identity are checked as real maps. Built twice from the same
/// arguments, the flows are identical.
struct Built {
    flow: Flow,
    names: Vec<String>,
    vars: Vec<Var>,
    buffers: Vec<Tensor>,
}

/// How far [`build`] moves every trainable variable: the spread of a normal draw.
const NOISE: f64 = 0.1;

fn build(model: &ModelConfig, dtype: DType, noise: f64) -> Result<Built> {
    let varmap = VarMap::new();
    model.build(seeded_var_builder(&varmap, 3, dtype, &DEV))?;
    let mut flow = model.build(seeded_var_builder(&varmap, 3, dtype, &DEV))?;
    let buffers = flow.buffers();
    let ids: Vec<_> = buffers.iter().map(Tensor::id).collect();
    let mut named: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?
        .iter()
        .filter(|(_, v)| !ids.contains(&v.as_tensor().id()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let rng = &mut StdRng::seed_from_u64(5);
    for (_, var) in &named {
        let moved = (randn(1, var.elem_count(), dtype, &DEV, rng)? * noise)?;
        var.set(&(var.as_tensor() + moved.reshape(var.shape())?)?)?;
    }
    flow.set_training(true);
    let (names, vars) = named.into_iter().unzip();
    Ok(Built {
        flow,
        names,
        vars,
        buffers,
    })
}

/// The agreement asked of the two gradients in `dtype`.
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-8
    } else {
        1e-3
    }
}

/// `max|a − b| / max|b|` over the elements (0 when both are 0).
fn relative(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    Ok(if diff == 0.0 { 0.0 } else { diff / scale })
}

/// Checks, on the rows `x` (and context) split into `parts`, that the layer-by-layer
/// loss, every parameter's gradient and the buffers after the pass equal standard
/// backpropagation's to [`tolerance`]; returns what the layer-by-layer pass measured.
fn agrees(
    what: &str,
    model: &ModelConfig,
    x: &Tensor,
    context: Option<&Tensor>,
    parts: usize,
) -> Result<Reconstruction> {
    agrees_moved(what, model, NOISE, x, context, parts)
}

/// [`agrees`] with the variables moved by `noise`.
fn agrees_moved(
    what: &str,
    model: &ModelConfig,
    noise: f64,
    x: &Tensor,
    context: Option<&Tensor>,
    parts: usize,
) -> Result<Reconstruction> {
    let dtype = x.dtype();
    let tol = tolerance(dtype);
    let standard = build(model, dtype, noise)?;
    let layerwise = build(model, dtype, noise)?;
    let (loss, grads) = nll_and_gradients(&standard.flow, &standard.vars, x, context, parts)?;
    let mut backprop = LayerwiseBackprop::new(LowMemory::new());
    let (lw_loss, lw_grads) =
        backprop.nll_and_gradients(&layerwise.flow, &layerwise.vars, x, context, parts)?;
    ensure!(
        (loss - lw_loss).abs() <= tol * loss.abs().max(1.0),
        "{what}: loss {lw_loss} layer by layer, {loss} standard"
    );
    let grads = grads.with_context(|| format!("{what}: no standard gradients"))?;
    let lw_grads = lw_grads.with_context(|| format!("{what}: no layer-by-layer gradients"))?;
    let mut checked = 0;
    for ((name, g), lw) in standard.names.iter().zip(&grads).zip(&lw_grads) {
        match (g, lw) {
            (Some(g), Some(lw)) => {
                let r = relative(lw, g)?;
                ensure!(r <= tol, "{what}: `{name}`'s gradient differs by {r:e}");
                checked += 1;
            }
            (None, None) => {}
            _ => anyhow::bail!("{what}: `{name}` has a gradient one way only"),
        }
    }
    ensure!(checked > 0, "{what}: no parameter has a gradient");
    for (a, b) in standard.buffers.iter().zip(&layerwise.buffers) {
        let r = relative(b, a)?;
        ensure!(r <= tol, "{what}: a buffer differs by {r:e} after the pass");
    }
    Ok(backprop.report().clone())
}

/// Rows in `[0, 1)`, the input space of the image flows.
fn unit_rows(n: usize, dim: usize, dtype: DType, seed: u64) -> Result<Tensor> {
    inputs(n, dim, 0.5, 0.49, dtype, seed)
}

#[test]
fn every_layer_kind_agrees_with_backpropagation() -> Result<()> {
    let registry = Registry::builtin();
    for kind in registry.kinds() {
        let sample = registry
            .sample(kind)
            .with_context(|| format!("`{kind}` has no sample layer"))?;
        let mut model = ModelConfig::new(sample.dim, vec![sample.spec.clone()]);
        let varmap = VarMap::new();
        model.build(seeded_var_builder(&varmap, 3, DType::F64, &DEV))?;
        let noise = if varmap.all_vars().is_empty() {
            // A layer without parameters behind a per-feature ActNorm that starts as the
            // identity: the ActNorm's gradients are those the layer passes back.
            let actnorm = ActNormConfig::new(ImageShape::new(sample.dim, 1, 1));
            model.layers.insert(0, GlowLayer::ActNorm(actnorm).spec());
            0.0
        } else {
            NOISE
        };
        for dtype in [DType::F64, DType::F32] {
            let (lo, hi) = sample.domain;
            let x = if lo.is_finite() && hi.is_finite() {
                inputs(64, sample.dim, (lo + hi) / 2.0, 0.45 * (hi - lo), dtype, 7)?
            } else {
                inputs(64, sample.dim, 0.0, 2.0, dtype, 7)?
            };
            let what = format!("`{kind}` in {dtype:?}");
            let report = agrees_moved(&what, &model, noise, &x, None, 1)?;
            ensure!(
                report.kept.is_empty() && report.retries == 0,
                "`{kind}`: activations kept {report:?}"
            );
            ensure!(
                report.max_error <= tolerance(dtype) * 1e-2,
                "`{kind}` in {dtype:?}: reconstruction error {:e}",
                report.max_error
            );
        }
    }
    Ok(())
}

/// Small models of every family (conditional ones with their context features).
fn flows() -> Vec<(&'static str, ModelConfig, usize)> {
    let realnvp = RealNvpConfig::new(3)
        .with_layers(4)
        .with_hidden(16)
        .with_zero_init(false);
    let nsf = NsfConfig::new(3)
        .with_layers(3)
        .with_hidden(16)
        .with_zero_init(false);
    let maf = MafConfig::new(3).with_layers(3).with_hidden(16);
    let image = ImageShape::new(1, 8, 8);
    let glow = GlowConfig::new(image)
        .with_levels(2)
        .with_depth(2)
        .with_hidden_channels(8)
        .with_zero_init(false);
    vec![
        (
            "RealNVP",
            ModelConfig::realnvp(&realnvp).with_standardize(true),
            0,
        ),
        (
            "conditional RealNVP",
            ModelConfig::realnvp(&realnvp.clone().with_context_dim(2)),
            2,
        ),
        (
            "NICE",
            ModelConfig::realnvp(&realnvp.with_coupling(CouplingKind::Additive)),
            0,
        ),
        ("NSF", ModelConfig::nsf(&nsf), 0),
        (
            "conditional autoregressive NSF",
            ModelConfig::nsf(
                &nsf.with_kind(NsfKind::Autoregressive)
                    .with_layers(2)
                    .with_context_dim(1),
            ),
            1,
        ),
        ("MAF", ModelConfig::maf(&maf), 0),
        ("IAF", ModelConfig::maf(&maf.with_inverse(true)), 0),
        ("Glow", ModelConfig::glow(&glow), 0),
        (
            "Glow, plain 1×1 convolutions and a logit",
            ModelConfig::glow(&glow.with_lu(false).with_logit(Some(0.05))),
            0,
        ),
        (
            "RealNVP image flow with batch norm",
            ModelConfig::realnvp_image(
                &RealNvpImageConfig::new(image)
                    .with_scales(2)
                    .with_hidden_channels(8)
                    .with_zero_init(false),
            ),
            0,
        ),
    ]
}

#[test]
fn whole_flows_agree_with_backpropagation() -> Result<()> {
    for (name, model, context_dim) in flows() {
        for dtype in [DType::F64, DType::F32] {
            let x = if model.pixel_levels().is_some() {
                unit_rows(48, model.dim, dtype, 11)?
            } else {
                inputs(48, model.dim, 0.0, 2.0, dtype, 11)?
            };
            let c = (context_dim > 0)
                .then(|| inputs(48, context_dim, 0.0, 1.0, dtype, 12))
                .transpose()?;
            let what = format!("{name} in {dtype:?}");
            let report = agrees(&what, &model, &x, c.as_ref(), 1)?;
            ensure!(report.kept.is_empty(), "{what}: kept {:?}", report.kept);
            ensure!(
                report.max_input_error <= tolerance(dtype) * 1e-2,
                "{what}: the batch reconstructed through every layer is {:e} off",
                report.max_input_error
            );
        }
    }
    Ok(())
}

#[test]
fn a_batch_in_parts_agrees_with_backpropagation_in_parts() -> Result<()> {
    let (_, glow, _) = flows().swap_remove(7);
    let x = unit_rows(64, glow.dim, DType::F64, 13)?;
    agrees("Glow in two parts", &glow, &x, None, 2)?;
    let realnvp = ModelConfig::realnvp(&RealNvpConfig::new(2).with_hidden(8));
    let x = inputs(96, 2, 0.0, 2.0, DType::F64, 14)?;
    agrees("RealNVP in three parts", &realnvp, &x, None, 3)?;
    Ok(())
}

/// A layer whose input cannot be recomputed: it keeps its activations.
#[derive(Debug)]
struct NotRecomputable(Box<dyn Bijector>);

impl Bijector for NotRecomputable {
    fn forward(&self, x: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        self.0.forward(x)
    }
    fn inverse(&self, z: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        self.0.inverse(z)
    }
    fn recomputable(&self) -> bool {
        false
    }
}

/// A layer whose inverse is off by `drift` in every value.
#[derive(Debug)]
struct Drifting(Box<dyn Bijector>, f64);

impl Bijector for Drifting {
    fn forward(&self, x: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        self.0.forward(x)
    }
    fn inverse(&self, z: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        let (x, log_det) = self.0.inverse(z)?;
        Ok((x.affine(1.0, self.1)?, log_det))
    }
}

#[test]
fn layers_that_cannot_be_recomputed_or_drift_keep_their_activations() -> Result<()> {
    let dtype = DType::F64;
    let cfg = ModelConfig::realnvp(
        &RealNvpConfig::new(2)
            .with_layers(4)
            .with_hidden(8)
            .with_zero_init(false),
    );
    // The same four couplings as a plain chain, and with layer 1 not recomputable and
    // layer 2 drifting by 1e-2 (ten times the tolerance).
    let flow = |mixed: bool| -> Result<(Flow, Vec<Var>)> {
        let registry = Registry::builtin();
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, dtype, &DEV);
        let mut layers = Vec::new();
        for (i, spec) in cfg.layers.iter().enumerate() {
            let layer = registry.build(spec, vb.pp(i))?;
            layers.push(match (mixed, i) {
                (true, 1) => Box::new(NotRecomputable(layer)) as Box<dyn Bijector>,
                (true, 2) => Box::new(Drifting(layer, 1e-2)),
                _ => layer,
            });
        }
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("variable map poisoned"))?
            .clone()
            .into_iter()
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let flow = Flow::new(Chain::new(layers), StandardNormal::new(2, dtype, &DEV));
        Ok((flow, named.into_iter().map(|(_, v)| v).collect()))
    };
    let x = inputs(40, 2, 0.0, 2.0, dtype, 15)?;
    let (plain, vars) = flow(false)?;
    let (loss, grads) = nll_and_gradients(&plain, &vars, &x, None, 1)?;
    let (mixed, mixed_vars) = flow(true)?;
    let mut backprop = LayerwiseBackprop::new(LowMemory::new());
    let (lw_loss, lw_grads) = backprop.nll_and_gradients(&mixed, &mixed_vars, &x, None, 1)?;
    ensure!((loss - lw_loss).abs() < 1e-12, "{lw_loss} against {loss}");
    let (grads, lw_grads) = (grads.context("grads")?, lw_grads.context("grads")?);
    for (g, lw) in grads.iter().zip(&lw_grads) {
        let (g, lw) = (g.as_ref().context("grad")?, lw.as_ref().context("grad")?);
        let r = relative(lw, g)?;
        ensure!(r <= 1e-8, "a gradient differs by {r:e}");
    }
    let report = backprop.report();
    ensure!(report.kept == [1, 2], "kept {:?}", report.kept);
    ensure!(report.retries == 1, "{} retries", report.retries);
    ensure!(
        report.max_error > 1e-3 && report.max_error < 0.1,
        "the drifting layer's error is {:e}",
        report.max_error
    );
    // With a tolerance above the drift, the drifting layer is recomputed, and its
    // gradients are off.
    let mut lenient = LayerwiseBackprop::new(LowMemory::new().with_tolerance(1.0));
    let (_, off) = lenient.nll_and_gradients(&mixed, &mixed_vars, &x, None, 1)?;
    let worst = grads
        .iter()
        .zip(off.context("grads")?)
        .map(|(g, o)| relative(o.as_ref().context("grad")?, g.as_ref().context("grad")?))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0.0, f64::max);
    ensure!(worst > 1e-6, "drift left the gradients at {worst:e}");
    ensure!(lenient.report().kept == [1], "{:?}", lenient.report().kept);
    Ok(())
}

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

/// Every variable's values, by name.
fn weights(t: &Trained) -> Result<Vec<(String, Vec<f64>)>> {
    let data = t
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut all: Vec<(String, Vec<f64>)> = data
        .iter()
        .map(|(n, v)| {
            let values = v
                .as_tensor()
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            Ok((n.clone(), values))
        })
        .collect::<candle::Result<_>>()?;
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

/// The labelled moons, the label as the context.
fn labelled(n: usize, seed: u64) -> Result<Dataset> {
    Ok(generate_labeled(Toy::Moons, n, None, seed)?.split_context(1, "moons")?)
}

fn conditional_trainer(steps: usize, low_memory: bool) -> Result<Trainer> {
    let model = RealNvpConfig::new(2)
        .with_layers(3)
        .with_hidden(16)
        .with_context_dim(1);
    let cfg = TrainConfig::new(model)
        .with_duration(Duration::Steps(steps))
        .with_batch_size(64);
    let trainer = Trainer::new(cfg, &DEV)?.with_dtype(DType::F64);
    Ok(if low_memory {
        trainer.with_low_memory(LowMemory::new())?
    } else {
        trainer
    })
}

#[test]
fn training_with_low_memory_follows_standard_training_and_resumes_exactly() -> Result<()> {
    let data = labelled(512, 3)?;
    let standard = conditional_trainer(30, false)?.fit(&data, None, &mut Silent)?;
    let low = conditional_trainer(30, true)?.fit(&data, None, &mut Silent)?;
    for ((name, a), (_, b)) in weights(&standard)?.iter().zip(weights(&low)?) {
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        ensure!(diff < 1e-8, "`{name}` is {diff:e} off after 30 steps");
    }
    let report = low.summary.low_memory.clone().context("no report")?;
    ensure!(report.layers == 4 && report.kept.is_empty(), "{report:?}");
    ensure!(
        standard.summary.low_memory.is_none(),
        "a report without low memory"
    );

    let stopped = conditional_trainer(30, true)?.fit_with(
        &data,
        None,
        &mut Silent,
        Control {
            stop_at: Some(12),
            ..Control::default()
        },
    )?;
    ensure!(stopped.summary.interrupted, "{:?}", stopped.summary);
    let resumed = conditional_trainer(30, true)?.fit_with(
        &data,
        None,
        &mut Silent,
        Control {
            resume: Some(stopped.checkpoint),
            ..Control::default()
        },
    )?;
    ensure!(
        weights(&resumed)? == weights(&low)?,
        "the resumed run differs from the straight one"
    );
    Ok(())
}

#[test]
fn a_non_finite_loss_stops_low_memory_training_with_the_first_weights() -> Result<()> {
    let data = labelled(256, 4)?;
    let mut cfg = conditional_trainer(20, true)?.config().clone();
    cfg.optimizer.lr = 1e30;
    let t = Trainer::new(cfg, &DEV)?
        .with_low_memory(LowMemory::new())?
        .fit(&data, None, &mut Silent)?;
    ensure!(t.summary.kept_step == Some(0), "{:?}", t.summary);
    let reason = t.summary.stopped.unwrap_or_default();
    ensure!(reason.contains("became non-finite"), "{reason}");
    Ok(())
}

#[test]
fn a_tolerance_that_is_not_positive_is_refused() -> Result<()> {
    let trainer = conditional_trainer(1, false)?;
    let err = match trainer.with_low_memory(LowMemory::new().with_tolerance(0.0)) {
        Ok(_) => anyhow::bail!("a zero tolerance was accepted"),
        Err(e) => e.to_string(),
    };
    ensure!(
        err == "invalid training configuration: the reconstruction tolerance must be positive, got 0",
        "{err}"
    );
    Ok(())
}
