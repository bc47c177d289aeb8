//! Launching the CUDA kernels of `mlp.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaStorageSlice, WrapErr};
use candle::{CudaDevice, CudaStorage, Layout, Result, WithDType};

use super::Dims;
use crate::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_mlp.ptx"));
const MODULE: &str = "flows_fused_mlp";

/// Threads per block.
const THREADS: u32 = 128;

/// Samples per block row of the backward kernel.
const CHUNK: usize = 64;

/// Most inputs or outputs the kernels handle (`MAX_IO` in `mlp.cu`).
pub(crate) const MAX_IO: usize = 16;

/// The kernels' activation code and slope below zero.
fn activation(a: Activation) -> Result<(i32, f64)> {
    match a {
        Activation::LeakyRelu => Ok((0, Activation::LEAKY_SLOPE)),
        Activation::Relu => Ok((0, 0.0)),
        Activation::Tanh => Ok((1, 0.0)),
        other => candle::bail!("no fused CUDA kernel for {other:?}"),
    }
}

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle::bail!("fused mlp expects contiguous inputs"),
    }
}

fn int(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle::Error::Msg(format!("{n} is too large for the kernel")))
}

fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per).max(1))
        .map_err(|_| candle::Error::Msg(format!("{n} is too large for the kernel")))
}

/// Element types with kernels.
trait Kernel: DeviceRepr + WithDType + ValidAsZeroBits {
    const SUFFIX: &'static str;
    fn of(v: f64) -> Self;
}

impl Kernel for f32 {
    const SUFFIX: &'static str = "f32";
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl Kernel for f64 {
    const SUFFIX: &'static str = "f64";
    fn of(v: f64) -> Self {
        v
    }
}

fn forward_typed<T: Kernel>(
    dev: &CudaDevice,
    a: Activation,
    (x, p1, p2): (CudaView<T>, CudaView<T>, CudaView<T>),
    d: Dims,
) -> Result<CudaSlice<T>> {
    let (kind, c) = activation(a)?;
    let func = dev.get_or_load_custom_func(&format!("fused_mlp_fwd_{}", T::SUFFIX), MODULE, PTX)?;
    // SAFETY: the kernel writes every element (one thread per sample, every output).
    let out = unsafe { dev.alloc::<T>(d.batch * d.output)? };
    let cfg = LaunchConfig {
        grid_dim: (blocks(d.batch, THREADS as usize)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&p1);
    b.arg(&p2);
    b.arg(&out);
    let (batch, input, hidden, output) =
        (int(d.batch)?, int(d.input)?, int(d.hidden)?, int(d.output)?);
    let c = T::of(c);
    b.arg(&batch);
    b.arg(&input);
    b.arg(&hidden);
    b.arg(&output);
    b.arg(&kind);
    b.arg(&c);
    // SAFETY: the arguments match the kernel's signature in mlp.cu; the buffers hold
    // the sizes `d` describes (checked by the caller from the layouts).
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// The network's outputs `(batch, out)` on the GPU.
pub(super) fn forward(
    a: Activation,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    d: Dims,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let slice = match (&s1.slice, &s2.slice, &s3.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(p1), CudaStorageSlice::F32(p2)) => {
            let io = (view(x, l1)?, view(p1, l2)?, view(p2, l3)?);
            CudaStorageSlice::F32(forward_typed(dev, a, io, d)?)
        }
        (CudaStorageSlice::F64(x), CudaStorageSlice::F64(p1), CudaStorageSlice::F64(p2)) => {
            let io = (view(x, l1)?, view(p1, l2)?, view(p2, l3)?);
            CudaStorageSlice::F64(forward_typed(dev, a, io, d)?)
        }
        _ => candle::bail!("fused mlp supports f32 and f64 inputs of one dtype"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

fn backward_typed<T: Kernel>(
    dev: &CudaDevice,
    a: Activation,
    (x, p, g): (CudaView<T>, CudaView<T>, CudaView<T>),
    d: Dims,
) -> Result<CudaSlice<T>> {
    let (kind, c) = activation(a)?;
    let func = dev.get_or_load_custom_func(&format!("fused_mlp_bwd_{}", T::SUFFIX), MODULE, PTX)?;
    let n1 = d.hidden * (d.input + 1);
    let grad = dev.alloc_zeros::<T>(d.batch * d.input + n1 + d.output * (d.hidden + 1))?;
    let (p1, p2) = (p.slice(..n1), p.slice(n1..));
    let cfg = LaunchConfig {
        grid_dim: (
            blocks(d.hidden, THREADS as usize)?,
            blocks(d.batch, CHUNK)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&p1);
    b.arg(&p2);
    b.arg(&g);
    b.arg(&grad);
    let (batch, input, hidden, output) =
        (int(d.batch)?, int(d.input)?, int(d.hidden)?, int(d.output)?);
    let (c, chunk) = (T::of(c), int(CHUNK)?);
    b.arg(&batch);
    b.arg(&input);
    b.arg(&hidden);
    b.arg(&output);
    b.arg(&kind);
    b.arg(&c);
    b.arg(&chunk);
    // SAFETY: the arguments match the kernel's signature in mlp.cu; `grad` is zeroed
    // and sized `[gx | gp1 | gp2]` as the kernel expects.
    unsafe { b.launch(cfg) }.w()?;
    Ok(grad)
}

/// The gradients packed as `[∂x | ∂p1 | ∂p2]`, from `x`, the parameters packed as
/// `[p1 | p2]` (flattened) and the output gradient `g`.
pub(super) fn backward(
    a: Activation,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    d: Dims,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let slice = match (&s1.slice, &s2.slice, &s3.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(p), CudaStorageSlice::F32(g)) => {
            let io = (view(x, l1)?, view(p, l2)?, view(g, l3)?);
            CudaStorageSlice::F32(backward_typed(dev, a, io, d)?)
        }
        (CudaStorageSlice::F64(x), CudaStorageSlice::F64(p), CudaStorageSlice::F64(g)) => {
            let io = (view(x, l1)?, view(p, l2)?, view(g, l3)?);
            CudaStorageSlice::F64(backward_typed(dev, a, io, d)?)
        }
        _ => candle::bail!("fused mlp supports f32 and f64 inputs of one dtype"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}
