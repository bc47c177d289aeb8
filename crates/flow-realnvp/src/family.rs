use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig, LayerSpec, SampleLayer};

use crate::{CouplingKind, CouplingLayer, RealNvpConfig};

/// The RealNVP and NICE layers of a model configuration: kinds `affine` and
/// `additive`, each a [`CouplingLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealNvpFamily;

impl Family for RealNvpFamily {
    type Layer = CouplingLayer;
    const KINDS: &'static [&'static str] = &["affine", "additive"];

    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        let coupling = match kind {
            "affine" => CouplingKind::Affine,
            "additive" => CouplingKind::Additive,
            _ => return None,
        };
        let cfg = RealNvpConfig::new(2)
            .with_layers(1)
            .with_hidden(8)
            .with_coupling(coupling)
            .with_zero_init(false);
        let spec = LayerSpec::tagged(cfg.layers().first()?).ok()?;
        Some(SampleLayer::new(spec, 2))
    }
}

impl LayerConfig for CouplingLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        match self {
            Self::Affine(c) => c.check(dim, context_dim),
            Self::Additive(c) => c.check(dim, context_dim),
        }
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        match self {
            Self::Affine(c) => c.build(vb),
            Self::Additive(c) => c.build(vb),
        }
    }
}
