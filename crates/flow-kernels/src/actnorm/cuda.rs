//! Launching the kernels of `actnorm.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{CudaDevice, CudaStorage, Layout, Result, WithDType};

use super::Dims;
use crate::cuda_storage::{blocks, by_dtype, grid, int, long, storage, uninit, zeros};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_actnorm.ptx"));
const MODULE: &str = "flows_fused_actnorm";
/// The op as errors name it.
const WHAT: &str = "the fused actnorm";

/// Threads per block.
const THREADS: u32 = 256;
/// Threads of a warp, as `actnorm.cu` reduces over them.
const WARP: u32 = 32;
/// Elements each thread of the backward sums at least, and the most blocks a channel
/// gets: enough threads to keep the memory busy, few enough partials for one warp to
/// add up per channel.
const PER_THREAD: usize = 8;
const MAX_BLOCKS: usize = 32;

/// The name of the kernel `actnorm_{name}` for `T`.
fn kernel<T: WithDType>(name: &str) -> String {
    format!("actnorm_{name}_{}", T::DTYPE.as_str())
}

/// A buffer of `n` elements that the next kernels write in full.
fn buffer<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: each caller's kernels write every element before anything reads it.
    unsafe { uninit::<T>(dev, n) }
}

fn config((x, y): (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks per channel for the backward's partial sums.
fn blocks_per_channel(d: Dims) -> usize {
    (d.batch * d.pixels)
        .div_ceil(THREADS as usize * PER_THREAD)
        .clamp(1, MAX_BLOCKS)
}

fn apply_of<T: CudaDType + WithDType + DeviceRepr>(
    dev: &CudaDevice,
    d: Dims,
    inverse: bool,
    x: &CudaView<T>,
    b: &CudaView<T>,
    s: &CudaView<T>,
) -> Result<CudaSlice<T>> {
    let n = d.elems();
    let y = buffer::<T>(dev, n)?;
    let func = dev.get_or_load_custom_func(&kernel::<T>("apply"), MODULE, PTX)?;
    let (len, c, hw, inv) = (
        long(n)?,
        int(d.channels)?,
        long(d.pixels)?,
        i32::from(inverse),
    );
    let mut a = func.builder();
    a.arg(x);
    a.arg(b);
    a.arg(s);
    a.arg(&y);
    a.arg(&len);
    a.arg(&c);
    a.arg(&hw);
    a.arg(&inv);
    // SAFETY: the arguments match `actnorm_apply` in actnorm.cu; `x` and `y` hold `n`
    // elements, `b` and `s` one per channel.
    unsafe { a.launch(grid(n, THREADS)?) }.w()?;
    Ok(y)
}

fn grad_of<T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    d: Dims,
    inverse: bool,
    g: &CudaView<T>,
    v: &CudaView<T>,
    s: &CudaView<T>,
) -> Result<CudaSlice<T>> {
    let (n, channels) = (d.elems(), d.channels);
    if n == 0 {
        // No values to sum over (or no channels to launch for): every gradient is zero.
        return zeros::<T>(dev, n + 2 * channels);
    }
    let mut out = buffer::<T>(dev, n + 2 * channels)?;
    let per_channel = blocks_per_channel(d);
    let warps = per_channel * (THREADS / WARP) as usize;
    let partial = buffer::<T>(dev, channels * warps * 2)?;
    let (batch, c, hw, inv) = (
        int(d.batch)?,
        int(channels)?,
        long(d.pixels)?,
        i32::from(inverse),
    );

    let func = dev.get_or_load_custom_func(&kernel::<T>("partials"), MODULE, PTX)?;
    let mut dx = out.slice_mut(..n);
    let mut a = func.builder();
    a.arg(g);
    a.arg(v);
    a.arg(s);
    a.arg(&mut dx);
    a.arg(&partial);
    a.arg(&batch);
    a.arg(&c);
    a.arg(&hw);
    a.arg(&inv);
    // SAFETY: the arguments match `actnorm_partials` in actnorm.cu; `g`, `v` and `dx`
    // hold `n` elements, `s` one per channel, and `partial` two per warp of the grid
    // (C × `per_channel` blocks of THREADS threads).
    unsafe {
        a.launch(config(
            (blocks(channels, 1)?, blocks(per_channel, 1)?),
            THREADS,
        ))
    }
    .w()?;

    let func = dev.get_or_load_custom_func(&kernel::<T>("finish"), MODULE, PTX)?;
    let mut sums = out.slice_mut(n..);
    let warps = int(warps)?;
    let mut a = func.builder();
    a.arg(&partial);
    a.arg(s);
    a.arg(&mut sums);
    a.arg(&c);
    a.arg(&warps);
    a.arg(&inv);
    // SAFETY: the arguments match `actnorm_finish` in actnorm.cu; `partial` holds two
    // values per warp of each channel, `s` one per channel and `sums` two.
    unsafe { a.launch(config((blocks(channels, 1)?, 1), WARP)) }.w()?;
    Ok(out)
}

/// `y`, the map in either direction, `(batch, C, …)`.
pub(super) fn apply(
    d: Dims,
    inverse: bool,
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    s: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let slice = by_dtype!(WHAT, [x, b, s], |v| apply_of(
        dev, d, inverse, &v[0], &v[1], &v[2]
    )?);
    Ok(storage(slice, dev))
}

/// `[∂x | ∂b | ∂s]` flattened, from the output's gradient `g`, `v` and `s`.
pub(super) fn grad(
    d: Dims,
    inverse: bool,
    g: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    s: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &g.0.device;
    let slice = by_dtype!(WHAT, [g, v, s], |w| grad_of(
        dev, d, inverse, &w[0], &w[1], &w[2]
    )?);
    Ok(storage(slice, dev))
}
