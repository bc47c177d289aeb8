//! RealNVP (Dinh et al. 2016) affine coupling and NICE additive coupling layers on
//! candle-nn.
//!
//! An affine coupling layer keeps the features selected by its [`Mask`] and maps the
//! others as `z_b = x_b ⊙ exp(s(x_a)) + t(x_a)`, with `log|det| = Σ s`. [`RealNvp`]
//! stacks such layers, alternating which half is transformed.

mod activation;
mod additive;
mod affine;
mod conditioner;
mod config;
mod fused;
mod mask;
mod mlp;
mod model;
mod realnvp;
mod scale;

pub use activation::Activation;
pub use additive::AdditiveCoupling;
pub use affine::AffineCoupling;
pub use conditioner::{Conditioner, ConditionerConfig, Nets, OutputLayout};
pub use config::{CouplingConfig, CouplingKind, LayerConfig, MaskPattern, RealNvpConfig};
pub use mask::Mask;
pub use mlp::{cuda_fusion_enabled, fusion_enabled, set_cuda_fusion, set_fusion, Mlp, NetConfig};
pub use model::{BaseConfig, ModelConfig, TRAIN_STATE_PREFIX};
pub use realnvp::{build_layer, RealNvp};
pub use scale::ScaleMap;
