//! Launching the CUDA kernels of `mlp.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{Map3, WrapErr};
use candle::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

use super::Dims;
use crate::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_mlp.ptx"));
const MODULE: &str = "flows_fused_mlp";

/// Threads per block.
const THREADS: u32 = 128;

/// Samples per block row of the backward kernel.
const CHUNK: usize = 64;

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

/// The name of the kernel for `T` (`fwd` or `bwd` pass), or an error for dtypes
/// without one.
fn kernel_name<T: WithDType>(pass: &str) -> Result<String> {
    if !matches!(T::DTYPE, DType::F32 | DType::F64) {
        candle::bail!("fused mlp supports f32 and f64, not {:?}", T::DTYPE);
    }
    Ok(format!("fused_mlp_{pass}_{}", T::DTYPE.as_str()))
}

/// The kernels' scalar arguments after the buffers: the sizes and the activation's
/// code, then its slope below zero.
fn scalars<T: WithDType>(a: Activation, d: Dims) -> Result<([i32; 5], T)> {
    let (kind, c) = activation(a)?;
    let sizes = [
        int(d.batch)?,
        int(d.input)?,
        int(d.hidden)?,
        int(d.output)?,
        kind,
    ];
    Ok((sizes, T::from_f64(c)))
}

/// Pushes the [`scalars`].
fn push_scalars<'a, T: WithDType + DeviceRepr>(
    b: &mut LaunchArgs<'a>,
    sizes: &'a [i32; 5],
    c: &'a T,
) {
    for v in sizes {
        b.arg(v);
    }
    b.arg(c);
}

/// The forward pass: `(x, p1, p2)` to the outputs `(batch, out)`.
struct Forward {
    a: Activation,
    d: Dims,
}

impl Map3 for Forward {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        l1: &Layout,
        p1: &CudaSlice<T>,
        l2: &Layout,
        p2: &CudaSlice<T>,
        l3: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let d = self.d;
        let (sizes, c) = scalars::<T>(self.a, d)?;
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("fwd")?, MODULE, PTX)?;
        let (x, p1, p2) = (view(x, l1)?, view(p1, l2)?, view(p2, l3)?);
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
        push_scalars(&mut b, &sizes, &c);
        // SAFETY: the arguments match the kernel's signature in mlp.cu; the buffers hold
        // the sizes `d` describes (checked by the caller from the layouts).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

/// The backward pass: `(x, [p1 | p2] flattened, g)` to the gradients flattened and
/// concatenated, `[∂x | ∂p1 | ∂p2]`.
struct Backward {
    a: Activation,
    d: Dims,
}

impl Map3 for Backward {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        l1: &Layout,
        p: &CudaSlice<T>,
        l2: &Layout,
        g: &CudaSlice<T>,
        l3: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let d = self.d;
        let (sizes, c) = scalars::<T>(self.a, d)?;
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("bwd")?, MODULE, PTX)?;
        let (x, p, g) = (view(x, l1)?, view(p, l2)?, view(g, l3)?);
        let n1 = d.hidden * (d.input + 1);
        let (p1, p2) = (p.slice(..n1), p.slice(n1..));
        let grad = dev.alloc_zeros::<T>(d.batch * d.input + n1 + d.output * (d.hidden + 1))?;
        let cfg = LaunchConfig {
            grid_dim: (
                blocks(d.hidden, THREADS as usize)?,
                blocks(d.batch, CHUNK)?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let chunk = int(CHUNK)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&p1);
        b.arg(&p2);
        b.arg(&g);
        b.arg(&grad);
        push_scalars(&mut b, &sizes, &c);
        b.arg(&chunk);
        // SAFETY: the arguments match the kernel's signature in mlp.cu; `grad` is zeroed
        // and sized `[gx | gp1 | gp2]` as the kernel expects.
        unsafe { b.launch(cfg) }.w()?;
        Ok(grad)
    }
}

/// Runs a pass on three storages of one dtype.
fn run(
    pass: &impl Map3,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let slice = pass.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// The network's outputs `(batch, out)` on the GPU.
pub(super) fn forward(
    a: Activation,
    x: (&CudaStorage, &Layout),
    p1: (&CudaStorage, &Layout),
    p2: (&CudaStorage, &Layout),
    d: Dims,
) -> Result<CudaStorage> {
    run(&Forward { a, d }, x, p1, p2)
}

/// The gradients packed as `[∂x | ∂p1 | ∂p2]`, from `x`, the parameters packed as
/// `[p1 | p2]` (flattened) and the output gradient `g`.
pub(super) fn backward(
    a: Activation,
    x: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    d: Dims,
) -> Result<CudaStorage> {
    run(&Backward { a, d }, x, p, g)
}
