use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig};

use crate::MafLayer;

/// MAF and IAF layers of a model configuration: kind `affine-autoregressive`, a
/// [`MafLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct MafFamily;

impl Family for MafFamily {
    type Layer = MafLayer;
    const KINDS: &'static [&'static str] = &["affine-autoregressive"];
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
