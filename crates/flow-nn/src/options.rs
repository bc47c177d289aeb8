//! The model options families share, each defined once: a family declares one by
//! saying where its recipe keeps the value.

use flow_core::{
    limits::{MAX_HIDDEN, MAX_LAYERS},
    Choice, ModelOption,
};

use crate::{Activation, Nets, Order, ScaleMap};

/// Layers of a stack (couplings or autoregressive layers).
pub fn layers<C>(
    get: impl Fn(&C) -> usize + Send + Sync + 'static,
    set: impl Fn(&mut C, usize) + Send + Sync + 'static,
) -> ModelOption<C> {
    ModelOption::count(
        "layers",
        "Layers (couplings or autoregressive layers)",
        (1, MAX_LAYERS),
        get,
        set,
    )
}

/// Width of the conditioner networks' hidden layers.
pub fn hidden<C>(
    get: impl Fn(&C) -> usize + Send + Sync + 'static,
    set: impl Fn(&mut C, usize) + Send + Sync + 'static,
) -> ModelOption<C> {
    ModelOption::count(
        "hidden",
        "Width of each hidden layer of the conditioner networks",
        (1, MAX_HIDDEN),
        get,
        set,
    )
}

/// Hidden layers of each conditioner network.
pub fn hidden_layers<C>(
    get: impl Fn(&C) -> usize + Send + Sync + 'static,
    set: impl Fn(&mut C, usize) + Send + Sync + 'static,
) -> ModelOption<C> {
    ModelOption::count(
        "hidden-layers",
        "Hidden layers of each conditioner network (residual blocks with --conditioner residual)",
        (0, MAX_LAYERS),
        get,
        set,
    )
}

/// The conditioner networks' hidden activation.
pub fn activation<C>(
    get: impl Fn(&C) -> Activation + Send + Sync + 'static,
    set: impl Fn(&mut C, Activation) + Send + Sync + 'static,
) -> ModelOption<C> {
    let choices = Activation::ALL
        .iter()
        .map(|a| Choice::new(a.name(), ""))
        .collect();
    ModelOption::choice(
        "activation",
        "Hidden-layer activation of the conditioner networks",
        choices,
        move |c| get(c).name(),
        move |c, (name, _)| {
            set(c, name.parse()?);
            Ok(())
        },
    )
}

/// The clamp a log-scale bound keeps when its kind changes from one without a clamp.
fn default_clamp() -> f64 {
    match ScaleMap::default() {
        ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => clamp,
        _ => 1.0,
    }
}

/// How an affine layer bounds its raw log-scale: `--scale`. A new kind of bound keeps
/// the clamp the recipe had.
pub fn scale<C>(
    get: impl Fn(&C) -> ScaleMap + Send + Sync + 'static,
    set: impl Fn(&mut C, ScaleMap) + Send + Sync + 'static,
) -> ModelOption<C> {
    let choices = vec![
        Choice::new("soft-clamp", "`s / (1 + |s| / clamp)`"),
        Choice::new("exp", "`s` unbounded (the original RealNVP)"),
        Choice::new("tanh", "`clamp · tanh(s / clamp)`"),
    ];
    let get = std::sync::Arc::new(get);
    let read = get.clone();
    ModelOption::choice(
        "scale",
        "How an affine layer's raw log-scale is bounded",
        choices,
        move |c| match read(c) {
            ScaleMap::Exp => "exp",
            ScaleMap::SoftClamp { .. } => "soft-clamp",
            ScaleMap::Tanh { .. } => "tanh",
            ScaleMap::Atan { .. } => "atan",
            ScaleMap::Sigmoid => "sigmoid",
            ScaleMap::Softplus => "softplus",
        },
        move |c, (name, _)| {
            let clamp = match get(c) {
                ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => clamp,
                _ => default_clamp(),
            };
            set(
                c,
                match name {
                    "exp" => ScaleMap::Exp,
                    "tanh" => ScaleMap::Tanh { clamp },
                    _ => ScaleMap::SoftClamp { clamp },
                },
            );
            Ok(())
        },
    )
}

/// The bound of the soft-clamp and tanh log-scales: `--clamp`. Declared after
/// [`scale`], so that a new kind of bound is set before its bound.
pub fn clamp<C>(
    get: impl Fn(&C) -> ScaleMap + Send + Sync + 'static,
    set: impl Fn(&mut C, ScaleMap) + Send + Sync + 'static,
) -> ModelOption<C> {
    let get = std::sync::Arc::new(get);
    let read = get.clone();
    ModelOption::positive(
        "clamp",
        "Bound of the soft-clamp and tanh log-scale maps",
        move |c| match read(c) {
            ScaleMap::SoftClamp { clamp } | ScaleMap::Tanh { clamp } => clamp,
            _ => default_clamp(),
        },
        move |c, clamp| {
            set(
                c,
                match get(c) {
                    ScaleMap::SoftClamp { .. } => ScaleMap::SoftClamp { clamp },
                    ScaleMap::Tanh { .. } => ScaleMap::Tanh { clamp },
                    _ => {
                        return Err(
                            "--clamp bounds the soft-clamp and tanh scales, not --scale exp".into(),
                        )
                    }
                },
            );
            Ok(())
        },
    )
}

/// The feature orders of autoregressive layers; a random one is seeded with the
/// run's seed.
pub fn order<C>(
    get: impl Fn(&C) -> Order + Send + Sync + 'static,
    set: impl Fn(&mut C, Order) + Send + Sync + 'static,
) -> ModelOption<C> {
    let choices = vec![
        Choice::new("alternate", "Alternate forward and reversed"),
        Choice::new("random", "A seeded random permutation per layer"),
    ];
    ModelOption::choice(
        "order",
        "Feature orders of autoregressive layers: alternating, or a seeded random permutation per layer",
        choices,
        move |c| match get(c) {
            Order::Alternate => "alternate",
            Order::Random { .. } => "random",
        },
        move |c, (name, seed)| {
            set(
                c,
                match name {
                    "random" => Order::Random { seed },
                    _ => Order::Alternate,
                },
            );
            Ok(())
        },
    )
}

/// One conditioner network per parameter, or one for all.
pub fn nets<C>(
    get: impl Fn(&C) -> Nets + Send + Sync + 'static,
    set: impl Fn(&mut C, Nets) + Send + Sync + 'static,
) -> ModelOption<C> {
    let choices = vec![
        Choice::new("separate", "One network per parameter"),
        Choice::new("joint", "One network for all parameters"),
    ];
    ModelOption::choice(
        "nets",
        "Conditioner networks: one per parameter (scale and shift: the original RealNVP) or one joint network for both (zuko's and normflows' layout, half the arithmetic)",
        choices,
        move |c| match get(c) {
            Nets::Separate => "separate",
            Nets::Joint => "joint",
        },
        move |c, (name, _)| {
            set(
                c,
                match name {
                    "joint" => Nets::Joint,
                    _ => Nets::Separate,
                },
            );
            Ok(())
        },
    )
}

/// Checks `--hidden` against the features an autoregressive (MADE) network orders: each
/// hidden layer needs a unit for every feature.
pub fn check_autoregressive_hidden(hidden: usize, dim: usize) -> Result<(), String> {
    if hidden < dim {
        return Err(format!(
            "--hidden {hidden}: an autoregressive network over {dim} features needs at least {dim} hidden units"
        ));
    }
    Ok(())
}
