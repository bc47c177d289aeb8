use std::{f64::consts::LN_2, io::IsTerminal, path::Path, sync::atomic::Ordering};

use flow_core::{
    image::DEFAULT_PIXEL_LEVELS,
    limits::{check_count, check_positive, MAX_ROWS, MAX_SAMPLES},
    ImageInfo, ImageShape,
};
use flow_models::{options, BoundsBy, Family, Registry};
use flow_train::val_every_for;
use flow_train::{
    data::{
        check_pixels, check_rows_left, generate, generate_labeled, held_out_rows, load_path,
        load_pixel_images, Dataset, ImageDims, StreamSource, Toy, DEFAULT_CHUNK_ROWS,
        DIGITS_LEVELS,
    },
    fit_best_of, Candidate, Control, Duration, JsonlReporter, LowMemory, PlainReporter, Report,
    Reporter, TrainCheckpoint, TrainConfig, TrainSummary, Trainer, DEFAULT_DTYPE,
};

use crate::{
    cli::{SplitArg, TrainArgs},
    commands::{data::digits_split, device, peak_memory_mib},
    output::{check_distinct, check_writable, Format},
    progress::BarReporter,
    signals, CmdResult, Failure,
};

mod distributed;
mod recipe;
mod run_flags;

use recipe::model_options;
use run_flags::RunFlag;

/// Points a built-in 2-D data set has unless `--n` says otherwise.
pub const DEFAULT_POINTS: usize = 20_000;

/// A help line's defaults: `base`, then each built-in family's own, where `own` gives
/// one.
fn defaults_with_families(base: String, own: impl Fn(&Family) -> Option<String>) -> String {
    std::iter::once(base)
        .chain(Registry::builtin().model_families().iter().filter_map(own))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `--weight-decay`'s defaults, for its help line: 0, and the families' own.
pub fn weight_decay_defaults() -> String {
    defaults_with_families("0".into(), |f| {
        (f.weight_decay() > 0.0).then(|| format!("{} for {}", f.weight_decay(), f.name()))
    })
}

/// `--batch`'s defaults, for its help line: the trainer's, the families' own, and how a
/// conditional model's follows its training rows.
pub fn batch_defaults() -> String {
    let own = defaults_with_families(TrainConfig::default().batch_size.to_string(), |f| {
        Some(format!("{} for {}", f.batch()?, f.name()))
    });
    format!(
        "{own}; for a conditional model (--context-dim), halved until an epoch of its training rows holds two batches, not below {}",
        flow_train::CONDITIONAL_MIN_BATCH
    )
}

/// `--lr`'s defaults, for its help line: the trainer's, and the families' own for a
/// conditional model.
pub fn lr_defaults() -> String {
    defaults_with_families(flow_train::OptimizerConfig::default().lr.to_string(), |f| {
        Some(format!(
            "for a conditional {}, {}",
            f.name(),
            f.conditional_lr()?.describe()
        ))
    })
}

/// `--lr-decay`'s defaults, for its help line: the default schedule's (the
/// exponential one, that of `--schedule exp`), and the families' own for a conditional
/// model.
pub fn lr_decay_defaults() -> String {
    defaults_with_families(default_lr_decay().to_string(), |f| {
        f.conditional_lr()
            .map(|_| format!("for a conditional {}, 1 − its learning rate", f.name()))
    })
}

/// The decay of the default schedule, the exponential one; that of `--schedule exp`.
pub fn default_lr_decay() -> f64 {
    flow_train::recipe::default_lr_decay()
}

/// The length of a run unless `--steps` or `--epochs` say, for `--help`.
pub fn default_duration() -> String {
    let run = match TrainConfig::default().duration {
        Duration::Steps(s) => format!("{s}"),
        Duration::Epochs(e) => format!("{e} epochs"),
    };
    format!(
        "{run}; for a conditional model (--context-dim) {}, or {} epochs where more, the default learning-rate decay then stretched to match",
        flow_train::CONDITIONAL_STEPS,
        flow_train::CONDITIONAL_EPOCHS
    )
}

/// Early stopping's patience unless `--patience` says, for `--help`.
pub fn default_patience() -> String {
    match TrainConfig::default().patience {
        Some(p) => format!("{p}"),
        None => "0".into(),
    }
}

/// `--{flag} v`, checked to lie in `[min, max]` before anything of that size is made.
fn count(flag: &str, v: usize, min: usize, max: usize) -> Result<usize, Failure> {
    Ok(check_count(flag, v, min, max)?)
}

/// `--{flag} v`, checked to be positive and finite as the `f32` it becomes.
fn real(flag: &str, v: f64) -> Result<f64, Failure> {
    Ok(check_positive(flag, v)?)
}

/// The training run's length the flags give, if they give one.
fn duration(a: &TrainArgs) -> Result<Option<Duration>, Failure> {
    Ok(match (a.steps, a.epochs) {
        (_, Some(e)) => Some(Duration::Epochs(count("epochs", e, 1, usize::MAX)?)),
        (Some(s), None) => Some(Duration::Steps(count("steps", s, 1, usize::MAX)?)),
        (None, None) => None,
    })
}

/// The images an image flow trains on: their shape (from `--image`, else the file's)
/// and pixel levels (`--pixel-levels`, else the data set's, else the family's),
/// checked against the rows.
fn image_info(a: &TrainArgs, data: &TrainingData) -> Result<ImageInfo, Failure> {
    let info = image_shape(a, data.dims, data.levels, data.data.dim)?;
    check_pixels(&data.data, info.pixel_levels, &a.data)?;
    Ok(info)
}

/// [`image_info`] for rows of `dim` values in images of `dims` if recorded, with pixel
/// levels `levels` if the data set has its own; the pixels themselves unchecked.
fn image_shape(
    a: &TrainArgs,
    dims: Option<ImageDims>,
    levels: Option<u32>,
    dim: usize,
) -> Result<ImageInfo, Failure> {
    let recorded = dims.map(|d| ImageShape::new(d.channels, d.height, d.width));
    let shape = match (
        a.image.as_deref().map(options::image).transpose()?,
        recorded,
    ) {
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
                "an image flow needs the image shape: --image HxWxC ({} has {dim} values per row)",
                a.data
            )
            .into())
        }
    };
    if shape.dim() != dim {
        return Err(format!(
            "--image {}x{}x{} has {} values per image, but the rows of {} have {dim}",
            shape.height,
            shape.width,
            shape.channels,
            shape.dim(),
            a.data,
        )
        .into());
    }
    let pixel_levels = a.pixel_levels.or(levels).unwrap_or(DEFAULT_PIXEL_LEVELS);
    if pixel_levels < 2 {
        return Err(format!("--pixel-levels must be at least 2, got {pixel_levels}").into());
    }
    Ok(ImageInfo {
        shape,
        pixel_levels,
    })
}

