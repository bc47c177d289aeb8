use candle_nn::VarBuilder;
use flow_core::{
    AnyModelFamily, Bijector, Family, LayerConfig, LayerSpec, ModelFamily, ModelOption, Recipe,
    SampleLayer,
};
use flow_nn::options;

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

    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        let maf = ModelFamily::new("maf", "Masked autoregressive flow", |d| {
            MafConfig::new(d.dim).with_context_dim(d.context_dim)
        });
        let iaf = ModelFamily::new("iaf", "Inverse autoregressive flow", |d| {
            MafConfig::new(d.dim)
                .with_inverse(true)
                .with_context_dim(d.context_dim)
        });
        vec![
            maf.with_options(maf_options()).boxed(),
            iaf.with_options(maf_options()).boxed(),
        ]
    }
}

/// The options MAF and IAF take.
fn maf_options() -> Vec<ModelOption<MafConfig>> {
    vec![
        options::layers(|c: &MafConfig| c.layers, |c, v| c.layers = v),
        options::hidden(|c: &MafConfig| c.hidden, |c, v| c.hidden = v),
        options::hidden_layers(|c: &MafConfig| c.hidden_layers, |c, v| c.hidden_layers = v),
        options::activation(|c: &MafConfig| c.activation, |c, v| c.activation = v),
        options::order(|c: &MafConfig| c.order, |c, v| c.order = v),
        options::scale(|c: &MafConfig| c.scale, |c, v| c.scale = v),
        options::clamp(|c: &MafConfig| c.scale, |c, v| c.scale = v),
    ]
}

impl Recipe for MafConfig {
    fn family(&self) -> &'static str {
        if self.inverse {
            "iaf"
        } else {
            "maf"
        }
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn context_dim(&self) -> usize {
        self.context_dim
    }

    fn layer_specs(&self) -> Vec<LayerSpec> {
        LayerSpec::tagged_all(&self.layers())
    }

    fn check_options(&self) -> Result<(), String> {
        options::check_autoregressive_hidden(self.hidden, self.dim)
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
