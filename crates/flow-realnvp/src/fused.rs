//! A fused CPU kernel for the common conditioner `Linear → act → Linear`.
//!
//! The reference path runs five candle ops per network and materialises the
//! `(batch, hidden)` activations several times (forward and backward); at the shapes of
//! coupling layers (a few inputs and outputs, hundreds of hidden units) that is almost
//! all memory traffic and per-op overhead. This kernel walks each sample once, keeping
//! the hidden activations in a small buffer, and computes the backward pass the same
//! way, in parallel over batch chunks. Results equal the reference path up to the order
//! of floating-point sums (tested to 1e-5).
//!
//! Parameters travel packed: `p1 = [W₁ | b₁]` `(hidden, in + 1)` and
//! `p2 = [W₂ | b₂]` `(out, hidden + 1)`.

use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::Activation;

/// Samples per parallel task.
const CHUNK: usize = 64;

#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedMlp {
    pub activation: Activation,
}

impl FusedMlp {
    /// Whether the kernel handles this activation.
    pub fn supports(activation: Activation) -> bool {
        matches!(
            activation,
            Activation::LeakyRelu | Activation::Relu | Activation::Tanh
        )
    }
}

/// Dimensions of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    input: usize,
    hidden: usize,
    output: usize,
}

/// The activation, branch-free so that loops over hidden units vectorise.
#[inline(always)]
fn act<T: Float>(a: Activation, z: T, slope: T) -> T {
    match a {
        // For a slope below 1, leaky-relu is the larger of z and slope·z.
        Activation::LeakyRelu => z.max(z * slope),
        Activation::Tanh => z.tanh(),
        _ => z.max(T::zero()),
    }
}

/// Derivative of `act` at pre-activation `z` (with `y = act(z)`).
#[inline(always)]
fn act_grad<T: Float>(a: Activation, z: T, y: T, slope: T) -> T {
    let positive = z > T::zero();
    match a {
        Activation::LeakyRelu => {
            if positive {
                T::one()
            } else {
                slope
            }
        }
        Activation::Tanh => T::one() - y * y,
        _ => {
            if positive {
                T::one()
            } else {
                T::zero()
            }
        }
    }
}

fn leaky_slope<T: Float>() -> T {
    T::from(Activation::LEAKY_SLOPE).unwrap_or_else(T::zero)
}

/// Lanes of the partial sums in reductions: independent accumulators let the compiler
/// vectorise what a single running sum would serialise.
const LANES: usize = 8;

/// `W₁` transposed to `(in, hidden)` so the inner loops run over contiguous hidden units,
/// and `b₁`.
fn unpack_p1<T: Float>(p1: &[T], d: Dims) -> (Vec<T>, Vec<T>) {
    let mut w1t = vec![T::zero(); d.input * d.hidden];
    let mut b1 = vec![T::zero(); d.hidden];
    for h in 0..d.hidden {
        let row = &p1[h * (d.input + 1)..(h + 1) * (d.input + 1)];
        for i in 0..d.input {
            w1t[i * d.hidden + h] = row[i];
        }
        b1[h] = row[d.input];
    }
    (w1t, b1)
}

/// Pre-activations and activations of one sample.
#[inline(always)]
fn hidden_layer<T: Float>(a: Activation, x: &[T], w1t: &[T], b1: &[T], z: &mut [T], y: &mut [T]) {
    z.copy_from_slice(b1);
    for (&xi, col) in x.iter().zip(w1t.chunks_exact(z.len())) {
        for (zh, &w) in z.iter_mut().zip(col) {
            *zh = *zh + w * xi;
        }
    }
    let slope = leaky_slope();
    for (yh, &zh) in y.iter_mut().zip(z.iter()) {
        *yh = act(a, zh, slope);
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&u, &v)| s + u * v);
    for (u, v) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] = acc[k] + u[k] * v[k];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// The forward pass over one chunk of samples.
