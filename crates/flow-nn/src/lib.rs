//! Building blocks shared by flow families, on candle-nn: conditioner networks
//! ([`Mlp`], residual MLPs), [`Mask`]s, the general [`Coupling`] layer, the
//! element-wise [`Transform`]s it applies ([`Affine`], [`Shift`], [`Spline`]) and the
//! [`LuLinear`] map that mixes features between couplings.
//!
//! A family is a few lines over these: RealNVP is `Coupling<Affine>`, NICE is
//! `Coupling<Shift>`, NSF is `Coupling<Spline>`; MAF is [`Autoregressive`]`<Affine>` over
//! a MADE network (a masked [`Mlp`]), autoregressive NSF `Autoregressive<Spline>`. Networks and
//! transforms take the fused kernels of `flow-kernels` where those apply; [`linalg`]
//! passes on its differentiable matrix inverse and `log|det|` (for invertible 1×1
//! convolutions); [`transformer`] holds the pieces of causal Transformers (layer norm, causal
//! self-attention) with their fused kernels.

mod affine;
mod autoregressive;
mod conditioner;
mod coupling;
mod layer;
mod lu_linear;
mod made;
mod mask;
mod mlp;
pub mod options;
mod shift;
mod spline;
mod transform;
pub mod transformer;

pub use affine::Affine;
pub use autoregressive::{Autoregressive, AutoregressiveConfig, Order};
pub use conditioner::{Conditioner, ConditionerConfig, Nets, OutputLayout};
pub use coupling::{Coupling, CouplingConfig};
pub use flow_kernels::linalg;
pub use flow_kernels::{
    fusion_enabled, pin_thread_count, pin_thread_count_among, retain_freed_memory, set_fusion,
    Activation, ScaleMap, SplineStyle,
};
pub use lu_linear::{LuLinear, LuLinearConfig};
pub use made::made_masks;
pub use mask::Mask;
pub use mlp::{Mlp, NetConfig};
pub use shift::Shift;
pub use spline::{Knots, Spline};
pub use transform::{apply_transform, Features, Transform};
