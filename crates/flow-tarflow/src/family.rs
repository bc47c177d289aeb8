use candle_nn::VarBuilder;
use flow_core::{
    limits::{MAX_DIM, MAX_HIDDEN, MAX_LAYERS},
    AnyModelFamily, Bijector, Family, ImageShape, LayerConfig, LayerSpec, ModelData, ModelFamily,
    ModelOption, Recipe, SampleLayer,
};
use flow_nn::options;
use serde::{Deserialize, Serialize};

use crate::{TarFlowBlockConfig, TarFlowConfig};

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

    fn models(&self) -> Vec<Box<dyn AnyModelFamily>> {
        let tarflow = ModelFamily::new(
            "tarflow",
            "TarFlow (Zhai et al. 2024): affine autoregressive blocks over image patches, each conditioned by a causal Transformer (images)",
            defaults,
        );
        // Small batches: on the digits, a thousand steps of 64 images reach a lower
        // test bits/dim than a thousand of 512, in an eighth of the time.
        vec![tarflow
            .with_image(true)
            .with_batch(64)
            .with_options(tarflow_options())
            .boxed()]
    }
}

/// The default TarFlow for the data's images (rows of `dim` features as one pixel of
/// `dim` channels when the data give none), conditioned on the data's context.
fn defaults(d: &ModelData) -> TarFlowConfig {
    let base = TarFlowConfig::default();
    let (shape, levels) = match d.image {
        Some(i) => (i.shape, i.pixel_levels),
        None => (ImageShape::flat(d.dim), base.pixel_levels),
    };
    TarFlowConfig::new(shape)
        .with_pixel_levels(levels)
        .with_context_dim(d.context_dim)
}

/// TarFlow's options, in the order they apply.
fn tarflow_options() -> Vec<ModelOption<TarFlowConfig>> {
    vec![
        ModelOption::count(
            "patch",
            "Side of the square patches TarFlow reads an image in: tokens of patch²·C values",
            (1, MAX_DIM),
            |c: &TarFlowConfig| c.patch,
            |c, v| c.patch = v,
        ),
        ModelOption::count(
            "blocks",
            "TarFlow blocks; the token order reverses from one to the next",
            (1, MAX_LAYERS),
            |c: &TarFlowConfig| c.blocks,
            |c, v| c.blocks = v,
        ),
        ModelOption::count(
            "layers-per-block",
            "Transformer layers of each TarFlow block",
            (1, MAX_LAYERS),
            |c: &TarFlowConfig| c.layers_per_block,
            |c, v| c.layers_per_block = v,
        ),
        ModelOption::count(
            "width",
            "Width of TarFlow's token embeddings",
            (1, MAX_HIDDEN),
            |c: &TarFlowConfig| c.width,
            |c, v| c.width = v,
        ),
        ModelOption::count(
            "heads",
            "Attention heads of TarFlow's Transformers; they divide --width",
            (1, MAX_HIDDEN),
            |c: &TarFlowConfig| c.heads,
            |c, v| c.heads = v,
        ),
        options::activation(|c: &TarFlowConfig| c.activation, |c, v| c.activation = v),
        options::scale(|c: &TarFlowConfig| c.scale, |c, v| c.scale = v),
        options::clamp(|c: &TarFlowConfig| c.scale, |c, v| c.scale = v),
        ModelOption::non_negative(
            "noise-std",
            "Gaussian noise added to the dequantised training data (noise augmentation); the density learnt, and reported, is then that of the noised data",
            |c: &TarFlowConfig| c.noise_std,
            |c, v| {
                c.noise_std = v;
                Ok(())
            },
        ),
    ]
}

impl Recipe for TarFlowConfig {
    fn family(&self) -> &'static str {
        "tarflow"
    }

    fn dim(&self) -> usize {
        self.shape.dim()
    }

    fn context_dim(&self) -> usize {
        self.context_dim
    }

    fn layer_specs(&self) -> Vec<LayerSpec> {
        LayerSpec::tagged_all(&self.layers())
    }

    fn check_options(&self) -> Result<(), String> {
        self.validate().map_err(|e| {
            let s = self.shape;
            format!(
                "--flow tarflow on {}x{}x{} images: {e}",
                s.height, s.width, s.channels
            )
        })
    }
}
