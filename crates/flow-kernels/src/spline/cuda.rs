//! Launching the CUDA kernels of `spline.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{Map2, Map3, WrapErr};
use candle::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

use super::{SplineShape, SplineStyle};
use crate::cuda_storage::{int, uninit, zeros};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_spline.ptx"));
const MODULE: &str = "flows_fused_spline";

/// Threads per block (one thread per row).
const THREADS: u32 = 128;

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle::bail!("the fused spline expects contiguous inputs"),
    }
}

fn kernel_name<T: WithDType>(pass: &str) -> Result<String> {
    if !matches!(T::DTYPE, DType::F32 | DType::F64) {
        candle::bail!("the fused spline supports f32 and f64, not {:?}", T::DTYPE);
    }
    Ok(format!("fused_spline_{pass}_{}", T::DTYPE.as_str()))
}

/// The kernels' arguments after the buffers: batch, n, bins, style, then the bound and
/// minimums (as doubles), then the direction.
struct Args {
    ints: [i32; 4],
    reals: [f64; 4],
    inverse: i32,
}

impl Args {
    fn new(shape: &SplineShape, inverse: bool, batch: usize, n: usize) -> Result<Self> {
        if shape.bins == 0 || shape.bins > crate::CUDA_MAX_BINS {
            candle::bail!(
                "the fused CUDA spline takes 1 to {} bins, not {}",
                crate::CUDA_MAX_BINS,
                shape.bins
            );
        }
        let style = match shape.style {
            SplineStyle::Durkan => 0,
            SplineStyle::Zuko => 1,
        };
        Ok(Self {
            ints: [int(batch)?, int(n)?, int(shape.bins)?, style],
            reals: [
                shape.bound,
                shape.min_bin_width,
                shape.min_bin_height,
                shape.min_derivative,
            ],
            inverse: i32::from(inverse),
        })
    }

    /// Pushes the arguments, in the kernels' order, after the buffers already pushed.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        for v in &self.ints {
            b.arg(v);
        }
        for v in &self.reals {
            b.arg(v);
        }
        b.arg(&self.inverse);
    }

    fn config(&self) -> Result<LaunchConfig> {
        let rows = self.ints[0].max(1) as u32;
        Ok(LaunchConfig {
            grid_dim: (rows.div_ceil(THREADS), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
}

struct Forward<'a> {
    args: &'a Args,
}

impl Map2 for Forward<'_> {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        l1: &Layout,
        theta: &CudaSlice<T>,
        l2: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let [batch, n, ..] = self.args.ints;
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("fwd")?, MODULE, PTX)?;
        let (x, theta) = (view(x, l1)?, view(theta, l2)?);
        // SAFETY: one thread per row writes the row's n outputs and its log-det: every
        // element.
        let out = unsafe { uninit::<T>(dev, batch as usize * (n as usize + 1))? };
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&theta);
        b.arg(&out);
        self.args.push(&mut b);
        // SAFETY: the arguments match `fused_spline_fwd_*` in spline.cu; the buffers hold
        // the sizes the caller checked against the layouts.
        unsafe { b.launch(self.args.config()?) }.w()?;
        Ok(out)
    }
}

struct Backward<'a> {
    args: &'a Args,
    params: usize,
}

impl Map3 for Backward<'_> {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        l1: &Layout,
        theta: &CudaSlice<T>,
        l2: &Layout,
        g: &CudaSlice<T>,
        l3: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let [batch, n, ..] = self.args.ints;
        let (batch, n) = (batch as usize, n as usize);
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("bwd")?, MODULE, PTX)?;
        let (x, theta, g) = (view(x, l1)?, view(theta, l2)?, view(g, l3)?);
        let grad = zeros::<T>(dev, batch * (n + n * self.params))?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&theta);
        b.arg(&g);
        b.arg(&grad);
        self.args.push(&mut b);
        // SAFETY: the arguments match `fused_spline_bwd_*` in spline.cu; `grad` is zeroed
        // and sized `(batch, n + n·P)` as the kernel expects.
        unsafe { b.launch(self.args.config()?) }.w()?;
        Ok(grad)
    }
}

/// The forward op's output `(batch, n + 1)` on the GPU.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    shape: &SplineShape,
    inverse: bool,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    batch: usize,
    n: usize,
) -> Result<CudaStorage> {
    let args = Args::new(shape, inverse, batch, n)?;
    let dev = &s1.device;
    let slice = Forward { args: &args }.map(&s1.slice, l1, &s2.slice, l2, dev)?;
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// The gradients `(batch, n + n·P)` on the GPU.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    shape: &SplineShape,
    inverse: bool,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    batch: usize,
    n: usize,
) -> Result<CudaStorage> {
    let args = Args::new(shape, inverse, batch, n)?;
    let dev = &s1.device;
    let pass = Backward {
        args: &args,
        params: shape.params(),
    };
    let slice = pass.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}
