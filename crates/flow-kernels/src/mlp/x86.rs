//! The f32 kernel in explicit x86 SIMD, for the piecewise-linear activations
//! (leaky-relu and relu, both `max(z, c·z)` with `c` the slope below zero): AVX-512
//! (16 lanes) where the CPU has it, otherwise AVX2 + FMA (8 lanes). One generic body
//! serves both through [`Vector`]; each instruction set gets its own compiled copy.
//!
//! Loop order: blocks of hidden units (one vector wide) outside, the chunk's samples
//! inside. A block's weights and its gradient accumulators then stay in registers while
//! the samples stream past, instead of every sample reading and writing whole
//! `(hidden,)` rows. Per sample and block the backward pass is about ten vector
//! instructions; the sums over hidden units (outputs, input gradients) collect in
//! per-sample vectors reduced once at the end.

use std::arch::x86_64::*;

use super::Dims;
use crate::Activation;

/// Most inputs or outputs the kernel keeps in registers; wider networks take the
/// portable kernel.
const MAX_IO: usize = 16;

/// The widest vector's f32 lanes (AVX-512).
const MAX_LANES: usize = 16;

/// The instruction sets the kernel is built for, widest first.
#[derive(Clone, Copy)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The widest this CPU runs.
    fn detect() -> Option<Self> {
        if is_x86_feature_detected!("avx512f") {
            Some(Self::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Self::Avx2)
        } else {
            None
        }
    }

    /// Every instruction set this CPU runs (so that tests can pin each to the portable
    /// kernel).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            all.push(Self::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Self::Avx2);
        }
        all
    }

    fn lanes(self) -> usize {
        match self {
            Self::Avx512 => Wide::LANES,
            Self::Avx2 => Narrow::LANES,
        }
    }
}

/// The weights padded to whole blocks of hidden units. The padding is zero, so padded
/// units have zero activation and zero gradient and contribute nothing.
pub(super) struct Weights {
    d: Dims,
    isa: Isa,
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
    /// it does not apply (activation, sizes, or a CPU with neither AVX-512 nor AVX2 and
    /// FMA).
    pub fn new(a: Activation, p1: &[f32], p2: &[f32], d: Dims) -> Option<Self> {
        Self::build(a, p1, p2, d, Isa::detect()?)
    }

    /// [`Weights::new`] for the instruction set `isa`, which the CPU must run.
    fn build(a: Activation, p1: &[f32], p2: &[f32], d: Dims, isa: Isa) -> Option<Self> {
        let slope = match a {
            Activation::LeakyRelu => Activation::LEAKY_SLOPE as f32,
            Activation::Relu => 0.0,
            _ => return None,
        };
        let fits = (1..=MAX_IO).contains(&d.input) && (1..=MAX_IO).contains(&d.output);
        if !fits {
            return None;
        }
        let padded = d.hidden.div_ceil(isa.lanes()) * isa.lanes();
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
            isa,
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
        super::par_forward(x, self.d, |x, out| match self.isa {
            // SAFETY (both arms): `new` chose the instruction set this CPU has.
            Isa::Avx512 => unsafe { self.forward_avx512(x, out) },
            Isa::Avx2 => unsafe { self.forward_avx2(x, out) },
        })
    }

