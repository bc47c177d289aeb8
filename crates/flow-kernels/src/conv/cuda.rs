//! The convolution on CUDA: the kernels of `conv.cu` around cuBLAS products, on
//! candle's device buffers, in the CPU op's position-major layout.
//!
//! - forward: `cols = im2col(x)`, `z = cols · Wᵀ` (cuBLAS), then one epilogue kernel
//!   adds the bias, applies the activation and transposes back to `(B, C_out, H, W)`;
//! - backward, from `∂z` (the gradient before the activation): `∂z` to positions,
//!   `∂W = ∂zᵀ · cols`, `∂b = Σ ∂z`, `∂cols = ∂z · W` (into `cols`' buffer, which
//!   `∂W` has read), and `∂x = col2im(∂cols)`.

use candle::cuda_backend::cudarc::cublas::{CudaBlas, Gemm};
use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use candle::cuda_backend::WrapErr;
use candle::{CudaDevice, CudaStorage, Layout, Result, WithDType};

use super::{Dims, Inner};
use crate::cuda_storage::{by_dtype, grid, int, long, storage, uninit};
use crate::product::{Blas, Product};
use crate::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_conv.ptx"));
const MODULE: &str = "flows_fused_conv";
/// The op as errors name it.
const WHAT: &str = "the fused conv";

/// Threads per block.
const THREADS: u32 = 256;

/// Rows of `∂z` each thread of the bias gradient's first pass sums: enough work per
/// thread to hide its loads, and B·H·W / `BIAS_SLICE` slices per channel to spread over
/// the device.
const BIAS_SLICE: usize = 64;

/// The kernels' activation code and slope below zero (see conv.cu).
fn code(act: Option<Inner>) -> (i32, f64) {
    match act {
        None => (0, 0.0),
        Some(Inner::Relu) => (1, 0.0),
        Some(Inner::LeakyRelu) => (1, Activation::LEAKY_SLOPE),
        Some(Inner::Tanh) => (2, 0.0),
    }
}

/// The null pointer for an absent bias.
static NULL: u64 = 0;

/// The launches of one convolution's shape, in one dtype.
struct Launches<'a> {
    dev: &'a CudaDevice,
    d: Dims,
}

/// The name of the kernel `conv_{name}` for `T`.
fn kernel<T: WithDType>(name: &str) -> String {
    format!("conv_{name}_{}", T::DTYPE.as_str())
}

/// A buffer of `n` elements that the next kernel or product writes in full.
fn buffer<T: Blas>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: each caller's kernel or product (β = 0) writes every element before
    // anything reads it.
    unsafe { uninit::<T>(dev, n) }
}

impl<'a> Launches<'a> {
    /// `∂b` (C_out) from the position-major `dzp` (B·H·W, C_out): sums over slices of
    /// [`BIAS_SLICE`] rows, then over the slices, each in a fixed order.
    fn bias_grad<T: Blas>(&self, dzp: &CudaSlice<T>, gb: &mut CudaViewMut<T>) -> Result<()> {
        let d = self.d;
        let slices = d.positions().div_ceil(BIAS_SLICE);
        let mut partials = buffer::<T>(self.dev, slices * d.cout)?;
        let (rows, cout) = (long(d.positions())?, int(d.cout)?);
        let slice = int(BIAS_SLICE)?;
        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("bias_partials"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(dzp);
        b.arg(&mut partials);
        b.arg(&rows);
        b.arg(&cout);
        b.arg(&slice);
        // SAFETY: the arguments match `conv_bias_partials` in conv.cu; `dzp` holds
        // B·H·W·C_out elements and `partials` one per slice and channel, which the
        // threads write, one each.
        unsafe { b.launch(grid(slices * d.cout, THREADS)?) }.w()?;
        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("bias_finish"), MODULE, PTX)?;
        let slices = long(slices)?;
        let mut b = func.builder();
        b.arg(&partials);
        b.arg(gb);
        b.arg(&slices);
        b.arg(&cout);
        // SAFETY: the arguments match `conv_bias_finish` in conv.cu; `partials` holds
        // `slices`·C_out elements and `gb` C_out.
        unsafe { b.launch(grid(d.cout, THREADS)?) }.w()?;
        Ok(())
    }

