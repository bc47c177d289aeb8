//! Activation normalisation's per-channel affine map as one op with its own backward.
//! On images `x` `(batch, C, …)` with a bias `b` and a log-scale `s`, both `(C,)`:
//!
//! - forward: `y = (x + b[c]) · exp(s[c])`,
//! - inverse: `y = x · exp(−s[c]) − b[c]`.
//!
//! As candle's ops this is a broadcast add, an exponential and a broadcast product,
//! and their backward passes sum the broadcasts back over the batch and the pixels: on
//! CUDA about a dozen launches a layer. Here the forward is one launch, and the
//! backward ([`Grad`]) two: `∂x` with per-warp partial sums, then the sums per channel
//! (`actnorm.cu`). The CPU runs the same op as plain loops.
//!
//! The log-determinant, `±H·W·Σ s`, does not depend on `x` and stays with the caller.

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::{slice, Elem};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;

/// The shape of the images: `batch` images of `channels` planes of `pixels` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    batch: usize,
    channels: usize,
    pixels: usize,
}

impl Dims {
    /// From the layouts of `x` `(batch, C, …)`, `b` and `s` `(C,)`.
    fn new(x: &Layout, b: &Layout, s: &Layout) -> Result<Self> {
        let dims = x.shape().dims();
        let ok = dims.len() >= 2 && b.shape().dims() == [dims[1]] && s.shape().dims() == [dims[1]];
        if !ok {
            candle::bail!(
                "fused actnorm: input {:?} with bias {:?} and log-scale {:?}: expected \
                 (batch, C, …) and two (C,)",
                x.shape(),
                b.shape(),
                s.shape()
            );
        }
        Ok(Self {
            batch: dims[0],
            channels: dims[1],
            pixels: dims[2..].iter().product(),
        })
    }

    fn elems(&self) -> usize {
        self.batch * self.channels * self.pixels
    }
}

/// `e = exp(s)` forward, `exp(−s)` inverse: the factor on `x` and on its gradient.
fn factor<T: Elem>(s: T, inverse: bool) -> T {
    if inverse {
        (-s).exp()
    } else {
        s.exp()
    }
}

/// `y` from `x`, one image plane at a time.
fn apply<T: Elem>(x: &[T], b: &[T], s: &[T], d: Dims, inverse: bool) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for (i, plane) in x.chunks_exact(d.pixels.max(1)).enumerate() {
        let c = i % d.channels;
        let (b, e) = (b[c], factor(s[c], inverse));
        if inverse {
            y.extend(plane.iter().map(|&v| v * e - b));
        } else {
            y.extend(plane.iter().map(|&v| (v + b) * e));
        }
    }
    y
}

/// `[∂x | ∂b | ∂s]` from the output's gradient `g`, `v` (the output `y` forward, the
/// input `x` inverse) and `s`.
fn grad<T: Elem>(g: &[T], v: &[T], s: &[T], d: Dims, inverse: bool) -> Vec<T> {
    let c = d.channels;
    let mut out = Vec::with_capacity(g.len() + 2 * c);
    // Per channel, Σ g and Σ g·v.
    let mut sums = vec![(T::zero(), T::zero()); c];
    let planes = g
        .chunks_exact(d.pixels.max(1))
        .zip(v.chunks_exact(d.pixels.max(1)));
    for (i, (gp, vp)) in planes.enumerate() {
        let ch = i % c;
        let e = factor(s[ch], inverse);
        out.extend(gp.iter().map(|&g| g * e));
        let (sg, sgv) = &mut sums[ch];
        for (&g, &v) in gp.iter().zip(vp) {
            *sg += g;
            *sgv += g * v;
        }
    }
    let finish = |(ch, &(sg, sgv)): (usize, &(T, T))| {
        let e = factor(s[ch], inverse);
        if inverse {
            (-sg, -(e * sgv))
        } else {
            (e * sg, sgv)
        }
    };
    let (db, ds): (Vec<T>, Vec<T>) = sums.iter().enumerate().map(finish).unzip();
    out.extend(db);
    out.extend(ds);
    out
}

/// The map `(x, b, s) ↦ y`, either direction.
#[derive(Debug, Clone, Copy)]
struct Apply {
    inverse: bool,
}

