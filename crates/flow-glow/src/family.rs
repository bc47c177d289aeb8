use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig};

use crate::GlowLayer;

/// The image layers of a model configuration: kinds `actnorm`, `inv-conv1x1`,
/// `conv-coupling`, `squeeze`, `unsqueeze`, `batch-norm`, `logit` and `multiscale`,
/// each a [`GlowLayer`] in JSON. Unconditional only: a model with context features is
/// refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlowFamily;

impl Family for GlowFamily {
    type Layer = GlowLayer;
    const KINDS: &'static [&'static str] = &GlowLayer::KINDS;
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
