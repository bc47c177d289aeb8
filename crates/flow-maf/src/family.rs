use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerFamily, LayerSpec, SampleLayer};

use crate::{MafConfig, MafLayer};

/// MAF and IAF layers of a model configuration: kind `affine-autoregressive`, a
/// [`MafLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct MafFamily;

impl LayerFamily for MafFamily {
    fn kinds(&self) -> &[&'static str] {
        &["affine-autoregressive"]
    }

    fn check(&self, spec: &LayerSpec, dim: usize, context_dim: usize) -> Result<(), String> {
        let MafLayer::AffineAutoregressive(c) = spec.tagged_as::<MafLayer>()?;
        c.check(dim)?;
        if c.context_dim != context_dim {
            return Err(format!(
                "a layer of {} context features in a model of {context_dim}",
                c.context_dim
            ));
        }
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        spec.tagged_as::<MafLayer>()
            .map_err(candle::Error::Msg)?
            .build(vb)
    }

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        if kind != "affine-autoregressive" {
            return None;
        }
        let cfg = MafConfig::new(2).with_layers(1).with_hidden(8);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
}
