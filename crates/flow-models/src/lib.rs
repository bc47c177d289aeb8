//! The model registry: one configuration, [`ModelConfig`], describes a flow built from
//! layers of any registered family, with its base distribution, standardisation and
//! context dimension; [`Registry`] holds the families and builds the flow.
//!
//! Families are crates of their own (RealNVP and NICE in `flow-realnvp`), each
//! behind a cargo feature here, so a user depends only on the families they use. A
//! family implements [`LayerFamily`](flow_core::LayerFamily) for its kinds of layer and
//! joins the registry with one line in [`Registry::builtin`]; one defined elsewhere
//! joins at run time through [`Registry::with`]. A family's crate declares its families
//! of models ([`Family`]: the names recipes record and the command line takes, with
//! their options and defaults), and the registry lists them.

mod density;
mod family;
mod model;
pub mod options;
mod registry;

pub use density::ModelDensity;
pub use family::Family;
pub use flow_core::{
    LayerFamily, LayerSpec, ModelData, OptionInfo, OptionKind, Recipe, SampleLayer,
};
pub use model::{BaseConfig, BoundsBy, ModelConfig, OutOfBounds};
pub use registry::{Registry, RegistryOption};