#[inline(always)]
fn forward_chunk<T: Float>(
    a: Activation,
    x: &[T],
    out: &mut [T],
    w1t: &[T],
    b1: &[T],
    p2: &[T],
    d: Dims,
) {
    let mut z = vec![T::zero(); d.hidden];
    let mut y = vec![T::zero(); d.hidden];
    for (o_row, x_row) in out.chunks_mut(d.output).zip(x.chunks(d.input)) {
        hidden_layer(a, x_row, w1t, b1, &mut z, &mut y);
        for (o, v) in o_row.iter_mut().enumerate() {
            let w2 = &p2[o * (d.hidden + 1)..(o + 1) * (d.hidden + 1)];
            *v = w2[d.hidden] + dot(&w2[..d.hidden], &y);
        }
    }
}

fn forward<T: Float + Send + Sync>(a: Activation, x: &[T], p1: &[T], p2: &[T], d: Dims) -> Vec<T> {
    let (w1t, b1) = unpack_p1(p1, d);
    let mut out = vec![T::zero(); d.batch * d.output];
    out.par_chunks_mut(CHUNK * d.output)
        .zip(x.par_chunks(CHUNK * d.input))
        .for_each(|(out, x)| simd::forward_chunk(a, x, out, &w1t, &b1, p2, d));
    out
}

/// The backward pass over one chunk of samples: writes the chunk's input gradients and
/// returns its share of the parameter gradients `(∂p1, ∂p2)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_chunk<T: Float>(
    a: Activation,
    x: &[T],
    g_out: &[T],
    gx: &mut [T],
    w1t: &[T],
    b1: &[T],
    p2: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>) {
    // Accumulated in the packed layouts; W₁'s gradient transposed like w1t.
    let mut gw1t = vec![T::zero(); d.input * d.hidden];
    let mut gb1 = vec![T::zero(); d.hidden];
    let mut gp2 = vec![T::zero(); d.output * (d.hidden + 1)];
    let mut z = vec![T::zero(); d.hidden];
    let mut y = vec![T::zero(); d.hidden];
    let mut gz = vec![T::zero(); d.hidden];
    for ((gx_row, x_row), go) in gx
        .chunks_mut(d.input)
        .zip(x.chunks(d.input))
        .zip(g_out.chunks(d.output))
    {
        hidden_layer(a, x_row, w1t, b1, &mut z, &mut y);
        gz.iter_mut().for_each(|v| *v = T::zero());
        for (o, &g) in go.iter().enumerate() {
            let w2 = &p2[o * (d.hidden + 1)..(o + 1) * (d.hidden + 1)];
            let gw2 = &mut gp2[o * (d.hidden + 1)..(o + 1) * (d.hidden + 1)];
            for (gzh, &w) in gz.iter_mut().zip(&w2[..d.hidden]) {
                *gzh = *gzh + g * w;
            }
            for (gw, &yh) in gw2[..d.hidden].iter_mut().zip(y.iter()) {
                *gw = *gw + g * yh;
            }
            gw2[d.hidden] = gw2[d.hidden] + g;
        }
        let slope = leaky_slope();
        for (((gzh, gb), &zh), &yh) in gz
            .iter_mut()
            .zip(gb1.iter_mut())
            .zip(z.iter())
            .zip(y.iter())
        {
            *gzh = *gzh * act_grad(a, zh, yh, slope);
            *gb = *gb + *gzh;
        }
        for (i, (&xi, gxi)) in x_row.iter().zip(gx_row.iter_mut()).enumerate() {
            let col = &w1t[i * d.hidden..(i + 1) * d.hidden];
            *gxi = dot(col, &gz);
            let gcol = &mut gw1t[i * d.hidden..(i + 1) * d.hidden];
            for (gw, &g) in gcol.iter_mut().zip(gz.iter()) {
                *gw = *gw + g * xi;
            }
        }
    }
    let mut gp1 = vec![T::zero(); d.hidden * (d.input + 1)];
    for h in 0..d.hidden {
        for i in 0..d.input {
            gp1[h * (d.input + 1) + i] = gw1t[i * d.hidden + h];
        }
        gp1[h * (d.input + 1) + d.input] = gb1[h];
    }
    (gp1, gp2)
}

