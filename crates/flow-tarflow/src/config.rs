//! The TarFlow architecture as a configuration that spells out its blocks.

use flow_core::limits;
use flow_core::ImageShape;
use flow_nn::{Activation, ScaleMap};
use serde::{Deserialize, Serialize};

use crate::{block::DEFAULT_MLP_RATIO, TarFlowBlockConfig, TarFlowLayer};

/// TarFlow (Zhai et al. 2024): `blocks` [`TarFlowBlock`](crate::TarFlowBlock)s over
/// the image's `patch × patch` patches, each conditioned by a causal Transformer of
/// `layers_per_block` layers of `width` units and `heads` heads, the token order
/// reversed from one block to the next.
///
/// Data are expected as `x = (pixel + u) / pixel_levels` in `[0, 1)` (uniform
/// dequantisation, as for Glow: likelihoods comparable with it). With `noise_std`
/// σ > 0 the trainer adds `σ·ε`, `ε ~ N(0, I)`, to every dequantised batch (the
/// paper's noise augmentation), and the density learnt, and reported, is that of
/// the noised data.
///
/// The defaults are a small model for small images such as the 8×8 digits; the
/// paper's models are far larger (e.g. 8 blocks of 8 layers of width 768).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TarFlowConfig {
    pub shape: ImageShape,
    /// Side of the square patches.
    pub patch: usize,
    pub blocks: usize,
    pub layers_per_block: usize,
    /// Width of the token embeddings.
    pub width: usize,
    pub heads: usize,
    /// Hidden units of each MLP, as a multiple of `width`.
    pub mlp_ratio: usize,
    pub activation: Activation,
    pub scale: ScaleMap,
    /// Context features (class labels, one-hot, or any condition) embedded into every
    /// token of every block.
    pub context_dim: usize,
    /// Values a pixel takes (256 for 8-bit images), for bits per dimension.
    pub pixel_levels: u32,
    /// Standard deviation of the Gaussian noise added to the training data (0: none).
    pub noise_std: f64,
}

/// The defaults' patch side.
pub const DEFAULT_PATCH: usize = 2;
/// The defaults' blocks.
pub const DEFAULT_BLOCKS: usize = 4;
/// The defaults' Transformer layers per block.
pub const DEFAULT_LAYERS_PER_BLOCK: usize = 2;
/// The defaults' embedding width.
pub const DEFAULT_WIDTH: usize = 64;
/// The defaults' attention heads.
pub const DEFAULT_HEADS: usize = 4;

impl Default for TarFlowConfig {
    fn default() -> Self {
        Self {
            shape: ImageShape::new(3, 32, 32),
            patch: DEFAULT_PATCH,
            blocks: DEFAULT_BLOCKS,
            layers_per_block: DEFAULT_LAYERS_PER_BLOCK,
            width: DEFAULT_WIDTH,
            heads: DEFAULT_HEADS,
            mlp_ratio: DEFAULT_MLP_RATIO,
            activation: Activation::Relu,
            scale: ScaleMap::default(),
            context_dim: 0,
            pixel_levels: 256,
            noise_std: 0.0,
        }
    }
}

impl TarFlowConfig {
    /// The default model for images of `shape`.
    pub fn new(shape: ImageShape) -> Self {
        Self {
            shape,
            ..Self::default()
        }
    }

    flow_core::with_setters! {
        with_patch: patch: usize,
        with_blocks: blocks: usize,
        with_layers_per_block: layers_per_block: usize,
        with_width: width: usize,
        with_heads: heads: usize,
        with_mlp_ratio: mlp_ratio: usize,
        with_activation: activation: Activation,
        with_scale: scale: ScaleMap,
        with_context_dim: context_dim: usize,
        with_pixel_levels: pixel_levels: u32,
        with_noise_std: noise_std: f64,
    }

    /// Features per image.
    pub fn dim(&self) -> usize {
        self.shape.dim()
    }

    /// Block `i`'s configuration: odd blocks read the tokens last to first.
    pub fn block(&self, i: usize) -> TarFlowBlockConfig {
        TarFlowBlockConfig::new(
            self.shape,
            self.patch,
            self.layers_per_block,
            self.width,
            self.heads,
        )
        .with_mlp_ratio(self.mlp_ratio)
        .with_activation(self.activation)
        .with_scale(self.scale)
        .with_reversed(i % 2 == 1)
        .with_context_dim(self.context_dim)
    }

    /// Checks every size, naming the setting at fault: at least one block, the
    /// blocks' own checks, pixel levels and a finite, non-negative noise.
    pub fn validate(&self) -> Result<(), String> {
        if self.blocks == 0 {
            return Err("a TarFlow needs at least one block".into());
        }
        limits::check_at_most("blocks", self.blocks, limits::MAX_LAYERS)?;
        self.block(0).validate()?;
        if !(2..=limits::MAX_PIXEL_LEVELS).contains(&self.pixel_levels) {
            return Err(format!(
                "pixel levels must lie in 2..={}, got {}",
                limits::MAX_PIXEL_LEVELS,
                self.pixel_levels
            ));
        }
        if !(self.noise_std.is_finite() && self.noise_std >= 0.0) {
            return Err(format!(
                "the noise's standard deviation must be finite and at least 0, got {}",
                self.noise_std
            ));
        }
        Ok(())
    }

    /// The model's layers: one `tarflow-block` per block.
    pub fn layers(&self) -> Vec<TarFlowLayer> {
        (0..self.blocks)
            .map(|i| TarFlowLayer::TarflowBlock(self.block(i)))
            .collect()
    }
}
