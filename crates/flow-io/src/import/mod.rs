//! Importing weights saved by other tools
//! (`safetensors.torch.save_file(model.state_dict())`): RealNVP-family couplings, and
//! from zuko, nflows and normflows also spline couplings, masked autoregressive flows
//! and autoregressive splines.
//!
//! The architecture is inferred from tensor names and shapes: layer count, dimension,
//! split, hidden widths and depth, spline bins, permutations, masks and MADE degrees from
//! integer and boolean buffers. What the weights cannot tell (activation, clamp, tail
//! bound) takes the source library's default unless overridden in [`ImportOptions`];
//! each default so taken is reported as an [`Assumption`]. An import is built and
//! scored before it is returned, so that nothing is written that would not load.

mod freia;
mod nets;
mod nflows;
mod normflows;
mod normflows_glow;
mod seed;
mod weights;
mod zuko;
mod zuko_export;

use std::{collections::HashMap, path::Path};

use candle::{DType, Device, Tensor};
use flow_models::{BaseConfig, LayerSpec, ModelConfig};
use flow_nn::{
    Activation, Affine, ConditionerConfig, CouplingConfig, NetConfig, Nets, OutputLayout, ScaleMap,
};
use flow_nn::{AutoregressiveConfig, Spline};
use serde::{Deserialize, Serialize};

pub use seed::export_seed;
pub(crate) use weights::Weights;
pub use zuko_export::export_zuko;

use crate::IoError;

/// Tools whose checkpoints can be imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The reference `stacked_NVP` code (`bijectors.{i}.sig_net` / `mu_net`).
    Seed,
    /// normflows: `NormalizingFlow` of `AffineCouplingBlock`,
    /// `CoupledRationalQuadraticSpline`, `AutoregressiveRationalQuadraticSpline` or
    /// `MaskedAffineAutoregressive`, and `Permute`; or its Glow, a `MultiscaleFlow` of
    /// `GlowBlock`s, `Squeeze`, `Merge` and per-level `DiagGaussian` bases.
    Normflows,
    /// nflows: `SimpleRealNVP`, or a flow of `PiecewiseRationalQuadraticCouplingTransform`,
    /// `MaskedAffineAutoregressiveTransform` and permutations.
    Nflows,
    /// zuko: `zuko.flows.RealNVP`, `NSF` and `MAF`.
    Zuko,
    /// FrEIA: `SequenceINN` of `GLOWCouplingBlock` + `PermuteRandom`.
    Freia,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Seed,
        Source::Normflows,
        Source::Nflows,
        Source::Zuko,
        Source::Freia,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Seed => "seed",
            Source::Normflows => "normflows",
            Source::Nflows => "nflows",
            Source::Zuko => "zuko",
            Source::Freia => "freia",
        }
    }

    pub fn from_name(name: &str) -> Option<Source> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The hidden activation the source's networks use unless built with another.
    pub fn default_activation(self) -> Activation {
        match self {
            Source::Seed => Activation::LeakyRelu,
            Source::Normflows | Source::Nflows | Source::Zuko | Source::Freia => Activation::Relu,
        }
    }

    /// The tail bound of the source's spline layers unless built with another; `None`
    /// for a source whose layers this crate imports have no splines.
    pub fn default_tail_bound(self) -> Option<f64> {
        match self {
            Source::Nflows => Some(1.0),
            Source::Normflows => Some(3.0),
            Source::Zuko => Some(5.0),
            Source::Seed | Source::Freia => None,
        }
    }

    /// The log-scale clamp of the source's affine layers unless built with another;
    /// `None` for a source whose affine layers do not clamp.
    pub fn default_clamp(self) -> Option<f64> {
        match self {
            Source::Freia => Some(freia::DEFAULT_CLAMP),
            Source::Zuko => Some(zuko::DEFAULT_CLAMP),
            Source::Seed | Source::Normflows | Source::Nflows => None,
        }
    }

    /// `nflows'`, `zuko's`: the name as a possessive.
    fn possessive(self) -> String {
        let name = self.name();
        if name.ends_with('s') {
            format!("{name}'")
        } else {
            format!("{name}'s")
        }
    }
}

