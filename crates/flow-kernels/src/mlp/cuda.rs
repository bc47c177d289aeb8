//! Launching the CUDA kernels of `mlp.cu` on candle's device buffers.

use candle::cuda_backend::cudarc::cublas::{CudaBlas, Gemm};
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle::cuda_backend::{CudaStorageSlice, Map3, WrapErr};
use candle::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

use super::{Arch, Dims};
use crate::cuda_storage::{blocks, grid, int, uninit, zeros};
use crate::product::{Blas, Product};
use crate::Activation;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_mlp.ptx"));
const MODULE: &str = "flows_fused_mlp";

/// Threads per block.
const THREADS: u32 = 128;

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
        let out = unsafe { uninit::<T>(dev, d.batch * d.output)? };
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
        let grad = zeros::<T>(dev, d.batch * d.input + n1 + d.output * (d.hidden + 1))?;
        let chunk = super::cuda_backward_chunk(d.batch);
        let cfg = LaunchConfig {
            grid_dim: (
                blocks(d.hidden, THREADS as usize)?,
                blocks(d.batch, chunk)?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let chunk = int(chunk)?;
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

/// Launches of the kernels for networks of any shape, in one dtype.
struct Layers<'a, T> {
    dev: &'a CudaDevice,
    blas: std::sync::Arc<CudaBlas>,
    kind: i32,
    c: T,
}

/// The null pointer for the kernels' optional inputs.
static NULL: u64 = 0;

impl<'a, T: Blas> Layers<'a, T>
where
    CudaBlas: Gemm<T>,
{
    fn new(dev: &'a CudaDevice, a: Activation) -> Result<Self> {
        let (kind, c) = activation(a)?;
        Ok(Self {
            dev,
            blas: dev.cublas_handle(),
            kind,
            c: T::from_f64(c),
        })
    }

    /// The kernel `name` for `T`.
    fn name(name: &str) -> String {
        format!("fused_{name}_{}", T::DTYPE.as_str())
    }

    /// `c = a·b` (or `+=`) as `product` describes.
    fn product(
        &self,
        product: Product,
        a: &CudaView<T>,
        b: &CudaView<T>,
        c: &mut CudaViewMut<T>,
    ) -> Result<()> {
        if product.m == 0 || product.n == 0 {
            return Ok(());
        }
        let cfg = product.config::<T>()?;
        // SAFETY: `Product`'s constructors give the shapes and leading dimensions of
        // the row-major buffers the callers pass (checked against their lengths by the
        // ops that own them), so cuBLAS reads and writes inside them.
        unsafe { self.blas.gemm(cfg, a, b, c) }.w()
    }

    /// `z = h · Wᵀ + b (+ add)` `(rows, n)`, and `act(z)` when `activate`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        h: &CudaView<T>,
        p: &CudaView<T>,
        add: Option<&CudaView<T>>,
        rows: usize,
        k: usize,
        n: usize,
        activate: bool,
    ) -> Result<(CudaSlice<T>, Option<CudaSlice<T>>)> {
        let z = if k == 0 {
            zeros::<T>(self.dev, rows * n)?
        } else {
            // SAFETY: the product writes every element of `z` (β = 0).
            let mut z = unsafe { uninit::<T>(self.dev, rows * n)? };
            self.product(Product::layer(rows, k, n), p, h, &mut z.slice_mut(..))?;
            z
        };
        // SAFETY: the epilogue writes every element of `y`.
        let y = if activate {
            Some(unsafe { uninit::<T>(self.dev, rows * n)? })
        } else {
            None
        };
        let func = self
            .dev
            .get_or_load_custom_func(&Self::name("linear_epilogue"), MODULE, PTX)?;
        let sizes = [int(rows)?, int(k)?, int(n)?, self.kind];
        let mut b = func.builder();
        b.arg(&z);
        b.arg(p);
        match add {
            Some(a) => b.arg(a),
            None => b.arg(&NULL),
        };
        match &y {
            Some(y) => b.arg(y),
            None => b.arg(&NULL),
        };
        for v in &sizes {
            b.arg(v);
        }
        b.arg(&self.c);
        // SAFETY: the arguments match `fused_linear_epilogue` in mlp.cu; `z`, `add` and
        // `y` hold rows × n elements, `p` n × (k + 1).
        unsafe { b.launch(grid(rows * n, THREADS)?) }.w()?;
        Ok((z, y))
    }

    /// `dz · W` `(rows, k)`, times `act'(z)` at `(z, y)` when given, plus `add`.
    #[allow(clippy::too_many_arguments)]
    fn input(
        &self,
        dz: &CudaView<T>,
        p: &CudaView<T>,
        zy: Option<(&CudaView<T>, &CudaView<T>)>,
        add: Option<&CudaView<T>>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: the product writes every element (β = 0, n ≥ 1 outputs per layer).
        let mut g = unsafe { uninit::<T>(self.dev, rows * k)? };
        self.product(Product::input(rows, k, n), p, dz, &mut g.slice_mut(..))?;
        if zy.is_none() && add.is_none() {
            return Ok(g);
        }
        let func = self
            .dev
            .get_or_load_custom_func(&Self::name("input_epilogue"), MODULE, PTX)?;
        let sizes = [int(rows)?, int(k)?, self.kind];
        let mut b = func.builder();
        b.arg(&g);
        match zy {
            Some((z, y)) => {
                b.arg(z);
                b.arg(y);
            }
            None => {
                b.arg(&NULL);
                b.arg(&NULL);
            }
        }
        match add {
            Some(a) => b.arg(a),
            None => b.arg(&NULL),
        };
        for v in &sizes {
            b.arg(v);
        }
        b.arg(&self.c);
        // SAFETY: the arguments match `fused_input_epilogue` in mlp.cu; `g`, `z`, `y`
        // and `add` hold rows × k elements.
        unsafe { b.launch(grid(rows * k, THREADS)?) }.w()?;
        Ok(g)
    }

    /// `gp += [dzᵀ · h | Σ_rows dz]` into the layer's part of the parameter gradient.
    fn weights(
        &self,
        dz: &CudaView<T>,
        h: &CudaView<T>,
        gp: &mut CudaViewMut<T>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if k > 0 {
            self.product(Product::weights(rows, k, n), h, dz, gp)?;
        }
        let func = self
            .dev
            .get_or_load_custom_func(&Self::name("bias_grad"), MODULE, PTX)?;
        let sizes = [int(rows)?, int(k)?, int(n)?];
        let mut b = func.builder();
        b.arg(dz);
        b.arg(gp);
        for v in &sizes {
            b.arg(v);
        }
        // SAFETY: the arguments match `fused_bias_grad` in mlp.cu; `dz` holds rows × n
        // and `gp` n × (k + 1) elements, which the kernel adds to.
        unsafe { b.launch(grid(n, THREADS)?) }.w()?;
        Ok(())
    }

    /// `act(z)`.
    fn activate(&self, z: &CudaView<T>, len: usize) -> Result<CudaSlice<T>> {
        let func = self
            .dev
            .get_or_load_custom_func(&Self::name("activate"), MODULE, PTX)?;
        // SAFETY: the kernel writes every element.
        let y = unsafe { uninit::<T>(self.dev, len)? };
        let n = i64::try_from(len)
            .map_err(|_| candle::Error::Msg(format!("{len} is too large for the kernel")))?;
        let mut b = func.builder();
        b.arg(z);
        b.arg(&y);
        b.arg(&n);
        b.arg(&self.kind);
        b.arg(&self.c);
        // SAFETY: the arguments match `fused_activate` in mlp.cu; `z` and `y` hold `len`
        // elements.
        unsafe { b.launch(grid(len, THREADS)?) }.w()?;
        Ok(y)
    }
}