impl CustomOp3 for Apply {
    fn name(&self) -> &'static str {
        "fused-actnorm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(lx, lb, ls)?;
        fn run<T: Elem>(
            inverse: bool,
            d: Dims,
            (x, lx): (&CpuStorage, &Layout),
            (b, lb): (&CpuStorage, &Layout),
            (s, ls): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let y = apply(
                slice(x.as_slice::<T>()?, lx)?,
                slice(b.as_slice::<T>()?, lb)?,
                slice(s.as_slice::<T>()?, ls)?,
                d,
                inverse,
            );
            Ok(T::to_cpu_storage_owned(y))
        }
        let args = ((x, lx), (b, lb), (s, ls));
        let y = match (x.dtype(), b.dtype(), s.dtype()) {
            (DType::F32, DType::F32, DType::F32) => {
                run::<f32>(self.inverse, d, args.0, args.1, args.2)?
            }
            (DType::F64, DType::F64, DType::F64) => {
                run::<f64>(self.inverse, d, args.0, args.1, args.2)?
            }
            _ => candle::bail!("the fused actnorm supports f32 and f64 inputs of one dtype"),
        };
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        lx: &Layout,
        b: &candle::CudaStorage,
        lb: &Layout,
        s: &candle::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let d = Dims::new(lx, lb, ls)?;
        let y = cuda::apply(d, self.inverse, (x, lx), (b, lb), (s, ls))?;
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        s: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let v = if self.inverse { x } else { y };
        let packed = g.contiguous()?.apply_op3_no_bwd(
            &v.contiguous()?,
            &s.contiguous()?,
            &Grad {
                inverse: self.inverse,
            },
        )?;
        let (n, c) = (x.elem_count(), b.elem_count());
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
        ))
    }
}

/// `[∂x | ∂b | ∂s]` flattened, from `(g, v, s)`: the output's gradient, `v` (the
/// output forward, the input inverse) and the log-scale.
#[derive(Debug, Clone, Copy)]
struct Grad {
    inverse: bool,
}

impl Grad {
    /// The images' shape, with `v` checked against `g`.
    fn dims(lg: &Layout, lv: &Layout, ls: &Layout) -> Result<(Dims, Shape)> {
        let d = Dims::new(lg, ls, ls)?;
        if lv.shape() != lg.shape() {
            candle::bail!(
                "fused actnorm: gradient {:?} for values {:?}",
                lg.shape(),
                lv.shape()
            );
        }
        Ok((d, Shape::from(d.elems() + 2 * d.channels)))
    }
}

impl CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        "fused-actnorm-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        v: &CpuStorage,
        lv: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = Self::dims(lg, lv, ls)?;
        fn run<T: Elem>(
            inverse: bool,
            d: Dims,
            (g, lg): (&CpuStorage, &Layout),
            (v, lv): (&CpuStorage, &Layout),
            (s, ls): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let out = grad(
                slice(g.as_slice::<T>()?, lg)?,
                slice(v.as_slice::<T>()?, lv)?,
                slice(s.as_slice::<T>()?, ls)?,
                d,
                inverse,
            );
            Ok(T::to_cpu_storage_owned(out))
        }
        let args = ((g, lg), (v, lv), (s, ls));
        let out = match (g.dtype(), v.dtype(), s.dtype()) {
            (DType::F32, DType::F32, DType::F32) => {
                run::<f32>(self.inverse, d, args.0, args.1, args.2)?
            }
            (DType::F64, DType::F64, DType::F64) => {
                run::<f64>(self.inverse, d, args.0, args.1, args.2)?
            }
            _ => candle::bail!("the fused actnorm supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle::CudaStorage,
        lg: &Layout,
        v: &candle::CudaStorage,
        lv: &Layout,
        s: &candle::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (d, shape) = Self::dims(lg, lv, ls)?;
        let out = cuda::grad(d, self.inverse, (g, lg), (v, lv), (s, ls))?;
        Ok((out, shape))
    }
}

/// The fused kernel: `y = (x + b) · exp(s)` per channel, or (`inverse`)
/// `y = x · exp(−s) − b`, for `x` `(batch, C, …)` and `b`, `s` `(C,)`. CPU, and CUDA
/// with the `cuda` feature; f32 and f64. The caller decides that the kernel applies,
/// through [`fused`](crate::fused) with [`Op::ActNorm`](crate::Op::ActNorm);
/// [`actnorm`] does both.
pub fn actnorm_fused(
    x: &Tensor,
    bias: &Tensor,
    log_scale: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &bias.contiguous()?,
        &log_scale.contiguous()?,
        Apply { inverse },
    )
}

