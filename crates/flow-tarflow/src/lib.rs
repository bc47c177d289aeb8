//! Transformer autoregressive flows: TarFlow (Zhai et al. 2024, "Normalizing Flows
//! are Capable Generative Models").
//!
//! An image, a flat `(C, H, W)` row, is cut into `p × p` patches ([`Patches`]): a
//! sequence of `T = (H/p)·(W/p)` tokens of `p²·C` values. A [`TarFlowBlock`] maps the
//! sequence token by token, `z_t = x_t ⊙ exp(ŝ_t) + b_t`, with `(s_t, b_t)` from a
//! causal Transformer over `x_0 … x_{t−1}`; its log-det is the sum of the log-scales
//! `ŝ`. [`TarFlowConfig`] stacks blocks, reversing the token order from one to the
//! next, so that every token comes to condition every other.
//!
//! # The Transformer
//!
//! The sequence shifted right by one token (the first position sees zeros, so its
//! parameters come from its learned positional embedding: a learned start), a linear
//! embedding of each token, learned positional embeddings, an optional context
//! embedding added to every token, `L` pre-norm layers (multi-head causal
//! self-attention, then an MLP of `4·width` hidden units; each a residual branch
//! behind a layer norm), a final layer norm, and an output projection to the raw
//! log-scales and shifts, zero-initialised so that each block starts as the identity.
//! Layer norms, the key-value cache and the softmax are candle-nn's; the linear maps
//! and the MLP are flow-nn's networks, and the layer norm and causal attention
//! flow-nn's [`transformer`](flow_nn::transformer) pieces: on the CPU, each one fused
//! op per pass with its own backward.
//!
//! # Speed
//!
//! - Attention on the CPU is one op forward and one backward that visits, for each
//!   query, the keys up to its own position: no mask, no heads' transposes, and the
//!   attention weights recomputed in the backward pass rather than kept. Its
//!   reference (other devices, fusion off) is three matrix products per chunk of
//!   queries for all heads and rows at once: up to [`QUERY_CHUNK`] tokens one chunk
//!   with one `T × T` additive mask shared by every head and row; longer sequences
//!   cut into chunks of queries, each against the keys up to its end, so no `T × T`
//!   mask is made and the products above the diagonal's chunks are skipped.
//! - The density is one pass of the Transformer over the whole sequence, and the
//!   affine update of all tokens one call of flow-nn's affine transform (a fused op
//!   where fusion applies).
//! - Sampling (the inverse) takes `T` steps; each runs one position through the
//!   layers against a key-value cache of the positions before it.
//!   [`TarFlowBlock::inverse_uncached`] is the same inverse without the cache.

mod block;
mod config;
mod family;
mod patches;
mod transformer;

pub use block::{TarFlowBlock, TarFlowBlockConfig, DEFAULT_MLP_RATIO};
pub use config::{
    TarFlowConfig, DEFAULT_BLOCKS, DEFAULT_HEADS, DEFAULT_LAYERS_PER_BLOCK, DEFAULT_PATCH,
    DEFAULT_WIDTH,
};
pub use family::{TarFlowFamily, TarFlowLayer};
pub use flow_core::{ImageInfo, ImageShape};
pub use flow_nn::transformer::QUERY_CHUNK;
pub use flow_nn::{Activation, ScaleMap};
pub use patches::Patches;
