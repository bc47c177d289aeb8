//! Launching the CUDA kernels of `affine.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle::cuda_backend::WrapErr;
use candle::{CudaDevice, CudaStorage, Layout, Result, WithDType};

use crate::cuda_storage::{by_dtype, int, storage, uninit};
use crate::ScaleMap;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_affine.ptx"));
const MODULE: &str = "flows_fused_affine";
/// The op as errors name it.
const WHAT: &str = "the fused coupling";

/// Threads per block.
const THREADS: u32 = 256;

/// What every kernel of `affine.cu` takes after its buffers: the sizes, the scale
/// map's code and constant, the direction.
pub(super) struct Code {
    batch: i64,
    dim: i32,
    n: i32,
    kind: i32,
    clamp: f64,
    inverse: i32,
    shift_first: i32,
}

impl Code {
    /// For `batch` rows of `dim` features, `n` of them transformed.
    pub(super) fn new(
        scale: ScaleMap,
        inverse: bool,
        batch: usize,
        dim: usize,
        n: usize,
    ) -> Result<Self> {
        let (kind, clamp) = match scale {
            ScaleMap::Exp => (0, 1.0),
            ScaleMap::SoftClamp { clamp } => (1, clamp),
            ScaleMap::Tanh { clamp } => (2, clamp),
            ScaleMap::Atan { clamp } => (3, clamp),
            ScaleMap::Sigmoid => (4, 1.0),
            ScaleMap::Softplus => (5, 1.0),
        };
        let batch = i64::try_from(batch)
            .map_err(|_| candle::Error::Msg(format!("{batch} rows are too many")))?;
        Ok(Self {
            batch,
            dim: int(dim)?,
            n: int(n)?,
            kind,
            clamp,
            inverse: i32::from(inverse),
            shift_first: 0,
        })
    }

    /// The update kernels' order of shift and scale.
    pub(super) fn with_order(self, order: super::Order) -> Self {
        Self {
            shift_first: i32::from(order == super::Order::ShiftThenScale),
            ..self
        }
    }

    /// Blocks for one thread per each of `threads` outputs.
    fn grid(threads: i64) -> Result<LaunchConfig> {
        let per = i64::from(THREADS);
        let blocks = u32::try_from((threads.max(1) + per - 1) / per)
            .map_err(|_| candle::Error::Msg(format!("{threads} threads are too many")))?;
        Ok(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Pushes `(batch, dim, n, kind, clamp, inverse, shift_first)`, or without `dim`
    /// and `shift_first` for the log-det kernels.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>, with_dim: bool) {
        b.arg(&self.batch);
        if with_dim {
            b.arg(&self.dim);
        }
        b.arg(&self.n);
        b.arg(&self.kind);
        b.arg(&self.clamp);
        b.arg(&self.inverse);
        if with_dim {
            b.arg(&self.shift_first);
        }
    }

    fn elems(&self) -> i64 {
        self.batch * i64::from(self.dim)
    }

    fn params(&self) -> i64 {
        self.batch * i64::from(self.n)
    }
}

fn len(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Launches `kernel` for `T` over `threads` outputs into a fresh buffer of `out`
/// elements, with the buffers `inputs` (and `columns`, when given) before it.
#[allow(clippy::too_many_arguments)]
fn launch<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    kernel: &str,
    inputs: &[CudaView<T>],
    columns: Option<&CudaSlice<i32>>,
    out: usize,
    code: &Code,
    threads: i64,
    with_dim: bool,
) -> Result<CudaSlice<T>> {
    let func =
        dev.get_or_load_custom_func(&format!("{kernel}_{}", T::DTYPE.as_str()), MODULE, PTX)?;
    // SAFETY: every kernel writes each element of its output (one writer per element,
    // see affine.cu).
    let dst = unsafe { uninit::<T>(dev, out)? };
    let mut b = func.builder();
    for input in inputs {
        b.arg(input);
    }
    if let Some(c) = columns {
        b.arg(c);
    }
    b.arg(&dst);
    code.push(&mut b, with_dim);
    // SAFETY: the arguments match the kernel's signature in affine.cu: the inputs hold
    // the elements the sizes in `code` describe (checked from the layouts by the ops in
    // mod.rs), `columns` has `dim` entries, each −1 or a column below `n`.
    unsafe { b.launch(Code::grid(threads)?) }.w()?;
    Ok(dst)
}

/// `y` `(batch, dim)` from `x`, `s` and `t`.
pub(super) fn update(
    code: &Code,
    columns: &[i32],
    x: (&CudaStorage, &Layout),
    s: (&CudaStorage, &Layout),
    t: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let columns = dev.clone_htod(columns)?;
    let (threads, out) = (code.elems(), len(code.elems()));
    let slice = by_dtype!(WHAT, [x, s, t], |v| {
        launch(
            dev,
            "affine_update",
            &v,
            Some(&columns),
            out,
            code,
            threads,
            true,
        )?
    });
    Ok(storage(slice, dev))
}

/// `[∂x | ∂s | ∂t]` flattened, from `xy` (the op's input or output, see affine.cu), `s` and the
/// output gradient `g`.
pub(super) fn update_grad(
    code: &Code,
    columns: &[i32],
    xy: (&CudaStorage, &Layout),
    s: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &xy.0.device;
    let columns = dev.clone_htod(columns)?;
    let threads = code.elems();
    let out = len(code.elems() + 2 * code.params());
    let slice = by_dtype!(WHAT, [xy, s, g], |v| {
        launch(
            dev,
            "affine_update_grad",
            &v,
            Some(&columns),
            out,
            code,
            threads,
            true,
        )?
    });
    Ok(storage(slice, dev))
}

/// Each row's log-det `(batch)` from `s`.
pub(super) fn log_det(code: &Code, s: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let dev = &s.0.device;
    let slice = by_dtype!(WHAT, [s], |v| {
        launch(
            dev,
            "affine_log_det",
            &v,
            None,
            len(code.batch),
            code,
            code.batch,
            false,
        )?
    });
    Ok(storage(slice, dev))
}

/// `∂s` `(batch, n)` from `s` and the log-dets' gradient `g`.
pub(super) fn log_det_grad(
    code: &Code,
    s: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &s.0.device;
    let (threads, out) = (code.params(), len(code.params()));
    let slice = by_dtype!(WHAT, [s, g], |v| {
        launch(
            dev,
            "affine_log_det_grad",
            &v,
            None,
            out,
            code,
            threads,
            false,
        )?
    });
    Ok(storage(slice, dev))
}