/// The reference path: the same map as candle's broadcast ops.
pub fn actnorm_reference(
    x: &Tensor,
    bias: &Tensor,
    log_scale: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    // (1, C, 1, …), to broadcast over the batch and the pixels.
    let mut shape = vec![1; x.rank()];
    if let Some(c) = shape.get_mut(1) {
        *c = bias.elem_count();
    }
    let per_channel = |t: &Tensor| t.reshape(shape.as_slice());
    if inverse {
        x.broadcast_mul(&per_channel(&log_scale.neg()?.exp()?)?)?
            .broadcast_sub(&per_channel(bias)?)
    } else {
        x.broadcast_add(&per_channel(bias)?)?
            .broadcast_mul(&per_channel(&log_scale.exp()?)?)
    }
}

/// The per-channel affine map: the fused kernel when [`fused`](crate::fused) allows it
/// for [`Op::ActNorm`](crate::Op::ActNorm), else the reference path.
pub fn actnorm(x: &Tensor, bias: &Tensor, log_scale: &Tensor, inverse: bool) -> Result<Tensor> {
    if crate::fused(crate::Op::ActNorm, x) {
        actnorm_fused(x, bias, log_scale, inverse)
    } else {
        actnorm_reference(x, bias, log_scale, inverse)
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor, Var};

    use super::{actnorm_fused, actnorm_reference};
    use crate::test_support::gap;

    /// Values and every gradient of the op against candle's broadcast ops, both
    /// directions, f32 and f64, images of rank 4 and rows of rank 2.
    #[test]
    fn the_op_matches_the_reference_path() -> candle::Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![3, 4, 5, 2], vec![2, 1, 3, 3], vec![7, 6]] {
            let c = shape[1];
            for dtype in [DType::F32, DType::F64] {
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                let x = Var::from_tensor(
                    &Tensor::randn(0.0, 1.0, shape.as_slice(), &dev)?.to_dtype(dtype)?,
                )?;
                let b = Var::from_tensor(&Tensor::randn(0.0, 1.0, c, &dev)?.to_dtype(dtype)?)?;
                let s = Var::from_tensor(&Tensor::randn(0.0, 0.5, c, &dev)?.to_dtype(dtype)?)?;
                let r = Tensor::randn(0.0, 1.0, shape.as_slice(), &dev)?.to_dtype(dtype)?;
                for inverse in [false, true] {
                    let fused = actnorm_fused(&x, &b, &s, inverse)?;
                    let reference = actnorm_reference(&x, &b, &s, inverse)?;
                    assert!(
                        gap(&fused, &reference)? < tol,
                        "y {shape:?} {dtype:?} {inverse}"
                    );
                    let gf = (fused * &r)?.sum_all()?.backward()?;
                    let gr = (reference * &r)?.sum_all()?.backward()?;
                    for (name, v) in [("∂x", &x), ("∂b", &b), ("∂s", &s)] {
                        let (a, o) = (gf.get(v).expect("grad"), gr.get(v).expect("grad"));
                        assert_eq!(a.dims(), o.dims(), "{name}");
                        let scale = o
                            .abs()?
                            .max_all()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?
                            .max(1.0);
                        assert!(
                            gap(a, o)? < tol * scale,
                            "{name} {shape:?} {dtype:?} inverse {inverse}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The inverse undoes the forward map.
    #[test]
    fn the_inverse_undoes_the_forward_map() -> candle::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.0, 1.0, (4, 3, 2, 2), &dev)?.to_dtype(DType::F64)?;
        let b = Tensor::randn(0.0, 1.0, 3, &dev)?.to_dtype(DType::F64)?;
        let s = Tensor::randn(0.0, 1.0, 3, &dev)?.to_dtype(DType::F64)?;
        let y = actnorm_fused(&x, &b, &s, false)?;
        assert!(gap(&actnorm_fused(&y, &b, &s, true)?, &x)? < 1e-12);
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> candle::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 2, 2), DType::F32, &dev)?;
        let b = Tensor::zeros(4, DType::F32, &dev)?;
        let s = Tensor::zeros(3, DType::F32, &dev)?;
        let err = actnorm_fused(&x, &b, &s, false).unwrap_err().to_string();
        assert!(err.contains("fused actnorm"), "{err}");
        Ok(())
    }
}
