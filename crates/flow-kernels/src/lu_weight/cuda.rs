//! Launching the kernels of `lu_weight.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{CudaDevice, CudaStorage, Layout, Result, Storage, Tensor, WithDType};

use super::LuWeightGrad;
use crate::cuda_storage::{by_dtype, grid, int, storage, uninit};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_lu_weight.ptx"));
const MODULE: &str = "flows_fused_lu_weight";
/// The op as errors name it.
const WHAT: &str = "the fused LU weight";

/// Threads per block.
const THREADS: u32 = 128;

/// Runs `f` with the CUDA storage and layout of `t`, a tensor the op holds.
fn held<R>(t: &Tensor, f: impl FnOnce((&CudaStorage, &Layout)) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(s) => f((s, l)),
        _ => candle::bail!("{WHAT}: its buffers are not on the GPU of its inputs"),
    }
}

/// Launches `lu_weight_{name}` for `T` over `n` outputs, with `inputs` before the
/// output buffer and the channel count after it.
fn launch<T: CudaDType + WithDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[CudaView<T>],
    n: usize,
    c: usize,
) -> Result<CudaSlice<T>> {
    // The kernels index the C·C matrices with `int`s.
    if int(c.saturating_mul(c)).is_err() {
        candle::bail!("the fused LU weight takes fewer than 46 341 channels, got {c}");
    }
    let c = int(c)?;
    // SAFETY: the kernel writes all `n` outputs before anything reads them.
    let out = unsafe { uninit::<T>(dev, n) }?;
    let kernel = format!("lu_weight_{name}_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
    let mut b = func.builder();
    for v in inputs {
        b.arg(v);
    }
    b.arg(&out);
    b.arg(&c);
    // SAFETY: the arguments match the kernel in lu_weight.cu (the buffers in its order,
    // p and the matrices C·C elements, the vectors C, the output `n`), and the grid
    // covers the `n` outputs.
    unsafe { b.launch(grid(n, THREADS)?) }.w()?;
    Ok(out)
}

/// `W` `(C, C)` from `l`, `u`, `log_s` and the held `p` and `sign`.
pub(super) fn forward(
    c: usize,
    p: &Tensor,
    sign: &Tensor,
    l: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    log_s: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &l.0.device;
    held(p, |p| {
        held(sign, |sign| {
            let slice = by_dtype!(WHAT, [p, l, u, log_s, sign], |v| launch(
                dev,
                "forward",
                &v,
                c * c,
                c
            )?);
            Ok(storage(slice, dev))
        })
    })
}

/// `[∂l | ∂u | ∂log_s]` from `∂W`.
pub(super) fn backward(
    c: usize,
    op: &LuWeightGrad,
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &g.0.device;
    held(&op.p, |p| {
        held(&op.l, |l| {
            held(&op.u, |u| {
                held(&op.log_s, |log_s| {
                    held(&op.sign, |sign| {
                        let slice = by_dtype!(WHAT, [p, l, u, log_s, sign, g], |v| launch(
                            dev,
                            "backward",
                            &v,
                            2 * c * c + c,
                            c
                        )?);
                        Ok(storage(slice, dev))
                    })
                })
            })
        })
    })
}
