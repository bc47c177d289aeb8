//! Image flows: the layers of Glow (Kingma & Dhariwal 2018) and of RealNVP's
//! multi-scale architecture (Dinh et al. 2016), and both architectures as
//! configurations.
//!
//! # Conventions
//!
//! Every layer is a [`flow_core::Bijector`] on flat rows `(batch, C·H·W)`, each row an
//! image in `(C, H, W)` order ([`ImageShape`]); layers reshape internally. So `Flow`,
//! `Chain`, checkpoints, training and the command line work on image models
//! unchanged. `forward` maps data to latent and returns `log|det ∂z/∂x|` per row.
//!
//! # Layers
//!
//! Each is built by `new(&config, vb)` (tensors read or created under `vb`, with the
//! keys listed) from a serde configuration with `new(required)` and `with_*` setters:
//!
//! | layer | config (JSON `type`) | map, data → latent | log-det | tensors |
//! | --- | --- | --- | --- | --- |
//! | [`ActNorm`] | [`ActNormConfig`] (`actnorm`) | `(x + b)·exp(s)` per channel | `H·W·Σ s` | `bias`, `log_scale`; data-dependent init |
//! | [`InvConv1x1`] | [`InvConv1x1Config`] (`inv-conv1x1`) | `W·x` per pixel | `H·W·log\|det W\|` | `weight`, or `p`*, `l`, `u`, `log_s`, `sign_s`* |
//! | [`ConvCoupling`] | [`ConvCouplingConfig`] (`conv-coupling`) | `z_b = (x_b + t)·exp(ls)` | `Σ ls` | `conv_in`, `conv_hidden`, `conv_out` |
//! | [`Squeeze`], [`Unsqueeze`] | [`SqueezeConfig`] (`squeeze`, `unsqueeze`) | space to depth / back | 0 | — |
//! | [`MultiScale`] | [`MultiScaleConfig`] (`multiscale`) | levels, half the channels factored out after each but the last | Σ levels | `levels.{l}.{i}.*` |
//! | [`BatchNorm`] | [`BatchNormConfig`] (`batch-norm`) | `(x − μ)/√(σ² + ε)·exp(γ) + β` | `H·W·Σ(γ − ½log(σ² + ε))` | `log_gamma`, `beta`, `running_mean`*, `running_var`* |
//! | [`Logit`] | [`LogitConfig`] (`logit`) | `logit(α + (1 − 2α)x)` | see type | — |
//!
//! (* buffers: returned by [`Bijector::buffers`](flow_core::Bijector::buffers), saved
//! with the weights, never trained.) [`GlowLayer`] is the tagged union of the configs
//! as a model configuration lists them, and [`GlowFamily`] the
//! [`LayerFamily`](flow_core::LayerFamily) that checks and builds them (registered in
//! `flow-models` behind its `glow` feature).
//!
//! # Architectures
//!
//! [`GlowConfig`] and [`RealNvpImageConfig`] spell out their layers as
//! `[logit?, multiscale]` ([`GlowConfig::layers`]); `flow_models::ModelConfig::glow` and
//! `ModelConfig::realnvp_image` make them models, keeping the configuration as the
//! recipe (family `glow` / `realnvp-image`). The recipe records the image shape and
//! the pixel levels: read them back with
//! `serde_json::from_value::<ImageInfo>(recipe.clone())`.
//!
//! The latent of a multi-scale flow is the concatenation of the levels'
//! factored-out parts, finest first, and the last level's output
//! ([`MultiScale`] has the details; [`GlowConfig::latent_shapes`] the shapes).
//!
//! # For a trainer, a data loader and a command line
//!
//! - Data: `x = (pixel + u) / pixel_levels`, `u ~ U[0, 1)`, rows in `(C, H, W)` order;
//!   [`bits_per_dim`] turns a mean log-density into bits per dimension.
//! - [`Flow::initialize`](flow_core::Flow::initialize) on a first batch sets every
//!   ActNorm of a fresh model; a loaded model keeps its values.
//! - Batch-norm layers start in evaluation mode (running statistics): call
//!   `Flow::set_training(true)` for training steps and `false` for evaluation and
//!   sampling.
//! - [`flow_nn::linalg::inverse`] and [`flow_nn::linalg::log_abs_det`] are
//!   differentiable matrix ops that work for `f32` and `f64` on any device (computed
//!   on the host).
//!
//! Importing normflows' Glow: its flows run latent to data, so its
//! `Invertible1x1Conv` weight is this `W` (its `P`, `L`, `U`, `log_S`, `sign_S` map to
//! `p`, `l`, `u`, `log_s`, `sign_s`, `L` and `U` masked the same way), its `ActNorm`
//! `(s, t)` is `(log_scale, bias) = (−s, −t)`, its coupling's `sigmoid` scale is
//! `σ(s + 2)` where [`ScaleMap::Sigmoid`] adds `1e-3` inside the log (the couplings'
//! `exact_sigmoid`, and [`GlowConfig`]'s, drop it), and its shift
//! enters as `(x − t)·σ` where this crate has `(x + t)·exp(ls)` (negate the shift rows
//! of the last convolution). Its squeeze and channel split order match this crate's.

mod actnorm;
mod architecture;
mod batch_norm;
mod coupling;
mod family;
mod inv_conv;
mod layer;
mod logit;
mod multiscale;
mod shape;
mod squeeze;

pub use actnorm::{ActNorm, ActNormConfig};
pub use architecture::{
    GlowConfig, RealNvpImageConfig, SMALL_DEPTH, SMALL_HIDDEN_CHANNELS, SMALL_LEVELS,
};
pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use coupling::{ConvCoupling, ConvCouplingConfig, CouplingMask};
pub use family::GlowFamily;
pub use flow_core::{ImageInfo, ImageShape};
pub use flow_nn::{Activation, ScaleMap};
pub use inv_conv::{InvConv1x1, InvConv1x1Config};
pub use layer::GlowLayer;
pub use logit::{bits_per_dim, Logit, LogitConfig};
pub use multiscale::{MultiScale, MultiScaleConfig};
pub use squeeze::{Squeeze, SqueezeConfig, Unsqueeze};
