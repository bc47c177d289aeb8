//! RealNVP (Dinh et al. 2016) and NICE (Dinh et al. 2014): stacks of coupling layers.
//!
//! Both are the general [`Coupling`](flow_nn::Coupling) of `flow-nn` with an
//! element-wise transform: RealNVP's affine coupling keeps the features its mask
//! selects and maps the others as `z_b = x_b ⊙ exp(s(x_a)) + t(x_a)`, with
//! `log|det| = Σ s` ([`AffineCoupling`]); NICE's additive coupling only shifts,
//! `z_b = x_b + t(x_a)` ([`AdditiveCoupling`]). [`RealNvpConfig`] describes a stack
//! with alternating masks; [`RealNvpFamily`] builds its layers from a model
//! configuration (kinds `affine` and `additive`).

mod config;
mod family;
mod realnvp;

pub use config::{CouplingKind, CouplingLayer, MaskPattern, RealNvpConfig};
pub use family::RealNvpFamily;
pub use flow_nn::{
    Activation, Affine, ConditionerConfig, CouplingConfig, Mask, Mlp, NetConfig, Nets,
    OutputLayout, ScaleMap, Shift,
};
pub use realnvp::{AdditiveCoupling, AffineCoupling, RealNvp};
