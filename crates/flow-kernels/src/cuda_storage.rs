//! Candle's CUDA storages as the contiguous views the kernel modules launch on, and
//! back: the dtype dispatch the affine coupling's and the convolution's launches share.

use candle::cuda_backend::cudarc::driver::CudaView;
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
