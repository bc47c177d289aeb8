use candle::{bail, DType, Result};
use candle_nn::VarBuilder;
use flow_core::{
    Bijector, Chain, DiagNormal, Distribution, Flow, GaussianMixture, LayerSpec, StandardNormal,
    Standardize,
};
use serde::{Deserialize, Serialize};

use crate::{Family, Registry};

/// The base distribution of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BaseConfig {
    /// `N(0, I)`: no parameters.
    #[default]
    StandardNormal,
    /// `N(loc, diag(exp(log_scale))²)`, stored as `base.loc` and `base.log_scale`;
    /// trained only when `trainable` (otherwise they are buffers).
    DiagNormal { trainable: bool },
    /// A trainable mixture of `components` diagonal Gaussians, stored as
    /// `base.logits`, `base.loc` and `base.log_scale`.
    Mixture { components: usize },
}

/// Everything needed to rebuild a flow from its tensors: optional standardisation, the
/// layers (of any registered family), the base distribution, and the number of context
/// features a conditional flow reads.
///
/// Tensor names: `standardize.mean`, `standardize.std` (`(dim,)`), `layers.{i}.*`,
/// `base.loc`, `base.log_scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct ModelConfig {
    pub dim: usize,
    /// Context features of a conditional flow (0: unconditional).
    #[serde(default)]
    pub context_dim: usize,
    /// A fixed `(x − mean) / std` in front of the layers (statistics of the data
    /// features, not of the context; training sets them from its data).
    #[serde(default)]
    pub standardize: bool,
    pub layers: Vec<LayerSpec>,
    #[serde(default)]
    pub base: BaseConfig,
    /// The family's high-level description the layers were generated from, if any
    /// (for people reading the file; the layers are what is built).
    #[serde(default, alias = "realnvp", skip_serializing_if = "Option::is_none")]
    pub recipe: Option<serde_json::Value>,
}

/// A [`ModelConfig`] as files hold it. Files from before models had a context
/// dimension of their own give each layer's; the model's is then the layers'.
#[derive(Deserialize)]
struct Stored {
    dim: usize,
    context_dim: Option<usize>,
    #[serde(default)]
    standardize: bool,
    layers: Vec<LayerSpec>,
    #[serde(default)]
    base: BaseConfig,
    #[serde(default, alias = "realnvp")]
    recipe: Option<serde_json::Value>,
}

impl From<Stored> for ModelConfig {
    fn from(s: Stored) -> Self {
        let from_layers = || {
            s.layers
                .iter()
                .find_map(|l| l.settings::<LayerContext>().ok())
                .map_or(0, |l| l.context_dim)
        };
        Self {
            context_dim: s.context_dim.unwrap_or_else(from_layers),
            dim: s.dim,
            standardize: s.standardize,
            layers: s.layers,
            base: s.base,
            recipe: s.recipe,
        }
    }
}

/// The context dimension a layer's settings carry, where they carry one.
#[derive(Deserialize)]
struct LayerContext {
    context_dim: usize,
}

impl ModelConfig {
    /// A model of `layers` over `dim` features: no context, no standardisation, a
    /// standard-normal base.
    pub fn new(dim: usize, layers: Vec<LayerSpec>) -> Self {
        Self {
            dim,
            context_dim: 0,
            standardize: false,
            layers,
            base: BaseConfig::StandardNormal,
            recipe: None,
        }
    }

    /// A family's stack as a model: its layers, with the description kept as the
    /// recipe under the family's name.
    fn from_recipe<L: serde::Serialize>(
        family: Family,
        recipe: &impl serde::Serialize,
        dim: usize,
        context_dim: usize,
        layers: &[L],
    ) -> Self {
        let layers = layers
            .iter()
            .map(|l| LayerSpec::tagged(l).expect("a family's layer serialises to an object"))
            .collect();
        let mut recipe = serde_json::to_value(recipe).ok();
        if let Some(serde_json::Value::Object(m)) = &mut recipe {
            m.insert("family".into(), family.name().into());
        }
        Self {
            context_dim,
            recipe,
            ..Self::new(dim, layers)
        }
    }

