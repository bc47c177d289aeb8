//! The Glow and RealNVP image architectures as configurations that spell out their
//! layers.

use flow_core::{image::DEFAULT_PIXEL_LEVELS, ImageInfo, LayerSpec};
use flow_nn::{Activation, ScaleMap};
use serde::{Deserialize, Serialize};

use crate::{
    ActNormConfig, BatchNormConfig, ConvCouplingConfig, CouplingMask, GlowLayer, ImageShape,
    InvConv1x1Config, LogitConfig, MultiScaleConfig, SqueezeConfig,
};

/// `(C, H, W) → (4C, H/2, W/2)` without checking (a configuration that cannot squeeze
/// is reported by its `squeeze` layer's check).
fn squeezed(s: ImageShape) -> ImageShape {
    ImageShape::new(s.channels.saturating_mul(4), s.height / 2, s.width / 2)
}

/// The first of the named counts that is 0, as an error.
fn at_least_one(counts: &[(&str, usize)]) -> Result<(), String> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(format!("`{name}` must be at least 1")),
        None => Ok(()),
    }
}

fn check_common(
    shape: ImageShape,
    squeezes: usize,
    pixel_levels: u32,
    logit: Option<f64>,
) -> Result<(), String> {
    shape.validate()?;
    let factor = 1usize.checked_shl(squeezes as u32).unwrap_or(0);
    if factor == 0 || !shape.height.is_multiple_of(factor) || !shape.width.is_multiple_of(factor) {
        return Err(format!(
            "{squeezes} squeezes need a height and width divisible by 2^{squeezes}, got a {shape} image"
        ));
    }
    if pixel_levels < 2 {
        return Err(format!("pixels need at least 2 levels, got {pixel_levels}"));
    }
    if let Some(alpha) = logit {
        LogitConfig::new(shape.dim()).with_alpha(alpha).validate()?;
    }
    Ok(())
}

/// Levels (scales) of the small image flows, [`GlowConfig::small`] and
/// [`RealNvpImageConfig::small`]: two squeezes fit 8×8 digits and 28×28 MNIST alike.
pub const SMALL_LEVELS: usize = 2;
/// Flow steps per level of [`GlowConfig::small`].
pub const SMALL_DEPTH: usize = 8;
/// Hidden channels of the small image flows' convolutional conditioners.
pub const SMALL_HIDDEN_CHANNELS: usize = 64;

/// Glow (Kingma & Dhariwal 2018): `levels` (L) levels, each
///
/// `squeeze`, then `depth` (K) steps of `actnorm → inv-conv1x1 → conv-coupling`
/// (channel split: the first half conditions the second),
///
/// and after every level but the last half of the channels factored out (see
/// [`MultiScale`](crate::MultiScale) for the latent's layout), all as one `multiscale`
/// layer, behind an optional `logit` layer. Data are expected as
/// `x = (pixel + u) / pixel_levels` in `[0, 1)`; ActNorm's data-dependent
/// initialisation takes the place of Glow's `x − ½`.
///
/// The defaults are the paper's CIFAR-10 model: L = 3, K = 32, 512 hidden channels,
/// LU-decomposed 1×1 convolutions, `σ(s + 2)` scales, zero-initialised last
/// convolutions, and a learned diagonal Gaussian base (`learn_base`; the paper's
/// learned prior is not conditioned on the channels that go on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GlowConfig {
    pub shape: ImageShape,
    /// L: levels, each starting with a squeeze.
    pub levels: usize,
    /// K: flow steps per level.
    pub depth: usize,
    pub hidden_channels: usize,
    pub activation: Activation,
    pub scale: ScaleMap,
    /// LU-parametrised 1×1 convolutions (otherwise plain ones).
    pub lu: bool,
    /// Couplings start as the identity.
    pub zero_init: bool,
    /// `Some(α)`: a `logit` layer with this α in front of the levels.
    pub logit: Option<f64>,
    /// Values a pixel takes (256 for 8-bit images), for bits per dimension.
    pub pixel_levels: u32,
    /// A trainable diagonal Gaussian base over the latent (one per level, per element),
    /// rather than `N(0, I)`.
    pub learn_base: bool,
    /// The couplings' `sigmoid` scale as `log σ(s + 2)` exactly (normflows' Glow), not
    /// `log(σ(s + 2) + 1e-3)`; see [`ConvCouplingConfig`]. Omitted from the JSON when
    /// false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exact_sigmoid: bool,
}

impl Default for GlowConfig {
    fn default() -> Self {
        Self {
            shape: ImageShape::new(3, 32, 32),
            levels: 3,
            depth: 32,
            hidden_channels: 512,
            activation: Activation::Relu,
            scale: ScaleMap::Sigmoid,
            lu: true,
            zero_init: true,
            logit: None,
            pixel_levels: DEFAULT_PIXEL_LEVELS,
            learn_base: true,
            exact_sigmoid: false,
        }
    }
}

