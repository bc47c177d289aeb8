//! Core of `flows`: the [`Bijector`] and [`Distribution`] traits, [`Chain`], fixed
//! bijectors, base distributions and the change-of-variables [`Flow`].
//!
//! Conventions used throughout the workspace:
//! - data tensors are `(batch, dim)`, log-determinants are `(batch,)`;
//! - `forward` maps data to latent (`x -> z`), `inverse` maps latent to data;
//! - `log p(x) = log p_Z(f(x)) + log|det df/dx|`, where the log-dets of a chain add up.

pub mod bijectors;
pub mod device;
pub mod distributions;
pub mod family;
pub mod flow;
pub mod image;
pub mod init;
pub mod limits;
pub mod recipe;
pub mod sampling;
mod setters;
pub mod shared_batch;
pub mod truncation;

pub use bijectors::{
    recompute_by_inverse, stages_of, Bijector, Bound, Bounded, Chain, ContextStandardize, Inverse,
    Permute, Reverse, Stage, Standardize,
};
pub use device::{cuda_if_present, join_cpu_pool, parse_device};
pub use distributions::{DiagNormal, Distribution, GaussianMixture, StandardNormal};
pub use family::{Family, FixedLayers, LayerConfig, LayerFamily, LayerSpec, SampleLayer};
pub use flow::Flow;
pub use image::{ImageInfo, ImageShape};
pub use init::seeded_var_builder;
pub use recipe::{
    AnyModelFamily, Choice, ConditionalRate, DecayingRate, ModelData, ModelFamily, ModelOption,
    OptionInfo, OptionKind, Recipe, Spelled,
};
pub use shared_batch::SharedBatch;
pub use truncation::{Truncated, TruncatedLogProb};
