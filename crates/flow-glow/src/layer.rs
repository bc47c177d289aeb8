//! The layer kinds of this crate as one tagged configuration, as a model configuration
//! lists them.

use candle::Result;
use candle_nn::VarBuilder;
use flow_core::{Bijector, FixedLayers, LayerFamily, LayerSpec};
use serde::{Deserialize, Serialize};

use crate::{
    ActNorm, ActNormConfig, BatchNorm, BatchNormConfig, ConvCoupling, ConvCouplingConfig,
    ImageShape, InvConv1x1, InvConv1x1Config, Logit, LogitConfig, MultiScale, MultiScaleConfig,
    Squeeze, SqueezeConfig, Unsqueeze,
};

/// One layer of this crate, fully specified; its JSON form names its kind under `type`:
///
/// | `type` | settings |
/// | --- | --- |
/// | `actnorm` | [`ActNormConfig`]: `shape`, `eps` |
/// | `inv-conv1x1` | [`InvConv1x1Config`]: `shape`, `lu` |
/// | `conv-coupling` | [`ConvCouplingConfig`]: `shape`, `mask`, `hidden_channels`, `activation`, `scale`, `zero_init`, `exact_sigmoid` |
/// | `squeeze`, `unsqueeze` | [`SqueezeConfig`]: `shape` (the input's) |
/// | `batch-norm` | [`BatchNormConfig`]: `shape`, `momentum`, `eps` |
/// | `logit` | [`LogitConfig`]: `dim`, `alpha` |
/// | `multiscale` | [`MultiScaleConfig`]: `shape`, `levels` (lists of layers) |
///
/// e.g. `{"type": "actnorm", "shape": {"channels": 3, "height": 32, "width": 32}, "eps": 1e-6}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum GlowLayer {
    #[serde(rename = "actnorm")]
    ActNorm(ActNormConfig),
    #[serde(rename = "inv-conv1x1")]
    InvConv1x1(InvConv1x1Config),
    #[serde(rename = "conv-coupling")]
    ConvCoupling(ConvCouplingConfig),
    #[serde(rename = "squeeze")]
    Squeeze(SqueezeConfig),
    #[serde(rename = "unsqueeze")]
    Unsqueeze(SqueezeConfig),
    #[serde(rename = "batch-norm")]
    BatchNorm(BatchNormConfig),
    #[serde(rename = "logit")]
    Logit(LogitConfig),
    #[serde(rename = "multiscale")]
    MultiScale(MultiScaleConfig),
}

impl GlowLayer {
    /// Every `type` above.
    pub const KINDS: [&'static str; 8] = [
        "actnorm",
        "inv-conv1x1",
        "conv-coupling",
        "squeeze",
        "unsqueeze",
        "batch-norm",
        "logit",
        "multiscale",
    ];

    /// The layer as a model configuration lists it.
    pub fn spec(&self) -> LayerSpec {
        LayerSpec::tagged(self).expect("every variant serialises to an object with its `type`")
    }

    /// Features per row, in and out (no layer here changes the count).
    pub fn dim(&self) -> usize {
        match self {
            Self::ActNorm(c) => c.shape.dim(),
            Self::InvConv1x1(c) => c.shape.dim(),
            Self::ConvCoupling(c) => c.shape.dim(),
            Self::Squeeze(c) | Self::Unsqueeze(c) => c.shape.dim(),
            Self::BatchNorm(c) => c.shape.dim(),
            Self::Logit(c) => c.dim,
            Self::MultiScale(c) => c.shape.dim(),
        }
    }

    /// The image shape it takes, for the kinds that have one (all but `logit`).
    pub fn input_shape(&self) -> Option<ImageShape> {
        match self {
            Self::ActNorm(c) => Some(c.shape),
            Self::InvConv1x1(c) => Some(c.shape),
            Self::ConvCoupling(c) => Some(c.shape),
            Self::Squeeze(c) | Self::Unsqueeze(c) => Some(c.shape),
            Self::BatchNorm(c) => Some(c.shape),
            Self::Logit(_) => None,
            Self::MultiScale(c) => Some(c.shape),
        }
    }

    /// Checks the settings; the message says what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Self::ActNorm(c) => c.validate(),
            Self::InvConv1x1(c) => c.validate(),
            Self::ConvCoupling(c) => c.validate(),
            Self::Squeeze(c) => c.shape.squeezed().map(|_| ()),
            Self::Unsqueeze(c) => c.shape.unsqueezed().map(|_| ()),
            Self::BatchNorm(c) => c.validate(),
            Self::Logit(c) => c.validate(),
            Self::MultiScale(c) => c.latent_shapes().map(|_| ()),
        }
    }

    /// The shape of its output given `input`, checking that the layer takes `input`
    /// (a layer without a shape of its own keeps it).
    pub fn output_shape(&self, input: ImageShape) -> std::result::Result<ImageShape, String> {
        self.validate()?;
        if let Some(own) = self.input_shape() {
            if own != input {
                return Err(format!("a layer of {own} images given {input} images"));
            }
        } else if self.dim() != input.dim() {
            return Err(format!(
                "a layer of {} features given {input} images",
                self.dim()
            ));
        }
        match self {
            Self::Squeeze(c) => c.shape.squeezed(),
            Self::Unsqueeze(c) => c.shape.unsqueezed(),
            _ => Ok(input),
        }
    }

    /// Builds the layer, reading (or creating) its tensors under `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
        Ok(match self {
            Self::ActNorm(c) => Box::new(ActNorm::new(c, vb)?),
            Self::InvConv1x1(c) => Box::new(InvConv1x1::new(c, vb)?),
            Self::ConvCoupling(c) => Box::new(ConvCoupling::new(c, vb)?),
            Self::Squeeze(c) => Box::new(Squeeze::new(c)?),
            Self::Unsqueeze(c) => Box::new(Unsqueeze::new(c)?),
            Self::BatchNorm(c) => Box::new(BatchNorm::new(c, vb)?),
            Self::Logit(c) => Box::new(Logit::new(c)?),
            Self::MultiScale(c) => Box::new(MultiScale::new(c, vb)?),
        })
    }
}

/// The output shape of a layer inside a multi-scale level: a layer of this crate (not
/// another `multiscale`), or a fixed `permute` / `reverse` over the image's features.
pub(crate) fn nested_output_shape(
    spec: &LayerSpec,
    input: ImageShape,
) -> std::result::Result<ImageShape, String> {
    if FixedLayers.kinds().contains(&spec.kind()) {
        FixedLayers.check(spec, input.dim(), 0)?;
        return Ok(input);
    }
    if !GlowLayer::KINDS.contains(&spec.kind()) {
        return Err(format!(
            "a multiscale level takes the layers {} and the fixed permute and reverse, got `{}`",
            GlowLayer::KINDS.join(", "),
            spec.kind()
        ));
    }
    match spec.tagged_as::<GlowLayer>()? {
        GlowLayer::MultiScale(_) => Err("a multiscale level cannot hold another multiscale".into()),
        layer => layer.output_shape(input),
    }
}

/// Builds a layer inside a multi-scale level (see [`nested_output_shape`]).
pub(crate) fn build_nested(spec: &LayerSpec, vb: VarBuilder) -> Result<Box<dyn Bijector>> {
    if FixedLayers.kinds().contains(&spec.kind()) {
        return FixedLayers.build(spec, vb);
    }
    spec.tagged_as::<GlowLayer>()
        .map_err(candle::Error::Msg)?
        .build(vb)
}
