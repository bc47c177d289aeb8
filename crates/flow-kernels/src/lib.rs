//! Fused kernels for normalizing flows on candle, shared by every flow family.
//!
//! Each kernel is a candle custom op with its own backward, next to a reference path of
//! plain candle ops that it is tested against:
//! - [`mlp`]: a conditioner network (an MLP of any depth and width, plain or residual) in
//!   one pass forward and one backward (narrow portable and AVX2 CPU kernels, a general
//!   one over matrix products, CUDA kernels in `mlp/mlp.cu`), with [`pack_linear`]
//!   laying out its parameters;
//! - [`affine`]: the element-wise part of an affine coupling (update and log-det);
//! - [`conv`]: a same-padded stride-1 image convolution as im2col and one matrix
//!   product, with its backward;
//! - [`actnorm`]: activation normalisation's per-channel affine map, with its backward;
//! - [`lu_weight`]: the weight of an LU-parametrised invertible 1×1 convolution from
//!   its factors, with its backward;
//! - [`spline`]: a rational-quadratic spline per element, knots to log-slope;
//! - [`adam`]: Adam's update in place;
//! - [`transformer`]: a layer norm and causal multi-head self-attention, each one op
//!   with its backward;
//! - [`linalg`]: a square matrix's inverse and `log|det|` as differentiable ops (an LU
//!   decomposition on the host, for the small matrices of invertible 1×1
//!   convolutions);
//! - [`pin_thread_count`]: the thread count candle reads, fixed once per process;
//!   [`on_this_thread`]: kernels planned for the calling thread alone;
//! - [`allocator`]: the allocator's settings for a process that trains.
//!
//! [`fusion`] holds the one switch and the one decision, per op, between a kernel and
//! the reference path. Unsafe code lives in this crate only, in the kernel modules.

pub mod activation;
pub mod actnorm;
pub mod adam;
pub mod affine;
#[allow(unsafe_code)]
pub mod allocator;
pub mod conv;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda_storage;
pub mod fusion;
mod limits;
pub mod linalg;
pub mod lu_weight;
pub mod mlp;
mod pack;
mod product;
mod real;
pub mod scale;
pub mod spline;
#[cfg(test)]
mod test_support;
mod threads;
pub mod transformer;
pub mod transformer_layer;

pub use activation::Activation;
pub use allocator::retain_freed_memory;
pub use fusion::{fused, fusion_enabled, set_fusion, Op};
pub use limits::{CUDA_MAX_BINS, CUDA_MAX_IO};
pub use pack::pack_linear;
pub(crate) use real::{Elem, Real};
pub use scale::ScaleMap;
pub use spline::{SplineShape, SplineStyle};
pub use threads::{on_this_thread, pin_thread_count, pin_thread_count_among};

/// Runs `f` on a CPU tensor's values in row-major order: borrowed from its storage when
/// they lie there contiguously, else a copy.
pub(crate) fn on_host<T: candle::WithDType, R>(
    t: &candle::Tensor,
    f: impl FnOnce(&[T]) -> candle::Result<R>,
) -> candle::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle::Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return f(&T::cpu_storage_as_slice(s)?[a..b]);
        }
    }
    f(&t.flatten_all()?.to_vec1::<T>()?)
}

/// [`on_host`] on three tensors at once, as the fused ops' backward passes take their
/// inputs and the output's gradient.
pub(crate) fn on_host3<T: candle::WithDType, R>(
    a: &candle::Tensor,
    b: &candle::Tensor,
    c: &candle::Tensor,
    f: impl FnOnce(&[T], &[T], &[T]) -> candle::Result<R>,
) -> candle::Result<R> {
    on_host(a, |a| on_host(b, |b| on_host(c, |c| f(a, b, c))))
}

/// The contiguous part of a storage that `l` describes (the fused ops take contiguous
/// inputs).
pub(crate) fn slice<'a, T>(data: &'a [T], l: &candle::Layout) -> candle::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle::bail!("fused ops expect contiguous inputs"),
    }
}

/// A buffer of `n` values for a kernel that writes every one of them before anything
/// reads it: the allocation without `vec![0; n]`'s zero-fill, a pass over memory that
/// the kernel's own writes then repeat (a tenth of a Transformer's training step).
/// Debug builds, and builds with the `nan-unwritten` feature (which the tests that pin
/// each kernel to its reference turn on), fill it with NaN instead, so that a value read
/// before it is written shows in those tests.
///
/// # Safety
///
/// The caller writes every element before it, or anything it is handed to, reads any.
#[allow(unsafe_code, clippy::uninit_vec)]
pub(crate) unsafe fn unwritten<E: Unwritten>(n: usize) -> Vec<E> {
    if cfg!(any(debug_assertions, feature = "nan-unwritten")) {
        return vec![E::NAN; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; that the values are written before they are read is
    // the caller's promise.
    unsafe { v.set_len(n) };
    v
}

/// An element of an [`unwritten`] buffer, with the NaN that fills it where reads before
/// writes are checked.
pub(crate) trait Unwritten: Copy {
    const NAN: Self;
}

impl Unwritten for f32 {
    const NAN: f32 = f32::NAN;
}

impl Unwritten for f64 {
    const NAN: f64 = f64::NAN;
}

impl<T: Unwritten, const N: usize> Unwritten for [T; N] {
    const NAN: Self = [T::NAN; N];
}
