//! `flows`: normalizing flows on candle, with exact log-likelihoods.
//!
//! This facade re-exports the workspace's crates; depend on the individual crates to
//! pull in only what you need:
//! - [`core`] (`flow-core`): bijector and distribution traits, chains, `Flow`, layer
//!   specs;
//! - [`kernels`] (`flow-kernels`): fused CPU and CUDA kernels, the fusion switch;
//! - [`nn`] (`flow-nn`): conditioner networks, masks, the general coupling layer and
//!   its element-wise transforms;
//! - [`realnvp`] (`flow-realnvp`): the RealNVP and NICE families;
//! - [`models`] (`flow-models`): the model registry and configuration;
//! - [`train`] (`flow-train`): training loop, optimizers, schedules, data sets;
//! - [`io`] (`flow-io`): safetensors checkpoints and importers for other tools' weights.

pub use flow_core as core;
pub use flow_io as io;
pub use flow_kernels as kernels;
pub use flow_models as models;
pub use flow_nn as nn;
pub use flow_realnvp as realnvp;
pub use flow_train as train;
