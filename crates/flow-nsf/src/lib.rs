//! Neural spline flows (Durkan et al. 2019): rational-quadratic splines
//! ([`flow_nn::Spline`]) as the element-wise transform of a coupling layer (NSF-C,
//! `Coupling<Spline>`) or of an autoregressive layer (NSF-AR,
//! `Autoregressive<Spline>`). [`NsfConfig`] describes a stack; [`NsfFamily`] builds its
//! layers from a model configuration (kinds `spline-coupling` and
//! `spline-autoregressive`, and `lu-linear` for the linear layers that may mix the
//! features between them).

mod config;
mod family;

pub use config::{
    Masks, Mixing, Network, NsfConfig, NsfKind, SplineLayer, CONDITIONAL_BLOCKS,
    CONDITIONAL_HIDDEN, CONDITIONAL_LR, CONDITIONAL_RIVAL, DEFAULT_BINS, DEFAULT_TAIL_BOUND,
};
pub use family::NsfFamily;
pub use flow_nn::{Spline, SplineStyle};