    /// A RealNVP (or NICE) stack as a model, with the description kept as its recipe.
    #[cfg(feature = "realnvp")]
    pub fn realnvp(cfg: &flow_realnvp::RealNvpConfig) -> Self {
        let family = match cfg.coupling {
            flow_realnvp::CouplingKind::Affine => Family::RealNvp,
            flow_realnvp::CouplingKind::Additive => Family::Nice,
        };
        Self::from_recipe(family, cfg, cfg.dim, cfg.context_dim, &cfg.layers())
    }

    /// A neural spline flow (coupling or autoregressive) as a model.
    #[cfg(feature = "nsf")]
    pub fn nsf(cfg: &flow_nsf::NsfConfig) -> Self {
        let family = match cfg.kind {
            flow_nsf::NsfKind::Coupling => Family::Nsf,
            flow_nsf::NsfKind::Autoregressive => Family::NsfAr,
        };
        Self::from_recipe(family, cfg, cfg.dim, cfg.context_dim, &cfg.layers())
    }

    /// A MAF (or IAF) as a model.
    #[cfg(feature = "maf")]
    pub fn maf(cfg: &flow_maf::MafConfig) -> Self {
        let family = if cfg.inverse {
            Family::Iaf
        } else {
            Family::Maf
        };
        Self::from_recipe(family, cfg, cfg.dim, cfg.context_dim, &cfg.layers())
    }

    /// A Glow image flow as a model: its `[logit?, multiscale]` layers, a trainable
    /// diagonal Gaussian base over the latent when `learn_base` (one per level, per
    /// element), and the configuration (image shape, pixel levels) as the recipe.
    #[cfg(feature = "glow")]
    pub fn glow(cfg: &flow_glow::GlowConfig) -> Self {
        let model = Self::from_recipe(Family::Glow, cfg, cfg.dim(), 0, &cfg.layers());
        model.with_base(image_base(cfg.learn_base))
    }

    /// The image shape and pixel levels of an image model (family `glow` or
    /// `realnvp-image`), from its recipe; `None` for other models.
    #[cfg(feature = "glow")]
    pub fn image_info(&self) -> Option<flow_glow::ImageInfo> {
        if !self.family()?.is_image() {
            return None;
        }
        serde_json::from_value(self.recipe.clone()?).ok()
    }

    /// The family the recipe names, if it names one.
    pub fn family(&self) -> Option<Family> {
        Family::from_name(self.recipe.as_ref()?.get("family")?.as_str()?)
    }

    /// The pixel levels `L` of an image model (family `glow` or `realnvp-image`), from
    /// its recipe: its data are whole numbers in `[0, L)`, dequantised for training.
    /// `None` for other models.
    pub fn pixel_levels(&self) -> Option<u32> {
        if !self.family()?.is_image() {
            return None;
        }
        let levels = self.recipe.as_ref()?.get("pixel_levels")?.as_u64()?;
        levels.try_into().ok()
    }

    /// RealNVP's multi-scale image flow as a model, as [`glow`](Self::glow).
    #[cfg(feature = "glow")]
    pub fn realnvp_image(cfg: &flow_glow::RealNvpImageConfig) -> Self {
        let model = Self::from_recipe(Family::RealNvpImage, cfg, cfg.dim(), 0, &cfg.layers());
        model.with_base(image_base(cfg.learn_base))
    }

    flow_core::with_setters! {
        with_context_dim: context_dim: usize,
        with_standardize: standardize: bool,
        with_base: base: BaseConfig,
    }

