use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig, LayerSpec, SampleLayer};

use crate::{MafConfig, MafLayer};

/// MAF and IAF layers of a model configuration: kind `affine-autoregressive`, a
/// [`MafLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct MafFamily;

impl Family for MafFamily {
    type Layer = MafLayer;
    const KINDS: &'static [&'static str] = &["affine-autoregressive"];

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        if kind != "affine-autoregressive" {
            return None;
        }
        let cfg = MafConfig::new(2).with_layers(1).with_hidden(8);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
}

impl LayerConfig for MafLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        let Self::AffineAutoregressive(c) = self;
        LayerConfig::check(c, dim, context_dim)
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        let Self::AffineAutoregressive(c) = self;
        c.build(vb)
    }
}
