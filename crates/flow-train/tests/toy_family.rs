//! A flow family defined in this file alone, joined to the registry with one line
//! (`Registry::builtin().with(ToyFamily)`): it trains, saves, loads and resumes through
//! the same paths as RealNVP. Its `center` layer also exercises the two hooks a layer
//! has beside its maps: a declared buffer, and data-dependent initialisation.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{ensure, Result};
use candle::{bail, DType, Device, Tensor};
use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerFamily, LayerSpec};
use flow_models::{ModelConfig, Registry};
use flow_nn::{Activation, ConditionerConfig, Coupling, CouplingConfig, NetConfig, Transform};
use flow_train::{
    data::{generate, Toy},
    Control, Duration, Report, Reporter, TrainCheckpoint, TrainConfig, Trainer,
};
use serde::{Deserialize, Serialize};

/// `y = x · exp(tanh(s))`: a coupling transform that only scales, by at most e.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct ScaleOnly {}

impl Transform for ScaleOnly {
    fn params(&self) -> Vec<String> {
        vec!["s".into()]
    }

    fn apply(
        &self,
        x: &Tensor,
        theta: &[Tensor],
        inverse: bool,
    ) -> candle::Result<(Tensor, Tensor)> {
        let [s] = theta else {
            bail!("scale-only takes one parameter");
        };
        let s = s.tanh()?;
        let s = if inverse { s.neg()? } else { s };
        Ok((x.mul(&s.exp()?)?, s.sum(1)?))
    }
}

/// `z = (x − shift) / spread`, with both set from the data by `initialize`: `shift`
/// (the mean) is trained on, `spread` (the standard deviation) is a buffer.
#[derive(Debug)]
struct Center {
    shift: Tensor,
    spread: Tensor,
}

impl Center {
    fn new(dim: usize, vb: VarBuilder) -> candle::Result<Self> {
        Ok(Self {
            shift: vb.get_with_hints(dim, "shift", candle_nn::init::ZERO)?,
            spread: vb.get_with_hints(dim, "spread", candle_nn::init::ONE)?,
        })
    }

    fn log_det(&self, x: &Tensor, sign: f64) -> candle::Result<Tensor> {
        let total = self.spread.log()?.sum_all()?.affine(sign, 0.0)?;
        total.broadcast_as(x.dim(0)?)?.contiguous()
    }
}

impl Bijector for Center {
    fn forward(&self, x: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        let z = x.broadcast_sub(&self.shift)?.broadcast_div(&self.spread)?;
        Ok((z, self.log_det(x, -1.0)?))
    }
    fn inverse(&self, z: &Tensor) -> candle::Result<(Tensor, Tensor)> {
        let x = z.broadcast_mul(&self.spread)?.broadcast_add(&self.shift)?;
        Ok((x, self.log_det(z, 1.0)?))
    }
    fn buffers(&self) -> Vec<Tensor> {
        vec![self.spread.clone()]
    }
    fn initialize(&self, x: &Tensor, _: Option<&Tensor>) -> candle::Result<()> {
        let mean = x.mean(0)?;
        let std = x.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
        self.shift.slice_set(&mean, 0, 0)?;
        self.spread.slice_set(&std, 0, 0)
    }
}

#[derive(Deserialize)]
struct CenterSettings {
    dim: usize,
}

/// The family: kinds `center` and `scale-coupling`.
struct ToyFamily;

/// Layers the family has built, to count the builds of a model.
static BUILT_LAYERS: AtomicUsize = AtomicUsize::new(0);

impl LayerFamily for ToyFamily {
    fn kinds(&self) -> &[&'static str] {
        &["center", "scale-coupling"]
    }

    fn check(&self, spec: &LayerSpec, dim: usize, _: usize) -> Result<(), String> {
        let n = match spec.kind() {
            "center" => spec.settings::<CenterSettings>()?.dim,
            _ => spec.settings::<CouplingConfig<ScaleOnly>>()?.mask.len(),
        };
        if n != dim {
            return Err(format!("{n} features in a model of {dim}"));
        }
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        BUILT_LAYERS.fetch_add(1, Ordering::SeqCst);
        let settings = |e: String| candle::Error::Msg(e);
        Ok(match spec.kind() {
            "center" => Box::new(Center::new(
                spec.settings::<CenterSettings>().map_err(settings)?.dim,
                vb,
            )?),
            _ => Box::new(Coupling::new(
                &spec
                    .settings::<CouplingConfig<ScaleOnly>>()
                    .map_err(settings)?,
                vb,
            )?),
        })
    }
}

fn model() -> Result<ModelConfig> {
    let coupling = |mask: Vec<bool>| -> Result<LayerSpec> {
        let cfg = CouplingConfig {
            mask,
            conditioner: ConditionerConfig {
                nets: Default::default(),
                layout: Default::default(),
                net: NetConfig::Mlp {
                    hidden: vec![32],
                    activation: Activation::Tanh,
                },
                zero_init: false,
            },
            transform: ScaleOnly {},
            inverted: false,
            context_dim: 0,
        };
        LayerSpec::new("scale-coupling", &cfg).map_err(anyhow::Error::msg)
    };
    let layers = vec![
        LayerSpec::new("center", &serde_json::json!({ "dim": 2 })).map_err(anyhow::Error::msg)?,
        coupling(vec![true, false])?,
        coupling(vec![false, true])?,
        coupling(vec![true, false])?,
    ];
    Ok(ModelConfig::new(2, layers))
}

