//! Candle's CUDA storages as the contiguous views the kernel modules launch on, and
//! back (the dtype dispatch the kernel modules share), and the sizes and grids of their
//! launches.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, CudaStorageSlice};
use candle::{CudaDevice, CudaStorage, Layout, Result};

/// The contiguous views of storages of one dtype `T`; `what` names the op in the error
/// for a strided input.
pub(crate) fn views<'a, T: CudaDType>(
    inputs: &[(&'a CudaStorage, &Layout)],
    what: &str,
) -> Result<Vec<CudaView<'a, T>>> {
    inputs
        .iter()
        .map(|(s, l)| match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
            None => candle::bail!("{what} expects contiguous inputs"),
        })
        .collect()
}

/// `n` elements on `dev`, left as they are, at least one: a zero-byte allocation may
/// fail (`cuMemAlloc` refuses one), and a kernel over nothing writes nothing anyway.
///
/// # Safety
///
/// The caller writes every element before anything reads it.
pub(crate) unsafe fn uninit<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the caller's promise, above.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// `n` zeros on `dev`, at least one (as [`uninit`]).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

/// `n` as a kernel's `int`.
pub(crate) fn int(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle::Error::Msg(format!("{n} is too large for the kernel")))
}

/// `n` as a kernel's `long long`.
pub(crate) fn long(n: usize) -> Result<i64> {
    i64::try_from(n).map_err(|_| candle::Error::Msg(format!("{n} is too large for the kernel")))
}

/// Blocks of `per` for `n` (at least one).
pub(crate) fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per).max(1))
        .map_err(|_| candle::Error::Msg(format!("{n} is too large for the kernel")))
}

/// One thread per each of `n` outputs, in blocks of `threads`.
pub(crate) fn grid(n: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks(n, threads as usize)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A result on `dev`.
pub(crate) fn storage(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

/// Runs `body` with `views` bound to the contiguous views of `inputs` (pairs of storage
/// and layout, all of one float type) and wraps its buffer as that type's slice; `what`
/// names the op in the errors.
macro_rules! by_dtype {
    ($what:expr, $inputs:expr, |$views:ident| $body:expr) => {{
        let inputs = $inputs;
        match inputs[0].0.slice {
            candle::cuda_backend::CudaStorageSlice::F32(_) => {
                let $views = $crate::cuda_storage::views::<f32>(&inputs, $what)?;
                candle::cuda_backend::CudaStorageSlice::F32($body)
            }
            candle::cuda_backend::CudaStorageSlice::F64(_) => {
                let $views = $crate::cuda_storage::views::<f64>(&inputs, $what)?;
                candle::cuda_backend::CudaStorageSlice::F64($body)
            }
            _ => candle::bail!("{} takes f32 or f64", $what),
        }
    }};
}
pub(crate) use by_dtype;