    /// `(batch, c_in, h, w, k)`, as im2col and col2im take them.
    fn image(&self) -> Result<[i32; 5]> {
        let d = self.d;
        Ok([
            int(d.batch)?,
            int(d.cin)?,
            int(d.height)?,
            int(d.width)?,
            int(d.k)?,
        ])
    }

    /// `C = op(A)·op(B)` on row-major buffers, as `p` gives them.
    fn product<T: Blas>(
        &self,
        p: Product,
        a: &CudaView<T>,
        b: &CudaView<T>,
        c: &mut CudaViewMut<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        if p.m == 0 || p.n == 0 {
            return Ok(());
        }
        let blas = self.dev.cublas_handle();
        // SAFETY: `Product::row_major` gives the shapes and leading dimensions of the
        // dense buffers passed, whose lengths the callers size from `Dims`.
        unsafe { blas.gemm(p.config::<T>()?, b, a, c) }.w()
    }

    /// `cols` `(B·H·W, C_in·k·k)` from `x`.
    fn im2col<T: Blas>(&self, x: &CudaView<T>) -> Result<CudaSlice<T>> {
        let d = self.d;
        let cols = buffer::<T>(self.dev, d.positions() * d.patch())?;
        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("im2col"), MODULE, PTX)?;
        let sizes = self.image()?;
        let mut b = func.builder();
        b.arg(x);
        b.arg(&cols);
        for v in &sizes {
            b.arg(v);
        }
        // SAFETY: the arguments match `conv_im2col` in conv.cu; `x` holds B·C_in·H·W
        // elements and `cols` B·H·W·C_in·k·k.
        unsafe { b.launch(grid(d.positions() * d.patch(), THREADS)?) }.w()?;
        Ok(cols)
    }

    fn forward<T: Blas>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<T>,
        bias: Option<&CudaView<T>>,
        act: Option<Inner>,
    ) -> Result<CudaSlice<T>>
    where
        CudaBlas: Gemm<T>,
    {
        let d = self.d;
        let cols = self.im2col(x)?;
        let mut z = buffer::<T>(self.dev, d.positions() * d.cout)?;
        let p = Product::row_major(d.positions(), d.cout, d.patch(), false, true);
        self.product(p, &cols.slice(..), w, &mut z.slice_mut(..))?;
        let y = buffer::<T>(self.dev, d.positions() * d.cout)?;
        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("epilogue"), MODULE, PTX)?;
        let (kind, slope) = code(act);
        let (batch, cout, hw) = (int(d.batch)?, int(d.cout)?, long(d.pixels())?);
        let mut b = func.builder();
        b.arg(&z);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&NULL),
        };
        b.arg(&y);
        b.arg(&batch);
        b.arg(&cout);
        b.arg(&hw);
        b.arg(&kind);
        b.arg(&slope);
        // SAFETY: the arguments match `conv_epilogue` in conv.cu; `z` and `y` hold
        // B·H·W·C_out elements, `bias` (when given) C_out.
        unsafe { b.launch(grid(d.positions() * d.cout, THREADS)?) }.w()?;
        Ok(y)
    }

    /// `[∂x | ∂W | ∂b]` flattened, from `x`, `W` and `∂z` `(B, C_out, H, W)`.
    fn grad<T: Blas>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<T>,
        dz: &CudaView<T>,
    ) -> Result<CudaSlice<T>>
    where
        CudaBlas: Gemm<T>,
    {
        let d = self.d;
        let (batch, hw) = (int(d.batch)?, long(d.pixels())?);
        let (nx, nw) = (d.batch * d.cin * d.pixels(), d.cout * d.patch());
        let mut out = buffer::<T>(self.dev, nx + nw + d.cout)?;

        let dzp = buffer::<T>(self.dev, d.positions() * d.cout)?;
        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("to_positions"), MODULE, PTX)?;
        let cout = int(d.cout)?;
        let mut b = func.builder();
        b.arg(dz);
        b.arg(&dzp);
        b.arg(&batch);
        b.arg(&cout);
        b.arg(&hw);
        // SAFETY: the arguments match `conv_to_positions` in conv.cu; `dz` and `dzp`
        // hold B·C_out·H·W elements.
        unsafe { b.launch(grid(d.positions() * d.cout, THREADS)?) }.w()?;

        let mut cols = self.im2col(x)?;
        let p = Product::row_major(d.cout, d.patch(), d.positions(), true, false);
        self.product(
            p,
            &dzp.slice(..),
            &cols.slice(..),
            &mut out.slice_mut(nx..nx + nw),
        )?;

        self.bias_grad(&dzp, &mut out.slice_mut(nx + nw..nx + nw + d.cout))?;

        // ∂cols overwrites cols: the stream runs the product above first.
        let p = Product::row_major(d.positions(), d.patch(), d.cout, false, false);
        self.product(p, &dzp.slice(..), w, &mut cols.slice_mut(..))?;

        let func = self
            .dev
            .get_or_load_custom_func(&kernel::<T>("col2im"), MODULE, PTX)?;
        let sizes = self.image()?;
        let mut gx = out.slice_mut(..nx);
        let mut b = func.builder();
        b.arg(&cols);
        b.arg(&mut gx);
        for v in &sizes {
            b.arg(v);
        }
        // SAFETY: the arguments match `conv_col2im` in conv.cu; `cols` holds
        // B·H·W·C_in·k·k elements and `gx` B·C_in·H·W.
        unsafe { b.launch(grid(nx, THREADS)?) }.w()?;
        Ok(out)
    }
}

