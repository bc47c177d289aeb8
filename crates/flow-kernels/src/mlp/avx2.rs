//! The f32 kernel in explicit AVX2 + FMA, for the piecewise-linear activations
//! (leaky-relu and relu, both `max(z, c·z)` with `c` the slope below zero).
//!
//! Loop order: blocks of eight hidden units outside, the chunk's samples inside. A
//! block's weights and its gradient accumulators then stay in registers while the
//! samples stream past, instead of every sample reading and writing whole
//! `(hidden,)` rows. Per sample and block the backward pass is a dozen vector
//! instructions; the sums over hidden units (outputs, input gradients) collect in
//! per-sample vectors reduced once at the end.

use std::arch::x86_64::*;

use super::Dims;
use crate::Activation;

/// Hidden units per block: the f32 lanes of an AVX register.
const L: usize = 8;

/// Most inputs or outputs the kernel keeps in registers; wider networks take the
/// portable kernel.
const MAX_IO: usize = 16;

/// The weights padded to whole blocks of hidden units. The padding is zero, so padded
/// units have zero activation and zero gradient and contribute nothing.
pub(super) struct Weights {
    d: Dims,
    /// Hidden units rounded up to whole blocks.
    padded: usize,
    /// `W₁` transposed: `(in, padded)`.
    w1: Vec<f32>,
    /// `(padded,)`
    b1: Vec<f32>,
    /// `W₂`: `(out, padded)`.
    w2: Vec<f32>,
    /// `(out,)`
    b2: Vec<f32>,
    /// The activation's slope below zero.
    slope: f32,
}