/// What the forward pass of a network of any shape leaves for its backward pass: for a
/// plain network each hidden layer's pre-activation and activation; for a residual one
/// the stream entering each block, its activation, the block's inner pre-activation and
/// activation, then the final stream.
struct Trace<T> {
    z: Vec<CudaSlice<T>>,
    y: Vec<CudaSlice<T>>,
    u: Vec<CudaSlice<T>>,
    v: Vec<CudaSlice<T>>,
}

/// Runs a network of any shape forward over `x` `(rows, in)`: what the backward pass
/// reads, and the output.
fn run_general<T: Blas>(
    l: &Layers<T>,
    arch: &Arch,
    x: &CudaView<T>,
    p: &CudaView<T>,
) -> Result<(Trace<T>, CudaSlice<T>)>
where
    CudaBlas: Gemm<T>,
{
    let shapes = arch.linear_shapes();
    let mut at = vec![0];
    for &(k, n) in &shapes {
        at.push(at[at.len() - 1] + n * (k + 1));
    }
    let rows = x.len() / arch.input().max(1);
    let param = |i: usize| p.slice(at[i]..at[i + 1]);
    let mut t = Trace {
        z: Vec::new(),
        y: Vec::new(),
        u: Vec::new(),
        v: Vec::new(),
    };
    let mut out = None;
    match arch {
        Arch::Plain { .. } => {
            for (i, &(k, n)) in shapes.iter().enumerate() {
                let last = i + 1 == shapes.len();
                let (z, y) = {
                    let input = match t.y.last() {
                        Some(y) if i > 0 => y.slice(..),
                        _ => x.slice(..),
                    };
                    l.forward(&input, &param(i), None, rows, k, n, !last)?
                };
                if last {
                    out = Some(z);
                } else {
                    t.z.push(z);
                    t.y.extend(y);
                }
            }
        }
        Arch::Residual { hidden, .. } => {
            let h = *hidden;
            let (k, n) = shapes[0];
            let (mut stream, _) = l.forward(x, &param(0), None, rows, k, n, false)?;
            for b in 0..(shapes.len() - 2) / 2 {
                let (i0, i1) = (1 + 2 * b, 2 + 2 * b);
                let y = l.activate(&stream.slice(..), rows * h)?;
                let (u, v) = l.forward(&y.slice(..), &param(i0), None, rows, h, h, true)?;
                let v = v.ok_or_else(|| candle::Error::Msg("no activation".into()))?;
                let (next, _) = l.forward(
                    &v.slice(..),
                    &param(i1),
                    Some(&stream.slice(..)),
                    rows,
                    h,
                    h,
                    false,
                )?;
                t.z.push(std::mem::replace(&mut stream, next));
                t.y.push(y);
                t.u.push(u);
                t.v.push(v);
            }
            let (k, n) = shapes[shapes.len() - 1];
            let (last, _) = l.forward(
                &stream.slice(..),
                &param(shapes.len() - 1),
                None,
                rows,
                k,
                n,
                false,
            )?;
            t.z.push(stream);
            out = Some(last);
        }
    }
    let out = out.ok_or_else(|| candle::Error::Msg("a network without layers".into()))?;
    Ok((t, out))
}