/// `g ⊙ act'` `(n)` from the output's gradient `g` and the output `y`.
fn activation_grad_of<T: Blas>(
    dev: &CudaDevice,
    g: &CudaView<T>,
    y: &CudaView<T>,
    act: Inner,
    n: usize,
) -> Result<CudaSlice<T>> {
    let out = buffer::<T>(dev, n)?;
    let func = dev.get_or_load_custom_func(&kernel::<T>("activation_grad"), MODULE, PTX)?;
    let (kind, slope) = code(Some(act));
    let len = long(n)?;
    let mut b = func.builder();
    b.arg(g);
    b.arg(y);
    b.arg(&out);
    b.arg(&len);
    b.arg(&kind);
    b.arg(&slope);
    // SAFETY: the arguments match `conv_activation_grad` in conv.cu; `g`, `y` and `out`
    // hold `n` elements.
    unsafe { b.launch(grid(n, THREADS)?) }.w()?;
    Ok(out)
}

/// `act(conv(x, W) + b)` `(B, C_out, H, W)`.
pub(super) fn forward(
    d: Dims,
    act: Option<Inner>,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let l = Launches { dev, d };
    let slice = match bias {
        Some(b) => by_dtype!(WHAT, [x, w, b], |v| l.forward(
            &v[0],
            &v[1],
            Some(&v[2]),
            act
        )?),
        None => by_dtype!(WHAT, [x, w], |v| l.forward(&v[0], &v[1], None, act)?),
    };
    Ok(storage(slice, dev))
}

/// `[∂x | ∂W | ∂b]` flattened, from `x`, `W` and the gradient `∂z` before the
/// activation.
pub(super) fn grad(
    d: Dims,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dz: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let l = Launches { dev, d };
    let slice = by_dtype!(WHAT, [x, w, dz], |v| l.grad(&v[0], &v[1], &v[2])?);
    Ok(storage(slice, dev))
}

/// `g ⊙ act'` from the output's gradient `g` and the output `y`.
pub(super) fn activation_grad(
    act: Inner,
    g: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &g.0.device;
    let n = g.1.shape().elem_count();
    if y.1.shape().elem_count() != n {
        candle::bail!(
            "fused conv: gradient {:?} for output {:?}",
            g.1.shape(),
            y.1.shape()
        );
    }
    let slice = by_dtype!(WHAT, [g, y], |v| activation_grad_of(
        dev, &v[0], &v[1], act, n
    )?);
    Ok(storage(slice, dev))
}