impl GlowConfig {
    /// The paper's configuration for images of `shape`.
    pub fn new(shape: ImageShape) -> Self {
        Self {
            shape,
            ..Self::default()
        }
    }

    /// A small Glow for small images such as the digits: [`SMALL_LEVELS`] levels of
    /// [`SMALL_DEPTH`] steps with [`SMALL_HIDDEN_CHANNELS`] hidden channels, otherwise
    /// the paper's settings.
    pub fn small(shape: ImageShape) -> Self {
        Self::new(shape)
            .with_levels(SMALL_LEVELS)
            .with_depth(SMALL_DEPTH)
            .with_hidden_channels(SMALL_HIDDEN_CHANNELS)
    }

    flow_core::with_setters! {
        with_levels: levels: usize,
        with_depth: depth: usize,
        with_hidden_channels: hidden_channels: usize,
        with_activation: activation: Activation,
        with_scale: scale: ScaleMap,
        with_lu: lu: bool,
        with_zero_init: zero_init: bool,
        with_logit: logit: Option<f64>,
        with_pixel_levels: pixel_levels: u32,
        with_learn_base: learn_base: bool,
        with_exact_sigmoid: exact_sigmoid: bool,
    }

    /// Features per image.
    pub fn dim(&self) -> usize {
        self.shape.dim()
    }

    /// The recorded image shape and pixel levels.
    pub fn image_info(&self) -> ImageInfo {
        ImageInfo {
            shape: self.shape,
            pixel_levels: self.pixel_levels,
        }
    }

    /// Checks the sizes: at least one level and step, and an image that `levels`
    /// squeezes fit.
    pub fn validate(&self) -> Result<(), String> {
        at_least_one(&[
            ("levels", self.levels),
            ("depth", self.depth),
            ("hidden_channels", self.hidden_channels),
        ])?;
        check_common(self.shape, self.levels, self.pixel_levels, self.logit)?;
        self.multiscale().latent_shapes().map(|_| ())
    }

    fn multiscale(&self) -> MultiScaleConfig {
        let mut shape = self.shape;
        let mut levels = Vec::with_capacity(self.levels);
        for l in 0..self.levels {
            let mut level = vec![GlowLayer::Squeeze(SqueezeConfig::new(shape)).spec()];
            shape = squeezed(shape);
            for _ in 0..self.depth {
                level.push(GlowLayer::ActNorm(ActNormConfig::new(shape)).spec());
                level.push(
                    GlowLayer::InvConv1x1(InvConv1x1Config::new(shape).with_lu(self.lu)).spec(),
                );
                let coupling = ConvCouplingConfig::new(shape, CouplingMask::Channel)
                    .with_hidden_channels(self.hidden_channels)
                    .with_activation(self.activation)
                    .with_scale(self.scale)
                    .with_zero_init(self.zero_init)
                    .with_exact_sigmoid(self.exact_sigmoid);
                level.push(GlowLayer::ConvCoupling(coupling).spec());
            }
            levels.push(level);
            if l + 1 < self.levels {
                shape = shape.with_channels(shape.channels / 2);
            }
        }
        MultiScaleConfig::new(self.shape, levels)
    }

    /// The shapes of the latent's parts, in order (finest level's factored-out
    /// channels first, the last level's output last).
    pub fn latent_shapes(&self) -> Result<Vec<ImageShape>, String> {
        self.validate()?;
        self.multiscale().latent_shapes()
    }

    /// The model's layers: `[logit?, multiscale]`.
    pub fn layers(&self) -> Vec<LayerSpec> {
        let mut layers = Vec::with_capacity(2);
        if let Some(alpha) = self.logit {
            layers.push(GlowLayer::Logit(LogitConfig::new(self.dim()).with_alpha(alpha)).spec());
        }
        layers.push(GlowLayer::MultiScale(self.multiscale()).spec());
        layers
    }
}

/// RealNVP's multi-scale image architecture (Dinh et al. 2016, §3.6, §4.1): `scales`
/// scales; each but the last is
///
/// 3 checkerboard couplings (alternating colours), `squeeze`, 3 channel-wise couplings
/// (alternating halves), then half the channels factored out;
///
/// the last is 4 checkerboard couplings. With `batch_norm`, a `batch-norm` layer
/// follows every coupling; a `logit` layer (α = 0.05) comes first.
///
/// Deviations from the paper, for a small and plain model: the conditioner is the
/// three-convolution network of [`ConvCoupling`](crate::ConvCoupling) rather than a
/// residual network with batch normalisation inside, the log-scale is
/// `clamp·tanh(s/clamp)` with a fixed clamp (the paper learns the tanh's scale), the
/// couplings start as the identity (`zero_init`), and there is no L2 penalty; the base
/// is `N(0, I)` unless `learn_base`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RealNvpImageConfig {
    pub shape: ImageShape,
    /// Scales; `scales − 1` squeezes.
    pub scales: usize,
    pub hidden_channels: usize,
    pub activation: Activation,
    pub scale: ScaleMap,
    pub zero_init: bool,
    /// A `batch-norm` layer after every coupling.
    pub batch_norm: bool,
    /// `Some(α)`: a `logit` layer with this α first.
    pub logit: Option<f64>,
    /// Values a pixel takes (256 for 8-bit images), for bits per dimension.
    pub pixel_levels: u32,
    /// A trainable diagonal Gaussian base rather than `N(0, I)`.
    pub learn_base: bool,
}