/// Forward pass of a network of any shape: `(x, p)` to the outputs `(batch, out)`.
fn general_forward<T: Blas>(
    arch: &Arch,
    a: Activation,
    (x, l1): (&CudaStorage, &Layout),
    (p, l2): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>>
where
    CudaBlas: Gemm<T>,
{
    let dev = &x.device;
    let l = Layers::<T>::new(dev, a)?;
    let (x, p) = (
        view(x.as_cuda_slice::<T>()?, l1)?,
        view(p.as_cuda_slice::<T>()?, l2)?,
    );
    Ok(run_general(&l, arch, &x, &p)?.1)
}

/// Backward pass of a network of any shape: `(x, p, g)` to `[∂x | ∂p]`.
fn general_backward<T: Blas>(
    arch: &Arch,
    a: Activation,
    (x, l1): (&CudaStorage, &Layout),
    (p, l2): (&CudaStorage, &Layout),
    (g, l3): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>>
where
    CudaBlas: Gemm<T>,
{
    let dev = &x.device;
    {
        let l = Layers::<T>::new(dev, a)?;
        let (x, p, g) = (
            view(x.as_cuda_slice::<T>()?, l1)?,
            view(p.as_cuda_slice::<T>()?, l2)?,
            view(g.as_cuda_slice::<T>()?, l3)?,
        );
        let (t, _) = run_general(&l, arch, &x, &p)?;
        let shapes = arch.linear_shapes();
        let mut at = vec![0];
        for &(k, n) in &shapes {
            at.push(at[at.len() - 1] + n * (k + 1));
        }
        let rows = x.len() / arch.input().max(1);
        let nx = rows * arch.input();
        let mut grad = zeros::<T>(dev, nx + p.len())?;
        let param = |i: usize| p.slice(at[i]..at[i + 1]);
        let last = shapes.len() - 1;
        let gx = match arch {
            Arch::Plain { .. } => {
                let mut dz: Option<CudaSlice<T>> = None;
                let mut gx = None;
                for i in (0..shapes.len()).rev() {
                    let (k, n) = shapes[i];
                    let dzv = match &dz {
                        Some(d) => d.slice(..),
                        None => g.slice(..),
                    };
                    let input = if i == 0 {
                        x.slice(..)
                    } else {
                        t.y[i - 1].slice(..)
                    };
                    let mut gp = grad.slice_mut(nx + at[i]..nx + at[i + 1]);
                    l.weights(&dzv, &input, &mut gp, rows, k, n)?;
                    let zy = (i > 0).then(|| (t.z[i - 1].slice(..), t.y[i - 1].slice(..)));
                    let zy = zy.as_ref().map(|(z, y)| (z, y));
                    let next = l.input(&dzv, &param(i), zy, None, rows, k, n)?;
                    if i == 0 {
                        gx = Some(next);
                    } else {
                        dz = Some(next);
                    }
                }
                gx
            }
            Arch::Residual { hidden, .. } => {
                let h = *hidden;
                let stream = &t.z[t.z.len() - 1];
                let (k, n) = shapes[last];
                let mut gp = grad.slice_mut(nx + at[last]..nx + at[last + 1]);
                l.weights(&g, &stream.slice(..), &mut gp, rows, k, n)?;
                let mut gh = l.input(&g, &param(last), None, None, rows, k, n)?;
                for b in (0..(shapes.len() - 2) / 2).rev() {
                    let (i0, i1) = (1 + 2 * b, 2 + 2 * b);
                    let mut gp = grad.slice_mut(nx + at[i1]..nx + at[i1 + 1]);
                    l.weights(&gh.slice(..), &t.v[b].slice(..), &mut gp, rows, h, h)?;
                    let (u, v) = (t.u[b].slice(..), t.v[b].slice(..));
                    let gu =
                        l.input(&gh.slice(..), &param(i1), Some((&u, &v)), None, rows, h, h)?;
                    let mut gp = grad.slice_mut(nx + at[i0]..nx + at[i0 + 1]);
                    l.weights(&gu.slice(..), &t.y[b].slice(..), &mut gp, rows, h, h)?;
                    let (z, y) = (t.z[b].slice(..), t.y[b].slice(..));
                    gh = l.input(
                        &gu.slice(..),
                        &param(i0),
                        Some((&z, &y)),
                        Some(&gh.slice(..)),
                        rows,
                        h,
                        h,
                    )?;
                }
                let (k, n) = shapes[0];
                let mut gp = grad.slice_mut(nx..nx + at[1]);
                l.weights(&gh.slice(..), &x, &mut gp, rows, k, n)?;
                Some(l.input(&gh.slice(..), &param(0), None, None, rows, k, n)?)
            }
        };
        if let Some(gx) = gx {
            dev.memcpy_dtod(&gx, &mut grad.slice_mut(..nx))?;
        }
        Ok(grad)
    }
}

/// The outputs `(batch, out)` of a network of any shape on the GPU.
pub(super) fn forward_general(
    arch: &Arch,
    a: Activation,
    x: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let slice = match x.0.slice {
        CudaStorageSlice::F32(_) => CudaStorageSlice::F32(general_forward(arch, a, x, p)?),
        CudaStorageSlice::F64(_) => CudaStorageSlice::F64(general_forward(arch, a, x, p)?),
        _ => candle::bail!("fused mlp supports f32 and f64"),
    };
    Ok(CudaStorage {
        slice,
        device: x.0.device.clone(),
    })
}

/// The gradients packed as `[∂x | ∂p]` of a network of any shape on the GPU.
pub(super) fn backward_general(
    arch: &Arch,
    a: Activation,
    x: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let slice = match x.0.slice {
        CudaStorageSlice::F32(_) => CudaStorageSlice::F32(general_backward(arch, a, x, p, g)?),
        CudaStorageSlice::F64(_) => CudaStorageSlice::F64(general_backward(arch, a, x, p, g)?),
        _ => candle::bail!("fused mlp supports f32 and f64"),
    };
    Ok(CudaStorage {
        slice,
        device: x.0.device.clone(),
    })
}
