use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig, SampleLayer};

use crate::{
    ActNormConfig, BatchNormConfig, ConvCouplingConfig, CouplingMask, GlowLayer, ImageShape,
    InvConv1x1Config, LogitConfig, MultiScaleConfig, SqueezeConfig,
};

/// The image layers of a model configuration: kinds `actnorm`, `inv-conv1x1`,
/// `conv-coupling`, `squeeze`, `unsqueeze`, `batch-norm`, `logit` and `multiscale`,
/// each a [`GlowLayer`] in JSON. Unconditional only: a model with context features is
/// refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlowFamily;

impl Family for GlowFamily {
    type Layer = GlowLayer;
    const KINDS: &'static [&'static str] = &GlowLayer::KINDS;

    /// Images of at most 4 values, small enough for a density integrated on a grid.
    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let pair = ImageShape::new(2, 1, 1);
        let square = ImageShape::new(1, 2, 2);
        let coupling = |shape| {
            ConvCouplingConfig::new(shape, CouplingMask::Channel)
                .with_hidden_channels(4)
                .with_zero_init(false)
        };
        let layer = match kind {
            "actnorm" => GlowLayer::ActNorm(ActNormConfig::new(pair)),
            "inv-conv1x1" => GlowLayer::InvConv1x1(InvConv1x1Config::new(pair)),
            "conv-coupling" => GlowLayer::ConvCoupling(coupling(ImageShape::new(2, 1, 2))),
            "squeeze" => GlowLayer::Squeeze(SqueezeConfig::new(square)),
            "unsqueeze" => GlowLayer::Unsqueeze(SqueezeConfig::new(ImageShape::new(4, 1, 1))),
            "batch-norm" => GlowLayer::BatchNorm(BatchNormConfig::new(pair)),
            "logit" => GlowLayer::Logit(LogitConfig::new(2).with_alpha(1e-3)),
            "multiscale" => GlowLayer::MultiScale(MultiScaleConfig::new(
                square,
                vec![
                    vec![
                        GlowLayer::Squeeze(SqueezeConfig::new(square)).spec(),
                        GlowLayer::ConvCoupling(coupling(ImageShape::new(4, 1, 1))).spec(),
                    ],
                    vec![GlowLayer::ActNorm(ActNormConfig::new(pair)).spec()],
                ],
            )),
            _ => return None,
        };
        let mut sample = SampleLayer::new(layer.spec(), layer.dim());
        if kind == "logit" {
            sample.domain = (0.0, 1.0);
        }
        Some(sample)
    }
}

impl LayerConfig for GlowLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        let spec = self.spec();
        let kind = spec.kind();
        if context_dim != 0 {
            return Err(format!(
                "`{kind}` layers take no context, the model has {context_dim} context features"
            ));
        }
        self.validate()
            .map_err(|e| format!("`{kind}` layer: {e}"))?;
        if self.dim() != dim {
            let what = match self.input_shape() {
                Some(shape) => format!("{shape} images ({} features)", shape.dim()),
                None => format!("{} features", self.dim()),
            };
            return Err(format!(
                "a `{kind}` layer of {what} in a model of {dim} features"
            ));
        }
        Ok(())
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        GlowLayer::build(self, vb)
    }
}
