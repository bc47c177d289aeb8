//! The fusion switch and the decision, per op, between a fused kernel and the
//! reference path of plain candle ops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle::{DType, Tensor};

use crate::Activation;

/// Unset until first read, then from `FLOWS_FUSION`.
static FUSION: OnceLock<AtomicBool> = OnceLock::new();

fn switch() -> &'static AtomicBool {
    FUSION.get_or_init(|| {
        let off = std::env::var("FLOWS_FUSION").is_ok_and(|v| v == "0" || v == "false");
        AtomicBool::new(!off)
    })
}

/// Turns every fused kernel on (the default) or off, process-wide, on every device.
/// Off, networks, coupling updates and Adam run as plain candle ops: the reference
/// the kernels are tested against. The environment sets the starting value:
/// `FLOWS_FUSION=0` starts with fusion off.
pub fn set_fusion(enabled: bool) {
    switch().store(enabled, Ordering::Relaxed);
}

/// Whether the fused kernels are in use.
pub fn fusion_enabled() -> bool {
    switch().load(Ordering::Relaxed)
}

/// An op that has a fused kernel, with what decides whether the kernel takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A conditioner network (of any shape) with this activation.
    Mlp { activation: Activation },
    /// The element-wise part of an affine coupling.
    AffineCoupling,
    /// A rational-quadratic spline per element, with this many bins.
    Spline { bins: usize },
    /// Adam's update of a variable (on CUDA, of all of them in one launch).
    Adam,
    /// A same-padded stride-1 image convolution (odd square kernel), bias or none.
    Conv,
    /// Activation normalisation's per-channel affine map of images.
    ActNorm,
    /// The weight of an LU-parametrised invertible 1×1 convolution from its factors.
    LuWeight,
    /// A layer norm over the last dimension.
    LayerNorm,
    /// Causal multi-head self-attention.
    Attention,
    /// A whole pre-norm Transformer layer (norms, attention, projections and MLP).
    TransformerLayer,
}

/// Whether `op` on the tensor `x` (its input, or the variable for [`Op::Adam`]) runs
/// as a fused kernel: fusion is on, `x` is f32 or f64, and a kernel exists for the op's
/// shape on `x`'s device. The CPU has them all (networks of any depth and width, plain
/// or residual, with a piecewise-linear or tanh activation); with the `cuda` feature,
/// CUDA has the network kernels too (a narrow one-hidden-layer kernel for at most
/// [`CUDA_MAX_IO`](crate::CUDA_MAX_IO) inputs and outputs, one kernel per layer for every
/// other shape), the spline, the affine coupling's update, the convolution and the
/// one-launch optimiser step, while the layer-norm, attention and Transformer-layer
/// kernels are the CPU's. Activation normalisation and the LU-parametrised 1×1
/// convolution's weight take their kernels on CUDA only.
pub fn fused(op: Op, x: &Tensor) -> bool {
    if !fusion_enabled() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return false;
    }
    let dev = x.device();
    match op {
        Op::Mlp { activation } => {
            let act = matches!(
                activation,
                Activation::LeakyRelu | Activation::Relu | Activation::Tanh
            );
            act && (dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda()))
        }
        Op::Spline { bins } => {
            dev.is_cpu()
                || (cfg!(feature = "cuda") && dev.is_cuda() && bins <= crate::CUDA_MAX_BINS)
        }
        Op::AffineCoupling | Op::Conv => dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda()),
        // The CPU runs these ops (their tests pin them there), but candle's ops are as
        // fast on it: a few passes over memory, or matrices of a few channels.
        Op::ActNorm | Op::LuWeight => cfg!(feature = "cuda") && dev.is_cuda(),
        Op::Adam => dev.is_cpu() || crate::adam::steps_all_at_once(x),
        Op::LayerNorm | Op::Attention | Op::TransformerLayer => dev.is_cpu(),
    }
}
