//! Importing weights saved by other tools
//! (`safetensors.torch.save_file(model.state_dict())`): RealNVP-family couplings, and
//! from zuko, nflows and normflows also spline couplings, masked autoregressive flows
//! and autoregressive splines.
//!
//! The architecture is inferred from tensor names and shapes: layer count, dimension,
//! split, hidden widths and depth, spline bins, permutations, masks and MADE degrees from
//! integer and boolean buffers. What the weights cannot tell (activation, clamp, tail
//! bound) takes the source library's default unless overridden in [`ImportOptions`].

mod freia;
mod nets;
mod nflows;
mod normflows;
mod normflows_glow;
mod seed;
mod weights;
mod zuko;

use std::{collections::HashMap, path::Path};

use candle::Tensor;
use flow_models::{BaseConfig, LayerSpec, ModelConfig};
use flow_nn::{AutoregressiveConfig, Spline};
use flow_realnvp::{
    Activation, Affine, ConditionerConfig, CouplingConfig, NetConfig, Nets, OutputLayout, ScaleMap,
};
use serde::Serialize;

pub use seed::export_seed;
pub(crate) use weights::Weights;

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

/// An imported model: its configuration and tensors, named as this crate's checkpoints
/// name them.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// A layer as the importers produce it; its JSON form is the registry's (kinds
/// `affine`, `permute`, `spline-coupling`, `spline-autoregressive` and
/// `affine-autoregressive`).
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// Converts the state dict in `bytes` (errors name `path`).
pub fn import_bytes(
    source: Source,
    path: &Path,
    bytes: &[u8],
    opts: &ImportOptions,
) -> Result<Imported, IoError> {
    let mut w = Weights::parse(path, bytes)?;
    if let Some(b) = opts.tail_bound.filter(|b| !(b.is_finite() && *b > 0.0)) {
        return Err(w.invalid(format!("the tail bound must be positive, got {b}")));
    }
    let imported = match source {
        Source::Seed => seed::import(&mut w, opts)?,
        Source::Normflows => normflows::import(&mut w, opts)?,
        Source::Nflows => nflows::import(&mut w, opts)?,
        Source::Zuko => zuko::import(&mut w, opts)?,
        Source::Freia => freia::import(&mut w, opts)?,
    };
    w.finish()?;
    Ok(imported)
}
