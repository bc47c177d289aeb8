//! The fused conditioner `Linear → act → Linear`.
//!
//! The reference path runs five candle ops per network and materialises the
//! `(batch, hidden)` activations several times (forward and backward); at the shapes of
//! coupling layers (a few inputs and outputs, hundreds of hidden units) that is almost
//! all memory traffic and per-op overhead. These kernels compute each pass in one go,
//! keeping hidden activations in registers or small buffers, in parallel over batch
//! chunks. Results equal the reference path up to the order of floating-point sums
//! (tested to 1e-5).
//!
//! Two CPU kernels: [`portable`] handles every dtype and activation; on x86-64 CPUs
//! with AVX2 and FMA, `avx2` takes f32 networks with a piecewise-linear activation
//! (the common case) and keeps a block of hidden units in registers while samples
//! stream past. With the `cuda` feature, `mlp.cu` holds the same pair of passes for
//! the GPU (`cuda`), one thread per sample forward and one per hidden unit backward.
//!
//! Parameters travel packed: `p1 = [W₁ | b₁]` `(hidden, in + 1)` and
//! `p2 = [W₂ | b₂]` `(out, hidden + 1)`, built by [`pack_linear`](crate::pack_linear)
//! as one op each.

use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::{pack_linear, slice, Activation};

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;
mod portable;

/// `Linear(w1, b1) → activation → Linear(w2, b2)` on `x` `(batch, in)` as one op (and
/// one op for its backward). The caller decides that the kernel applies, through
/// [`fused`](crate::fused) with [`Op::Mlp`](crate::Op::Mlp).
pub fn forward(
    x: &Tensor,
    (w1, b1): (&Tensor, &Tensor),
    (w2, b2): (&Tensor, &Tensor),
    activation: Activation,
) -> Result<Tensor> {
    let p1 = pack_linear(w1, b1)?;
    let p2 = pack_linear(w2, b2)?;
    x.contiguous()?.apply_op3(&p1, &p2, FusedMlp { activation })
}

/// Samples per parallel task.
const CHUNK: usize = 64;

#[derive(Debug, Clone, Copy)]
struct FusedMlp {
    activation: Activation,
}

/// Dimensions of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    pub batch: usize,
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
}

/// Runs `chunk(x, out)` over batch chunks in parallel and returns the outputs
/// `(batch, out)`.
fn par_forward<T: Float + Send + Sync>(
    x: &[T],
    d: Dims,
    chunk: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); d.batch * d.output];
    out.par_chunks_mut(CHUNK * d.output)
        .zip(x.par_chunks(CHUNK * d.input))
        .for_each(|(out, x)| chunk(x, out));
    out
}

/// Runs `chunk(x, g_out, gx)` over batch chunks in parallel: each writes its input
/// gradients and returns its share of `(∂p1, ∂p2)`, summed here in chunk order (so the
/// result does not depend on scheduling).
fn par_backward<T: Float + Send + Sync>(
    x: &[T],
    g_out: &[T],
    d: Dims,
    chunk: impl Fn(&[T], &[T], &mut [T]) -> (Vec<T>, Vec<T>) + Sync,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut gx = vec![T::zero(); d.batch * d.input];
    let partial: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(CHUNK * d.input)
        .zip(x.par_chunks(CHUNK * d.input))
        .zip(g_out.par_chunks(CHUNK * d.output))
        .map(|((gx, x), g_out)| chunk(x, g_out, gx))
        .collect();
    let mut gp1 = vec![T::zero(); d.hidden * (d.input + 1)];
    let mut gp2 = vec![T::zero(); d.output * (d.hidden + 1)];
    for (p1, p2) in partial {
        gp1.iter_mut().zip(p1).for_each(|(s, v)| *s = *s + v);
        gp2.iter_mut().zip(p2).for_each(|(s, v)| *s = *s + v);
    }
    (gx, gp1, gp2)
}

/// The kernels for one dtype.
trait Kernel: candle::WithDType + Float + Send + Sync {
    fn forward(a: Activation, x: &[Self], p1: &[Self], p2: &[Self], d: Dims) -> Vec<Self>;

    fn backward(
        a: Activation,
        x: &[Self],
        p1: &[Self],
        p2: &[Self],
        g_out: &[Self],
        d: Dims,
    ) -> (Vec<Self>, Vec<Self>, Vec<Self>);
}

impl Kernel for f32 {
    fn forward(a: Activation, x: &[f32], p1: &[f32], p2: &[f32], d: Dims) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = avx2::Weights::new(a, p1, p2, d) {
            return k.forward(x);
        }
        portable::forward(a, x, p1, p2, d)
    }

    fn backward(
        a: Activation,
        x: &[f32],
        p1: &[f32],
        p2: &[f32],
        g_out: &[f32],
        d: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = avx2::Weights::new(a, p1, p2, d) {
            return k.backward(x, g_out);
        }
        portable::backward(a, x, p1, p2, g_out, d)
    }
}

impl Kernel for f64 {
    fn forward(a: Activation, x: &[f64], p1: &[f64], p2: &[f64], d: Dims) -> Vec<f64> {
        portable::forward(a, x, p1, p2, d)
    }

