use std::{
    f64::consts::LN_2,
    io::IsTerminal,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use flow_core::limits::{
    MAX_BINS, MAX_CHANNELS, MAX_COMPONENTS, MAX_DIM, MAX_HIDDEN, MAX_LAYERS, MAX_ROWS,
};
use flow_glow::{GlowConfig, ImageInfo, ImageShape, RealNvpImageConfig};
use flow_maf::MafConfig;
use flow_models::{BaseConfig, ModelConfig, Registry};
use flow_nn::{Activation, Order};
use flow_nsf::{NsfConfig, NsfKind};
use flow_realnvp::{CouplingKind, Nets, RealNvpConfig, ScaleMap};
use flow_train::{
    data::{
        check_pixels, generate, generate_labeled, load_images, load_path, Dataset, ImageDims, Toy,
        DIGITS_LEVELS,
    },
    positive_f32, Control, Duration, JsonlReporter, OptimizerKind, PlainReporter, Report, Reporter,
    Schedule, TrainCheckpoint, TrainConfig, TrainSummary, Trainer,
};

use crate::{
    cli::{
        listed, CouplingArg, FlowArg, NetsArg, OptimizerArg, OrderArg, ScaleArg, ScheduleArg,
        SplitArg, TrainArgs,
    },
    commands::{data::digits_split, device, peak_memory_mib},
    output::check_writable,
    progress::BarReporter,
    CmdResult, Failure,
};

/// Points a built-in 2-D data set has unless `--n` says otherwise.
pub const DEFAULT_POINTS: usize = 20_000;

/// Glow's default weight decay (decoupled, with Adam).
const GLOW_WEIGHT_DECAY: f64 = 0.1;

/// `--weight-decay`'s defaults, for its help line.
pub fn weight_decay_defaults() -> String {
    format!("0; {GLOW_WEIGHT_DECAY} for glow")
}

/// The decay of the default schedule, the exponential one; that of `--schedule exp`.
pub fn default_lr_decay() -> f64 {
    match Schedule::default() {
        Schedule::Exp { decay } => decay,
        _ => 1.0,
    }
}

/// The length of a run unless `--steps` or `--epochs` say, for `--help`.
pub fn default_duration() -> String {
    match TrainConfig::default().duration {
        Duration::Steps(s) => format!("{s}"),
        Duration::Epochs(e) => format!("{e} epochs"),
    }
}

/// `--{flag} v`, checked to lie in `[min, max]` before anything of that size is made.
fn count(flag: &str, v: usize, min: usize, max: usize) -> Result<usize, Failure> {
    if v < min {
        return Err(format!("--{flag} must be at least {min}, got {v}").into());
    }
    if v > max {
        return Err(format!("--{flag} {v} is more than the largest allowed, {max}").into());
    }
    Ok(v)
}

/// `--{flag} v`, checked to be positive and finite as the `f32` it becomes.
fn real(flag: &str, v: f64) -> Result<f64, Failure> {
    if !positive_f32(v) {
        let v = if v.abs() >= 1e6 {
            format!("{v:e}")
        } else {
            v.to_string()
        };
        return Err(format!(
            "--{flag} must be positive and finite in f32 (below {:e}), got {v}",
            f32::MAX
        )
        .into());
    }
    Ok(v)
}

/// The base distribution `--base` names.
fn base(text: &str) -> Result<BaseConfig, Failure> {
    match text.trim() {
        "normal" => Ok(BaseConfig::StandardNormal),
        "diag" => Ok(BaseConfig::DiagNormal { trainable: true }),
        other => match other.strip_prefix("mixture:").map(str::parse::<usize>) {
            Some(Ok(0)) => Err("--base mixture:K needs at least 1 component".into()),
            Some(Ok(k)) if k > MAX_COMPONENTS => Err(format!(
                "--base mixture:{k}: more components than the largest allowed, {MAX_COMPONENTS}"
            )
            .into()),
            Some(Ok(k)) => Ok(BaseConfig::Mixture { components: k }),
            _ => Err(format!("--base `{other}`: expected normal, diag or mixture:K").into()),
        },
    }
}

/// The training run's length the flags give, if they give one.
fn duration(a: &TrainArgs) -> Result<Option<Duration>, Failure> {
    Ok(match (a.steps, a.epochs) {
        (_, Some(e)) => Some(Duration::Epochs(count("epochs", e, 1, usize::MAX)?)),
        (Some(s), None) => Some(Duration::Steps(count("steps", s, 1, usize::MAX)?)),
        (None, None) => None,
    })
}

/// `--image HxWxC`, its size computed without overflow and bounded.
fn parse_image(text: &str) -> Result<ImageShape, Failure> {
    let parts: Vec<usize> = text
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("--image `{text}`: expected HxWxC, e.g. 28x28x1"))?;
    let [h, w, c] = parts[..] else {
        return Err(format!("--image `{text}`: expected HxWxC, e.g. 28x28x1").into());
    };
    if h == 0 || w == 0 || c == 0 {
        return Err(
            format!("--image `{text}`: expected HxWxC with each at least 1, e.g. 28x28x1").into(),
        );
    }
    match h.checked_mul(w).and_then(|p| p.checked_mul(c)) {
        Some(d) if d <= MAX_DIM => Ok(ImageShape::new(c, h, w)),
        _ => Err(format!(
            "--image `{text}`: more values per image than the largest allowed, {MAX_DIM}"
        )
        .into()),
    }
}