/// Gradients with respect to `x`, `p1` and `p2` given the gradient of the output.
fn backward<T: Float + Send + Sync>(
    a: Activation,
    x: &[T],
    p1: &[T],
    p2: &[T],
    g_out: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (w1t, b1) = unpack_p1(p1, d);
    let mut gx = vec![T::zero(); d.batch * d.input];
    let partial: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(CHUNK * d.input)
        .zip(x.par_chunks(CHUNK * d.input))
        .zip(g_out.par_chunks(CHUNK * d.output))
        .map(|((gx, x), g_out)| simd::backward_chunk(a, x, g_out, gx, &w1t, &b1, p2, d))
        .collect();
    let mut gp1 = vec![T::zero(); d.hidden * (d.input + 1)];
    let mut gp2 = vec![T::zero(); d.output * (d.hidden + 1)];
    for (p1, p2) in partial {
        gp1.iter_mut().zip(p1).for_each(|(s, v)| *s = *s + v);
        gp2.iter_mut().zip(p2).for_each(|(s, v)| *s = *s + v);
    }
    (gx, gp1, gp2)
}

/// The same kernels compiled for AVX2 (8 f32 lanes instead of SSE2's 4), chosen at run
/// time so that binaries stay portable.
mod simd {
    use num_traits::Float;

    use super::{Activation, Dims};

    /// Whether this CPU runs the AVX2 versions (the answer is cached by std).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn forward_avx2<T: Float>(
        a: Activation,
        x: &[T],
        out: &mut [T],
        w1t: &[T],
        b1: &[T],
        p2: &[T],
        d: Dims,
    ) {
        super::forward_chunk(a, x, out, w1t, b1, p2, d)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    fn backward_avx2<T: Float>(
        a: Activation,
        x: &[T],
        g_out: &[T],
        gx: &mut [T],
        w1t: &[T],
        b1: &[T],
        p2: &[T],
        d: Dims,
    ) -> (Vec<T>, Vec<T>) {
        super::backward_chunk(a, x, g_out, gx, w1t, b1, p2, d)
    }

    pub fn forward_chunk<T: Float>(
        a: Activation,
        x: &[T],
        out: &mut [T],
        w1t: &[T],
        b1: &[T],
        p2: &[T],
        d: Dims,
    ) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU supports AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { forward_avx2(a, x, out, w1t, b1, p2, d) };
        }
        super::forward_chunk(a, x, out, w1t, b1, p2, d)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward_chunk<T: Float>(
        a: Activation,
        x: &[T],
        g_out: &[T],
        gx: &mut [T],
        w1t: &[T],
        b1: &[T],
        p2: &[T],
        d: Dims,
    ) -> (Vec<T>, Vec<T>) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU supports AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { backward_avx2(a, x, g_out, gx, w1t, b1, p2, d) };
        }
        super::backward_chunk(a, x, g_out, gx, w1t, b1, p2, d)
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

fn slice<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle::bail!("fused mlp expects contiguous inputs"),
    }
}

/// The backward kernel on host copies of the tensors, returned as tensors.
fn gradients<T: candle::WithDType + Float>(
    a: Activation,
    x: &Tensor,
    p1: &Tensor,
    p2: &Tensor,
    grad: &Tensor,
    d: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
    let (gx, g1, g2) = backward(a, &flat(x)?, &flat(p1)?, &flat(p2)?, &flat(grad)?, d);
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
                CpuStorage::F32(forward(
                    self.activation,
                    slice(x, l1)?,
                    slice(p1, l2)?,
                    slice(p2, l3)?,
                    d,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(p1), CpuStorage::F64(p2)) => {
                CpuStorage::F64(forward(
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

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(x.layout(), p1.layout(), p2.layout())?;
        let (gx, g1, g2) = match x.dtype() {
            DType::F32 => gradients::<f32>(self.activation, x, p1, p2, grad, d)?,
            DType::F64 => gradients::<f64>(self.activation, x, p1, p2, grad, d)?,
            other => candle::bail!("fused mlp has no backward for {other:?}"),
        };
        Ok((Some(gx), Some(g1), Some(g2)))
    }
}
