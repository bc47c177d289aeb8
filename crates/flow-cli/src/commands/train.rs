use std::{io::IsTerminal, path::Path, sync::atomic::Ordering};

use flow_glow::{GlowConfig, ImageInfo, ImageShape, RealNvpImageConfig};
use flow_maf::MafConfig;
use flow_models::{BaseConfig, ModelConfig, Registry};
use flow_nn::{Activation, Order, Spline};
use flow_nsf::{NsfConfig, NsfKind};
use flow_realnvp::{CouplingKind, Nets, RealNvpConfig, ScaleMap};
use flow_train::{
    data::{
        check_pixels, generate, generate_labeled, load_images, load_path, Dataset, ImageDims, Toy,
        DIGITS_LEVELS,
    },
    Control, Duration, JsonlReporter, OptimizerConfig, OptimizerKind, PlainReporter, Reporter,
    Schedule, TrainCheckpoint, TrainConfig, Trainer,
};

use crate::{
    cli::{
        CouplingArg, FlowArg, NetsArg, OptimizerArg, OrderArg, ScaleArg, ScheduleArg, SplitArg,
        TrainArgs,
    },
    commands::{data::digits_split, device, peak_memory_mib},
    output::check_writable,
    progress::BarReporter,
    signals, CmdResult, Failure,
};

/// Glow's default weight decay (decoupled, with Adam).
const GLOW_WEIGHT_DECAY: f64 = 0.1;

fn positive(name: &str, v: usize) -> Result<usize, Failure> {
    if v == 0 {
        return Err(format!("--{name} must be at least 1").into());
    }
    Ok(v)
}

/// The base distribution `--base` names.
fn base(text: &str) -> Result<BaseConfig, Failure> {
    match text.trim() {
        "normal" => Ok(BaseConfig::StandardNormal),
        "diag" => Ok(BaseConfig::DiagNormal { trainable: true }),
        other => match other.strip_prefix("mixture:").map(str::parse::<usize>) {
            Some(Ok(k)) if k > 0 => Ok(BaseConfig::Mixture { components: k }),
            Some(Ok(_)) => Err("--base mixture:K needs at least 1 component".into()),
            _ => Err(format!("--base `{other}`: expected normal, diag or mixture:K").into()),
        },
    }
}

/// The training run's length the flags give, if they give one.
fn duration(a: &TrainArgs) -> Result<Option<Duration>, Failure> {
    Ok(match (a.steps, a.epochs) {
        (_, Some(e)) => Some(Duration::Epochs(positive("epochs", e)?)),
        (Some(s), None) => Some(Duration::Steps(positive("steps", s)?)),
        (None, None) => None,
    })
}

/// Whether `--flow` names an image flow.
fn image_flow(flow: FlowArg) -> bool {
    matches!(flow, FlowArg::Glow | FlowArg::RealnvpImage)
}

/// `--image HxWxC`.
fn parse_image(text: &str) -> Result<ImageShape, Failure> {
    let parts: Vec<usize> = text
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--image `{text}`: expected HxWxC, e.g. 28x28x1"))?;
    match parts[..] {
        [h, w, c] if h > 0 && w > 0 && c > 0 => Ok(ImageShape::new(c, h, w)),
        _ => Err(
            format!("--image `{text}`: expected HxWxC with each at least 1, e.g. 28x28x1").into(),
        ),
    }
}

/// The images an image flow trains on: their shape (from `--image`, else the file's)
/// and pixel levels (`--pixel-levels`, else the data set's, else 256), checked
/// against the rows. `None` for other flows, which take neither flag.
fn image_info(a: &TrainArgs, data: &TrainingData) -> Result<Option<ImageInfo>, Failure> {
    if !image_flow(a.flow) {
        if a.image.is_some() || a.pixel_levels.is_some() {
            return Err("--image and --pixel-levels describe the data of an image flow (--flow glow or realnvp-image)".into());
        }
        return Ok(None);
    }
    if a.context_dim > 0 {
        return Err("image flows are unconditional: --context-dim is not available".into());
    }
    let recorded = data
        .dims
        .map(|d| ImageShape::new(d.channels, d.height, d.width));
    let shape = match (a.image.as_deref().map(parse_image).transpose()?, recorded) {
        (Some(given), Some(file)) if given != file => {
            return Err(format!(
                "--image {}x{}x{}, but {} holds {}x{}x{} images",
                given.height,
                given.width,
                given.channels,
                a.data,
                file.height,
                file.width,
                file.channels
            )
            .into())
        }
        (Some(shape), _) | (None, Some(shape)) => shape,
        (None, None) => {
            return Err(format!(
                "an image flow needs the image shape: --image HxWxC ({} has {} values per row)",
                a.data, data.data.dim
            )
            .into())
        }
    };
    if shape.dim() != data.data.dim {
        return Err(format!(
            "--image {}x{}x{} has {} values per image, but the rows of {} have {}",
            shape.height,
            shape.width,
            shape.channels,
            shape.dim(),
            a.data,
            data.data.dim
        )
        .into());
    }
    let pixel_levels = a.pixel_levels.or(data.levels).unwrap_or(256);
    if pixel_levels < 2 {
        return Err(format!("--pixel-levels must be at least 2, got {pixel_levels}").into());
    }
    check_pixels(&data.data, pixel_levels, &a.data)?;
    Ok(Some(ImageInfo {
        shape,
        pixel_levels,
    }))
}