    fn backward(
        a: Activation,
        x: &[f64],
        p1: &[f64],
        p2: &[f64],
        g_out: &[f64],
        d: Dims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        portable::backward(a, x, p1, p2, g_out, d)
    }
}

fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
    let (batch, input) = l1.shape().dims2()?;
    let (hidden, in1) = l2.shape().dims2()?;
    let (output, h1) = l3.shape().dims2()?;
    if in1 != input + 1 || h1 != hidden + 1 {
        candle::bail!(
            "fused mlp: shapes {:?} {:?} {:?} do not chain",
            l1.shape(),
            l2.shape(),
            l3.shape()
        );
    }
    Ok(Dims {
        batch,
        input,
        hidden,
        output,
    })
}

/// The backward kernel on host copies of the tensors, returned as tensors.
fn gradients<T: Kernel>(
    a: Activation,
    x: &Tensor,
    p1: &Tensor,
    p2: &Tensor,
    grad: &Tensor,
    d: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
    let (gx, g1, g2) = T::backward(a, &flat(x)?, &flat(p1)?, &flat(p2)?, &flat(grad)?, d);
    let dev = x.device();
    Ok((
        Tensor::from_vec(gx, x.shape(), dev)?,
        Tensor::from_vec(g1, p1.shape(), dev)?,
        Tensor::from_vec(g2, p2.shape(), dev)?,
    ))
}

impl CustomOp3 for FusedMlp {
    fn name(&self) -> &'static str {
        "fused-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2, l3)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(p1), CpuStorage::F32(p2)) => {
                CpuStorage::F32(f32::forward(
                    self.activation,
                    slice(x, l1)?,
                    slice(p1, l2)?,
                    slice(p2, l3)?,
                    d,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(p1), CpuStorage::F64(p2)) => {
                CpuStorage::F64(f64::forward(
                    self.activation,
                    slice(x, l1)?,
                    slice(p1, l2)?,
                    slice(p2, l3)?,
                    d,
                ))
            }
            _ => candle::bail!("fused mlp supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((d.batch, d.output))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let d = dims(l1, l2, l3)?;
        let out = cuda::forward(self.activation, (s1, l1), (s2, l2), (s3, l3), d)?;
        Ok((out, Shape::from((d.batch, d.output))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.layout(), p1.layout(), p2.layout())?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (gx, g1, g2) = FusedMlpGrad::apply(self.activation, x, p1, p2, grad, d)?;
            return Ok((Some(gx), Some(g1), Some(g2)));
        }
        let (gx, g1, g2) = match x.dtype() {
            DType::F32 => gradients::<f32>(self.activation, x, p1, p2, grad, d)?,
            DType::F64 => gradients::<f64>(self.activation, x, p1, p2, grad, d)?,
            other => candle::bail!("fused mlp has no backward for {other:?}"),
        };
        Ok((Some(gx), Some(g1), Some(g2)))
    }
}

/// The backward pass as an op of its own, for devices whose kernels take tensors: inputs
/// `x`, the parameters flattened and concatenated `[p1 | p2]`, and the output gradient;
/// output the gradients flattened and concatenated `[∂x | ∂p1 | ∂p2]`.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
struct FusedMlpGrad {
    activation: Activation,
    d: Dims,
}

#[cfg(feature = "cuda")]
impl FusedMlpGrad {
    fn apply(
        activation: Activation,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        grad: &Tensor,
        d: Dims,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let p = Tensor::cat(&[p1.flatten_all()?, p2.flatten_all()?], 0)?;
        let packed =
            x.contiguous()?
                .apply_op3_no_bwd(&p, &grad.contiguous()?, &Self { activation, d })?;
        let (n0, n1) = (d.batch * d.input, d.hidden * (d.input + 1));
        let n2 = d.output * (d.hidden + 1);
        Ok((
            packed.narrow(0, 0, n0)?.reshape(x.shape())?,
            packed.narrow(0, n0, n1)?.reshape(p1.shape())?,
            packed.narrow(0, n0 + n1, n2)?.reshape(p2.shape())?,
        ))
    }

    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<()> {
        let d = self.d;
        let params = d.hidden * (d.input + 1) + d.output * (d.hidden + 1);
        if l1.shape().dims() != [d.batch, d.input]
            || l2.shape().elem_count() != params
            || l3.shape().dims() != [d.batch, d.output]
        {
            candle::bail!(
                "fused mlp backward: shapes {:?} {:?} {:?} do not match {d:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl CustomOp3 for FusedMlpGrad {
    fn name(&self) -> &'static str {
        "fused-mlp-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The CPU backward runs in `FusedMlp::bwd` directly.
        candle::bail!("fused-mlp-grad is a GPU op")
    }

    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let d = self.d;
        let out = cuda::backward(self.activation, (s1, l1), (s2, l2), (s3, l3), d)?;
        let n = d.batch * d.input + d.hidden * (d.input + 1) + d.output * (d.hidden + 1);
        Ok((out, Shape::from(n)))
    }
}