/// A setting the weights cannot carry, taken as the source library's default because
/// none was given; a model built with another imports with wrong densities, so it is
/// said out loud.
#[derive(Debug, Clone, PartialEq)]
pub struct Assumption {
    pub source: Source,
    /// What was assumed: `tail bound`, `hidden activation`, `clamp`.
    pub setting: &'static str,
    pub value: String,
    /// The `flow import` flag (the [`ImportOptions`] field) that gives another value.
    pub flag: &'static str,
}

impl std::fmt::Display for Assumption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "assumed {} {} ({} default); the weights do not record it: give {} if the model was built with another",
            self.setting,
            self.value,
            self.source.possessive(),
            self.flag
        )
    }
}

/// Settings the weights cannot carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Hidden activation (default: the source library's).
    pub activation: Option<Activation>,
    /// Log-scale clamp for sources that clamp (FrEIA: 2.0).
    pub clamp: Option<f64>,
    /// Spline tail bound, a setting of the source's layers (nflows: 1.0, its default;
    /// normflows: 3.0; zuko: 5.0).
    pub tail_bound: Option<f64>,
}

impl ImportOptions {
    /// Checks the settings given, before any file is read.
    pub fn check(&self) -> Result<(), String> {
        match self.clamp {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                Err(format!("--clamp must be positive, got {c}"))
            }
            _ => Ok(()),
        }
    }
}

/// An imported model: its configuration and tensors, named as this crate's checkpoints
/// name them, and the settings that were assumed rather than read.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub assumptions: Vec<Assumption>,
}

impl Imported {
    pub(crate) fn new(config: ModelConfig, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            config,
            tensors,
            assumptions: Vec::new(),
        }
    }

    /// Checks that the model is good to write: as a checkpoint it reads back, its
    /// tensors fit its configuration and are finite, and it scores its own samples
    /// finite. Errors name `path`, the file the weights came from.
    pub fn check(&self, path: &Path) -> Result<(), IoError> {
        let bytes = crate::checkpoint::serialize(
            path,
            &self.config,
            &self.tensors,
            None,
            &Default::default(),
        )?;
        let checkpoint = crate::checkpoint::load_bytes(path, &bytes)?;
        let loaded = crate::checkpoint::build_checked(path, checkpoint, DType::F32, &Device::Cpu)?;
        crate::check_scores(path, &loaded.flow, self.config.context_dim)
    }
}

/// The settings of `imported` that `opts` did not give and the weights cannot carry.
fn assumptions(source: Source, config: &ModelConfig, opts: &ImportOptions) -> Vec<Assumption> {
    let has = |kinds: &[&str]| config.layers.iter().any(|l| kinds.contains(&l.kind()));
    let assumed = |setting, value: String, flag| Assumption {
        source,
        setting,
        value,
        flag,
    };
    let mut out = Vec::new();
    let splines = has(&["spline-coupling", "spline-autoregressive"]);
    if let Some(bound) = source.default_tail_bound().filter(|_| splines) {
        if opts.tail_bound.is_none() {
            out.push(assumed("tail bound", bound.to_string(), "--tail-bound"));
        }
    }
    let networks = config.layers.iter().any(|l| l.kind() != "permute");
    if networks && opts.activation.is_none() {
        let activation = serde_json::to_value(source.default_activation())
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| format!("{:?}", source.default_activation()));
        out.push(assumed("hidden activation", activation, "--activation"));
    }
    let affine = has(&["affine", "affine-autoregressive"]);
    if let Some(clamp) = source.default_clamp().filter(|_| affine) {
        if opts.clamp.is_none() {
            out.push(assumed("clamp", clamp.to_string(), "--clamp"));
        }
    }
    out
}

/// A layer as the importers produce it; its JSON form is the registry's (kinds
/// `affine`, `permute`, `spline-coupling`, `spline-autoregressive` and
/// `affine-autoregressive`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum LayerConfig {
    Affine(CouplingConfig<Affine>),
    Permute { perm: Vec<usize> },
    SplineCoupling(CouplingConfig<Spline>),
    SplineAutoregressive(AutoregressiveConfig<Spline>),
    AffineAutoregressive(AutoregressiveConfig<Affine>),
}

