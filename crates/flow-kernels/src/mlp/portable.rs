//! The portable kernel: generic over `f32`/`f64` and every supported activation, written
//! as loops over contiguous hidden units that the compiler vectorises (and compiles a
//! second time for AVX2, picked at run time).

use num_traits::Float;

use super::Dims;
use crate::Activation;

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

/// One call's network, laid out for the kernels: `W₁` transposed to `(in, hidden)` so
/// the inner loops run over contiguous hidden units, `b₁`, and `p2` as packed.
struct Net<'a, T> {
    a: Activation,
    w1t: Vec<T>,
    b1: Vec<T>,
    p2: &'a [T],
    d: Dims,
}

impl<'a, T: Float> Net<'a, T> {
    fn new(a: Activation, p1: &[T], p2: &'a [T], d: Dims) -> Self {
        let mut w1t = vec![T::zero(); d.input * d.hidden];
        let mut b1 = vec![T::zero(); d.hidden];
        for h in 0..d.hidden {
            let row = &p1[h * (d.input + 1)..(h + 1) * (d.input + 1)];
            for i in 0..d.input {
                w1t[i * d.hidden + h] = row[i];
            }
            b1[h] = row[d.input];
        }
        Self { a, w1t, b1, p2, d }
    }
}

/// Pre-activations and activations of one sample.
#[inline(always)]
fn hidden_layer<T: Float>(net: &Net<T>, x: &[T], z: &mut [T], y: &mut [T]) {
    let (a, w1t, b1) = (net.a, &net.w1t, &net.b1);
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

#[inline(always)]
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
fn forward_chunk<T: Float>(net: &Net<T>, x: &[T], out: &mut [T]) {
    let (p2, d) = (net.p2, net.d);
    let mut z = vec![T::zero(); d.hidden];
    let mut y = vec![T::zero(); d.hidden];
    for (o_row, x_row) in out.chunks_mut(d.output).zip(x.chunks(d.input)) {
        hidden_layer(net, x_row, &mut z, &mut y);
        for (o, v) in o_row.iter_mut().enumerate() {
            let w2 = &p2[o * (d.hidden + 1)..(o + 1) * (d.hidden + 1)];
            *v = w2[d.hidden] + dot(&w2[..d.hidden], &y);
        }
    }
}

/// The network's outputs `(batch, out)` for inputs `x` `(batch, in)`.
pub(super) fn forward<T: Float + Send + Sync>(
    a: Activation,
    x: &[T],
    p1: &[T],
    p2: &[T],
    d: Dims,
) -> Vec<T> {
    let net = Net::new(a, p1, p2, d);
    super::par_forward(x, d, |x, out| simd::forward_chunk(&net, x, out))
}

/// The backward pass over one chunk of samples: writes the chunk's input gradients and
/// returns its share of the parameter gradients `(∂p1, ∂p2)`.
#[inline(always)]
fn backward_chunk<T: Float>(net: &Net<T>, x: &[T], g_out: &[T], gx: &mut [T]) -> (Vec<T>, Vec<T>) {
    let (a, w1t, p2, d) = (net.a, &net.w1t, net.p2, net.d);
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
        hidden_layer(net, x_row, &mut z, &mut y);
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
pub(super) fn backward<T: Float + Send + Sync>(
    a: Activation,
    x: &[T],
    p1: &[T],
    p2: &[T],
    g_out: &[T],
    d: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let net = Net::new(a, p1, p2, d);
    super::par_backward(x, g_out, d, |x, g_out, gx| {
        simd::backward_chunk(&net, x, g_out, gx)
    })
}

/// The same kernels compiled for AVX2 (8 f32 lanes instead of SSE2's 4), chosen at run
/// time so that binaries stay portable.
mod simd {
    use num_traits::Float;

    use super::Net;

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn forward_avx2<T: Float>(net: &Net<T>, x: &[T], out: &mut [T]) {
        super::forward_chunk(net, x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn backward_avx2<T: Float>(net: &Net<T>, x: &[T], g: &[T], gx: &mut [T]) -> (Vec<T>, Vec<T>) {
        super::backward_chunk(net, x, g, gx)
    }

    pub fn forward_chunk<T: Float>(net: &Net<T>, x: &[T], out: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if super::super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { forward_avx2(net, x, out) };
        }
        super::forward_chunk(net, x, out)
    }

    pub fn backward_chunk<T: Float>(
        net: &Net<T>,
        x: &[T],
        g: &[T],
        gx: &mut [T],
    ) -> (Vec<T>, Vec<T>) {
        #[cfg(target_arch = "x86_64")]
        if super::super::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { backward_avx2(net, x, g, gx) };
        }
        super::backward_chunk(net, x, g, gx)
    }
}
