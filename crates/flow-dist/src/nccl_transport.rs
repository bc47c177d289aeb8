//! The NCCL backend: one CUDA GPU per process, through cudarc's NCCL bindings (as
//! candle's `nccl` feature builds them). Rank 0 makes NCCL's unique id and hands it
//! to the others over TCP at `MASTER_ADDR:MASTER_PORT`.

use std::{sync::Arc, time::Duration};

use candle::{
    backend::BackendDevice,
    cuda_backend::{
        cudarc::nccl::safe::{Comm, Id, ReduceOp},
        CudaDevice, CudaStorage, CudaStorageSlice,
    },
    CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor,
};

use crate::{
    rendezvous::{receive_id, serve_id},
    worker::{Transport, Worker},
    Collective, LauncherVars,
};

/// `torchrun`'s default port for the rendezvous.
const DEFAULT_PORT: u16 = 29500;

/// The bytes of NCCL's unique id.
const ID_BYTES: usize = 128;

fn fail(msg: impl Into<String>) -> candle::Error {
    candle::Error::Msg(msg.into())
}

/// Where rank 0 serves the id: `MASTER_ADDR:MASTER_PORT`.
fn rendezvous_address() -> Result<String> {
    let host = std::env::var("MASTER_ADDR").map_err(|_| {
        fail("NCCL: set MASTER_ADDR (and MASTER_PORT) to the host of rank 0, as torchrun does")
    })?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p
            .trim()
            .parse::<u16>()
            .map_err(|_| fail(format!("MASTER_PORT=`{p}` is not a port number")))?,
        Err(_) => DEFAULT_PORT,
    };
    Ok(format!("{host}:{port}"))
}

pub(crate) fn connect(timeout: Duration, device: &Device) -> Result<Arc<dyn Collective>> {
    let vars = LauncherVars::from_env().map_err(fail)?;
    let Device::Cuda(dev) = device else {
        return Err(fail("NCCL needs a CUDA device"));
    };
    let dev = dev.clone();
    let worker = Worker::start("NCCL", timeout, move || open(vars, dev, timeout))?;
    Ok(Arc::new(worker))
}

fn open(vars: LauncherVars, dev: CudaDevice, timeout: Duration) -> Result<(usize, usize, Nccl)> {
    let stream = dev.cuda_stream();
    // NCCL works on the calling thread's current device.
    stream
        .context()
        .bind_to_thread()
        .map_err(candle::Error::wrap)?;
    let id = if vars.world == 1 {
        Id::new().map_err(|e| fail(format!("NCCL: {e:?}")))?
    } else if vars.rank == 0 {
        let id = Id::new().map_err(|e| fail(format!("NCCL: {e:?}")))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        serve_id(&rendezvous_address()?, vars.world - 1, &bytes, timeout).map_err(fail)?;
        id
    } else {
        let bytes = receive_id(&rendezvous_address()?, ID_BYTES, timeout).map_err(fail)?;
        let internal: [std::ffi::c_char; ID_BYTES] =
            std::array::from_fn(|i| bytes.get(i).copied().unwrap_or(0) as std::ffi::c_char);
        Id::uninit(internal)
    };
    let comm = Comm::from_rank(stream, vars.rank, vars.world, id)
        .map_err(|e| fail(format!("NCCL: {e:?}")))?;
    Ok((vars.rank, vars.world, Nccl { comm, dev }))
}

/// An NCCL communicator on this process's GPU.
struct Nccl {
    comm: Comm,
    dev: CudaDevice,
}

/// What an op does with the communicator.
#[derive(Clone, Copy)]
enum Call {
    Sum,
    Broadcast(usize),
}

/// A collective call as a candle op on a CUDA tensor: its result is a new tensor.
struct NcclOp<'a> {
    comm: &'a Comm,
    call: Call,
}

impl NcclOp<'_> {
    fn run<T>(
        &self,
        src: &candle::cuda_backend::cudarc::driver::CudaSlice<T>,
        range: std::ops::Range<usize>,
        dev: &CudaDevice,
    ) -> Result<candle::cuda_backend::cudarc::driver::CudaSlice<T>>
    where
        T: candle::cuda_backend::cudarc::nccl::safe::NcclType
            + candle::cuda_backend::cudarc::driver::DeviceRepr
            + candle::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let src = src.slice(range.clone());
        let mut dst = dev.alloc_zeros::<T>(range.len())?;
        let status = match self.call {
            Call::Sum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Call::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        status.map_err(|e| fail(format!("NCCL: {e:?}")))?;
        Ok(dst)
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(fail("NCCL carries CUDA tensors only"))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| fail("NCCL: a tensor that is not contiguous"))?;
        let dev = &s.device;
        let slice = match &s.slice {
            CudaStorageSlice::F32(v) => CudaStorageSlice::F32(self.run(v, start..end, dev)?),
            CudaStorageSlice::F64(v) => CudaStorageSlice::F64(self.run(v, start..end, dev)?),
            CudaStorageSlice::U32(v) => CudaStorageSlice::U32(self.run(v, start..end, dev)?),
            CudaStorageSlice::I64(v) => CudaStorageSlice::I64(self.run(v, start..end, dev)?),
            CudaStorageSlice::U8(v) => CudaStorageSlice::U8(self.run(v, start..end, dev)?),
            _ => return Err(fail("NCCL carries f32, f64, u32, i64 and u8 tensors")),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            l.shape().clone(),
        ))
    }
}

impl Nccl {
    /// Runs `call` on `t` and waits for the GPU to finish it, so that the worker's
    /// bounded wait covers the other processes' part.
    fn apply(&self, t: &Tensor, call: Call) -> Result<Tensor> {
        let out = t.contiguous()?.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm,
            call,
        })?;
        self.dev.synchronize()?;
        Ok(out)
    }
}

impl Transport for Nccl {
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, Call::Sum)
    }
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.apply(t, Call::Broadcast(root))
    }
    fn barrier(&mut self) -> Result<()> {
        let one = Tensor::zeros(1, candle::DType::F32, &Device::Cuda(self.dev.clone()))?;
        self.apply(&one, Call::Sum).map(|_| ())
    }
}