/// The family `--flow` names, or the one that suits the data: Glow for the digits, an
/// image set, and RealNVP otherwise.
fn family(a: &TrainArgs) -> Result<Family, Failure> {
    if let Some(flow) = &a.flow {
        return Ok(flow.clone());
    }
    let name = if a.data == "digits" {
        "glow"
    } else {
        "realnvp"
    };
    Registry::builtin()
        .model_family(name)
        .ok_or_else(|| format!("this build has no `{name}` family: give --flow").into())
}

/// The training configuration the flags describe for a fresh run of `flow` on data of
/// `dim` features and `context_dim` context features (images: `image`). Every value
/// is the family's or [`TrainConfig`]'s default unless a flag gives it, and is checked
/// here, before any work starts.
fn config(
    a: &TrainArgs,
    flow: &Family,
    dim: usize,
    context_dim: usize,
    image: Option<ImageInfo>,
) -> Result<TrainConfig, Failure> {
    let seed = a.seed.unwrap_or(TrainConfig::default().seed);
    let model = model_options(a).model(flow, &a.data, dim, context_dim, image, seed)?;
    let standardize = model.standardize;
    let mut cfg = TrainConfig::new(model).with_standardize(standardize);
    flow_train::recipe::apply_family_defaults(&mut cfg, flow);
    if let Some(d) = duration(a)? {
        cfg.duration = d;
    }
    for flag in RunFlag::given(a)? {
        flag.apply(&mut cfg)?;
    }
    cfg.validate()
        .map_err(|e| Failure::from(format!("invalid settings: {e}")))?;
    Ok(cfg)
}