/// An affine coupling as the importers produce it: explicit mask, no context.
pub(crate) fn affine(
    mask: Vec<bool>,
    nets: Nets,
    layout: OutputLayout,
    net: NetConfig,
    scale: ScaleMap,
    inverted: bool,
) -> LayerConfig {
    LayerConfig::Affine(CouplingConfig {
        mask,
        conditioner: ConditionerConfig {
            nets,
            layout,
            net,
            zero_init: false,
        },
        transform: Affine::new(scale),
        inverted,
        context_dim: 0,
    })
}

/// A spline coupling as the importers produce it: explicit mask (true = kept), one
/// network whose output holds each transformed feature's parameters in turn, no context.
pub(crate) fn spline_coupling(mask: Vec<bool>, net: NetConfig, spline: Spline) -> LayerConfig {
    LayerConfig::SplineCoupling(CouplingConfig {
        mask,
        conditioner: ConditionerConfig {
            nets: Nets::Joint,
            layout: OutputLayout::ByFeature,
            net,
            zero_init: false,
        },
        transform: spline,
        inverted: false,
        context_dim: 0,
    })
}

/// An autoregressive layer with the source's MADE masks (stored beside the weights:
/// every library assigns MADE degrees its own way): plain hidden widths, or one width
/// and `residual_blocks` blocks.
pub(crate) fn autoregressive<T>(
    order: Vec<usize>,
    hidden: Vec<usize>,
    residual_blocks: usize,
    activation: Activation,
    transform: T,
    inverted: bool,
) -> AutoregressiveConfig<T> {
    AutoregressiveConfig {
        order,
        hidden,
        activation,
        transform,
        inverted,
        context_dim: 0,
        zero_init: false,
        residual_blocks,
        stored_masks: true,
    }
}

/// The model around imported layers: no standardisation.
pub(crate) fn model(dim: usize, layers: Vec<LayerConfig>, base: BaseConfig) -> ModelConfig {
    let specs = layers
        .iter()
        .map(|l| LayerSpec::tagged(l).expect("an imported layer serialises to an object"))
        .collect();
    ModelConfig::new(dim, specs).with_base(base)
}

/// Reads `path` as a `source` state dict and converts it.
pub fn import(source: Source, path: &Path, opts: &ImportOptions) -> Result<Imported, IoError> {
    import_bytes(source, path, &crate::checkpoint::read_file(path)?, opts)
}

/// Converts the state dict in `bytes` (errors name `path`), and checks the result as
/// [`Imported::check`] does.
pub fn import_bytes(
    source: Source,
    path: &Path,
    bytes: &[u8],
    opts: &ImportOptions,
) -> Result<Imported, IoError> {
    let mut w = Weights::parse(path, bytes)?;
    // The bound is used in f32: one beyond f32's range would make the spline infinite.
    let in_f32 = |b: f64| b > 0.0 && b <= f64::from(f32::MAX);
    if let Some(b) = opts.tail_bound.filter(|b| !in_f32(*b)) {
        return Err(w.invalid(format!(
            "the tail bound must be positive and finite in f32, got {b:?}"
        )));
    }
    let mut imported = match source {
        Source::Seed => seed::import(&mut w, opts)?,
        Source::Normflows => normflows::import(&mut w, opts)?,
        Source::Nflows => nflows::import(&mut w, opts)?,
        Source::Zuko => zuko::import(&mut w, opts)?,
        Source::Freia => freia::import(&mut w, opts)?,
    };
    w.finish()?;
    // A setting applies where, not given, it would be assumed: one given to weights
    // whose layers do not take it is refused rather than ignored.
    let applies = assumptions(source, &imported.config, &ImportOptions::default());
    let given = [
        (opts.tail_bound.is_some(), "--tail-bound"),
        (opts.clamp.is_some(), "--clamp"),
        (opts.activation.is_some(), "--activation"),
    ];
    if let Some((_, flag)) = given
        .iter()
        .find(|(given, flag)| *given && !applies.iter().any(|a| a.flag == *flag))
    {
        return Err(IoError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "{flag} does not apply: no layer of these {} weights takes it",
                source.name()
            ),
        });
    }
    imported.check(path)?;
    imported.assumptions = assumptions(source, &imported.config, opts);
    Ok(imported)
}
