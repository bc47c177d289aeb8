use candle_nn::VarBuilder;
use flow_core::{Bijector, LayerFamily, LayerSpec};

use crate::GlowLayer;

/// The image layers of a model configuration: kinds `actnorm`, `inv-conv1x1`,
/// `conv-coupling`, `squeeze`, `unsqueeze`, `batch-norm`, `logit` and `multiscale`,
/// each a [`GlowLayer`] in JSON. Unconditional only: a model with context features is
/// refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlowFamily;

impl LayerFamily for GlowFamily {
    fn kinds(&self) -> &[&'static str] {
        &GlowLayer::KINDS
    }

    fn check(&self, spec: &LayerSpec, dim: usize, context_dim: usize) -> Result<(), String> {
        if context_dim != 0 {
            return Err(format!(
                "`{}` layers take no context, the model has {context_dim} context features",
                spec.kind()
            ));
        }
        let layer = spec.tagged_as::<GlowLayer>()?;
        layer
            .validate()
            .map_err(|e| format!("`{}` layer: {e}", spec.kind()))?;
        if layer.dim() != dim {
            let what = match layer.input_shape() {
                Some(shape) => format!("{shape} images ({} features)", shape.dim()),
                None => format!("{} features", layer.dim()),
            };
            return Err(format!(
                "a `{}` layer of {what} in a model of {dim} features",
                spec.kind()
            ));
        }
        Ok(())
    }

    fn build(&self, spec: &LayerSpec, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        spec.tagged_as::<GlowLayer>()
            .map_err(candle::Error::Msg)?
            .build(vb)
    }
}
