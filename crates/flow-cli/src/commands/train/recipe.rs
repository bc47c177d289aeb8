//! `flow train`'s model flags: which families take them, and how each sets a
//! family's configuration.

use flow_core::limits::{MAX_BINS, MAX_HIDDEN, MAX_LAYERS};
use flow_glow::{GlowConfig, ImageInfo, ImageShape, RealNvpImageConfig};
use flow_maf::MafConfig;
use flow_models::{Family, ModelConfig};
use flow_nn::{Activation, Order};
use flow_nn::{Nets, ScaleMap};
use flow_nsf::{NsfConfig, NsfKind};
use flow_realnvp::{CouplingKind, RealNvpConfig};

use super::{count, real};
use crate::{
    cli::{listed, takes, taking, CouplingArg, NetsArg, OrderArg, ScaleArg, TrainArgs},
    Failure,
};

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
pub(super) enum Value {
    Count(usize),
    Real(f64),
    Activation(Activation),
    Scale(ScaleArg),
    Order(Order),
    Coupling(CouplingKind),
    Nets(Nets),
}

/// The field of a family's configuration that a model flag sets.
pub(super) enum Field<'a> {
    Count(&'a mut usize),
    Real(&'a mut f64),
    Activation(&'a mut Activation),
    Scale(&'a mut ScaleMap),
    Order(&'a mut Order),
    Coupling(&'a mut CouplingKind),
    Nets(&'a mut Nets),
}

impl Field<'_> {
    pub(super) fn set(self, value: Value) -> Result<(), Failure> {
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
pub(super) enum Recipe {
    RealNvp(RealNvpConfig),
    Nsf(NsfConfig),
    Maf(MafConfig),
    Glow(GlowConfig),
    RealNvpImage(RealNvpImageConfig),
}

impl Recipe {
    /// `flow`'s own defaults over `dim` features, or over the images `image` describes.
    pub(super) fn defaults(flow: Family, dim: usize, image: Option<ImageInfo>) -> Self {
        let shape = image.map_or(ImageShape::flat(dim), |i| i.shape);
        let levels = |default: u32| image.map_or(default, |i| i.pixel_levels);
        match flow {
            Family::RealNvp => Self::RealNvp(RealNvpConfig::new(dim)),
            Family::Nice => {
                Self::RealNvp(RealNvpConfig::new(dim).with_coupling(CouplingKind::Additive))
            }
            Family::Nsf => Self::Nsf(NsfConfig::new(dim)),
            Family::NsfAr => Self::Nsf(NsfConfig::new(dim).with_kind(NsfKind::Autoregressive)),
            Family::Maf => Self::Maf(MafConfig::new(dim)),
            Family::Iaf => Self::Maf(MafConfig::new(dim).with_inverse(true)),
            Family::Glow => {
                let c = GlowConfig::small(shape);
                let l = levels(c.pixel_levels);
                Self::Glow(c.with_pixel_levels(l))
            }
            Family::RealNvpImage => {
                let c = RealNvpImageConfig::small(shape);
                let l = levels(c.pixel_levels);
                Self::RealNvpImage(c.with_pixel_levels(l))
            }
        }
    }

    /// The family and configuration a model was generated from, read from its recipe.
    pub(super) fn of(model: &ModelConfig) -> Option<(Family, Self)> {
        let flow = model.family()?;
        let recipe = model.recipe.clone()?;
        let parsed = match flow {
            Family::RealNvp | Family::Nice => Self::RealNvp(serde_json::from_value(recipe).ok()?),
            Family::Nsf | Family::NsfAr => Self::Nsf(serde_json::from_value(recipe).ok()?),
            Family::Maf | Family::Iaf => Self::Maf(serde_json::from_value(recipe).ok()?),
            Family::Glow => Self::Glow(serde_json::from_value(recipe).ok()?),
            Family::RealNvpImage => Self::RealNvpImage(serde_json::from_value(recipe).ok()?),
        };
        Some((flow, parsed))
    }

    /// The setting `--{flag}` gives. The table in [`takes`] has refused the
    /// flags a family does not take before this is asked.
    pub(super) fn field(&mut self, flag: &str) -> Result<Field<'_>, Failure> {
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
    pub(super) fn model(&self, context_dim: usize) -> ModelConfig {
        match self {
            Self::RealNvp(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Nsf(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Maf(c) => c.clone().with_context_dim(context_dim).into(),
            Self::Glow(c) => ModelConfig::glow(c),
            Self::RealNvpImage(c) => ModelConfig::realnvp_image(c),
        }
    }

    /// Checks what the model flags set, naming the flag at fault.
    pub(super) fn check(&self) -> Result<(), Failure> {
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
pub fn family_defaults(flag: &str) -> Vec<(String, Vec<Family>)> {
    let mut defaults: Vec<(String, Vec<Family>)> = Vec::new();
    for &flow in taking(flag) {
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
pub(super) fn given_model_flags(a: &TrainArgs) -> Vec<&'static str> {
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
        ("bounds", a.bounds.is_some()),
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
pub(super) fn check_flags_apply(a: &TrainArgs, flow: Family) -> Result<(), Failure> {
    match given_model_flags(a).into_iter().find(|f| !takes(flow, f)) {
        Some(flag) => Err(format!(
            "--{flag} applies to {}, not {}",
            listed(taking(flag)),
            flow.name()
        )
        .into()),
        None => Ok(()),
    }
}

/// The values of the model flags `a` gives that a family's configuration holds, each
/// bounded, in the order they apply (`--scale` before `--clamp`). `seed` seeds a
/// random `--order`.
pub(super) fn recipe_values(
    a: &TrainArgs,
    seed: u64,
) -> Result<Vec<(&'static str, Value)>, Failure> {
    let counts = [
        ("layers", a.layers, 1, MAX_LAYERS),
        ("hidden", a.hidden, 1, MAX_HIDDEN),
        ("hidden-layers", a.hidden_layers, 0, MAX_LAYERS),
        ("bins", a.bins, 1, MAX_BINS),
        ("scales", a.scales, 1, MAX_LAYERS),
        ("depth", a.depth, 1, MAX_LAYERS),
        ("channels", a.channels, 1, MAX_HIDDEN),
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