/// The settings of a resumed run. The checkpoint's settings stand, since its weights,
/// optimizer state and place in the data belong to them: a model or run flag may
/// repeat them, and one that would change them is refused. Only the length may change
/// (`--steps` or `--epochs`), and the saved run records the new one.
fn resumed_config(a: &TrainArgs, r: &TrainCheckpoint) -> Result<TrainConfig, Failure> {
    let was = &r.config;
    let refuse = |flag: &str| -> Failure {
        format!(
            "--{flag} would change the resumed run, which keeps its own settings; on --resume only --steps, --epochs, --stop-at, --checkpoint-every and --low-memory may change"
        )
        .into()
    };
    let recorded_flow = was.model.family();
    if a.flow.is_some() && a.flow != recorded_flow {
        return Err(refuse("flow"));
    }
    let options = model_options(a);
    if let Some(flow) = &recorded_flow {
        options.check_apply(flow)?;
    }
    if let Some(flag) = options.first_change(&was.model, was.seed)? {
        return Err(refuse(flag));
    }
    let recorded_image = was.model.image_info();
    let unchanged = [
        (
            "base",
            a.base
                .as_deref()
                .map(options::base)
                .transpose()?
                .is_none_or(|b| b == was.model.base),
        ),
        (
            "context-dim",
            a.context_dim.is_none_or(|c| c == was.model.context_dim),
        ),
        (
            "no-standardize",
            !(a.no_standardize && was.model.standardize),
        ),
        (
            "bounds",
            a.bounds
                .as_deref()
                .map(|b| options::bounds(b, was.model.dim))
                .transpose()?
                .is_none_or(|b| Some(b) == was.model.bounds),
        ),
        (
            "bounds-by",
            a.bounds_by
                .as_deref()
                .map(BoundsBy::parse)
                .transpose()?
                .is_none_or(|b| b == was.model.bounds_by),
        ),
        (
            "image",
            a.image
                .as_deref()
                .map(options::image)
                .transpose()?
                .is_none_or(|s| Some(s) == recorded_image.map(|i| i.shape)),
        ),
        (
            "pixel-levels",
            a.pixel_levels
                .is_none_or(|l| Some(l) == recorded_image.map(|i| i.pixel_levels)),
        ),
    ];
    if let Some((flag, _)) = unchanged.iter().find(|(_, same)| !same) {
        return Err(refuse(flag));
    }
    for flag in RunFlag::given(a)? {
        let mut asked = was.clone();
        flag.apply(&mut asked)?;
        if asked != *was {
            return Err(refuse(flag.name()));
        }
    }
    Ok(TrainConfig {
        duration: duration(a)?.unwrap_or(was.duration),
        ..was.clone()
    })
}

/// Training rows, with what an image file or data set records about them.
struct TrainingData {
    data: Dataset,
    /// The images' shape, if the file records it.
    dims: Option<ImageDims>,
    /// The data set's pixel levels, if it has its own.
    levels: Option<u32>,
}