    /// Checks that the layers fit together, with the built-in families.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_with(&Registry::builtin())
    }

    /// Checks that every layer's kind is registered and that each fits `dim` features
    /// and `context_dim` context features.
    pub fn validate_with(&self, registry: &Registry) -> std::result::Result<(), String> {
        if self.dim == 0 {
            return Err("a model needs at least one feature".into());
        }
        if self.base == (BaseConfig::Mixture { components: 0 }) {
            return Err("a mixture base needs at least one component".into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            registry
                .check(layer, self.dim, self.context_dim)
                .map_err(|e| format!("layer {i}: {e}"))?;
        }
        Ok(())
    }

    /// Builds the flow with the built-in families, reading (or creating) its tensors
    /// through `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Flow> {
        self.build_with(&Registry::builtin(), vb)
    }

    /// Builds the flow with the families of `registry`.
    pub fn build_with(&self, registry: &Registry, vb: VarBuilder) -> Result<Flow> {
        if let Err(e) = self.validate_with(registry) {
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
        let layers = vb.pp("layers");
        for (i, spec) in self.layers.iter().enumerate() {
            chain.push(registry.build(spec, layers.pp(i))?);
        }
        let base: Box<dyn Distribution> = match self.base {
            BaseConfig::StandardNormal => {
                Box::new(StandardNormal::new(self.dim, vb.dtype(), &device))
            }
            BaseConfig::DiagNormal { trainable } => {
                let base = DiagNormal::new(self.dim, vb.pp("base"))?;
                Box::new(if trainable { base } else { base.frozen() })
            }
            BaseConfig::Mixture { components } => {
                Box::new(GaussianMixture::new(components, self.dim, vb.pp("base"))?)
            }
        };
        let bijector: Box<dyn Bijector> = Box::new(chain);
        Ok(Flow::from_boxed(bijector, base))
    }

    /// Float types the layers support.
    pub fn supports(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64)
    }
}

/// An image architecture's base: trainable per-element Gaussians or `N(0, I)`.
#[cfg(feature = "glow")]
fn image_base(learn: bool) -> BaseConfig {
    if learn {
        BaseConfig::DiagNormal { trainable: true }
    } else {
        BaseConfig::StandardNormal
    }
}

#[cfg(feature = "nsf")]
impl From<flow_nsf::NsfConfig> for ModelConfig {
    fn from(cfg: flow_nsf::NsfConfig) -> Self {
        Self::nsf(&cfg)
    }
}

#[cfg(feature = "maf")]
impl From<flow_maf::MafConfig> for ModelConfig {
    fn from(cfg: flow_maf::MafConfig) -> Self {
        Self::maf(&cfg)
    }
}

#[cfg(feature = "realnvp")]
impl From<&flow_realnvp::RealNvpConfig> for ModelConfig {
    fn from(cfg: &flow_realnvp::RealNvpConfig) -> Self {
        Self::realnvp(cfg)
    }
}

#[cfg(feature = "realnvp")]
impl From<flow_realnvp::RealNvpConfig> for ModelConfig {
    fn from(cfg: flow_realnvp::RealNvpConfig) -> Self {
        Self::realnvp(&cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conditional RealNVP's configuration as files held it before models had a
    /// context dimension of their own.
    const OLD: &str = r#"{"dim":2,"standardize":true,"layers":[{"type":"affine","mask":[true,false],"conditioner":{"nets":"separate","layout":"scale-shift","net":{"kind":"mlp","hidden":[4],"activation":"leaky-relu"},"zero_init":false},"scale":{"kind":"soft-clamp","clamp":3.0},"inverted":false,"context_dim":1}],"base":{"kind":"standard-normal"},"realnvp":{"dim":2,"layers":1,"hidden":4,"context_dim":1}}"#;

    #[test]
    fn older_files_read_with_the_layers_context() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        assert_eq!(cfg.context_dim, 1);
        assert!(cfg.recipe.is_some());
        cfg.validate().expect("valid");
        let again: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("json")).expect("read");
        assert_eq!(again, cfg);
    }
}