impl Weights {
    /// The kernel's view of packed `p1 = [W₁ | b₁]` and `p2 = [W₂ | b₂]`, or `None` when
    /// it does not apply (activation, sizes, or a CPU without AVX2 and FMA).
    pub fn new(a: Activation, p1: &[f32], p2: &[f32], d: Dims) -> Option<Self> {
        let slope = match a {
            Activation::LeakyRelu => Activation::LEAKY_SLOPE as f32,
            Activation::Relu => 0.0,
            _ => return None,
        };
        let fits = (1..=MAX_IO).contains(&d.input) && (1..=MAX_IO).contains(&d.output);
        if !fits || !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
            return None;
        }
        let padded = d.hidden.div_ceil(L) * L;
        let mut w1 = vec![0.0; d.input * padded];
        let mut b1 = vec![0.0; padded];
        for (h, row) in p1.chunks_exact(d.input + 1).enumerate() {
            for (i, &w) in row[..d.input].iter().enumerate() {
                w1[i * padded + h] = w;
            }
            b1[h] = row[d.input];
        }
        let mut w2 = vec![0.0; d.output * padded];
        let mut b2 = vec![0.0; d.output];
        for (o, row) in p2.chunks_exact(d.hidden + 1).enumerate() {
            w2[o * padded..o * padded + d.hidden].copy_from_slice(&row[..d.hidden]);
            b2[o] = row[d.hidden];
        }
        Some(Self {
            d,
            padded,
            w1,
            b1,
            w2,
            b2,
            slope,
        })
    }

    /// Outputs `(batch, out)` for inputs `x` `(batch, in)`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        super::par_forward(x, self.d, |x, out| match (self.d.input, self.d.output) {
            // SAFETY (all arms): `new` checked that the CPU has AVX2 and FMA.
            (1, 1) => unsafe { self.forward_chunk(x, out, Fixed::<1>, Fixed::<1>) },
            (2, 2) => unsafe { self.forward_chunk(x, out, Fixed::<2>, Fixed::<2>) },
            (i, o) => unsafe { self.forward_chunk(x, out, Dynamic(i), Dynamic(o)) },
        })
    }

    /// Gradients with respect to `x`, `p1` and `p2` (packed like the inputs) given the
    /// gradient of the outputs `(batch, out)`.
    pub fn backward(&self, x: &[f32], g_out: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        super::par_backward(x, g_out, self.d, |x, g, gx| {
            match (self.d.input, self.d.output) {
                // SAFETY (all arms): `new` checked that the CPU has AVX2 and FMA.
                (1, 1) => unsafe { self.backward_chunk(x, g, gx, Fixed::<1>, Fixed::<1>) },
                (2, 2) => unsafe { self.backward_chunk(x, g, gx, Fixed::<2>, Fixed::<2>) },
                (i, o) => unsafe { self.backward_chunk(x, g, gx, Dynamic(i), Dynamic(o)) },
            }
        })
    }

    /// The block of eight hidden units starting at `h`: `(b₁, W₁ columns, W₂ rows)`.
    #[inline(always)]
    fn block(
        &self,
        h: usize,
        input: impl Size,
        output: impl Size,
    ) -> (__m256, [__m256; MAX_IO], [__m256; MAX_IO]) {
        let mut w1 = [zero(); MAX_IO];
        let mut w2 = [zero(); MAX_IO];
        for (i, w) in w1[..input.get()].iter_mut().enumerate() {
            *w = load(&self.w1[i * self.padded + h..]);
        }
        for (o, w) in w2[..output.get()].iter_mut().enumerate() {
            *w = load(&self.w2[o * self.padded + h..]);
        }
        (load(&self.b1[h..]), w1, w2)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_chunk(&self, x: &[f32], out: &mut [f32], i: impl Size, o: impl Size) {
        let (input, output) = (i.get(), o.get());
        let c = _mm256_set1_ps(self.slope);
        let mut acc = vec![_mm256_setzero_ps(); out.len()];
        for h in (0..self.padded).step_by(L) {
            let (b1, w1, w2) = self.block(h, i, o);
            for (x, acc) in x.chunks_exact(input).zip(acc.chunks_exact_mut(output)) {
                let mut z = b1;
                for (&w, &xi) in w1[..input].iter().zip(x) {
                    z = _mm256_fmadd_ps(w, _mm256_set1_ps(xi), z);
                }
                let y = _mm256_max_ps(z, _mm256_mul_ps(z, c));
                for (a, &w) in acc.iter_mut().zip(&w2[..output]) {
                    *a = _mm256_fmadd_ps(w, y, *a);
                }
            }
        }
        for (out, acc) in out.chunks_exact_mut(output).zip(acc.chunks_exact(output)) {
            for ((o, &a), &b) in out.iter_mut().zip(acc).zip(&self.b2) {
                *o = b + sum(a);
            }
        }
    }

    /// Writes the chunk's input gradients into `gx` and returns its share of `(∂p1, ∂p2)`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_chunk(
        &self,
        x: &[f32],
        g_out: &[f32],
        gx: &mut [f32],
        i: impl Size,
        o: impl Size,
    ) -> (Vec<f32>, Vec<f32>) {
        let (input, hidden, output) = (i.get(), self.d.hidden, o.get());
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let c = _mm256_set1_ps(self.slope);
        let mut gx_acc = vec![zero; gx.len()];
        let mut gp1 = vec![0.0; hidden * (input + 1)];
        let mut gp2 = vec![0.0; output * (hidden + 1)];
        for h in (0..self.padded).step_by(L) {
            let (b1, w1, w2) = self.block(h, i, o);
            let mut gb1 = zero;
            let mut gw1 = [zero; MAX_IO];
            let mut gw2 = [zero; MAX_IO];
            for ((x, g), gx) in x
                .chunks_exact(input)
                .zip(g_out.chunks_exact(output))
                .zip(gx_acc.chunks_exact_mut(input))
            {
                let mut z = b1;
                for (&w, &xi) in w1[..input].iter().zip(x) {
                    z = _mm256_fmadd_ps(w, _mm256_set1_ps(xi), z);
                }
                let y = _mm256_max_ps(z, _mm256_mul_ps(z, c));
                let mut gz = zero;
                for ((&w, gw), &go) in w2[..output].iter().zip(&mut gw2).zip(g) {
                    let go = _mm256_set1_ps(go);
                    gz = _mm256_fmadd_ps(go, w, gz);
                    *gw = _mm256_fmadd_ps(go, y, *gw);
                }
                let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(z, zero);
                gz = _mm256_mul_ps(gz, _mm256_blendv_ps(c, one, positive));
                gb1 = _mm256_add_ps(gb1, gz);
                for (((&w, gw), gxi), &xi) in w1[..input].iter().zip(&mut gw1).zip(gx).zip(x) {
                    *gw = _mm256_fmadd_ps(gz, _mm256_set1_ps(xi), *gw);
                    *gxi = _mm256_fmadd_ps(w, gz, *gxi);
                }
            }
            // Scatter the block's lanes that are real hidden units into the packed layouts.
            let units = L.min(hidden - h);
            let gb1 = lanes(gb1);
            for k in 0..units {
                let row = &mut gp1[(h + k) * (input + 1)..(h + k + 1) * (input + 1)];
                for (r, gw) in row.iter_mut().zip(&gw1[..input]) {
                    *r = lanes(*gw)[k];
                }
                row[input] = gb1[k];
            }
            for (o, gw) in gw2[..output].iter().enumerate() {
                let row = &mut gp2[o * (hidden + 1) + h..];
                row[..units].copy_from_slice(&lanes(*gw)[..units]);
            }
        }
        for (gx, acc) in gx.iter_mut().zip(&gx_acc) {
            *gx = sum(*acc);
        }
        for g in g_out.chunks_exact(output) {
            for (o, &go) in g.iter().enumerate() {
                gp2[o * (hidden + 1) + hidden] += go;
            }
        }
        (gp1, gp2)
    }
}

/// A count of inputs or outputs: a constant where the kernel is specialised (its loops
/// then unroll), otherwise known at run time.
trait Size: Copy {
    fn get(self) -> usize;
}

#[derive(Clone, Copy)]
struct Fixed<const N: usize>;

impl<const N: usize> Size for Fixed<N> {
    #[inline(always)]
    fn get(self) -> usize {
        N
    }
}

#[derive(Clone, Copy)]
struct Dynamic(usize);

impl Size for Dynamic {
    #[inline(always)]
    fn get(self) -> usize {
        self.0
    }
}

/// All lanes zero.
#[inline(always)]
fn zero() -> __m256 {
    // SAFETY: AVX is present wherever this kernel runs (`Weights::new` checks).
    unsafe { _mm256_setzero_ps() }
}

/// The first eight values of `s`.
#[inline(always)]
fn load(s: &[f32]) -> __m256 {
    let s = &s[..L];
    // SAFETY: `s` holds eight f32 (the slice above checks it); unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// The eight lanes of `v`.
#[inline(always)]
fn lanes(v: __m256) -> [f32; L] {
    let mut out = [0.0; L];
    // SAFETY: `out` has room for eight f32; unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// The sum of the lanes of `v`.
#[inline(always)]
fn sum(v: __m256) -> f32 {
    lanes(v).iter().sum()
}
