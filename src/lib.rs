//! `flows`: normalizing flows on candle, with exact log-likelihoods.
//!
//! This facade re-exports the workspace's crates; depend on the individual crates to
//! pull in only what you need:
//! - [`core`] (`flow-core`): bijector and distribution traits, chains, `Flow`;
//! - [`realnvp`] (`flow-realnvp`): affine and additive coupling layers, RealNVP stacks;
//! - [`train`] (`flow-train`): training loop, optimizers, schedules, data sets;
//! - [`io`] (`flow-io`): safetensors checkpoints and importers for other tools' weights.

pub use flow_core as core;
pub use flow_io as io;
pub use flow_realnvp as realnvp;
pub use flow_train as train;
