use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig};

use crate::SplineLayer;

/// The spline flows' layers of a model configuration: kinds `spline-coupling` and
/// `spline-autoregressive`, each a [`SplineLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct NsfFamily;

impl Family for NsfFamily {
    type Layer = SplineLayer;
    const KINDS: &'static [&'static str] = &["spline-coupling", "spline-autoregressive"];
}

impl LayerConfig for SplineLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        match self {
            Self::SplineCoupling(c) => c.check(dim, context_dim),
            Self::SplineAutoregressive(c) => LayerConfig::check(c, dim, context_dim),
        }
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        match self {
            Self::SplineCoupling(c) => c.build(vb),
            Self::SplineAutoregressive(c) => c.build(vb),
        }
    }
}
