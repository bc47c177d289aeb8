use candle::{bail, DType, Result};
use candle_nn::VarBuilder;
use flow_core::{
    limits, Bijector, Bound, Bounded, Chain, ContextStandardize, DiagNormal, Distribution, Flow,
    GaussianMixture, ImageInfo, LayerSpec, Recipe, Spelled, StandardNormal, Standardize,
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

/// How a model keeps its density inside its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BoundsBy {
    /// A fixed logit map from the box to the whole space in front of the flow
    /// ([`Bounded`]): exact densities, samples inside by construction.
    #[default]
    Logit,
    /// The flow as trained on the data, restricted to the box when drawing and
    /// scoring ([`Truncated`](flow_core::Truncated)): draws outside are rejected, and a
    /// density is divided by the flow's estimated mass inside the box at its context.
    Rejection,
}

impl BoundsBy {
    const ALL: [Self; 2] = [Self::Logit, Self::Rejection];

    /// The name `--bounds-by` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Logit => "logit",
            Self::Rejection => "rejection",
        }
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|b| b.name()).collect();
                format!("--bounds-by `{text}`: expected {}", names.join(" or "))
            })
    }

    fn is_logit(&self) -> bool {
        *self == Self::Logit
    }
}

/// Everything needed to rebuild a flow from its tensors: optional bounds of the data,
/// optional standardisation of the data and of the context, the layers (of any
/// registered family), the base distribution, and the number of context features a
/// conditional flow reads.
///
/// Tensor names: `standardize.mean`, `standardize.std` (`(dim,)`),
/// `context_standardize.mean`, `context_standardize.std` (`(context_dim,)`),
/// `layers.{i}.*`, `base.loc`, `base.log_scale`.
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
    /// A fixed `(c − mean) / std` of the context before any layer reads it (statistics
    /// of the context features; training sets them from its data). Callers pass the
    /// context in its own units. Files without it read as `false`.
    #[serde(default)]
    pub standardize_context: bool,
    /// The box the data live in, one interval per feature, held as
    /// [`bounds_by`](Self::bounds_by) says: by default a fixed map from the box to the
    /// whole space comes first ([`Bounded`]), so that samples stay inside and densities
    /// are densities on the box. Standardisation, if any, follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Vec<Bound>>,
    /// How the bounds hold: by the logit map in front of the flow (files without it),
    /// or by rejection, where no map is built and the flow is the data's as they are.
    #[serde(default, skip_serializing_if = "BoundsBy::is_logit")]
    pub bounds_by: BoundsBy,
    pub layers: Vec<LayerSpec>,
    #[serde(default)]
    pub base: BaseConfig,
    /// The family's high-level description the layers were generated from, if any
    /// (for people reading the file; the layers are what is built).
    #[serde(default, alias = "realnvp", skip_serializing_if = "Option::is_none")]
    pub recipe: Option<serde_json::Value>,
    /// Names of the data columns, then of the context columns, as the training file's
    /// header gave them; without them, [`feature_names`](Self::feature_names) and
    /// [`context_names`](Self::context_names) number the columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

/// A [`ModelConfig`] as files hold it. Files from before models had a context
/// dimension of their own give each layer's; the model's is then the layers'.
#[derive(Deserialize)]
struct Stored {
    dim: usize,
    context_dim: Option<usize>,
    #[serde(default)]
    standardize: bool,
    #[serde(default)]
    standardize_context: bool,
    #[serde(default)]
    bounds: Option<Vec<Bound>>,
    #[serde(default)]
    bounds_by: BoundsBy,
    layers: Vec<LayerSpec>,
    #[serde(default)]
    base: BaseConfig,
    #[serde(default, alias = "realnvp")]
    recipe: Option<serde_json::Value>,
    #[serde(default)]
    columns: Option<Vec<String>>,
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
            standardize_context: s.standardize_context,
            bounds: s.bounds,
            bounds_by: s.bounds_by,
            layers: s.layers,
            base: s.base,
            recipe: s.recipe,
            columns: s.columns,
        }
    }
}

/// A data value outside a model's bounds: its row and column, from 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutOfBounds {
    pub row: usize,
    pub column: usize,
    pub value: f32,
    pub bound: Bound,
}