impl Default for RealNvpImageConfig {
    fn default() -> Self {
        Self {
            shape: ImageShape::new(3, 32, 32),
            scales: 3,
            hidden_channels: 64,
            activation: Activation::Relu,
            scale: ScaleMap::Tanh { clamp: 2.0 },
            zero_init: true,
            batch_norm: true,
            logit: Some(0.05),
            pixel_levels: DEFAULT_PIXEL_LEVELS,
            learn_base: false,
        }
    }
}

impl RealNvpImageConfig {
    pub fn new(shape: ImageShape) -> Self {
        Self {
            shape,
            ..Self::default()
        }
    }

    /// A small RealNVP image flow: [`SMALL_LEVELS`] scales with
    /// [`SMALL_HIDDEN_CHANNELS`] hidden channels, otherwise as [`Self::new`].
    pub fn small(shape: ImageShape) -> Self {
        Self::new(shape)
            .with_scales(SMALL_LEVELS)
            .with_hidden_channels(SMALL_HIDDEN_CHANNELS)
    }

    flow_core::with_setters! {
        with_scales: scales: usize,
        with_hidden_channels: hidden_channels: usize,
        with_activation: activation: Activation,
        with_scale: scale: ScaleMap,
        with_zero_init: zero_init: bool,
        with_batch_norm: batch_norm: bool,
        with_logit: logit: Option<f64>,
        with_pixel_levels: pixel_levels: u32,
        with_learn_base: learn_base: bool,
    }

    pub fn dim(&self) -> usize {
        self.shape.dim()
    }

    pub fn image_info(&self) -> ImageInfo {
        ImageInfo {
            shape: self.shape,
            pixel_levels: self.pixel_levels,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        at_least_one(&[
            ("scales", self.scales),
            ("hidden_channels", self.hidden_channels),
        ])?;
        check_common(self.shape, self.scales - 1, self.pixel_levels, self.logit)?;
        self.multiscale().latent_shapes().map(|_| ())
    }

    /// A coupling (and its batch norm) at `shape`.
    fn coupling(&self, shape: ImageShape, mask: CouplingMask, level: &mut Vec<LayerSpec>) {
        let c = ConvCouplingConfig::new(shape, mask)
            .with_hidden_channels(self.hidden_channels)
            .with_activation(self.activation)
            .with_scale(self.scale)
            .with_zero_init(self.zero_init);
        level.push(GlowLayer::ConvCoupling(c).spec());
        if self.batch_norm {
            level.push(GlowLayer::BatchNorm(BatchNormConfig::new(shape)).spec());
        }
    }

    fn multiscale(&self) -> MultiScaleConfig {
        let mut shape = self.shape;
        let mut levels = Vec::with_capacity(self.scales);
        for s in 0..self.scales {
            let mut level = Vec::new();
            let mut mask = CouplingMask::Checkerboard;
            if s + 1 < self.scales {
                for _ in 0..3 {
                    self.coupling(shape, mask, &mut level);
                    mask = mask.flipped();
                }
                level.push(GlowLayer::Squeeze(SqueezeConfig::new(shape)).spec());
                shape = squeezed(shape);
                let mut mask = CouplingMask::Channel;
                for _ in 0..3 {
                    self.coupling(shape, mask, &mut level);
                    mask = mask.flipped();
                }
                levels.push(level);
                shape = shape.with_channels(shape.channels / 2);
            } else {
                for _ in 0..4 {
                    self.coupling(shape, mask, &mut level);
                    mask = mask.flipped();
                }
                levels.push(level);
            }
        }
        MultiScaleConfig::new(self.shape, levels)
    }

    /// The shapes of the latent's parts, in order.
    pub fn latent_shapes(&self) -> Result<Vec<ImageShape>, String> {
        self.validate()?;
        self.multiscale().latent_shapes()
    }

    /// The model's layers: `[logit?, multiscale]`.
    pub fn layers(&self) -> Vec<LayerSpec> {
        let mut layers = Vec::with_capacity(2);
        if let Some(alpha) = self.logit {
            layers.push(GlowLayer::Logit(LogitConfig::new(self.dim()).with_alpha(alpha)).spec());
        }
        layers.push(GlowLayer::MultiScale(self.multiscale()).spec());
        layers
    }
}