/// The images an image flow trains on: their shape (from `--image`, else the file's)
/// and pixel levels (`--pixel-levels`, else the data set's, else the family's),
/// checked against the rows.
fn image_info(a: &TrainArgs, data: &TrainingData) -> Result<ImageInfo, Failure> {
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
    // Both image families default to 8-bit pixels.
    let pixel_levels = a
        .pixel_levels
        .or(data.levels)
        .unwrap_or(GlowConfig::default().pixel_levels);
    if pixel_levels < 2 {
        return Err(format!("--pixel-levels must be at least 2, got {pixel_levels}").into());
    }
    check_pixels(&data.data, pixel_levels, &a.data)?;
    Ok(ImageInfo {
        shape,
        pixel_levels,
    })
}

/// The clamp of the default log-scale bound, which `--scale` keeps when it changes
/// from a bound without one.
fn default_clamp() -> f64 {
    match ScaleMap::default() {
        ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => clamp,
        _ => 1.0,
    }
}

/// The value a model flag gives, as a family's configuration holds it.
#[derive(Debug, Clone, Copy)]
enum Value {
    Count(usize),
    Real(f64),
    Activation(Activation),
    Scale(ScaleArg),
    Order(Order),
    Coupling(CouplingKind),
    Nets(Nets),
}