    /// Gradients with respect to `x`, `p1` and `p2` (packed like the inputs) given the
    /// gradient of the outputs `(batch, out)`.
    pub fn backward(&self, x: &[f32], g_out: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        super::par_backward(x, g_out, self.d, |x, g, gx| match self.isa {
            // SAFETY (both arms): `new` chose the instruction set this CPU has.
            Isa::Avx512 => unsafe { self.backward_avx512(x, g, gx) },
            Isa::Avx2 => unsafe { self.backward_avx2(x, g, gx) },
        })
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn forward_avx512(&self, x: &[f32], out: &mut [f32]) {
        self.forward_sized::<Wide>(x, out)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_avx2(&self, x: &[f32], out: &mut [f32]) {
        self.forward_sized::<Narrow>(x, out)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn backward_avx512(&self, x: &[f32], g: &[f32], gx: &mut [f32]) -> Parts {
        self.backward_sized::<Wide>(x, g, gx)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_avx2(&self, x: &[f32], g: &[f32], gx: &mut [f32]) -> Parts {
        self.backward_sized::<Narrow>(x, g, gx)
    }

    /// The forward chunk, specialised for the common sizes (their loops then unroll).
    #[inline(always)]
    unsafe fn forward_sized<V: Vector>(&self, x: &[f32], out: &mut [f32]) {
        match (self.d.input, self.d.output) {
            (1, 1) => self.forward_chunk::<V>(x, out, Fixed::<1>, Fixed::<1>),
            (2, 2) => self.forward_chunk::<V>(x, out, Fixed::<2>, Fixed::<2>),
            (i, o) => self.forward_chunk::<V>(x, out, Dynamic(i), Dynamic(o)),
        }
    }

    /// The backward chunk, specialised like [`Self::forward_sized`].
    #[inline(always)]
    unsafe fn backward_sized<V: Vector>(&self, x: &[f32], g: &[f32], gx: &mut [f32]) -> Parts {
        match (self.d.input, self.d.output) {
            (1, 1) => self.backward_one_output::<V>(x, g, gx, Fixed::<1>),
            (i, 1) => self.backward_one_output::<V>(x, g, gx, Dynamic(i)),
            (2, 2) => self.backward_chunk::<V>(x, g, gx, Fixed::<2>, Fixed::<2>),
            (i, o) => self.backward_chunk::<V>(x, g, gx, Dynamic(i), Dynamic(o)),
        }
    }

    /// The block of hidden units starting at `h`: `(b₁, W₁ columns, W₂ rows)`.
    #[inline(always)]
    unsafe fn block<V: Vector>(
        &self,
        h: usize,
        input: impl Size,
        output: impl Size,
    ) -> (V, [V; MAX_IO], [V; MAX_IO]) {
        let mut w1 = [V::zero(); MAX_IO];
        let mut w2 = [V::zero(); MAX_IO];
        for (i, w) in w1[..input.get()].iter_mut().enumerate() {
            *w = V::load(&self.w1[i * self.padded + h..]);
        }
        for (o, w) in w2[..output.get()].iter_mut().enumerate() {
            *w = V::load(&self.w2[o * self.padded + h..]);
        }
        (V::load(&self.b1[h..]), w1, w2)
    }

    #[inline(always)]
    unsafe fn forward_chunk<V: Vector>(
        &self,
        x: &[f32],
        out: &mut [f32],
        i: impl Size,
        o: impl Size,
    ) {
        let (input, output) = (i.get(), o.get());
        let c = V::splat(self.slope);
        let mut acc = vec![V::zero(); out.len()];
        for h in (0..self.padded).step_by(V::LANES) {
            let (b1, w1, w2) = self.block::<V>(h, i, o);
            for (x, acc) in x.chunks_exact(input).zip(acc.chunks_exact_mut(output)) {
                let mut z = b1;
                for (&w, &xi) in w1[..input].iter().zip(x) {
                    z = V::fmadd(w, V::splat(xi), z);
                }
                let (y, _) = V::leaky(z, c);
                for (a, &w) in acc.iter_mut().zip(&w2[..output]) {
                    *a = V::fmadd(w, y, *a);
                }
            }
        }
        for (out, acc) in out.chunks_exact_mut(output).zip(acc.chunks_exact(output)) {
            for ((o, &a), &b) in out.iter_mut().zip(acc).zip(&self.b2) {
                *o = b + a.sum();
            }
        }
    }

    /// Writes the chunk's input gradients into `gx` and returns its share of `(∂p1, ∂p2)`.
    #[inline(always)]
    unsafe fn backward_chunk<V: Vector>(
        &self,
        x: &[f32],
        g_out: &[f32],
        gx: &mut [f32],
        i: impl Size,
        o: impl Size,
    ) -> Parts {
        let (input, hidden, output) = (i.get(), self.d.hidden, o.get());
        let c = V::splat(self.slope);
        let mut gx_acc = vec![V::zero(); gx.len()];
        let mut gp1 = vec![0.0; hidden * (input + 1)];
        let mut gp2 = vec![0.0; output * (hidden + 1)];
        for h in (0..self.padded).step_by(V::LANES) {
            let (b1, w1, w2) = self.block::<V>(h, i, o);
            let mut gb1 = V::zero();
            let mut gw1 = [V::zero(); MAX_IO];
            let mut gw2 = [V::zero(); MAX_IO];
            for ((x, g), gx) in x
                .chunks_exact(input)
                .zip(g_out.chunks_exact(output))
                .zip(gx_acc.chunks_exact_mut(input))
            {
                let mut z = b1;
                for (&w, &xi) in w1[..input].iter().zip(x) {
                    z = V::fmadd(w, V::splat(xi), z);
                }
                let (y, negative) = V::leaky(z, c);
                let mut gy = V::zero();
                for ((&w, gw), &go) in w2[..output].iter().zip(&mut gw2).zip(g) {
                    let go = V::splat(go);
                    gy = V::fmadd(go, w, gy);
                    *gw = V::fmadd(go, y, *gw);
                }
                let gz = V::leaky_grad(gy, negative, c);
                gb1 = V::add(gb1, gz);
                for (((&w, gw), gxi), &xi) in w1[..input].iter().zip(&mut gw1).zip(gx).zip(x) {
                    *gw = V::fmadd(gz, V::splat(xi), *gw);
                    *gxi = V::fmadd(w, gz, *gxi);
                }
            }
            // Scatter the block's lanes that are real hidden units into the packed layouts.
            let units = V::LANES.min(hidden.saturating_sub(h));
            let gb1 = gb1.to_array();
            for k in 0..units {
                let row = &mut gp1[(h + k) * (input + 1)..(h + k + 1) * (input + 1)];
                for (r, gw) in row.iter_mut().zip(&gw1[..input]) {
                    *r = gw.to_array()[k];
                }
                row[input] = gb1[k];
            }
            for (o, gw) in gw2[..output].iter().enumerate() {
                let row = &mut gp2[o * (hidden + 1) + h..];
                row[..units].copy_from_slice(&gw.to_array()[..units]);
            }
        }
        for (gx, acc) in gx.iter_mut().zip(&gx_acc) {
            *gx = acc.sum();
        }
        for g in g_out.chunks_exact(output) {
            for (o, &go) in g.iter().enumerate() {
                gp2[o * (hidden + 1) + hidden] += go;
            }
        }
        (gp1, gp2)
    }
}

impl Weights {
    /// [`Weights::backward_chunk`] for networks of one output (the affine coupling's
    /// separate scale and shift networks), in fewer instructions: with one output the
    /// chain rule factorises. The activation is `y = a·z` with `a` 1 or the slope, so
    /// with `q = ∂out · a` per sample and hidden unit, `∂z = w₂ q`, and
    ///
    /// - `∂W₂ = Σ q z`, `∂b₁ = w₂ Σ q`, `∂W₁ = w₂ Σ q x` (sums over samples),
    /// - `∂x = Σ (W₁ ⊙ w₂) q` (sums over hidden units).
    ///
    /// The sample loop then needs `z`, the sign of `z`, `q` (a select between `∂out` and
    /// `∂out·c`) and four running sums, and multiplies by `w₂` once per block.
    #[inline(always)]
    unsafe fn backward_one_output<V: Vector>(
        &self,
        x: &[f32],
        g_out: &[f32],
        gx: &mut [f32],
        i: impl Size,
    ) -> Parts {
        let (input, hidden) = (i.get(), self.d.hidden);
        let mut gx_acc = vec![V::zero(); gx.len()];
        let mut gp1 = vec![0.0; hidden * (input + 1)];
        let mut gp2 = vec![0.0; hidden + 1];
        for h in (0..self.padded).step_by(V::LANES) {
            let (b1, w1, w2) = self.block::<V>(h, i, Fixed::<1>);
            let w2 = w2[0];
            let mut w12 = [V::zero(); MAX_IO];
            for (w12, &w) in w12[..input].iter_mut().zip(&w1[..input]) {
                *w12 = V::mul(w, w2);
            }
            let (mut sum_q, mut sum_qz) = (V::zero(), V::zero());
            let mut sum_qx = [V::zero(); MAX_IO];
            for ((x, &g), gx) in x
                .chunks_exact(input)
                .zip(g_out)
                .zip(gx_acc.chunks_exact_mut(input))
            {
                let mut z = b1;
                for (&w, &xi) in w1[..input].iter().zip(x) {
                    z = V::fmadd(w, V::splat(xi), z);
                }
                let q = V::select(V::not_positive(z), V::splat(g * self.slope), V::splat(g));
                sum_q = V::add(sum_q, q);
                sum_qz = V::fmadd(q, z, sum_qz);
                for (((&w12, s), gxi), &xi) in w12[..input].iter().zip(&mut sum_qx).zip(gx).zip(x) {
                    *s = V::fmadd(q, V::splat(xi), *s);
                    *gxi = V::fmadd(w12, q, *gxi);
                }
            }
            // Scatter the block's lanes that are real hidden units into the packed layouts.
            let units = V::LANES.min(hidden.saturating_sub(h));
            let gb1 = V::mul(w2, sum_q).to_array();
            // (Loops, not closures: a closure would not inherit this function's target
            // features, and its vector operations would not inline.)
            let mut gw1 = [[0.0; MAX_LANES]; MAX_IO];
            for (gw, &s) in gw1.iter_mut().zip(&sum_qx[..input]) {
                *gw = V::mul(w2, s).to_array();
            }
            for k in 0..units {
                let row = &mut gp1[(h + k) * (input + 1)..(h + k + 1) * (input + 1)];
                for (r, gw) in row.iter_mut().zip(&gw1[..input]) {
                    *r = gw[k];
                }
                row[input] = gb1[k];
            }
            gp2[h..h + units].copy_from_slice(&sum_qz.to_array()[..units]);
        }
        for (gx, acc) in gx.iter_mut().zip(&gx_acc) {
            *gx = acc.sum();
        }
        gp2[hidden] = g_out.iter().sum();
        (gp1, gp2)
    }
}

/// A chunk's share of the parameter gradients, `(∂p1, ∂p2)`.
type Parts = (Vec<f32>, Vec<f32>);

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

/// The vector operations the kernel uses, over one register of f32 lanes.
///
/// # Safety
///
/// Every method needs the CPU to have the type's instruction set; they are called only
/// from functions compiled for it (`target_feature`), into which they inline.
trait Vector: Copy {
    const LANES: usize;
    /// Which lanes [`Vector::leaky`] found not positive.
    type Mask: Copy;

    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// The first `LANES` values of `s` (which must hold them).
    unsafe fn load(s: &[f32]) -> Self;
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// The lanes where `z ≤ 0`.
    unsafe fn not_positive(z: Self) -> Self::Mask;
    /// `a` on the lanes of `mask`, `b` elsewhere.
    unsafe fn select(mask: Self::Mask, a: Self, b: Self) -> Self;
    /// `(max(z, c·z), the lanes where z ≤ 0)` for a slope `0 ≤ c ≤ 1`.
    unsafe fn leaky(z: Self, c: Self) -> (Self, Self::Mask);
    /// `g`, times `c` on the lanes of `negative`: the activation's chain rule.
    unsafe fn leaky_grad(g: Self, negative: Self::Mask, c: Self) -> Self;
    /// The lanes, then zeros up to [`MAX_LANES`].
    unsafe fn to_array(self) -> [f32; MAX_LANES];
    unsafe fn sum(self) -> f32;
}

/// AVX-512: 16 lanes, with mask registers for the activation.
#[derive(Clone, Copy)]
struct Wide(__m512);

impl Vector for Wide {
    const LANES: usize = 16;
    type Mask = __mmask16;

    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Self(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(s: &[f32]) -> Self {
        let s = &s[..Self::LANES];
        // SAFETY: `s` holds 16 f32 (the slice above checks it); unaligned loads are allowed.
        Self(unsafe { _mm512_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Self(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self(_mm512_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self(_mm512_mul_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn not_positive(z: Self) -> Self::Mask {
        _mm512_cmp_ps_mask::<_CMP_LE_OQ>(z.0, _mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn select(mask: Self::Mask, a: Self, b: Self) -> Self {
        Self(_mm512_mask_blend_ps(mask, b.0, a.0))
    }
    #[inline(always)]
    unsafe fn leaky(z: Self, c: Self) -> (Self, Self::Mask) {
        let negative = Self::not_positive(z);
        (Self(_mm512_mask_mul_ps(z.0, negative, z.0, c.0)), negative)
    }
    #[inline(always)]
    unsafe fn leaky_grad(g: Self, negative: Self::Mask, c: Self) -> Self {
        Self(_mm512_mask_mul_ps(g.0, negative, g.0, c.0))
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; MAX_LANES] {
        let mut out = [0.0; MAX_LANES];
        // SAFETY: `out` has room for 16 f32; unaligned stores are allowed.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) };
        out
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
}

/// AVX2 + FMA: 8 lanes; the activation's mask is a vector of all-ones lanes.
#[derive(Clone, Copy)]
struct Narrow(__m256);

impl Vector for Narrow {
    const LANES: usize = 8;
    type Mask = __m256;

    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Self(_mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn load(s: &[f32]) -> Self {
        let s = &s[..Self::LANES];
        // SAFETY: `s` holds eight f32 (the slice above checks it); unaligned loads are allowed.
        Self(unsafe { _mm256_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Self(_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self(_mm256_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self(_mm256_mul_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn not_positive(z: Self) -> Self::Mask {
        _mm256_cmp_ps::<_CMP_LE_OQ>(z.0, _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn select(mask: Self::Mask, a: Self, b: Self) -> Self {
        Self(_mm256_blendv_ps(b.0, a.0, mask))
    }
    #[inline(always)]
    unsafe fn leaky(z: Self, c: Self) -> (Self, Self::Mask) {
        let negative = Self::not_positive(z);
        (Self(_mm256_max_ps(z.0, _mm256_mul_ps(z.0, c.0))), negative)
    }
    #[inline(always)]
    unsafe fn leaky_grad(g: Self, negative: Self::Mask, c: Self) -> Self {
        Self::mul(g, Self::select(negative, c, Self::splat(1.0)))
    }
    #[inline(always)]
    unsafe fn to_array(self) -> [f32; MAX_LANES] {
        let mut out = [0.0; MAX_LANES];
        // SAFETY: `out` has room for 16 f32, of which the store fills eight; unaligned
        // stores are allowed.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), self.0) };
        out
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        self.to_array().iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    /// Each instruction set's passes against the portable kernel, on sizes that fill
    /// blocks exactly and that leave padded units, for both activations.
    #[test]
    fn every_instruction_set_matches_the_portable_kernel() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let isas = Isa::available();
        for (input, hidden, output, batch) in [
            (1, 512, 1, 300),
            (3, 37, 1, 90),
            (2, 24, 2, 70),
            (3, 37, 5, 130),
            (16, 9, 16, 65),
        ] {
            let d = Dims {
                batch,
                input,
                hidden,
                output,
            };
            let (x, p1, p2) = (
                draw(batch * input),
                draw(hidden * (input + 1)),
                draw(output * (hidden + 1)),
            );
            let g = draw(batch * output);
            for a in [Activation::LeakyRelu, Activation::Relu] {
                let out = super::super::portable::forward(a, &x, &p1, &p2, d);
                let (gx, gp1, gp2) = super::super::portable::backward(a, &x, &p1, &p2, &g, d);
                for &isa in &isas {
                    let k = Weights::build(a, &p1, &p2, d, isa).expect("the kernel applies");
                    let what = format!("{:?} lanes {} {input}-{hidden}-{output}", a, isa.lanes());
                    close(&k.forward(&x), &out, &what);
                    let (kx, k1, k2) = k.backward(&x, &g);
                    close(&kx, &gx, &what);
                    close(&k1, &gp1, &what);
                    close(&k2, &gp2, &what);
                }
            }
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}: [{i}] {x} against {y}"
            );
        }
    }
}
