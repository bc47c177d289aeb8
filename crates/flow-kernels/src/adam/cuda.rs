//! Launching `adam.cu`: one optimiser step over every variable in one launch.

use candle::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{CudaDevice, DType, Result, Storage, Tensor, WithDType};

use super::Step;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_adam.ptx"));
const MODULE: &str = "flows_fused_adam";

/// Threads per block.
const THREADS: u32 = 256;

/// Elements per block: a block's threads stride over this many of one variable.
const CHUNK: usize = 4096;

/// 64-bit words per variable in the launch's table (`ADAM_COLUMNS` in adam.cu): the
/// addresses of θ, m, v and g, the length, the first block.
const COLUMNS: usize = 6;

/// The step on CUDA: see [`super::step_all`].
pub(super) fn step_all(step: &Step, groups: &[[&Tensor; 4]]) -> Result<()> {
    let Some(first) = groups.first() else {
        return Ok(());
    };
    let candle::Device::Cuda(dev) = first[0].device() else {
        candle::bail!("the one-launch optimiser step runs on CUDA tensors");
    };
    match first[0].dtype() {
        DType::F32 => launch::<f32>(dev, step, groups),
        DType::F64 => launch::<f64>(dev, step, groups),
        other => candle::bail!("the one-launch optimiser step takes f32 or f64, not {other:?}"),
    }
}

fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
    dev: &CudaDevice,
    step: &Step,
    groups: &[[&Tensor; 4]],
) -> Result<()> {
    let stream = dev.cuda_stream();
    // Every tensor on the device the kernel launches on (the first group's): the
    // table's addresses mean nothing in another device's memory.
    let launching = groups[0][0].device();
    // Read guards on every storage for the whole launch: no candle op can take one of
    // them for writing (or free it) while the kernel is being scheduled.
    let mut held = Vec::with_capacity(groups.len() * 4);
    for group in groups {
        let n = group[0].elem_count();
        for t in group {
            if !t.device().same_device(launching) || t.dtype() != T::DTYPE {
                candle::bail!("the one-launch optimiser step needs one device and one dtype");
            }
            if t.elem_count() != n {
                candle::bail!(
                    "the optimiser step got tensors of {n} and {} elements",
                    t.elem_count()
                );
            }
            let (storage, layout) = t.storage_and_layout();
            let Some((start, _)) = layout.contiguous_offsets() else {
                candle::bail!("the one-launch optimiser step needs contiguous tensors");
            };
            held.push((storage, start));
        }
    }
    let mut table = Vec::with_capacity(groups.len() * COLUMNS);
    let mut syncs = Vec::with_capacity(held.len());
    let mut ranges = Vec::with_capacity(groups.len() * 4);
    let mut blocks = 0u64;
    for (group, parts) in groups.iter().zip(held.chunks(4)) {
        let n = group[0].elem_count();
        let bytes = (n * std::mem::size_of::<T>()) as u64;
        for (k, (storage, start)) in parts.iter().enumerate() {
            let Storage::Cuda(s) = &**storage else {
                candle::bail!("the one-launch optimiser step runs on CUDA tensors");
            };
            let (ptr, sync) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
            let address = ptr + (start * std::mem::size_of::<T>()) as u64;
            table.push(address);
            syncs.push(sync);
            // θ, m and v are written; g is only read.
            ranges.push((address, bytes, k < 3));
        }
        table.push(n as u64);
        table.push(blocks);
        blocks += n.div_ceil(CHUNK) as u64;
    }
    if super::conflicts(ranges) {
        candle::bail!(
            "the one-launch optimiser step got a variable or moment twice, or one that shares memory with another tensor of the step"
        );
    }
    let grid = u32::try_from(blocks).map_err(|_| {
        candle::Error::Msg(format!(
            "{blocks} blocks are too many for one optimiser launch"
        ))
    })?;
    if grid == 0 {
        return Ok(());
    }
    let rows = i32::try_from(groups.len())
        .map_err(|_| candle::Error::Msg("too many variables for one launch".into()))?;
    let table = dev.clone_htod(&table)?;
    let func =
        dev.get_or_load_custom_func(&format!("adam_multi_{}", T::DTYPE.as_str()), MODULE, PTX)?;
    let chunk = CHUNK as i64;
    let u = &step.update;
    let infinity_norm = i32::from(u.infinity_norm);
    let mut b = func.builder();
    b.arg(&table);
    b.arg(&rows);
    b.arg(&chunk);
    b.arg(&step.beta1);
    b.arg(&step.beta2);
    b.arg(&step.l2);
    b.arg(&u.alpha);
    b.arg(&u.kappa);
    b.arg(&u.eps);
    b.arg(&u.decay);
    b.arg(&infinity_norm);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `adam_multi_*` in adam.cu. Every address in the table
    // points at the first element of a contiguous CUDA buffer of `T` holding the row's
    // length, alive while `held` keeps its storage; the blocks per row are the row's
    // length over CHUNK, rounded up, as the kernel assumes. θ, m and v are written
    // through addresses taken from read guards: the variables and moments are the
    // optimiser's own, none shares an element with another tensor of the step (checked
    // above), and the kernel
    // runs on the device's one stream after every op already queued that reads them.
    unsafe { b.launch(cfg) }.w()?;
    drop(syncs);
    drop(held);
    Ok(())
}
