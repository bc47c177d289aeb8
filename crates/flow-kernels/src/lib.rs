//! Fused kernels for normalizing flows on candle, shared by every flow family.
//!
//! Each kernel is a candle custom op with its own backward, next to a reference path of
//! plain candle ops that it is tested against:
//! - [`mlp`]: the conditioner `Linear → act → Linear` in one pass (portable and AVX2 CPU
//!   kernels, CUDA kernels in `mlp/mlp.cu`), with [`pack`] laying out its parameters;
//! - [`affine`]: the element-wise part of an affine coupling (update and log-det);
//! - [`adam`]: Adam's update in place.
//!
//! [`fusion`] holds the one switch and the one decision, per op, between a kernel and
//! the reference path. Unsafe code lives in this crate only, in the kernel modules.

pub mod activation;
pub mod adam;
pub mod affine;
pub mod fusion;
mod limits;
pub mod mlp;
mod pack;
pub mod scale;

pub use activation::Activation;
pub use fusion::{fused, fusion_enabled, set_fusion, Op};
pub use limits::CUDA_MAX_IO;
pub use pack::pack_linear;
pub use scale::ScaleMap;

/// The contiguous part of a storage that `l` describes (the fused ops take contiguous
/// inputs).
pub(crate) fn slice<'a, T>(data: &'a [T], l: &candle::Layout) -> candle::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle::bail!("fused ops expect contiguous inputs"),
    }
}