struct Losses(Vec<f64>);

impl Reporter for Losses {
    fn report(&mut self, r: &Report) {
        self.0.push(r.loss);
    }
}

fn weights(t: &flow_train::Trained, name: &str) -> Result<Vec<f32>> {
    let vars = t.varmap.data().lock().expect("lock");
    let v = vars
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("no tensor {name}"))?;
    Ok(v.as_tensor().to_vec1::<f32>()?)
}

/// Every tensor of a trained model, by name.
fn all_weights(t: &flow_train::Trained) -> Result<Vec<(String, Vec<f32>)>> {
    let mut out: Vec<(String, Vec<f32>)> = t
        .varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[test]
fn a_family_defined_here_trains_saves_loads_and_resumes() -> Result<()> {
    let registry = Registry::builtin().with(ToyFamily);
    // One batch is the whole (shifted, stretched) data set, so the initialisation sees
    // the data's own mean and spread.
    let mut data = generate(Toy::Moons, 512, Some(0.05), 4)?;
    for row in data.values.chunks_mut(2) {
        row[0] = 3.0 * row[0] + 5.0;
        row[1] = 0.5 * row[1] - 2.0;
    }
    let config = |steps| {
        TrainConfig::new(model().expect("model"))
            .with_duration(Duration::Steps(steps))
            .with_batch_size(512)
            .with_val_fraction(0.0)
            .with_standardize(false)
            .with_report_every(1)
    };
    let trainer = |steps| Trainer::with_registry(config(steps), &Device::Cpu, registry.clone());

    let mut losses = Losses(Vec::new());
    let trained = trainer(60)?.fit(&data, None, &mut losses)?;
    let (first, last) = (losses.0[0], losses.0[losses.0.len() - 1]);
    ensure!(last < first - 0.1, "the loss went from {first} to {last}");

    // The initialisation ran before step 1: the buffer holds the data's spread and was
    // never trained; the parameter started at the data's mean and moved by Adam's steps.
    let x = data.to_tensor(&Device::Cpu)?;
    let mean = x.mean(0)?.to_vec1::<f32>()?;
    let std = x
        .broadcast_sub(&x.mean(0)?)?
        .sqr()?
        .mean(0)?
        .sqrt()?
        .to_vec1::<f32>()?;
    let spread = weights(&trained, "layers.0.spread")?;
    let shift = weights(&trained, "layers.0.shift")?;
    for j in 0..2 {
        ensure!(
            (spread[j] - std[j]).abs() < 1e-5,
            "spread {spread:?}, data std {std:?}"
        );
        ensure!(
            (shift[j] - mean[j]).abs() < 60.0 * 1e-3 + 1e-4,
            "shift {shift:?} is not near the data mean {mean:?}"
        );
    }

    // Saved and loaded through the checkpoint paths RealNVP uses: the same log-probs.
    let dir = std::env::temp_dir().join(format!("flows-toy-family-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("toy.safetensors");
    trained.checkpoint.save(&path, Some(&trained.summary))?;
    let ck = flow_io::load(&path)?;
    let loaded = flow_io::build_checked_with(&path, ck, &registry, DType::F32, &Device::Cpu)?;
    let (a, b) = (trained.flow.log_prob(&x)?, loaded.flow.log_prob(&x)?);
    ensure!(
        a.to_vec1::<f32>()? == b.to_vec1::<f32>()?,
        "log-probs changed through save and load"
    );
    let unknown = flow_io::load_model(&path, DType::F32, &Device::Cpu).map(|_| ());
    let message = unknown.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        message.contains("unknown layer type `center`"),
        "without the family: {message:?}"
    );

    // Resumed to 120 steps, the run equals a straight 120-step run (so the
    // initialisation did not run again on the loaded model), and loading, checking and
    // resuming built the model once.
    let before = BUILT_LAYERS.load(Ordering::SeqCst);
    let resume = TrainCheckpoint::load(&path, &registry)?;
    let control = Control {
        resume: Some(resume),
        ..Control::default()
    };
    let continued = trainer(120)?.fit_with(&data, None, &mut Losses(Vec::new()), control)?;
    let builds = (BUILT_LAYERS.load(Ordering::SeqCst) - before) / model()?.layers.len();
    ensure!(builds == 1, "resuming built the model {builds} times");
    let straight = trainer(120)?.fit(&data, None, &mut Losses(Vec::new()))?;
    ensure!(
        all_weights(&continued)? == all_weights(&straight)?,
        "the resumed run's weights differ from the straight run's"
    );
    let (c, s) = (continued.flow.log_prob(&x)?, straight.flow.log_prob(&x)?);
    ensure!(
        c.to_vec1::<f32>()? == s.to_vec1::<f32>()?,
        "the resumed run's log-probs differ from the straight run's"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
