use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig, LayerSpec, SampleLayer};

use crate::{NsfConfig, NsfKind, Spline, SplineLayer};

/// The spline flows' layers of a model configuration: kinds `spline-coupling` and
/// `spline-autoregressive`, each a [`SplineLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct NsfFamily;

impl Family for NsfFamily {
    type Layer = SplineLayer;
    const KINDS: &'static [&'static str] = &["spline-coupling", "spline-autoregressive"];

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let nsf = match kind {
            "spline-coupling" => NsfKind::Coupling,
            "spline-autoregressive" => NsfKind::Autoregressive,
            _ => return None,
        };
        let cfg = NsfConfig::new(2)
            .with_kind(nsf)
            .with_layers(1)
            .with_hidden(8)
            .with_spline(Spline::new(4, 3.0))
            .with_zero_init(false);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
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
