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
//! Linear maps, layer norms, the key-value cache and the softmax are candle-nn's; the
//! MLP is flow-nn's network (one fused op per pass for ReLU).
//!
//! # Speed
//!
//! - Attention is three matrix products per chunk of queries (scores, softmax,
//!   values) for all heads and rows at once. Up to [`QUERY_CHUNK`] tokens it is one
//!   chunk with one `T × T` additive mask shared by every head and row; longer
//!   sequences are cut into chunks of queries, each against the keys up to its end,
//!   so no `T × T` mask is made and the products above the diagonal's chunks are
//!   skipped.
//! - The density is one pass of the Transformer over the whole sequence, and the
//!   affine update of all tokens one call of flow-nn's affine transform (a fused op
//!   where fusion applies).
//! - Sampling (the inverse) takes `T` steps; each runs one position through the
//!   layers against a key-value cache of the positions before it.
//!   [`TarFlowBlock::inverse_uncached`] is the same inverse without the cache.
//! - candle's fused softmax and layer norm have no backward pass: they serve where no
//!   gradient is tracked (sampling, scoring a loaded model), the same arithmetic from
//!   differentiable ops elsewhere.

mod attention;
mod block;
mod config;
mod family;
mod patches;
mod transformer;

pub use attention::QUERY_CHUNK;
pub use block::{TarFlowBlock, TarFlowBlockConfig, DEFAULT_MLP_RATIO};
pub use config::{
    TarFlowConfig, DEFAULT_BLOCKS, DEFAULT_HEADS, DEFAULT_LAYERS_PER_BLOCK, DEFAULT_PATCH,
    DEFAULT_WIDTH,
};
pub use family::{TarFlowFamily, TarFlowLayer};
pub use flow_nn::{Activation, ImageShape, ScaleMap};
pub use patches::Patches;
