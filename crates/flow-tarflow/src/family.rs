use candle_nn::VarBuilder;
use flow_core::{Bijector, Family, LayerConfig, LayerSpec, SampleLayer};
use flow_nn::ImageShape;
use serde::{Deserialize, Serialize};

use crate::TarFlowBlockConfig;

/// A TarFlow layer as a model configuration lists it: kind `tarflow-block`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum TarFlowLayer {
    TarflowBlock(TarFlowBlockConfig),
}

impl TarFlowLayer {
    /// The layer as a spec.
    pub fn spec(&self) -> LayerSpec {
        LayerSpec::tagged(self).expect("a TarFlow layer serialises to an object")
    }
}

impl LayerConfig for TarFlowLayer {
    fn check(&self, dim: usize, context_dim: usize) -> Result<(), String> {
        let Self::TarflowBlock(c) = self;
        LayerConfig::check(c, dim, context_dim).map_err(|e| format!("`tarflow-block` layer: {e}"))
    }

    fn build(&self, vb: VarBuilder) -> candle::Result<Box<dyn Bijector>> {
        let Self::TarflowBlock(c) = self;
        c.build(vb)
    }
}

/// TarFlow's layers: kind `tarflow-block`, a [`TarFlowLayer`] in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct TarFlowFamily;

impl Family for TarFlowFamily {
    type Layer = TarFlowLayer;
    const KINDS: &'static [&'static str] = &["tarflow-block"];

    /// A 2×1×2 image in two tokens of two values, a Transformer of one layer of width
    /// 4 in two heads, the output not zeroed: a real map over 4 features.
    fn sample(&self, kind: &str) -> Option<SampleLayer> {
        if kind != "tarflow-block" {
            return None;
        }
        let cfg = TarFlowBlockConfig::new(ImageShape::new(2, 1, 2), 1, 1, 4, 2)
            .with_zero_init(false)
            .with_reversed(true);
        Some(SampleLayer::new(TarFlowLayer::TarflowBlock(cfg).spec(), 4))
    }
}