/// The field of a family's configuration that a model flag sets.
enum Field<'a> {
    Count(&'a mut usize),
    Real(&'a mut f64),
    Activation(&'a mut Activation),
    Scale(&'a mut ScaleMap),
    Order(&'a mut Order),
    Coupling(&'a mut CouplingKind),
    Nets(&'a mut Nets),
}

impl Field<'_> {
    fn set(self, value: Value) -> Result<(), Failure> {
        match (self, value) {
            (Field::Count(f), Value::Count(v)) => *f = v,
            (Field::Real(f), Value::Real(v)) => *f = v,
            (Field::Activation(f), Value::Activation(v)) => *f = v,
            (Field::Scale(f), Value::Scale(v)) => {
                // A new kind of bound keeps the clamp the configuration had.
                let clamp = match *f {
                    ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => clamp,
                    _ => default_clamp(),
                };
                *f = match v {
                    ScaleArg::SoftClamp => ScaleMap::SoftClamp { clamp },
                    ScaleArg::Exp => ScaleMap::Exp,
                    ScaleArg::Tanh => ScaleMap::Tanh { clamp },
                };
            }
            (Field::Order(f), Value::Order(v)) => *f = v,
            (Field::Coupling(f), Value::Coupling(v)) => *f = v,
            (Field::Nets(f), Value::Nets(v)) => *f = v,
            _ => return Err("a flag's value does not fit the setting it names".into()),
        }
        Ok(())
    }

    /// The value, as `--help` shows a default.
    fn show(&self) -> String {
        match self {
            Field::Count(v) => v.to_string(),
            Field::Real(v) => v.to_string(),
            Field::Activation(v) => v.name().to_string(),
            Field::Scale(v) => match v {
                ScaleMap::SoftClamp { .. } => "soft-clamp".into(),
                ScaleMap::Exp => "exp".into(),
                ScaleMap::Tanh { .. } => "tanh".into(),
                other => format!("{other:?}").to_lowercase(),
            },
            Field::Order(Order::Alternate) => "alternate".into(),
            Field::Order(Order::Random { .. }) => "random".into(),
            Field::Coupling(CouplingKind::Affine) => "affine".into(),
            Field::Coupling(CouplingKind::Additive) => "additive".into(),
            Field::Nets(Nets::Separate) => "separate".into(),
            Field::Nets(Nets::Joint) => "joint".into(),
        }
    }
}

/// A family's configuration: what the model flags set.
#[derive(Debug, Clone, PartialEq)]
enum Recipe {
    RealNvp(RealNvpConfig),
    Nsf(NsfConfig),
    Maf(MafConfig),
    Glow(GlowConfig),
    RealNvpImage(RealNvpImageConfig),
}

impl Recipe {
    /// `flow`'s own defaults over `dim` features, or over the images `image` describes.
    fn defaults(flow: FlowArg, dim: usize, image: Option<ImageInfo>) -> Self {
        let shape = image.map_or(ImageShape::flat(dim), |i| i.shape);
        let levels = |default: u32| image.map_or(default, |i| i.pixel_levels);
        match flow {
            FlowArg::Realnvp => Self::RealNvp(RealNvpConfig::new(dim)),
            FlowArg::Nice => {
                Self::RealNvp(RealNvpConfig::new(dim).with_coupling(CouplingKind::Additive))
            }
            FlowArg::Nsf => Self::Nsf(NsfConfig::new(dim)),
            FlowArg::NsfAr => Self::Nsf(NsfConfig::new(dim).with_kind(NsfKind::Autoregressive)),
            FlowArg::Maf => Self::Maf(MafConfig::new(dim)),
            FlowArg::Iaf => Self::Maf(MafConfig::new(dim).with_inverse(true)),
            FlowArg::Glow => {
                let c = GlowConfig::small(shape);
                let l = levels(c.pixel_levels);
                Self::Glow(c.with_pixel_levels(l))
            }
            FlowArg::RealnvpImage => {
                let c = RealNvpImageConfig::small(shape);
                let l = levels(c.pixel_levels);
                Self::RealNvpImage(c.with_pixel_levels(l))
            }
        }
    }

    /// The family and configuration a model was generated from, read from its recipe.
    fn of(model: &ModelConfig) -> Option<(FlowArg, Self)> {
        use clap::ValueEnum;
        let recipe = model.recipe.clone()?;
        let family = recipe.get("family")?.as_str()?;
        let flow = FlowArg::from_str(family, false).ok()?;
        let parsed = match flow {
            FlowArg::Realnvp | FlowArg::Nice => Self::RealNvp(serde_json::from_value(recipe).ok()?),
            FlowArg::Nsf | FlowArg::NsfAr => Self::Nsf(serde_json::from_value(recipe).ok()?),
            FlowArg::Maf | FlowArg::Iaf => Self::Maf(serde_json::from_value(recipe).ok()?),
            FlowArg::Glow => Self::Glow(serde_json::from_value(recipe).ok()?),
            FlowArg::RealnvpImage => Self::RealNvpImage(serde_json::from_value(recipe).ok()?),
        };
        Some((flow, parsed))
    }

    /// The setting `--{flag}` gives. The table in [`FlowArg::takes`] has refused the
    /// flags a family does not take before this is asked.
    fn field(&mut self, flag: &str) -> Result<Field<'_>, Failure> {
        use Recipe as R;
        Ok(match (self, flag) {
            (R::RealNvp(c), "layers") => Field::Count(&mut c.layers),
            (R::Nsf(c), "layers") => Field::Count(&mut c.layers),
            (R::Maf(c), "layers") => Field::Count(&mut c.layers),
            (R::RealNvp(c), "hidden") => Field::Count(&mut c.hidden),
            (R::Nsf(c), "hidden") => Field::Count(&mut c.hidden),
            (R::Maf(c), "hidden") => Field::Count(&mut c.hidden),
            (R::RealNvp(c), "hidden-layers") => Field::Count(&mut c.hidden_layers),
            (R::Nsf(c), "hidden-layers") => Field::Count(&mut c.hidden_layers),
            (R::Maf(c), "hidden-layers") => Field::Count(&mut c.hidden_layers),
            (R::RealNvp(c), "activation") => Field::Activation(&mut c.activation),
            (R::Nsf(c), "activation") => Field::Activation(&mut c.activation),
            (R::Maf(c), "activation") => Field::Activation(&mut c.activation),
            (R::Glow(c), "activation") => Field::Activation(&mut c.activation),
            (R::RealNvpImage(c), "activation") => Field::Activation(&mut c.activation),
            (R::Nsf(c), "bins") => Field::Count(&mut c.spline.bins),
            (R::Nsf(c), "tail-bound") => Field::Real(&mut c.spline.bound),
            (R::Nsf(c), "order") => Field::Order(&mut c.order),
            (R::Maf(c), "order") => Field::Order(&mut c.order),
            (R::RealNvp(c), "coupling") => Field::Coupling(&mut c.coupling),
            (R::RealNvp(c), "scale") => Field::Scale(&mut c.scale),
            (R::Maf(c), "scale") => Field::Scale(&mut c.scale),
            (
                R::RealNvp(RealNvpConfig { scale, .. }) | R::Maf(MafConfig { scale, .. }),
                "clamp",
            ) => match scale {
                ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => Field::Real(clamp),
                _ => {
                    return Err(
                        "--clamp bounds the soft-clamp and tanh scales, not --scale exp".into(),
                    )
                }
            },
            (R::RealNvp(c), "nets") => Field::Nets(&mut c.nets),
            (R::Glow(c), "scales") => Field::Count(&mut c.levels),
            (R::RealNvpImage(c), "scales") => Field::Count(&mut c.scales),
            (R::Glow(c), "depth") => Field::Count(&mut c.depth),
            (R::Glow(c), "channels") => Field::Count(&mut c.hidden_channels),
            (R::RealNvpImage(c), "channels") => Field::Count(&mut c.hidden_channels),
            (_, flag) => return Err(format!("--{flag} does not apply to this model").into()),
        })
    }

    /// The model, conditioned on `context_dim` features.
    fn model(&self, context_dim: usize) -> ModelConfig {
        match self {
            Self::RealNvp(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Nsf(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Maf(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Glow(c) => ModelConfig::glow(c),
            Self::RealNvpImage(c) => ModelConfig::realnvp_image(c),
        }
    }

    /// Checks what the model flags set, naming the flag at fault.
    fn check(&self) -> Result<(), Failure> {
        let (hidden, dim) = match self {
            Self::Nsf(c) if c.kind == NsfKind::Autoregressive => (c.hidden, c.dim),
            Self::Maf(c) => (c.hidden, c.dim),
            _ => (usize::MAX, 0),
        };
        if hidden < dim {
            return Err(format!(
                "--hidden {hidden}: an autoregressive network over {dim} features needs at least {dim} hidden units"
            )
            .into());
        }
        let scales = |e: String, scales: usize, s: ImageShape| -> Failure {
            format!(
                "--scales {scales} on {}x{}x{} images: {e}",
                s.height, s.width, s.channels
            )
            .into()
        };
        match self {
            Self::Nsf(c) => c.spline.check().map_err(|e| {
                let flag = if e.contains("tail bound") {
                    "--tail-bound"
                } else {
                    "--bins"
                };
                Failure::from(format!("{flag}: {e}"))
            }),
            Self::Glow(c) => c.validate().map_err(|e| scales(e, c.levels, c.shape)),
            Self::RealNvpImage(c) => c.validate().map_err(|e| scales(e, c.scales, c.shape)),
            _ => Ok(()),
        }
    }
}

/// Each family's default for the model flag `--{flag}`, with the families it is the
/// default of, as the families' configurations define them (for `--help`).
pub fn family_defaults(flag: &str) -> Vec<(String, Vec<FlowArg>)> {
    let mut defaults: Vec<(String, Vec<FlowArg>)> = Vec::new();
    for &flow in FlowArg::taking(flag) {
        let mut recipe = Recipe::defaults(flow, 2, None);
        let Ok(field) = recipe.field(flag) else {
            continue;
        };
        let value = field.show();
        match defaults.iter_mut().find(|(v, _)| *v == value) {
            Some((_, families)) => families.push(flow),
            None => defaults.push((value, vec![flow])),
        }
    }
    defaults
}

/// The model flags `a` gives, by the names the table lists.
fn given_model_flags(a: &TrainArgs) -> Vec<&'static str> {
    [
        ("layers", a.layers.is_some()),
        ("hidden", a.hidden.is_some()),
        ("hidden-layers", a.hidden_layers.is_some()),
        ("activation", a.activation.is_some()),
        ("bins", a.bins.is_some()),
        ("tail-bound", a.tail_bound.is_some()),
        ("order", a.order.is_some()),
        ("coupling", a.coupling.is_some()),
        ("scale", a.scale.is_some()),
        ("clamp", a.clamp.is_some()),
        ("nets", a.nets.is_some()),
        ("base", a.base.is_some()),
        ("context-dim", a.context_dim.is_some()),
        ("no-standardize", a.no_standardize),
        ("image", a.image.is_some()),
        ("pixel-levels", a.pixel_levels.is_some()),
        ("scales", a.scales.is_some()),
        ("depth", a.depth.is_some()),
        ("channels", a.channels.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect()
}

/// Refuses the model flags `flow` does not take, naming the families that do.
fn check_flags_apply(a: &TrainArgs, flow: FlowArg) -> Result<(), Failure> {
    match given_model_flags(a).into_iter().find(|f| !flow.takes(f)) {
        Some(flag) => Err(format!(
            "--{flag} applies to {}, not {}",
            listed(FlowArg::taking(flag)),
            flow.name()
        )
        .into()),
        None => Ok(()),
    }
}

/// The values of the model flags `a` gives that a family's configuration holds, each
/// bounded, in the order they apply (`--scale` before `--clamp`). `seed` seeds a
/// random `--order`.
fn recipe_values(a: &TrainArgs, seed: u64) -> Result<Vec<(&'static str, Value)>, Failure> {
    let counts = [
        ("layers", a.layers, 1, MAX_LAYERS),
        ("hidden", a.hidden, 1, MAX_HIDDEN),
        ("hidden-layers", a.hidden_layers, 0, MAX_LAYERS),
        ("bins", a.bins, 1, MAX_BINS),
        ("scales", a.scales, 1, MAX_LAYERS),
        ("depth", a.depth, 1, MAX_LAYERS),
        ("channels", a.channels, 1, MAX_CHANNELS),
    ];
    let mut values = Vec::new();
    for (flag, v, min, max) in counts {
        if let Some(v) = v {
            values.push((flag, Value::Count(count(flag, v, min, max)?)));
        }
    }
    if let Some(b) = a.tail_bound {
        values.push(("tail-bound", Value::Real(real("tail-bound", b)?)));
    }
    if let Some(v) = a.activation {
        values.push(("activation", Value::Activation(v)));
    }
    if let Some(o) = a.order {
        let order = match o {
            OrderArg::Alternate => Order::Alternate,
            OrderArg::Random => Order::Random { seed },
        };
        values.push(("order", Value::Order(order)));
    }
    if let Some(c) = a.coupling {
        let kind = match c {
            CouplingArg::Affine => CouplingKind::Affine,
            CouplingArg::Additive => CouplingKind::Additive,
        };
        values.push(("coupling", Value::Coupling(kind)));
    }
    if let Some(n) = a.nets {
        let nets = match n {
            NetsArg::Separate => Nets::Separate,
            NetsArg::Joint => Nets::Joint,
        };
        values.push(("nets", Value::Nets(nets)));
    }
    if let Some(s) = a.scale {
        values.push(("scale", Value::Scale(s)));
    }
    if let Some(c) = a.clamp {
        values.push(("clamp", Value::Real(real("clamp", c)?)));
    }
    Ok(values)
}

/// A flag that shapes the run rather than the model.
#[derive(Debug, Clone, Copy)]
enum RunFlag {
    Lr(f64),
    Batch(usize),
    Optimizer(OptimizerArg),
    WeightDecay(f64),
    Schedule(ScheduleArg),
    LrDecay(f64),
    Warmup(usize),
    ClipGrad(f64),
    Seed(u64),
    ValEvery(usize),
    Patience(usize),
}

impl RunFlag {
    /// The run flags `a` gives, in the order they apply (`--optimizer` before
    /// `--weight-decay`, `--schedule` before its parameters).
    fn given(a: &TrainArgs) -> Result<Vec<Self>, Failure> {
        if a.val.is_none() && (a.val_every.is_some() || a.patience.is_some()) {
            return Err("--val-every and --patience score a validation file: give --val".into());
        }
        let flags = [
            a.lr.map(Self::Lr),
            a.batch.map(Self::Batch),
            a.optimizer.map(Self::Optimizer),
            a.weight_decay.map(Self::WeightDecay),
            a.schedule.map(Self::Schedule),
            a.lr_decay.map(Self::LrDecay),
            a.warmup.map(Self::Warmup),
            a.clip_grad.map(Self::ClipGrad),
            a.seed.map(Self::Seed),
            a.val_every.map(Self::ValEvery),
            a.patience.map(Self::Patience),
        ];
        Ok(flags.into_iter().flatten().collect())
    }

    fn name(self) -> &'static str {
        match self {
            Self::Lr(_) => "lr",
            Self::Batch(_) => "batch",
            Self::Optimizer(_) => "optimizer",
            Self::WeightDecay(_) => "weight-decay",
            Self::Schedule(_) => "schedule",
            Self::LrDecay(_) => "lr-decay",
            Self::Warmup(_) => "warmup",
            Self::ClipGrad(_) => "clip-grad",
            Self::Seed(_) => "seed",
            Self::ValEvery(_) => "val-every",
            Self::Patience(_) => "patience",
        }
    }

    /// Sets what this flag gives in `cfg`, checked.
    fn apply(self, cfg: &mut TrainConfig) -> Result<(), Failure> {
        let o = &mut cfg.optimizer;
        match self {
            Self::Lr(v) => o.lr = real("lr", v)?,
            Self::Batch(v) => cfg.batch_size = count("batch", v, 1, MAX_ROWS)?,
            Self::Optimizer(OptimizerArg::Adamax) => o.kind = OptimizerKind::Adamax,
            Self::Optimizer(OptimizerArg::Adam) => {
                if o.kind == OptimizerKind::Adamax {
                    o.kind = if o.weight_decay > 0.0 {
                        OptimizerKind::AdamW
                    } else {
                        OptimizerKind::Adam
                    };
                }
            }
            Self::WeightDecay(w) => {
                if w != 0.0 {
                    real("weight-decay", w)?;
                }
                o.weight_decay = w;
                if o.kind == OptimizerKind::Adam {
                    o.kind = OptimizerKind::AdamW;
                }
            }
            Self::Schedule(kind) => {
                cfg.schedule = match (kind, cfg.schedule) {
                    (ScheduleArg::Constant, _) => Schedule::Constant,
                    (ScheduleArg::Exp, s @ Schedule::Exp { .. }) => s,
                    (ScheduleArg::Exp, _) => Schedule::Exp {
                        decay: default_lr_decay(),
                    },
                    (ScheduleArg::Cosine, s @ Schedule::Cosine { .. }) => s,
                    (ScheduleArg::Cosine, _) => Schedule::Cosine { warmup: 0 },
                }
            }
            Self::LrDecay(d) => match &mut cfg.schedule {
                Schedule::Exp { decay } => {
                    if real("lr-decay", d)? > 1.0 {
                        return Err(format!("--lr-decay must lie in (0, 1], got {d}").into());
                    }
                    *decay = d;
                }
                _ => return Err("--lr-decay applies to --schedule exp".into()),
            },
            Self::Warmup(w) => match &mut cfg.schedule {
                Schedule::Cosine { warmup } => *warmup = w,
                _ => return Err("--warmup applies to --schedule cosine".into()),
            },
            Self::ClipGrad(c) => cfg.clip_grad = Some(real("clip-grad", c)?),
            Self::Seed(s) => cfg.seed = s,
            Self::ValEvery(v) => cfg.val_every = count("val-every", v, 1, usize::MAX)?,
            Self::Patience(p) => cfg.patience = Some(p),
        }
        Ok(())
    }
}

/// The family `--flow` names, or the one that suits the data: Glow for the digits, an
/// image set, and RealNVP otherwise.
fn family(a: &TrainArgs) -> FlowArg {
    a.flow.unwrap_or(if a.data == "digits" {
        FlowArg::Glow
    } else {
        FlowArg::Realnvp
    })
}

/// The training configuration the flags describe for a fresh run of `flow` on data of
/// `dim` features and `context_dim` context features (images: `image`). Every value
/// is the family's or [`TrainConfig`]'s default unless a flag gives it, and is checked
/// here, before any work starts.
fn config(
    a: &TrainArgs,
    flow: FlowArg,
    dim: usize,
    context_dim: usize,
    image: Option<ImageInfo>,
) -> Result<TrainConfig, Failure> {
    if flow.couples() && dim < 2 {
        return Err(format!(
            "--flow {} couples one part of each row to the other and needs at least 2 features, but {} has {dim}: in one dimension use {}",
            flow.name(),
            a.data,
            listed(&FlowArg::one_dimensional()).replacen(" and ", " or ", 1)
        )
        .into());
    }
    let seed = a.seed.unwrap_or(TrainConfig::default().seed);
    let mut recipe = Recipe::defaults(flow, dim, image);
    for (flag, value) in recipe_values(a, seed)? {
        recipe.field(flag)?.set(value)?;
    }
    recipe.check()?;
    let mut model = recipe.model(context_dim);
    if let Some(b) = &a.base {
        model = model.with_base(base(b)?);
    }
    let mut cfg = TrainConfig::new(model)
        .with_standardize(image.is_none() && !a.no_standardize)
        .with_dequantize(image.map(|i| i.pixel_levels));
    if flow == FlowArg::Glow {
        // Glow fits a small image set far better than it generalises: decoupled weight
        // decay takes about 0.02 bits/dim off its test score on the digits.
        cfg.optimizer.kind = OptimizerKind::AdamW;
        cfg.optimizer.weight_decay = GLOW_WEIGHT_DECAY;
    }
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
            "--{flag} would change the resumed run, which keeps its own settings; on --resume only --steps, --epochs, --stop-at and --checkpoint-every may change"
        )
        .into()
    };
    let recorded = Recipe::of(&was.model);
    let recorded_flow = recorded.as_ref().map(|(flow, _)| *flow);
    if a.flow.is_some() && a.flow != recorded_flow {
        return Err(refuse("flow"));
    }
    if let Some(flow) = recorded_flow {
        check_flags_apply(a, flow)?;
    }
    for (flag, value) in recipe_values(a, was.seed)? {
        let Some((_, recipe)) = &recorded else {
            return Err(refuse(flag));
        };
        let mut asked = recipe.clone();
        asked.field(flag)?.set(value)?;
        if asked != *recipe {
            return Err(refuse(flag));
        }
    }
    let recorded_image = was.model.image_info();
    let unchanged = [
        (
            "base",
            a.base
                .as_deref()
                .map(base)
                .transpose()?
                .is_none_or(|b| b == was.model.base),
        ),
        (
            "context-dim",
            a.context_dim.is_none_or(|c| c == was.model.context_dim),
        ),
        ("no-standardize", !(a.no_standardize && was.standardize)),
        (
            "image",
            a.image
                .as_deref()
                .map(parse_image)
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
        let n = count("n", a.n.unwrap_or(DEFAULT_POINTS), 1, MAX_ROWS)?;
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

/// Set by the first SIGINT/SIGTERM: training stops after the current step and saves.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_signal_handler() {
    // A second signal exits at once; files are only ever replaced by rename, so none
    // is left half-written.
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing the current step and saving (again to quit at once)");
    });
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
    let flow = family(&a);
    if resume.is_none() {
        check_flags_apply(&a, flow)?;
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
    let train = training_data(&a, seed, context_dim, images)?;
    let cfg = match &resume {
        Some(r) => resumed_config(&a, r)?,
        None => {
            let image = images.then(|| image_info(&a, &train)).transpose()?;
            config(&a, flow, train.data.dim, context_dim, image)?
        }
    };
    let image = cfg.model.image_info();
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
    let trainer = Trainer::new(cfg, &device)?;
    if let (Some(r), Some(path)) = (&resume, &a.resume) {
        trainer
            .check_resume(r, &train)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    for warning in trainer.data_warnings(&train, &a.data)? {
        eprintln!("warning: {warning}");
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
        Some(r) => eprintln!(
            "resuming at step {} of {}",
            r.state.step,
            trainer.total_steps(train.len())
        ),
        None => eprintln!(
            "training {} on {} samples of {} features for {} steps",
            trainer
                .config()
                .model
                .recipe
                .as_ref()
                .and_then(|r| r.get("family"))
                .and_then(|f| f.as_str())
                .unwrap_or("a flow"),
            train.len(),
            train.dim,
            trainer.total_steps(train.len())
        ),
    }
    if let Some(i) = image {
        eprintln!(
            "losses are the pixels' NLL in nats per image, as flow log-prob reports: the dequantised density's NLL + {}·ln {} ({offset:.2})",
            i.shape.dim(),
            i.pixel_levels
        );
    }
    install_signal_handler();
    let out = a.out.clone();
    let mut save_periodic = |ck: &TrainCheckpoint| ck.save(&out, None);
    let control = Control {
        checkpoint_every: a.checkpoint_every,
        on_checkpoint: Some(&mut save_periodic),
        stop: Some(&STOP),
        stop_at: a.stop_at,
        skip_nonfinite: a.skip_nonfinite,
        resume,
    };
    let trained = trainer.fit_with(&train, val.as_ref(), &mut reporter, control)?;
    drop(reporter);

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
        if STOP.load(Ordering::SeqCst) {
            // Interrupted by a signal: the conventional status, nothing more to say.
            return Err(Failure {
                message: String::new(),
                code: 130,
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
        "trained {} steps in {:.1}s ({:.1} steps/s), last batch NLL {final_loss:.4} nats{}",
        s.steps,
        s.elapsed_secs,
        s.steps_per_sec,
        bits(final_loss)
    );
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