/// The rows a run trains on: held in memory, or streamed from a file.
enum Rows {
    Held(TrainingData),
    Streamed(StreamSource),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Self::Held(t) => t.data.len(),
            Self::Streamed(s) => s.len(),
        }
    }

    /// Features per row.
    fn dim(&self) -> usize {
        match self {
            Self::Held(t) => t.data.dim,
            Self::Streamed(s) => s.dim(),
        }
    }
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
    if Toy::from_name(&a.data).is_none() && (a.n.is_some() || a.noise.is_some()) {
        let names: Vec<_> = Toy::ALL.iter().map(|t| t.name()).collect();
        return Err(format!(
            "--n and --noise apply to the built-in 2-D data sets ({}), not {}",
            names.join(", "),
            a.data
        )
        .into());
    }
    if a.data == "digits" {
        if context_dim > 0 || a.with_labels {
            return Err("digits train an unconditional image flow".into());
        }
        return Ok(TrainingData {
            data: digits_split(SplitArg::Train).into_pixels(),
            dims: Some(ImageDims {
                channels: 1,
                height: 8,
                width: 8,
            }),
            levels: Some(DIGITS_LEVELS),
        });
    }
    let data = if let Some(toy) = Toy::from_name(&a.data) {
        let n = count("n", a.n.unwrap_or(DEFAULT_POINTS), 1, MAX_SAMPLES)?;
        if a.with_labels {
            if context_dim == 0 {
                return Err("--with-labels gives each point its label as a condition: train a conditional flow with --context-dim 1".into());
            }
            generate_labeled(toy, n, a.noise, seed)?
        } else {
            generate(toy, n, a.noise, seed)?
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
            let images = load_pixel_images(path)?;
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

/// The file to stream the training rows from, when the run streams (`--stream`, or a
/// resumed run that streamed), opened with the run's chunk size; `None` otherwise.
fn stream_source(
    a: &TrainArgs,
    resume: Option<&TrainCheckpoint>,
    context_dim: usize,
    images: bool,
) -> Result<Option<StreamSource>, Failure> {
    let streamed = resume.map(|r| r.state.stream.map(|s| s.chunk_rows));
    let chunk = match (streamed, a.stream, a.stream_chunk) {
        (None, false, None) | (Some(None), false, None) => return Ok(None),
        (None, false, Some(_)) => {
            return Err(
                "--stream-chunk sets the chunk size of --stream, which was not given".into(),
            )
        }
        (Some(None), _, _) => {
            return Err(
                "--stream would change the resumed run, whose rows were held in memory".into(),
            )
        }
        (Some(Some(was)), _, Some(c)) if c != was => {
            return Err(format!(
                "--stream-chunk would change the resumed run, which streamed chunks of {was} rows"
            )
            .into())
        }
        (Some(Some(was)), _, _) => was,
        (None, true, c) => count("stream-chunk", c.unwrap_or(DEFAULT_CHUNK_ROWS), 1, MAX_ROWS)?,
    };
    if a.data == "digits" || Toy::from_name(&a.data).is_some() {
        return Err(format!(
            "--stream reads a data file (.npy or IDX); `{}` is a built-in data set",
            a.data
        )
        .into());
    }
    if a.n.is_some() || a.noise.is_some() || a.with_labels {
        return Err("--n, --noise and --with-labels apply to the built-in data sets, not to a streamed file".into());
    }
    if a.distributed.is_some() {
        return Err(
            "--stream trains in one process: it does not combine with --distributed".into(),
        );
    }
    Ok(Some(StreamSource::open(
        Path::new(&a.data),
        chunk,
        images,
        context_dim,
    )?))
}

/// Reports an image model's losses in the units `flow log-prob` reports: the
/// pixels' negative log-likelihood in nats per image, which is the dequantised
/// density's plus `D·ln L` (D values per image, L levels per value).
struct PixelUnits {
    inner: Vec<Box<dyn Reporter>>,
    offset: f64,
}

impl Reporter for PixelUnits {
    fn start(&mut self, total_steps: usize) {
        self.inner.start(total_steps);
    }
    fn report(&mut self, report: &Report) {
        let mut r = report.clone();
        r.loss += self.offset;
        r.val_nll = r.val_nll.map(|v| v + self.offset);
        self.inner.report(&r);
    }
    fn message(&mut self, message: &str) {
        self.inner.message(message);
    }
    fn finish(&mut self, summary: &TrainSummary) {
        self.inner.finish(summary);
    }
}

pub fn run(a: TrainArgs) -> CmdResult {
    Format::of(&a.out, "--out", &[Format::Safetensors])?;
    check_writable(&a.out)?;
    let data = Path::new(&a.data);
    let mut read = vec![("--data", data)];
    read.extend(a.val.as_deref().map(|v| ("--val", v)));
    check_distinct("--out", &a.out, &read)?;
    if let Some(m) = &a.metrics {
        Format::of(m, "--metrics", &[Format::Jsonl])?;
        check_writable(m)?;
        read.push(("--out", &a.out));
        check_distinct("--metrics", m, &read)?;
    }
    if let Some(0) = a.checkpoint_every {
        return Err("--checkpoint-every must be at least 1".into());
    }
    let backend = distributed::backend(&a)?;
    let device = distributed::device(&a, backend)?;
    // The other processes of a data-parallel run; rank 0 reports and saves.
    let replicas = backend
        .map(|b| distributed::join(&a, b, &device))
        .transpose()?;
    let lead = replicas.as_ref().is_none_or(|r| r.is_lead());
    let resume = a
        .resume
        .as_deref()
        .map(|p| TrainCheckpoint::load_on(p, &Registry::builtin(), DEFAULT_DTYPE, &device))
        .transpose()?;
    // A stop at or before where the run stands would train nothing.
    let stands_at = resume.as_ref().map_or(0, |r| r.state.step);
    if let Some(at) = a.stop_at.filter(|&at| at <= stands_at) {
        return Err(match &a.resume {
            Some(p) => format!(
                "--stop-at {at}: {} is at step {stands_at} already; give a later step",
                p.display()
            ),
            None => "--stop-at must be at least 1".into(),
        }
        .into());
    }
    let flow = family(&a)?;
    if resume.is_none() {
        model_options(&a).check_apply(&flow)?;
    }
    let seed = resume
        .as_ref()
        .map_or(a.seed.unwrap_or(TrainConfig::default().seed), |r| {
            r.config.seed
        });
    let context_dim = resume
        .as_ref()
        .map_or(a.context_dim.unwrap_or(0), |r| r.config.model.context_dim);
    let resumed_image = resume.as_ref().and_then(|r| r.config.model.image_info());
    let images = resumed_image.is_some() || (resume.is_none() && flow.is_image());
    let rows = match stream_source(&a, resume.as_ref(), context_dim, images)? {
        Some(source) => Rows::Streamed(source),
        None => Rows::Held(training_data(&a, seed, context_dim, images)?),
    };
    let cfg = match &resume {
        Some(r) => resumed_config(&a, r)?,
        None => {
            let image = match &rows {
                _ if !images => None,
                Rows::Held(t) => Some(image_info(&a, t)?),
                Rows::Streamed(s) => Some(image_shape(&a, s.dims(), None, s.dim())?),
            };
            config(&a, &flow, rows.dim(), context_dim, image)?
        }
    };
    let image = cfg.model.image_info();
    let val = a
        .val
        .as_deref()
        .map(|p| -> Result<Dataset, Failure> {
            if images {
                return Ok(load_pixel_images(p)?.data);
            }
            Ok(load_path(p)?.split_context(context_dim, &p.display().to_string())?)
        })
        .transpose()?;
    if let Some(v) = &val {
        if v.dim != rows.dim() {
            return Err(format!(
                "--val has {} features per row, the training data {}",
                v.dim,
                rows.dim()
            )
            .into());
        }
    }
    // A resumed run keeps the model it was written with, names and all, and its
    // validation schedule; a fresh one validates every epoch unless told otherwise.
    let cfg = match &resume {
        Some(_) => cfg,
        None => {
            // Streamed rows are never all in memory to hold some out: such a run
            // validates on --val only.
            let streamed = matches!(rows, Rows::Streamed(_));
            if streamed && a.val_fraction.is_some_and(|f| f > 0.0) {
                return Err(
                    "--val-fraction holds out rows held in memory; a run with --stream validates on --val"
                        .into(),
                );
            }
            let val_fraction = if streamed { 0.0 } else { cfg.val_fraction };
            let train_rows = match &val {
                Some(_) => rows.len(),
                None => {
                    check_rows_left(rows.len(), val_fraction)
                        .map_err(|e| format!("{}: {e}", a.data))?;
                    rows.len() - held_out_rows(rows.len(), val_fraction)
                }
            };
            let mut cfg = cfg;
            flow_train::recipe::fit_conditional_run(
                &mut cfg,
                train_rows,
                Some(&flow),
                flow_train::recipe::Given {
                    length: a.steps.is_some() || a.epochs.is_some(),
                    schedule: a.schedule.is_some() || a.lr_decay.is_some() || a.warmup.is_some(),
                    lr: a.lr.is_some(),
                    batch: a.batch.is_some(),
                },
            );
            let val_every = a
                .val_every
                .unwrap_or_else(|| val_every_for(train_rows, cfg.batch_size));
            TrainConfig {
                model: crate::columns::recorded(cfg.model, &a.data)?,
                val_every,
                val_fraction,
                ..cfg
            }
        }
    };
    // A fresh conditional run in one process, validated on rows held in memory, also
    // trains the family's rival network where no option fixes the network.
    let validated = val.is_some() || cfg.val_fraction > 0.0;
    let rival = match (&resume, &replicas, &rows) {
        (None, None, Rows::Held(t)) if validated => model_options(&a)
            .rival(&flow, context_dim)
            .map(|options| -> Result<_, Failure> {
                let mut model =
                    options.model(&flow, &a.data, t.data.dim, context_dim, image, seed)?;
                model.columns = cfg.model.columns.clone();
                Ok((
                    flow.conditional_rival_flags(),
                    TrainConfig {
                        model,
                        ..cfg.clone()
                    },
                ))
            })
            .transpose()?,
        _ => None,
    };
    let with_memory = |trainer: Trainer| -> Result<Trainer, Failure> {
        Ok(match a.low_memory {
            true => trainer.with_low_memory(LowMemory::new())?,
            false => trainer,
        })
    };
    let trainer = with_memory(Trainer::new(cfg, &device)?)?;
    let candidates = match rival {
        Some((label, cfg)) => vec![
            Candidate::new(format!("the {} defaults", flow.name()), trainer.clone()),
            Candidate::new(label, with_memory(Trainer::new(cfg, &device)?)?),
        ],
        None => Vec::new(),
    };
    if let (Some(r), Some(path), Rows::Held(t)) = (&resume, &a.resume, &rows) {
        trainer
            .check_resume(r, &t.data, val.as_ref())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Rows::Held(t) = &rows {
        for warning in trainer.data_warnings(&t.data, &a.data)? {
            if lead {
                eprintln!("warning: {warning}");
            }
        }
    }

    let mut reporters: Vec<Box<dyn Reporter>> = Vec::new();
    if !lead {
        // Silent.
    } else if std::io::stderr().is_terminal() {
        reporters.push(Box::new(BarReporter::default()));
    } else {
        reporters.push(Box::new(PlainReporter::new(std::io::stderr(), 100)));
    }
    if let (true, Some(m)) = (lead, &a.metrics) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resume.is_some())
            .truncate(resume.is_none())
            .open(m)
            .map_err(|e| format!("{}: {e}", m.display()))?;
        reporters.push(Box::new(JsonlReporter::new(std::io::BufWriter::new(f))));
    }
    // An image model's losses in `flow log-prob`'s units; 0 for other models.
    let offset = image.map_or(0.0, |i| {
        i.shape.dim() as f64 * f64::from(i.pixel_levels).ln()
    });
    let mut reporter = PixelUnits {
        inner: reporters,
        offset,
    };
    let start_step = resume.as_ref().map_or(0, |r| r.state.step);
    match &resume {
        _ if !lead => {}
        Some(r) => eprintln!(
            "resuming at step {} of {}",
            r.state.step,
            trainer.total_steps(rows.len())
        ),
        None => {
            let cfg = trainer.config();
            let held = match val {
                Some(_) => 0,
                None => held_out_rows(rows.len(), cfg.val_fraction),
            };
            let validation = match (&val, held) {
                (Some(v), _) => format!(", validating on {} rows of --val", v.len()),
                (None, 0) => ", without validation".to_string(),
                (None, h) => format!(
                    ", {h} held out to validate on (--val-fraction {}, seed {})",
                    cfg.val_fraction, cfg.seed
                ),
            };
            let stops = match (held > 0 || val.is_some(), cfg.patience) {
                (true, Some(p)) => format!(
                    ", stopping after {p} validation scores without improvement (one every {} steps)",
                    cfg.val_every
                ),
                _ => String::new(),
            };
            eprintln!(
                "training {} on {} samples of {} features in batches of {}{validation}, for at most {} steps{stops}",
                cfg.model.family().map_or("a flow", |f| f.name()),
                rows.len() - held,
                rows.dim(),
                cfg.batch_size,
                trainer.total_steps(rows.len() - held)
            );
            if let [_, rivals @ ..] = &candidates[..] {
                for r in rivals {
                    eprintln!(
                        "training {} beside it on the same batches, to keep whichever validates better",
                        r.label
                    );
                }
            }
        }
    }
    if let (true, Some(i)) = (lead, image) {
        eprintln!(
            "losses are the pixels' NLL in nats per image, as flow log-prob reports: the dequantised density's NLL + {}·ln {} ({offset:.2})",
            i.shape.dim(),
            i.pixel_levels
        );
    }
    // Set by the first SIGINT/SIGTERM: training stops after the current step and saves.
    let stop = signals::stop_at_safe_point();
    let out = a.out.clone();
    let mut save_periodic = |ck: &TrainCheckpoint| ck.save(&out, None);
    let in_collectives = replicas.clone();
    let control = Control {
        checkpoint_every: a.checkpoint_every,
        on_checkpoint: lead.then_some(&mut save_periodic as _),
        stop: Some(stop),
        stop_at: a.stop_at,
        skip_nonfinite: a.skip_nonfinite,
        resume,
        replicas,
    };
    let trained = match &rows {
        Rows::Held(t) if !candidates.is_empty() => {
            fit_best_of(&candidates, &t.data, val.as_ref(), &mut reporter, control)
        }
        Rows::Held(t) => trainer.fit_with(&t.data, val.as_ref(), &mut reporter, control),
        Rows::Streamed(s) => trainer.fit_stream(s, val.as_ref(), &mut reporter, control),
    };
    let trained = match trained {
        Err(e) if in_collectives.is_some() => distributed::abandon(e.into()),
        trained => trained?,
    };
    drop(reporter);
    if !lead {
        let signalled = stop.load(Ordering::SeqCst);
        return distributed::follower_exit(&trained.summary, start_step, signalled);
    }

    let s = &trained.summary;
    if s.kept_step == Some(start_step) {
        // The weights kept are those the run began with: nothing worth writing.
        let reason = s.stopped.as_deref().unwrap_or("a non-finite step");
        let reason = reason.split(';').next().unwrap_or(reason);
        return Err(Failure {
            message: format!(
                "training failed: {reason}, and no step before it trained finite weights; {} was not written (a lower --lr or a --clip-grad may help)",
                a.out.display()
            ),
            code: 1,
        });
    }
    // The model, with everything needed to continue the run.
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

    let bits = |nll: f64| match image {
        Some(i) => format!(" ({:.4} bits/dim)", nll / (i.shape.dim() as f64 * LN_2)),
        None => String::new(),
    };
    let final_loss = s.final_loss + offset;
    let mut line = format!(
        "trained {} steps in {:.1}s ({:.1} steps/s)",
        s.steps, s.elapsed_secs, s.steps_per_sec
    );
    if let Some(rate) = s.training_steps_per_sec {
        line.push_str(&format!(
            ", {:.2}s of it validating ({rate:.1} steps/s without)",
            s.validation_secs
        ));
    }
    line.push_str(&format!(
        ", last batch NLL {final_loss:.4} nats{}",
        bits(final_loss)
    ));
    if let (Some(v), Some(at)) = (s.best_val_nll, s.best_step) {
        let v = v + offset;
        line.push_str(&format!(
            ", best validation NLL {v:.4} nats{} (step {at})",
            bits(v)
        ));
    }
    if s.skipped > 0 {
        line.push_str(&format!(", {} non-finite batches skipped", s.skipped));
    }
    if let Some(r) = &s.low_memory {
        line.push_str(&format!(
            ", low memory: largest reconstruction error {:.1e}, activations kept for {} of {} layers",
            r.max_error,
            r.kept.len(),
            r.layers
        ));
    }
    if let Some(r) = &in_collectives {
        line.push_str(&format!(
            ", {} process{}, {:.2}s of rank 0's in collectives",
            r.world(),
            if r.world() == 1 { "" } else { "es" },
            r.collective_secs()
        ));
    }
    if let Some(mib) = peak_memory_mib() {
        line.push_str(&format!(", peak memory {mib:.0} MiB"));
    }
    eprintln!("{line}");
    eprintln!("stopped: {}", s.ending());
    eprintln!("saved {}: {}", a.out.display(), s.weights_kept());
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
