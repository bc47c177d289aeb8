//! Masked autoregressive flows (Papamakarios et al. 2017) and inverse autoregressive
//! flows (Kingma et al. 2016): the affine transform ([`flow_nn::Affine`]) on an
//! autoregressive layer over a MADE network, `Autoregressive<Affine>`. MAF evaluates
//! densities in one pass and samples in `d`; IAF, the same layer inverted, samples in one
//! pass and evaluates densities in `d`. [`MafConfig`] describes a stack; [`MafFamily`]
//! builds its layers from a model configuration (kind `affine-autoregressive`).

mod config;
mod family;

pub use config::{MafConfig, MafLayer};
pub use family::MafFamily;