/// The image flow `--flow` names, over `image`, checked.
fn image_model(a: &TrainArgs, image: ImageInfo) -> Result<ModelConfig, Failure> {
    let scales = positive("scales", a.scales)?;
    let channels = positive("channels", a.channels)?;
    let shape = image.shape;
    let (model, checked) = match a.flow {
        FlowArg::Glow => {
            let cfg = GlowConfig::new(shape)
                .with_levels(scales)
                .with_depth(positive("depth", a.depth)?)
                .with_hidden_channels(channels)
                .with_pixel_levels(image.pixel_levels);
            (ModelConfig::glow(&cfg), cfg.validate())
        }
        _ => {
            let cfg = RealNvpImageConfig::new(shape)
                .with_scales(scales)
                .with_hidden_channels(channels)
                .with_pixel_levels(image.pixel_levels);
            (ModelConfig::realnvp_image(&cfg), cfg.validate())
        }
    };
    checked.map_err(|e| {
        format!(
            "--scales {scales} on {}x{}x{} images: {e}",
            shape.height, shape.width, shape.channels
        )
    })?;
    Ok(model)
}

/// The training configuration the flags describe for data of `dim` features and
/// `context_dim` context features (images: `image`); every value is checked here,
/// before any work starts.
pub fn config(
    a: &TrainArgs,
    dim: usize,
    context_dim: usize,
    image: Option<ImageInfo>,
) -> Result<TrainConfig, Failure> {
    if !(a.clamp.is_finite() && a.clamp > 0.0) {
        return Err(format!("--clamp must be positive, got {}", a.clamp).into());
    }
    let scale = match a.scale {
        ScaleArg::SoftClamp => ScaleMap::SoftClamp { clamp: a.clamp },
        ScaleArg::Exp => ScaleMap::Exp,
        ScaleArg::Tanh => ScaleMap::Tanh { clamp: a.clamp },
    };
    let layers = positive("layers", a.layers)?;
    let autoregressive = matches!(a.flow, FlowArg::NsfAr | FlowArg::Maf | FlowArg::Iaf);
    let (hidden, hidden_layers) = if matches!(a.flow, FlowArg::Maf | FlowArg::Iaf) {
        (a.hidden.unwrap_or(64), a.hidden_layers.unwrap_or(2))
    } else {
        (a.hidden.unwrap_or(512), a.hidden_layers.unwrap_or(1))
    };
    let hidden = positive("hidden", hidden)?;
    if autoregressive && hidden < dim {
        return Err(format!(
            "--hidden {hidden}: an autoregressive network over {dim} features needs at least {dim} hidden units"
        )
        .into());
    }
    let order = match a.order {
        OrderArg::Alternate => Order::Alternate,
        OrderArg::Random => Order::Random { seed: a.seed },
    };
    let spline = Spline::new(a.bins, a.tail_bound);
    if matches!(a.flow, FlowArg::Nsf | FlowArg::NsfAr) {
        spline.check().map_err(|e| {
            let flag = if e.contains("tail bound") {
                "--tail-bound"
            } else {
                "--bins"
            };
            Failure::from(format!("{flag}: {e}"))
        })?;
    }
    let base = base(&a.base)?;
    if image.is_some() && a.base != "normal" {
        return Err("--base: image flows keep one trainable Gaussian per scale".into());
    }
    let model: ModelConfig = match a.flow {
        FlowArg::Glow | FlowArg::RealnvpImage => {
            let image = image.ok_or("an image flow needs --image HxWxC")?;
            image_model(a, image)?
        }
        FlowArg::Realnvp | FlowArg::Nice => {
            let coupling = match (a.flow, a.coupling) {
                (FlowArg::Nice, _) | (_, CouplingArg::Additive) => CouplingKind::Additive,
                _ => CouplingKind::Affine,
            };
            RealNvpConfig::new(dim)
                .with_layers(layers)
                .with_hidden(hidden)
                .with_hidden_layers(hidden_layers)
                .with_activation(a.activation.unwrap_or(Activation::LeakyRelu))
                .with_coupling(coupling)
                .with_scale(scale)
                .with_nets(match a.nets {
                    NetsArg::Separate => Nets::Separate,
                    NetsArg::Joint => Nets::Joint,
                })
                .with_context_dim(context_dim)
                .into()
        }
        FlowArg::Nsf | FlowArg::NsfAr => NsfConfig::new(dim)
            .with_kind(if a.flow == FlowArg::Nsf {
                NsfKind::Coupling
            } else {
                NsfKind::Autoregressive
            })
            .with_layers(layers)
            .with_hidden(hidden)
            .with_hidden_layers(hidden_layers)
            .with_activation(a.activation.unwrap_or(Activation::Relu))
            .with_spline(spline)
            .with_order(order)
            .with_context_dim(context_dim)
            .into(),
        FlowArg::Maf | FlowArg::Iaf => MafConfig::new(dim)
            .with_layers(layers)
            .with_hidden(hidden)
            .with_hidden_layers(hidden_layers)
            .with_activation(a.activation.unwrap_or(Activation::Relu))
            .with_scale(scale)
            .with_order(order)
            .with_inverse(a.flow == FlowArg::Iaf)
            .with_context_dim(context_dim)
            .into(),
    };
    let model = if image.is_some() {
        model
    } else {
        model.with_base(base)
    };
    let duration = duration(a)?.unwrap_or(Duration::Steps(1000));
    let schedule = match a.schedule {
        ScheduleArg::Constant => Schedule::Constant,
        ScheduleArg::Exp => Schedule::Exp { decay: a.lr_decay },
        ScheduleArg::Cosine => Schedule::Cosine { warmup: a.warmup },
    };
    // Glow fits a small image set far better than it generalises: decoupled weight
    // decay takes about 0.02 bits/dim off its test score on the digits.
    let weight_decay = a
        .weight_decay
        .or((a.flow == FlowArg::Glow).then_some(GLOW_WEIGHT_DECAY));
    let optimizer = OptimizerConfig {
        kind: match (a.optimizer, weight_decay) {
            (OptimizerArg::Adamax, _) => OptimizerKind::Adamax,
            (OptimizerArg::Adam, Some(_)) => OptimizerKind::AdamW,
            (OptimizerArg::Adam, None) => OptimizerKind::Adam,
        },
        lr: a.lr,
        weight_decay: weight_decay.unwrap_or(0.0),
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
        .with_standardize(image.is_none() && !a.no_standardize)
        .with_dequantize(image.map(|i| i.pixel_levels));
    cfg.validate()
        .map_err(|e| Failure::from(format!("invalid settings: {e}")))?;
    Ok(cfg)
}

/// Training rows, with what an image file or data set records about them.
struct TrainingData {
    data: Dataset,
    /// The images' shape, if the file records it.
    dims: Option<ImageDims>,
    /// The data set's pixel levels, if it has its own.
    levels: Option<u32>,
}

/// The training data, its last `context_dim` columns split off as the context. An
/// image flow's files are read as images (`.npy` and IDX record their shape).
fn training_data(
    a: &TrainArgs,
    seed: u64,
    context_dim: usize,
    images: bool,
) -> Result<TrainingData, Failure> {
    let plain = |data| TrainingData {
        data,
        dims: None,
        levels: None,
    };
    if a.data == "digits" {
        if context_dim > 0 || a.with_labels {
            return Err("digits train an unconditional image flow".into());
        }
        return Ok(TrainingData {
            data: digits_split(SplitArg::Train),
            dims: Some(ImageDims {
                channels: 1,
                height: 8,
                width: 8,
            }),
            levels: Some(DIGITS_LEVELS),
        });
    }
    let data = if let Some(toy) = Toy::from_name(&a.data) {
        positive("n", a.n)?;
        if a.with_labels {
            if context_dim == 0 {
                return Err("--with-labels gives each point its label as a condition: train a conditional flow with --context-dim 1".into());
            }
            generate_labeled(toy, a.n, a.noise, seed)?
        } else {
            generate(toy, a.n, a.noise, seed)?
        }
    } else {
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
        if a.with_labels {
            return Err(
                "--with-labels labels a built-in data set; a file brings its own columns".into(),
            );
        }
        if images {
            let images = load_images(path)?;
            return Ok(TrainingData {
                data: images.data,
                dims: images.dims,
                levels: None,
            });
        }
        load_path(path)?
    };
    Ok(plain(data.split_context(context_dim, &a.data)?))
}

pub fn run(a: TrainArgs) -> CmdResult {
    check_writable(&a.out)?;
    if let Some(m) = &a.metrics {
        check_writable(m)?;
    }
    if let Some(0) = a.checkpoint_every {
        return Err("--checkpoint-every must be at least 1".into());
    }
    let device = device(&a.device)?;
    let resume = a
        .resume
        .as_deref()
        .map(|p| TrainCheckpoint::load(p, &Registry::builtin()))
        .transpose()?;
    let seed = resume.as_ref().map_or(a.seed, |r| r.config.seed);
    let context_dim = resume
        .as_ref()
        .map_or(a.context_dim, |r| r.config.model.context_dim);
    let resumed_image = resume.as_ref().and_then(|r| r.config.model.image_info());
    let images = resumed_image.is_some() || (resume.is_none() && image_flow(a.flow));
    let train = training_data(&a, seed, context_dim, images)?;
    let cfg = match &resume {
        Some(r) => TrainConfig {
            duration: duration(&a)?.unwrap_or(r.config.duration),
            ..r.config.clone()
        },
        None => {
            let image = image_info(&a, &train)?;
            config(&a, train.data.dim, context_dim, image)?
        }
    };
    let train = train.data;
    let val = a
        .val
        .as_deref()
        .map(|p| -> Result<Dataset, Failure> {
            if images {
                return Ok(load_images(p)?.data);
            }
            Ok(load_path(p)?.split_context(context_dim, &p.display().to_string())?)
        })
        .transpose()?;
    if let Some(v) = &val {
        if v.dim != train.dim {
            return Err(format!(
                "--val has {} features per row, the training data {}",
                v.dim, train.dim
            )
            .into());
        }
    }
    let cfg = TrainConfig {
        model: crate::columns::recorded(cfg.model, &a.data)?,
        ..cfg
    };
    let trainer = Trainer::new(cfg, &device)?;
    if let (Some(r), Some(path)) = (&resume, &a.resume) {
        trainer
            .check_resume(r, &train)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }

    let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
    if std::io::stderr().is_terminal() {
        reporters.push(Box::new(BarReporter::default()));
    } else {
        reporters.push(Box::new(PlainReporter::new(std::io::stderr(), 100)));
    }
    if let Some(m) = &a.metrics {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resume.is_some())
            .truncate(resume.is_none())
            .open(m)
            .map_err(|e| format!("{}: {e}", m.display()))?;
        reporters.push(Box::new(JsonlReporter::new(std::io::BufWriter::new(f))));
    }
    match &resume {
        Some(r) => eprintln!(
            "resuming at step {} of {}",
            r.state.step,
            trainer.total_steps(train.len())
        ),
        None => eprintln!(
            "training on {} samples of {} features for {} steps",
            train.len(),
            train.dim,
            trainer.total_steps(train.len())
        ),
    }
    // Set by the first SIGINT/SIGTERM: training stops after the current step and saves.
    let stop = signals::stop_at_safe_point();
    let out = a.out.clone();
    let mut save_periodic = |ck: &TrainCheckpoint| ck.save(&out, None);
    let control = Control {
        checkpoint_every: a.checkpoint_every,
        on_checkpoint: Some(&mut save_periodic),
        stop: Some(stop),
        stop_at: a.stop_at,
        skip_nonfinite: a.skip_nonfinite,
        resume,
    };
    let trained = trainer.fit_with(&train, val.as_ref(), &mut reporters, control)?;
    drop(reporters);

    // The model, with everything needed to continue the run.
    let s = &trained.summary;
    trained.checkpoint.save(&a.out, Some(s))?;
    if s.interrupted {
        let msg = format!(
            "stopped after step {} of {}; saved a resumable checkpoint to {} (continue with --resume {})",
            s.steps,
            s.total_steps,
            a.out.display(),
            a.out.display()
        );
        eprintln!("{msg}");
        if stop.load(Ordering::SeqCst) {
            // Interrupted by a signal: the conventional status, nothing more to say.
            return Err(Failure {
                message: String::new(),
                code: signals::INTERRUPTED,
            });
        }
        return Ok(());
    }

    let mut line = format!(
        "trained {} steps in {:.1}s ({:.1} steps/s), last batch NLL {:.4}",
        s.steps, s.elapsed_secs, s.steps_per_sec, s.final_loss
    );
    if let (Some(v), Some(at)) = (s.best_val_nll, s.best_step) {
        line.push_str(&format!(", best validation NLL {v:.4} nats (step {at})"));
    }
    if s.skipped > 0 {
        line.push_str(&format!(", {} non-finite batches skipped", s.skipped));
    }
    if let Some(mib) = peak_memory_mib() {
        line.push_str(&format!(", peak memory {mib:.0} MiB"));
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
