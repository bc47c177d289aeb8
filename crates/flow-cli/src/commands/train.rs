use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal,
    path::Path,
};

use flow_realnvp::{Activation, CouplingKind, RealNvpConfig, ScaleMap};
use flow_train::{
    data::{generate, load_path, Dataset, Toy},
    Duration, JsonlReporter, OptimizerConfig, OptimizerKind, PlainReporter, Reporter, Schedule,
    TrainConfig, Trainer,
};

use crate::{
    cli::{ActivationArg, CouplingArg, ScaleArg, ScheduleArg, TrainArgs},
    commands::device,
    output::check_writable,
    progress::BarReporter,
    CmdResult, Failure,
};

fn positive(name: &str, v: usize) -> Result<usize, Failure> {
    if v == 0 {
        return Err(format!("--{name} must be at least 1").into());
    }
    Ok(v)
}

/// The training configuration the flags describe; every value is checked here, before
/// any work starts.
pub fn activation(a: ActivationArg) -> Activation {
    match a {
        ActivationArg::LeakyRelu => Activation::LeakyRelu,
        ActivationArg::Relu => Activation::Relu,
        ActivationArg::Tanh => Activation::Tanh,
        ActivationArg::Gelu => Activation::Gelu,
    }
}

pub fn config(a: &TrainArgs, dim: usize) -> Result<TrainConfig, Failure> {
    let activation = activation(a.activation);
    if !(a.clamp.is_finite() && a.clamp > 0.0) {
        return Err(format!("--clamp must be positive, got {}", a.clamp).into());
    }
    let scale = match a.scale {
        ScaleArg::SoftClamp => ScaleMap::SoftClamp { clamp: a.clamp },
        ScaleArg::Exp => ScaleMap::Exp,
        ScaleArg::Tanh => ScaleMap::Tanh { clamp: a.clamp },
    };
    let coupling = match a.coupling {
        CouplingArg::Affine => CouplingKind::Affine,
        CouplingArg::Additive => CouplingKind::Additive,
    };
    let model = RealNvpConfig::new(dim)
        .with_layers(positive("layers", a.layers)?)
        .with_hidden(positive("hidden", a.hidden)?)
        .with_hidden_layers(a.hidden_layers)
        .with_activation(activation)
        .with_coupling(coupling)
        .with_scale(scale);
    let duration = match (a.steps, a.epochs) {
        (_, Some(e)) => Duration::Epochs(positive("epochs", e)?),
        (Some(s), None) => Duration::Steps(positive("steps", s)?),
        (None, None) => Duration::Steps(1000),
    };
    let schedule = match a.schedule {
        ScheduleArg::Constant => Schedule::Constant,
        ScheduleArg::Exp => Schedule::Exp { decay: a.lr_decay },
        ScheduleArg::Cosine => Schedule::Cosine { warmup: a.warmup },
    };
    let optimizer = OptimizerConfig {
        kind: if a.weight_decay.is_some() {
            OptimizerKind::AdamW
        } else {
            OptimizerKind::Adam
        },
        lr: a.lr,
        weight_decay: a.weight_decay.unwrap_or(0.0),
        ..OptimizerConfig::default()
    };
    let cfg = TrainConfig::new(model)
        .with_optimizer(optimizer)
        .with_schedule(schedule)
        .with_duration(duration)
        .with_batch_size(positive("batch", a.batch)?)
        .with_clip_grad(a.clip_grad)
        .with_seed(a.seed)
        .with_val_every(positive("val-every", a.val_every)?)
        .with_patience(a.patience)
        .with_standardize(!a.no_standardize);
    cfg.validate()
        .map_err(|e| Failure::from(format!("invalid settings: {e}")))?;
    Ok(cfg)
}

fn training_data(a: &TrainArgs) -> Result<Dataset, Failure> {
    if let Some(toy) = Toy::from_name(&a.data) {
        positive("n", a.n)?;
        return Ok(generate(toy, a.n, a.noise, a.seed)?);
    }
    let path = Path::new(&a.data);
    if !path.exists() {
        let names: Vec<_> = Toy::ALL.iter().map(|t| t.name()).collect();
        return Err(format!(
            "--data `{}` is neither a file nor a built-in data set ({})",
            a.data,
            names.join(", ")
        )
        .into());
    }
    Ok(load_path(path)?)
}

pub fn run(a: TrainArgs) -> CmdResult {
    check_writable(&a.out)?;
    if let Some(m) = &a.metrics {
        check_writable(m)?;
    }
    let device = device(&a.device)?;
    let train = training_data(&a)?;
    let val = a.val.as_deref().map(load_path).transpose()?;
    if let Some(v) = &val {
        if v.dim != train.dim {
            return Err(format!(
                "--val has {} features per row, the training data {}",
                v.dim, train.dim
            )
            .into());
        }
    }
    let cfg = config(&a, train.dim)?;
    let trainer = Trainer::new(cfg, &device)?;

    let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
    if std::io::stderr().is_terminal() {
        reporters.push(Box::new(BarReporter::default()));
    } else {
        reporters.push(Box::new(PlainReporter::new(std::io::stderr(), 100)));
    }
    if let Some(m) = &a.metrics {
        let f = std::fs::File::create(m).map_err(|e| format!("{}: {e}", m.display()))?;
        reporters.push(Box::new(JsonlReporter::new(std::io::BufWriter::new(f))));
    }
    eprintln!(
        "training on {} samples of {} features for {} steps",
        train.len(),
        train.dim,
        trainer.total_steps(train.len())
    );
    let trained = trainer.fit(&train, val.as_ref(), &mut reporters)?;
    drop(reporters);

    let tensors: HashMap<String, candle::Tensor> = trained
        .varmap
        .data()
        .lock()
        .map_err(|_| "variable map poisoned")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let summary = serde_json::to_value(&trained.summary)?;
    let mut extra = BTreeMap::new();
    extra.insert(
        "train_config".to_string(),
        serde_json::to_string(&trained.config)?,
    );
    flow_io::save(&a.out, &trained.model, &tensors, Some(&summary), &extra)?;

    let s = &trained.summary;
    let mut line = format!(
        "trained {} steps in {:.1}s ({:.1} steps/s), last batch NLL {:.4}",
        s.steps, s.elapsed_secs, s.steps_per_sec, s.final_loss
    );
    if let (Some(v), Some(at)) = (s.best_val_nll, s.best_step) {
        line.push_str(&format!(", best validation NLL {v:.4} nats (step {at})"));
    }
    eprintln!("{line}");
    eprintln!("saved {}", a.out.display());
    if let Some(reason) = &s.stopped {
        if !reason.starts_with("early stop") {
            return Err(Failure {
                message: format!(
                    "training stopped: {reason}; saved those weights to {}",
                    a.out.display()
                ),
                code: 1,
            });
        }
    }
    Ok(())
}