impl std::fmt::Display for OutOfBounds {
    /// Rows and columns counted from 1, as files are read.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "row {}, column {}: {} lies outside the model's bounds {} (ends excluded)",
            self.row + 1,
            self.column + 1,
            self.value,
            self.bound
        )
    }
}

/// The longest column name a model keeps.
pub const MAX_COLUMN_NAME: usize = 256;

/// Checks `names` as the names of `width` columns: one each, and each a plain CSV
/// header cell (not empty, at most [`MAX_COLUMN_NAME`] bytes, no comma, quote or
/// control character), so that files written with them read back the same.
fn check_columns(names: &[String], width: usize) -> std::result::Result<(), String> {
    if names.len() != width {
        return Err(format!(
            "{} column names for {width} columns (features, then context features)",
            names.len()
        ));
    }
    for name in names {
        let shown: String = name.chars().take(40).collect();
        if name.is_empty() || name.trim() != name {
            return Err(format!(
                "column name `{shown}` is empty or padded with spaces"
            ));
        }
        if name.len() > MAX_COLUMN_NAME {
            return Err(format!(
                "column name `{shown}…` is longer than {MAX_COLUMN_NAME} bytes"
            ));
        }
        if name.chars().any(|c| c == ',' || c == '"' || c.is_control()) {
            return Err(format!(
                "column name `{shown}` holds a comma, quote or control character"
            ));
        }
    }
    Ok(())
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
            standardize_context: false,
            bounds: None,
            bounds_by: BoundsBy::Logit,
            layers,
            base: BaseConfig::StandardNormal,
            recipe: None,
            columns: None,
        }
    }

    /// A family's recipe as a model: its layers, with the recipe kept under the name
    /// of the family it describes.
    pub fn from_recipe(recipe: &impl Recipe) -> Self {
        Self::from_spelled(Spelled::new(recipe))
    }

    /// A spelled-out recipe as a model.
    pub(crate) fn from_spelled(spelled: Spelled) -> Self {
        let base = if spelled.learned_base {
            BaseConfig::DiagNormal { trainable: true }
        } else {
            BaseConfig::StandardNormal
        };
        Self {
            context_dim: spelled.context_dim,
            recipe: Some(spelled.recipe),
            base,
            ..Self::new(spelled.dim, spelled.layers)
        }
    }

    /// A RealNVP (or NICE) stack as a model, with the description kept as its recipe.
    #[cfg(feature = "realnvp")]
    pub fn realnvp(cfg: &flow_realnvp::RealNvpConfig) -> Self {
        Self::from_recipe(cfg)
    }

    /// A neural spline flow (coupling or autoregressive) as a model.
    #[cfg(feature = "nsf")]
    pub fn nsf(cfg: &flow_nsf::NsfConfig) -> Self {
        Self::from_recipe(cfg)
    }

    /// A MAF (or IAF) as a model.
    #[cfg(feature = "maf")]
    pub fn maf(cfg: &flow_maf::MafConfig) -> Self {
        Self::from_recipe(cfg)
    }

    /// A Glow image flow as a model: its `[logit?, multiscale]` layers, a trainable
    /// diagonal Gaussian base over the latent when `learn_base` (one per level, per
    /// element), and the configuration (image shape, pixel levels) as the recipe.
    #[cfg(feature = "glow")]
    pub fn glow(cfg: &flow_glow::GlowConfig) -> Self {
        Self::from_recipe(cfg)
    }

    /// RealNVP's multi-scale image flow as a model, as [`glow`](Self::glow).
    #[cfg(feature = "glow")]
    pub fn realnvp_image(cfg: &flow_glow::RealNvpImageConfig) -> Self {
        Self::from_recipe(cfg)
    }

    /// The name of the family the recipe names, if it names one.
    pub fn family_name(&self) -> Option<&str> {
        self.recipe.as_ref()?.get("family")?.as_str()
    }

    /// The built-in family the recipe names, if it names one
    /// ([`Registry::family_of`] for another registry's).
    pub fn family(&self) -> Option<Family> {
        Registry::builtin().family_of(self)
    }

    /// The image shape and pixel levels of an image model (one whose family models
    /// images), from its recipe; `None` for other models.
    pub fn image_info(&self) -> Option<ImageInfo> {
        if !self.family()?.is_image() {
            return None;
        }
        serde_json::from_value(self.recipe.clone()?).ok()
    }

    /// The pixel levels `L` of an image model, from its recipe: its data are whole
    /// numbers in `[0, L)`, dequantised for training. `None` for other models.
    pub fn pixel_levels(&self) -> Option<u32> {
        if !self.family()?.is_image() {
            return None;
        }
        let levels = self.recipe.as_ref()?.get("pixel_levels")?.as_u64()?;
        levels.try_into().ok()
    }

    /// The standard deviation of the Gaussian noise an image model's training data
    /// get on top of their dequantisation (its recipe's `noise_std`, the noise
    /// augmentation an image family may declare); 0 for models without one.
    pub fn noise_std(&self) -> f64 {
        if !self.family().is_some_and(|f| f.is_image()) {
            return 0.0;
        }
        let recipe = self.recipe.as_ref();
        recipe
            .and_then(|r| r.get("noise_std")?.as_f64())
            .unwrap_or(0.0)
    }

    flow_core::with_setters! {
        with_context_dim: context_dim: usize,
        with_standardize: standardize: bool,
        with_standardize_context: standardize_context: bool,
        with_base: base: BaseConfig,
    }

    /// The model confined to a box: one [`Bound`] per feature (checked by
    /// [`validate`](Self::validate)).
    pub fn with_bounds(self, bounds: Vec<Bound>) -> Self {
        Self {
            bounds: Some(bounds),
            ..self
        }
    }

    /// The model with its bounds held by `by` (they apply only with bounds).
    pub fn with_bounds_by(self, by: BoundsBy) -> Self {
        Self {
            bounds_by: by,
            ..self
        }
    }

    /// The bounds a flow built from this model holds by its logit map in front
    /// ([`BoundsBy::Logit`]).
    pub fn mapped_bounds(&self) -> Option<&[Bound]> {
        self.bounds_held_by(BoundsBy::Logit)
    }

    /// The bounds a flow built from this model does not hold by itself, which its
    /// draws and densities are restricted to ([`BoundsBy::Rejection`]).
    pub fn truncation(&self) -> Option<&[Bound]> {
        self.bounds_held_by(BoundsBy::Rejection)
    }

    fn bounds_held_by(&self, by: BoundsBy) -> Option<&[Bound]> {
        self.bounds.as_deref().filter(|_| self.bounds_by == by)
    }

    /// The first value of `values` (rows of [`dim`](Self::dim) features) outside the
    /// model's bounds; `None` when every value is inside, or the model has no bounds.
    pub fn outside_bounds(&self, values: &[f32]) -> Option<OutOfBounds> {
        let bounds = self.bounds.as_ref()?;
        values
            .chunks(self.dim.max(1))
            .enumerate()
            .find_map(|(row, values)| {
                values
                    .iter()
                    .zip(bounds)
                    .enumerate()
                    .find(|(_, (&v, b))| !b.contains(f64::from(v)))
                    .map(|(column, (&value, &bound))| OutOfBounds {
                        row,
                        column,
                        value,
                        bound,
                    })
            })
    }

    /// The model with names for its data columns, then its context columns (checked
    /// by [`validate`](Self::validate)).
    pub fn with_columns(self, names: Vec<String>) -> Self {
        Self {
            columns: Some(names),
            ..self
        }
    }

    /// The data columns' names: the recorded ones, else `x0, x1, …`.
    pub fn feature_names(&self) -> Vec<String> {
        match &self.columns {
            Some(names) => names[..self.dim.min(names.len())].to_vec(),
            None => (0..self.dim).map(|j| format!("x{j}")).collect(),
        }
    }

    /// The context columns' names: the recorded ones, else `c0, c1, …`.
    pub fn context_names(&self) -> Vec<String> {
        match &self.columns {
            Some(names) => names[self.dim.min(names.len())..].to_vec(),
            None => (0..self.context_dim).map(|j| format!("c{j}")).collect(),
        }
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
        limits::check_at_most("features", self.dim, limits::MAX_DIM)?;
        limits::check_at_most("context features", self.context_dim, limits::MAX_DIM)?;
        if let BaseConfig::Mixture { components } = self.base {
            if components == 0 {
                return Err("a mixture base needs at least one component".into());
            }
            limits::check_at_most("mixture components", components, limits::MAX_COMPONENTS)?;
            limits::checked_product(
                "a mixture base's means",
                &[components, self.dim],
                limits::MAX_TENSOR_ELEMENTS,
            )?;
        }
        if let Some(names) = &self.columns {
            check_columns(names, self.dim + self.context_dim)?;
        }
        if self.standardize_context && self.context_dim == 0 {
            return Err("context standardisation needs context features".into());
        }
        if self.bounds.is_none() && !self.bounds_by.is_logit() {
            return Err("bounds held by rejection, but the model has no bounds".into());
        }
        if let Some(bounds) = &self.bounds {
            if bounds.len() != self.dim {
                return Err(format!(
                    "{} bounds for {} features: give one per feature",
                    bounds.len(),
                    self.dim
                ));
            }
            for (j, b) in bounds.iter().enumerate() {
                b.validate()
                    .map_err(|e| format!("bounds of column {}: {e}", j + 1))?;
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            registry
                .check(layer, self.dim, self.context_dim)
                .map_err(|e| format!("layer {i}: {e}"))?;
        }
        #[cfg(feature = "glow")]
        self.check_image_recipe()?;
        Ok(())
    }

    /// Checks an image model's recipe against its layers: the commands that read and
    /// write images take the shape and pixel levels from it.
    #[cfg(feature = "glow")]
    fn check_image_recipe(&self) -> std::result::Result<(), String> {
        let Some(family) = self.family().filter(Family::is_image).map(|f| f.name()) else {
            return Ok(());
        };
        let recipe = self.recipe.clone().unwrap_or_default();
        let info: flow_glow::ImageInfo = serde_json::from_value(recipe)
            .map_err(|e| format!("the `{family}` recipe does not give the images: {e}"))?;
        info.shape
            .validate()
            .map_err(|e| format!("the `{family}` recipe: {e}"))?;
        let levels = info.pixel_levels;
        if !(2..=limits::MAX_PIXEL_LEVELS).contains(&levels) {
            return Err(format!(
                "the `{family}` recipe gives {levels} pixel levels: they must lie in 2..={}",
                limits::MAX_PIXEL_LEVELS
            ));
        }
        let layers = self
            .layers
            .iter()
            .filter_map(|l| l.tagged_as::<flow_glow::GlowLayer>().ok());
        let first_shape = layers.filter_map(|l| l.input_shape()).next();
        let agrees = match first_shape {
            Some(shape) => shape == info.shape,
            None => info.shape.dim() == self.dim,
        };
        if !agrees {
            let layers = match first_shape {
                Some(shape) => format!("{shape} images"),
                None => format!("{} features", self.dim),
            };
            return Err(format!(
                "the `{family}` recipe gives {} images, the layers take {layers}",
                info.shape
            ));
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
        if let Some(bounds) = self.mapped_bounds() {
            chain.push(Bounded::new(bounds, vb.dtype(), &device)?);
        }
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
        let mut bijector: Box<dyn Bijector> = Box::new(chain);
        if self.standardize_context {
            let vb = vb.pp("context_standardize");
            let c = self.context_dim;
            let mean = vb.get_with_hints(c, "mean", candle_nn::init::ZERO)?;
            let std = vb.get_with_hints(c, "std", candle_nn::init::ONE)?;
            bijector = Box::new(ContextStandardize::new(bijector, &mean, &std)?);
        }
        Ok(Flow::from_boxed(bijector, base))
    }

    /// Float types the layers support.
    pub fn supports(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64)
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

    /// The message `validate` gives, which must exist.
    fn refused(cfg: &ModelConfig) -> String {
        cfg.validate().expect_err("refused")
    }

    #[test]
    fn sizes_beyond_the_limits_are_refused_before_anything_is_made() {
        use flow_core::limits::{MAX_COMPONENTS, MAX_DIM, MAX_HIDDEN};
        let maf = |dim: usize, hidden: usize| {
            ModelConfig::maf(&flow_maf::MafConfig::new(dim).with_hidden(hidden))
        };
        assert_eq!(maf(2, 64).validate(), Ok(()));
        // The order of a layer lists the features, so the model's size is checked
        // first: no layer check allocates for 10^12 features.
        let mut huge = maf(2, 64);
        huge.dim = 1_000_000_000_000;
        assert_eq!(
            refused(&huge),
            format!("1000000000000 features: more than the limit of {MAX_DIM}")
        );
        assert_eq!(
            refused(&maf(2, 99_999_999_999)),
            format!(
                "layer 0: 99999999999 hidden units in a layer: more than the limit of {MAX_HIDDEN}"
            )
        );
        let mixture = maf(2, 64).with_base(BaseConfig::Mixture {
            components: 99_999_999_999,
        });
        assert_eq!(
            refused(&mixture),
            format!("99999999999 mixture components: more than the limit of {MAX_COMPONENTS}")
        );
        let nsf = |bins| {
            ModelConfig::nsf(
                &flow_nsf::NsfConfig::new(2).with_spline(flow_nsf::Spline::new(bins, 5.0)),
            )
        };
        assert_eq!(nsf(64).validate(), Ok(()));
        assert_eq!(
            refused(&nsf(1001)),
            "layer 0: 1001 spline bins: more than the limit of 1000"
        );
        // Widths within their bounds whose weight matrix is not.
        let wide = ModelConfig::realnvp(
            &flow_realnvp::RealNvpConfig::new(1 << 16)
                .with_hidden(MAX_HIDDEN)
                .with_layers(1),
        );
        let err = refused(&wide);
        assert!(
            err.starts_with("layer 0: a weight matrix of 65536 × 65536 values"),
            "{err}"
        );
    }

    #[test]
    fn an_image_recipe_must_agree_with_the_layers() {
        use flow_glow::{GlowConfig, ImageShape};
        let glow = || {
            ModelConfig::glow(
                &GlowConfig::new(ImageShape::new(1, 8, 8))
                    .with_levels(2)
                    .with_depth(1)
                    .with_hidden_channels(4),
            )
        };
        assert_eq!(glow().validate(), Ok(()));
        let wide = ModelConfig::glow(
            &GlowConfig::new(ImageShape::new(1, 8, 8))
                .with_levels(1)
                .with_depth(1)
                .with_hidden_channels(99_999_999_999),
        );
        let err = refused(&wide);
        assert!(
            err.ends_with("99999999999 hidden channels: more than the limit of 65536"),
            "{err}"
        );
        let with_recipe = |key: &str, value: serde_json::Value| {
            let mut cfg = glow();
            if let Some(serde_json::Value::Object(r)) = &mut cfg.recipe {
                r.insert(key.into(), value);
            }
            cfg
        };
        let shape =
            |c: u64, h: u64, w: u64| serde_json::json!({"channels": c, "height": h, "width": w});
        assert_eq!(
            refused(&with_recipe("shape", shape(1, 2, 2))),
            "the `glow` recipe gives 1×2×2 images, the layers take 1×8×8 images"
        );
        // The same number of features in another shape.
        assert_eq!(
            refused(&with_recipe("shape", shape(4, 4, 4))),
            "the `glow` recipe gives 4×4×4 images, the layers take 1×8×8 images"
        );
        assert_eq!(
            refused(&with_recipe("pixel_levels", 0.into())),
            "the `glow` recipe gives 0 pixel levels: they must lie in 2..=65536"
        );
        assert_eq!(
            refused(&with_recipe("shape", shape(2_305_843_009_213_693_954, 8, 1))),
            "the `glow` recipe: an image of 2305843009213693954 × 8 × 1 values: more than the limit of 16777216"
        );
        let err = refused(&with_recipe("shape", "8x8".into()));
        assert!(
            err.starts_with("the `glow` recipe does not give the images: "),
            "{err}"
        );
    }

    #[test]
    fn older_files_read_with_the_layers_context() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        assert_eq!(cfg.context_dim, 1);
        assert!(cfg.recipe.is_some());
        cfg.validate().expect("valid");
        let again: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("json")).expect("read");
        assert_eq!(again, cfg);
        assert_eq!(cfg.columns, None);
        assert_eq!(
            (cfg.feature_names(), cfg.context_names()),
            (
                vec!["x0".to_string(), "x1".to_string()],
                vec!["c0".to_string()]
            )
        );
    }

    #[test]
    fn older_files_have_no_context_standardisation_or_bounds() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        assert!(!cfg.standardize_context);
        assert_eq!(cfg.bounds, None);
        let json = serde_json::to_string(&cfg).expect("json");
        assert!(!json.contains("bounds"), "{json}");
    }

    #[test]
    fn bounds_and_context_standardisation_are_checked_against_the_model() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        let inside = Bound::new(Some(-1.0), Some(1.0));
        let bounded = cfg
            .clone()
            .with_bounds(vec![inside, Bound::new(Some(0.0), None)]);
        bounded.validate().expect("valid bounds");
        let again: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&bounded).expect("json")).expect("read");
        assert_eq!(again, bounded);
        assert_eq!(
            refused(&cfg.clone().with_bounds(vec![inside])),
            "1 bounds for 2 features: give one per feature"
        );
        assert_eq!(
            refused(
                &cfg.clone()
                    .with_bounds(vec![inside, Bound::new(Some(2.0), Some(0.0))])
            ),
            "bounds of column 2: the lower bound 2 is not below the upper bound 0 in f32"
        );
        let unconditional = ModelConfig {
            context_dim: 0,
            layers: Vec::new(),
            ..cfg
        };
        assert_eq!(
            refused(&unconditional.with_standardize_context(true)),
            "context standardisation needs context features"
        );
        // The first value outside, with its place counted from 1.
        let outside = bounded.outside_bounds(&[0.0, 1.0, 0.5, 3.0, 1.0, 0.0]);
        assert_eq!(
            outside.map(|o| o.to_string()).as_deref(),
            Some("row 3, column 1: 1 lies outside the model's bounds -1:1 (ends excluded)")
        );
        assert_eq!(bounded.outside_bounds(&[0.0, 1.0, 0.5, 3.0]), None);
    }

    #[test]
    fn bounds_held_by_rejection_are_stored_and_build_no_map() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        assert_eq!(cfg.bounds_by, BoundsBy::Logit);
        let bounds = vec![Bound::new(Some(-1.0), Some(1.0)), Bound::unbounded()];
        let logit = cfg.clone().with_bounds(bounds.clone());
        let rejection = logit.clone().with_bounds_by(BoundsBy::Rejection);
        let json = serde_json::to_string(&rejection).expect("json");
        assert!(json.contains(r#""bounds_by":"rejection""#), "{json}");
        let again: ModelConfig = serde_json::from_str(&json).expect("read");
        assert_eq!(again, rejection);
        assert_eq!(again.truncation(), Some(&bounds[..]));
        assert_eq!(logit.truncation(), None);
        // Without the map, a point outside the box is the flow's to score; with it,
        // the map has no value there.
        let log_p = |c: &ModelConfig| {
            let device = candle::Device::Cpu;
            let vb = VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &device);
            let flow = c.build(vb).expect("build");
            let x = candle::Tensor::new(&[[2f32, 0.0]], &device).expect("x");
            let context = candle::Tensor::new(&[[0f32]], &device).expect("context");
            let log_p = flow
                .log_prob_with_context(&x, Some(&context))
                .expect("log p");
            log_p.to_vec1::<f32>().expect("values")[0]
        };
        assert!(log_p(&rejection).is_finite());
        assert!(log_p(&logit).is_nan());
        assert_eq!(
            refused(&cfg.with_bounds_by(BoundsBy::Rejection)),
            "bounds held by rejection, but the model has no bounds"
        );
        assert_eq!(BoundsBy::parse("rejection"), Ok(BoundsBy::Rejection));
        assert_eq!(
            BoundsBy::parse("clip").unwrap_err(),
            "--bounds-by `clip`: expected logit or rejection"
        );
    }

    #[test]
    fn column_names_are_kept_and_checked() {
        let cfg: ModelConfig = serde_json::from_str(OLD).expect("old configuration");
        let named = cfg
            .clone()
            .with_columns(vec!["theta0".into(), "theta1".into(), "obs".into()]);
        named.validate().expect("valid names");
        let again: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&named).expect("json")).expect("read");
        assert_eq!(again, named);
        assert_eq!(again.feature_names(), ["theta0", "theta1"]);
        assert_eq!(again.context_names(), ["obs"]);
        let cases: [(Vec<&str>, &str); 4] = [
            (vec!["a", "b"], "2 column names for 3 columns"),
            (vec!["a", "b,c", "d"], "`b,c` holds a comma"),
            (vec!["a", "", "d"], "empty"),
            (vec!["a", "b", "new\nline"], "control character"),
        ];
        for (names, want) in cases {
            let names = names.iter().map(|n| n.to_string()).collect();
            let e = cfg.clone().with_columns(names).validate().expect_err(want);
            assert!(e.contains(want), "{e}");
        }
    }
}
