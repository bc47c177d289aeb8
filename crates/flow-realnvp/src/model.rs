use candle::{bail, DType, Result};
use candle_nn::VarBuilder;
use flow_core::{Bijector, Chain, DiagNormal, Distribution, Flow, StandardNormal, Standardize};
use serde::{Deserialize, Serialize};

use crate::{LayerConfig, NetConfig, RealNvp, RealNvpConfig, ScaleMap};

/// Tensors whose names start with this belong to a training run's state (optimizer
/// moments, best weights), not to the model; loaders of models ignore them.
pub const TRAIN_STATE_PREFIX: &str = "train_state.";

/// The base distribution of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BaseConfig {
    /// `N(0, I)`: no parameters.
    #[default]
    StandardNormal,
    /// `N(loc, diag(exp(log_scale))²)`, stored as `base.loc` and `base.log_scale`;
    /// trained only when `trainable`.
    DiagNormal { trainable: bool },
}

/// Everything needed to rebuild a flow from its tensors: optional standardisation,
/// the layers, the base distribution.
///
/// Tensor names: `standardize.mean`, `standardize.std` (`(dim,)`), `layers.{i}.*`,
/// `base.loc`, `base.log_scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dim: usize,
    /// A fixed `(x − mean) / std` in front of the layers.
    #[serde(default)]
    pub standardize: bool,
    pub layers: Vec<LayerConfig>,
    #[serde(default)]
    pub base: BaseConfig,
    /// The high-level description the layers were generated from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realnvp: Option<RealNvpConfig>,
}

impl ModelConfig {
    pub fn from_realnvp(cfg: &RealNvpConfig) -> Self {
        Self {
            dim: cfg.dim,
            standardize: false,
            layers: cfg.layer_configs(),
            base: BaseConfig::StandardNormal,
            realnvp: Some(cfg.clone()),
        }
    }

    pub fn with_standardize(mut self, standardize: bool) -> Self {
        self.standardize = standardize;
        self
    }

    /// Whether the tensor `name` is updated by training (standardisation statistics
    /// and a fixed base are not).
    pub fn is_trainable(&self, name: &str) -> bool {
        if name.starts_with("standardize.") {
            return false;
        }
        if name.starts_with("base.") {
            return matches!(self.base, BaseConfig::DiagNormal { trainable: true });
        }
        true
    }

    /// Checks that the layers fit together: mask and permutation lengths match `dim`,
    /// every network has non-zero widths, clamps are positive.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let d = self.dim;
        if d == 0 {
            return Err("a model needs at least one feature".into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let fail = |why: String| Err(format!("layer {i}: {why}"));
            match layer {
                LayerConfig::Affine(c) | LayerConfig::Additive(c) => {
                    if c.mask.len() != d {
                        return fail(format!(
                            "mask of {} features in a model of {d}",
                            c.mask.len()
                        ));
                    }
                    let widths = match &c.conditioner.net {
                        NetConfig::Mlp { hidden, .. } => hidden.clone(),
                        NetConfig::Residual { hidden, .. } => vec![*hidden],
                    };
                    if widths.contains(&0) {
                        return fail("a hidden layer of width 0".into());
                    }
                    let clamp = match c.scale {
                        ScaleMap::SoftClamp { clamp }
                        | ScaleMap::Tanh { clamp }
                        | ScaleMap::Atan { clamp } => clamp,
                        ScaleMap::Exp | ScaleMap::Sigmoid => 1.0,
                    };
                    if !(clamp.is_finite() && clamp > 0.0) {
                        return fail(format!("clamp must be positive, got {clamp}"));
                    }
                }
                LayerConfig::Permute { perm } if perm.len() != d => {
                    return fail(format!(
                        "permutation of {} features in a model of {d}",
                        perm.len()
                    ));
                }
                LayerConfig::Reverse { dim } if *dim != d => {
                    return fail(format!("reversal of {dim} features in a model of {d}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Builds the flow, reading (or creating) its tensors through `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Flow> {
        if let Err(e) = self.validate() {
            bail!("{e}");
        }
        let device = vb.device().clone();
        let mut chain = Chain::default();
        if self.standardize {
            let vb = vb.pp("standardize");
            let mean = vb.get_with_hints(self.dim, "mean", candle_nn::init::ZERO)?;
            let std = vb.get_with_hints(self.dim, "std", candle_nn::init::ONE)?;
            chain.push(Standardize::new(&mean, &std)?);
        }
        chain.push(RealNvp::from_layers(&self.layers, vb.pp("layers"))?);
        let base: Box<dyn Distribution> = match self.base {
            BaseConfig::StandardNormal => {
                Box::new(StandardNormal::new(self.dim, vb.dtype(), &device))
            }
            BaseConfig::DiagNormal { .. } => Box::new(DiagNormal::new(self.dim, vb.pp("base"))?),
        };
        let bijector: Box<dyn Bijector> = Box::new(chain);
        Ok(Flow::from_boxed(bijector, base))
    }

    /// Float types the layers support.
    pub fn supports(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64)
    }
}
