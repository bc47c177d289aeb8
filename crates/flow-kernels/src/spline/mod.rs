//! The rational-quadratic spline (Durkan et al. 2019) of every element in one pass: from
//! the inputs `x` `(batch, n)` and the raw parameters `θ` `(batch, n, 3K − 1)`, each
//! element's knots (two softmaxes and a cumulative sum), its bin, the spline's value
//! and the log of its slope; backward, the gradients to `x` and `θ` by hand, from the
//! same per-element quantities. On the graph this replaces some forty candle ops, each
//! materialising a `(batch, n, K)` tensor.
//!
//! The maths is `flow_nn::Spline`'s reference path's, term for term; tests pin the two
//! together. `spline.cu` is the same on CUDA, one thread per row.
//! Inside `[−B, B]` the spline, outside the identity (log-slope 0). The inverse solves
//! the bin's quadratic with the numerically stable root; its gradients follow from the
//! forward map's by the implicit function theorem.

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{slice, Real};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;

/// How raw parameters become a spline's bin widths, heights and knot derivatives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplineStyle {
    /// Durkan et al. (2019) as nflows writes it: widths and heights a softmax with a
    /// minimum bin size, derivatives a softplus with a minimum.
    #[default]
    Durkan,
    /// zuko's: each raw value soft-clipped to `±|ln slope|`, widths and heights a
    /// softmax, derivatives an exponential (at least the slope `min_derivative`).
    Zuko,
}

/// The settings the kernel needs: `bins` on `[−bound, bound]`, the style and its
/// minimums.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplineShape {
    pub bins: usize,
    pub bound: f64,
    pub style: SplineStyle,
    pub min_bin_width: f64,
    pub min_bin_height: f64,
    pub min_derivative: f64,
}

fn c<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::zero)
}

/// Elements whose knots are computed together, one a lane: laid out knot by knot, the
/// loops over the bins (softmax, running sums, positions) are element-wise across the
/// lanes and vectorise, where one element's are chains of dependent operations.
const LANES: usize = 8;

/// The knot positions in `x` and `y` (`K + 1` each) of a block of up to [`LANES`]
/// elements, with the softmax probabilities of their widths and heights (kept for the
/// backward pass); knot `j` of lane `e` at `j · LANES + e`. The derivatives are
/// computed for an element's bin alone ([`SplineShape::bin`]): the other `K − 3` would
/// cost a softplus each and go unread.
struct Knots<T> {
    x: Vec<T>,
    y: Vec<T>,
    pw: Vec<T>,
    ph: Vec<T>,
    /// Scratch for [`SplineShape::knot_gradients`]: the gradient of each size.
    gs: Vec<T>,
}

/// The six numbers of a bin: its ends in `x` and `y` and its end derivatives.
#[derive(Clone, Copy)]
struct Bin<T> {
    x0: T,
    x1: T,
    y0: T,
    y1: T,
    d0: T,
    d1: T,
}

impl SplineShape {
    /// Raw parameters per element.
    pub fn params(&self) -> usize {
        3 * self.bins - 1
    }

    /// zuko's soft clip `v / (1 + |f v / ln slope|)` and its derivative.
    fn soft_clip<T: Float>(&self, v: T, f: f64) -> (T, T) {
        let a = c::<T>((f / self.min_derivative.ln()).abs());
        let den = T::one() + a * v.abs();
        (v / den, T::one() / (den * den))
    }

    /// For each lane `e` of `theta` (the raw parameters of up to [`LANES`] elements, `P`
    /// each, from `offset` on): the softmax of its (clipped) raw sizes into `p`, then the
    /// positions from `−B` to `B` into `at`, both knot by knot. Unused lanes hold the
    /// positions of equal sizes.
    fn positions<T: Real>(&self, theta: &[T], offset: usize, min: f64, p: &mut [T], at: &mut [T]) {
        let k = self.bins;
        let params = self.params();
        for (e, raw) in theta.chunks_exact(params).enumerate() {
            for (i, &r) in raw[offset..offset + k].iter().enumerate() {
                p[i * LANES + e] = match self.style {
                    SplineStyle::Durkan => r,
                    SplineStyle::Zuko => self.soft_clip(r, 2.0).0,
                };
            }
        }
        for e in theta.len() / params..LANES {
            (0..k).for_each(|i| p[i * LANES + e] = T::zero());
        }
        let mut m = [T::neg_infinity(); LANES];
        for bin in p.chunks_exact(LANES) {
            m.iter_mut().zip(bin).for_each(|(m, &v)| *m = m.max(v));
        }
        for bin in p.chunks_exact_mut(LANES) {
            bin.iter_mut().zip(&m).for_each(|(v, &m)| *v = *v - m);
        }
        T::exp_nonpositive(p);
        // The running sums of the unnormalised sizes, into knots 1 to K: the last is the
        // softmax's denominator, so that one chain of additions gives both, and the
        // positions are then scaled all at once.
        let mut acc = [T::zero(); LANES];
        for (a, bin) in at[LANES..]
            .chunks_exact_mut(LANES)
            .zip(p.chunks_exact(LANES))
        {
            for ((a, acc), &e) in a.iter_mut().zip(&mut acc).zip(bin) {
                *acc = *acc + e;
                *a = *acc;
            }
        }
        let inv = acc.map(|a| T::one() / a);
        for bin in p.chunks_exact_mut(LANES) {
            bin.iter_mut().zip(&inv).for_each(|(v, &i)| *v = *v * i);
        }
        let (scale, floor) = match self.style {
            SplineStyle::Durkan => (c::<T>(1.0 - min * k as f64), c::<T>(min)),
            SplineStyle::Zuko => (T::one(), T::zero()),
        };
        let b = c::<T>(self.bound);
        let two_b = c::<T>(2.0 * self.bound);
        // Position j is −B + 2B (scale Σ_{i<j} p_i + j · floor).
        let r = inv.map(|i| scale * i);
        let mut floors = T::zero();
        at[..LANES].fill(-b);
        for a in at[LANES..k * LANES].chunks_exact_mut(LANES) {
            floors = floors + floor;
            for (a, &r) in a.iter_mut().zip(&r) {
                *a = (*a * r + floors) * two_b - b;
            }
        }
        at[k * LANES..].fill(b);
    }

    /// The knots of the elements whose raw parameters are `theta` (up to [`LANES`]).
    fn knots<T: Real>(&self, theta: &[T], kn: &mut Knots<T>) {
        let k = self.bins;
        self.positions(theta, 0, self.min_bin_width, &mut kn.pw, &mut kn.x);
        self.positions(theta, k, self.min_bin_height, &mut kn.ph, &mut kn.y);
    }

    /// The derivative at knot `j` from the raw parameters `theta`: 1 at the two ends.
    fn derivative<T: Float>(&self, theta: &[T], j: usize) -> T {
        if j == 0 || j == self.bins {
            return T::one();
        }
        let r = theta[2 * self.bins + j - 1];
        match self.style {
            SplineStyle::Durkan => softplus(r) + c::<T>(self.min_derivative),
            SplineStyle::Zuko => self.soft_clip(r, 1.0).0.exp(),
        }
    }

    /// Bin `k` of the element in lane `e` of `kn`, whose raw parameters are `theta`.
    fn bin<T: Float>(&self, theta: &[T], kn: &Knots<T>, e: usize, k: usize) -> Bin<T> {
        Bin {
            x0: kn.x[k * LANES + e],
            x1: kn.x[(k + 1) * LANES + e],
            y0: kn.y[k * LANES + e],
            y1: kn.y[(k + 1) * LANES + e],
            d0: self.derivative(theta, k),
            d1: self.derivative(theta, k + 1),
        }
    }

    /// The bin of `v` among the positions `at` of lane `e`: the number of inner knots at
    /// or below it (the positions rise, so the first above ends the count).
    fn bin_index<T: Float>(&self, v: T, at: &[T], e: usize) -> usize {
        (1..self.bins)
            .take_while(|&j| at[j * LANES + e] <= v)
            .count()
    }

    /// Gradients of the knot values of bin `k` (`g` in [`Bin`] order) of the element in
    /// lane `e` of `kn` to its raw parameters `theta`, added into `gt`.
    fn knot_gradients<T: Float>(
        &self,
        theta: &[T],
        kn: &mut Knots<T>,
        e: usize,
        k: usize,
        g: Bin<T>,
        gt: &mut [T],
    ) {
        let bins = self.bins;
        let Knots { pw, ph, gs, .. } = kn;
        for ((gk, gk1), p, min, raw, out) in [
            ((g.x0, g.x1), &*pw, self.min_bin_width, &theta[..bins], 0),
            (
                (g.y0, g.y1),
                &*ph,
                self.min_bin_height,
                &theta[bins..2 * bins],
                bins,
            ),
        ] {
            // Position j (1 ≤ j ≤ K − 1) is −B + 2B Σ_{i<j} size_i: size i feeds the
            // inner positions after it.
            let two_b = c::<T>(2.0 * self.bound);
            let inner = |j: usize| j >= 1 && j < bins;
            for (i, gs) in gs.iter_mut().enumerate() {
                let mut acc = T::zero();
                if inner(k) && k > i {
                    acc = acc + gk;
                }
                if inner(k + 1) && k + 1 > i {
                    acc = acc + gk1;
                }
                *gs = acc * two_b;
            }
            let scale = match self.style {
                SplineStyle::Durkan => c::<T>(1.0 - min * bins as f64),
                SplineStyle::Zuko => T::one(),
            };
            // Softmax backward: ∂u_i = p_i (∂p_i − Σ_j p_j ∂p_j).
            let p = |i: usize| p[i * LANES + e];
            let dot = gs
                .iter()
                .enumerate()
                .fold(T::zero(), |a, (i, &g)| a + g * scale * p(i));
            for i in 0..bins {
                let gu = p(i) * (gs[i] * scale - dot);
                gt[out + i] = gt[out + i]
                    + match self.style {
                        SplineStyle::Durkan => gu,
                        SplineStyle::Zuko => gu * self.soft_clip(raw[i], 2.0).1,
                    };
            }
        }
        for (j, gd) in [(k, g.d0), (k + 1, g.d1)] {
            if j == 0 || j == bins {
                continue; // the end derivatives are fixed at 1
            }
            let r = theta[2 * bins + j - 1];
            let dr = match self.style {
                SplineStyle::Durkan => sigmoid(r),
                SplineStyle::Zuko => {
                    let (u, du) = self.soft_clip(r, 1.0);
                    u.exp() * du
                }
            };
            gt[2 * bins + j - 1] = gt[2 * bins + j - 1] + gd * dr;
        }
    }
}

/// `log(1 + eˣ)`, stable for large `|x|`.
fn softplus<T: Float>(x: T) -> T {
    x.max(T::zero()) + (-x.abs()).exp().ln_1p()
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl<T: Float> Bin<T> {
    fn zero() -> Self {
        let z = T::zero();
        Self {
            x0: z,
            x1: z,
            y0: z,
            y1: z,
            d0: z,
            d1: z,
        }
    }

    /// The forward map at `v` (in this bin): `(y, log dy/dx)`.
    fn forward(&self, v: T) -> (T, T) {
        let (w, h) = (self.x1 - self.x0, self.y1 - self.y0);
        let s = h / w;
        let z = (v - self.x0) / w;
        let q = z * (T::one() - z);
        let num = s * z * z + self.d0 * q;
        let den = s + (self.d0 + self.d1 - c::<T>(2.0) * s) * q;
        (self.y0 + h * num / den, self.log_slope(z, s))
    }

    fn log_slope(&self, z: T, s: T) -> T {
        let one_z = T::one() - z;
        let q = z * one_z;
        let n2 = self.d1 * z * z + c::<T>(2.0) * s * q + self.d0 * one_z * one_z;
        let den = s + (self.d0 + self.d1 - c::<T>(2.0) * s) * q;
        (s * s).ln() + n2.ln() - c::<T>(2.0) * den.ln()
    }

    /// The inverse at `v` (in this bin's `y` range): `(x, log dx/dy)`.
    fn inverse(&self, v: T) -> (T, T) {
        let (w, h) = (self.x1 - self.x0, self.y1 - self.y0);
        let s = h / w;
        let dy = v - self.y0;
        let curve = self.d0 + self.d1 - c::<T>(2.0) * s;
        let a = h * (s - self.d0) + dy * curve;
        let b = h * self.d0 - dy * curve;
        let cc = -s * dy;
        let disc = (b * b - c::<T>(4.0) * a * cc).max(T::zero());
        let z = c::<T>(2.0) * cc / (-b - disc.sqrt());
        (self.x0 + z * w, -self.log_slope(z, s))
    }

    /// The gradient of `a · y + b · log dy/dx` of the forward map at `v`, to `v` and
    /// to this bin's six numbers.
    fn gradient(&self, v: T, a: T, b: T) -> (T, Self) {
        let two = c::<T>(2.0);
        let one = T::one();
        let (w, h) = (self.x1 - self.x0, self.y1 - self.y0);
        let s = h / w;
        let z = (v - self.x0) / w;
        let q = z * (one - z);
        let num = s * z * z + self.d0 * q;
        let den = s + (self.d0 + self.d1 - two * s) * q;
        let n2 = self.d1 * z * z + two * s * q + self.d0 * (one - z) * (one - z);
        let mut g = Self::zero();
        // y = y0 + h·num/den
        g.y0 = a;
        let mut g_h = a * num / den;
        let g_num = a * h / den;
        let mut g_den = -a * h * num / (den * den);
        // log-slope = 2 ln s + ln n2 − 2 ln den
        let mut g_s = b * two / s;
        let g_n2 = b / n2;
        g_den = g_den - two * b / den;
        // num = s z² + d0 q
        g_s = g_s + g_num * z * z;
        let mut g_z = g_num * two * s * z;
        g.d0 = g_num * q;
        let mut g_q = g_num * self.d0;
        // den = s + (d0 + d1 − 2s) q
        g_s = g_s + g_den * (one - two * q);
        g.d0 = g.d0 + g_den * q;
        g.d1 = g_den * q;
        g_q = g_q + g_den * (self.d0 + self.d1 - two * s);
        // n2 = d1 z² + 2 s q + d0 (1 − z)²
        g.d1 = g.d1 + g_n2 * z * z;
        g_z = g_z + g_n2 * (two * self.d1 * z - two * self.d0 * (one - z));
        g_s = g_s + g_n2 * two * q;
        g_q = g_q + g_n2 * two * s;
        g.d0 = g.d0 + g_n2 * (one - z) * (one - z);
        // q = z (1 − z)
        g_z = g_z + g_q * (one - two * z);
        // z = (v − x0) / w, s = h / w
        let g_v = g_z / w;
        let mut g_w = -g_z * z / w;
        g.x0 = -g_z / w;
        g_h = g_h + g_s / w;
        g_w = g_w - g_s * s / w;
        g.x1 = g_w;
        g.x0 = g.x0 - g_w;
        g.y1 = g_h;
        g.y0 = g.y0 - g_h;
        (g_v, g)
    }
}

impl<T: Float> Knots<T> {
    fn new(bins: usize) -> Self {
        let z = |n| vec![T::zero(); n];
        Self {
            x: z((bins + 1) * LANES),
            y: z((bins + 1) * LANES),
            pw: z(bins * LANES),
            ph: z(bins * LANES),
            gs: z(bins),
        }
    }
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// `(batch, n, P)` of `θ` checked against `x` `(batch, n)`.
fn dims(shape: &SplineShape, x: &Layout, theta: &Layout) -> Result<(usize, usize)> {
    let (batch, n) = x.shape().dims2()?;
    if theta.shape().dims() != [batch, n, shape.params()] || shape.bins == 0 {
        candle::bail!(
            "fused spline: parameters {:?} do not match inputs {:?} and {} bins",
            theta.shape(),
            x.shape(),
            shape.bins
        );
    }
    Ok((batch, n))
}

/// The forward op: `(batch, n + 1)`, the outputs then the row's summed log-slope.
#[derive(Debug, Clone, Copy)]
struct SplineOp {
    shape: SplineShape,
    inverse: bool,
}

impl SplineOp {
    fn run<T: Real>(&self, x: &[T], theta: &[T], n: usize) -> Vec<T> {
        let p = self.shape.params();
        let mut out = vec![T::zero(); x.len() / n.max(1) * (n + 1)];
        out.par_chunks_mut(ROWS * (n + 1))
            .zip(x.par_chunks(ROWS * n))
            .zip(theta.par_chunks(ROWS * n * p))
            .for_each(|((out, x), theta)| self.rows(out, x, theta, n));
        out
    }

    /// The outputs `(rows, n + 1)` of rows `x` `(rows, n)` with raw parameters `theta`.
    fn rows<T: Real>(&self, out: &mut [T], x: &[T], theta: &[T], n: usize) {
        let sh = self.shape;
        let p = sh.params();
        let b = c::<T>(sh.bound);
        let mut kn = Knots::new(sh.bins);
        // `out` comes zeroed from `run`: each row's log-det is summed into its last
        // column over its features in order, lane by lane.
        for (block, (xs, thetas)) in x.chunks(LANES).zip(theta.chunks(LANES * p)).enumerate() {
            sh.knots(thetas, &mut kn);
            for (e, (&v, th)) in xs.iter().zip(thetas.chunks(p)).enumerate() {
                let (row, col) = ((block * LANES + e) / n, (block * LANES + e) % n);
                let out = &mut out[row * (n + 1)..(row + 1) * (n + 1)];
                if !(v >= -b && v <= b) {
                    out[col] = v;
                    continue;
                }
                let (y, l) = if self.inverse {
                    sh.bin(th, &kn, e, sh.bin_index(v, &kn.y, e)).inverse(v)
                } else {
                    sh.bin(th, &kn, e, sh.bin_index(v, &kn.x, e)).forward(v)
                };
                out[col] = y;
                out[n] = out[n] + l;
            }
        }
    }
}

impl CustomOp2 for SplineOp {
    fn name(&self) -> &'static str {
        "rational-quadratic-spline"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, n) = dims(&self.shape, l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(t)) => {
                CpuStorage::F32(self.run(slice(x, l1)?, slice(t, l2)?, n))
            }
            (CpuStorage::F64(x), CpuStorage::F64(t)) => {
                CpuStorage::F64(self.run(slice(x, l1)?, slice(t, l2)?, n))
            }
            _ => candle::bail!("the fused spline supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((batch, n + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (batch, n) = dims(&self.shape, l1, l2)?;
        let out = cuda::forward(&self.shape, self.inverse, s1, l1, s2, l2, batch, n)?;
        Ok((out, Shape::from((batch, n + 1))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (batch, n) = x.dims2()?;
        let p = self.shape.params();
        let grads = x.apply_op3(
            &theta.contiguous()?,
            &grad.contiguous()?,
            SplineGrad {
                shape: self.shape,
                inverse: self.inverse,
            },
        )?;
        let gx = grads.narrow(1, 0, n)?;
        let gt = grads.narrow(1, n, n * p)?.reshape((batch, n, p))?;
        Ok((Some(gx), Some(gt)))
    }
}

/// The backward op: from `x`, `θ` and the output gradient `(batch, n + 1)`, the
/// gradients `(batch, n + n·P)`: to `x`, then to `θ`.
#[derive(Debug, Clone, Copy)]
struct SplineGrad {
    shape: SplineShape,
    inverse: bool,
}

impl SplineGrad {
    fn run<T: Real>(&self, x: &[T], theta: &[T], g: &[T], n: usize) -> Vec<T> {
        let p = self.shape.params();
        let width = n + n * p;
        let mut out = vec![T::zero(); x.len() / n.max(1) * width];
        out.par_chunks_mut(ROWS * width)
            .zip(x.par_chunks(ROWS * n))
            .zip(theta.par_chunks(ROWS * n * p))
            .zip(g.par_chunks(ROWS * (n + 1)))
            .for_each(|(((out, x), theta), g)| self.rows(out, x, theta, g, n));
        out
    }

    /// The gradients `(rows, n + n·p)` to rows `x` and their raw parameters `theta`
    /// from the outputs' gradient `g` `(rows, n + 1)`.
    fn rows<T: Real>(&self, out: &mut [T], x: &[T], theta: &[T], g: &[T], n: usize) {
        let sh = self.shape;
        let p = sh.params();
        let b = c::<T>(sh.bound);
        let width = n + n * p;
        let mut kn = Knots::new(sh.bins);
        for (block, (xs, thetas)) in x.chunks(LANES).zip(theta.chunks(LANES * p)).enumerate() {
            sh.knots(thetas, &mut kn);
            for (e, (&v, th)) in xs.iter().zip(thetas.chunks(p)).enumerate() {
                let (row, j) = ((block * LANES + e) / n, (block * LANES + e) % n);
                let (g, gl) = (g[row * (n + 1) + j], g[row * (n + 1) + n]);
                let (gx, gt) = out[row * width..(row + 1) * width].split_at_mut(n);
                if !(v >= -b && v <= b) {
                    gx[j] = g;
                    continue;
                }
                let gt = &mut gt[j * p..(j + 1) * p];
                if self.inverse {
                    let k = sh.bin_index(v, &kn.y, e);
                    let bin = sh.bin(th, &kn, e, k);
                    let (u, l) = bin.inverse(v);
                    // u = F⁻¹(v): ∂u/∂v = 1/F′(u), ∂u/∂θ = −F_θ/F′(u), and the
                    // log-det is −L(u) with L the forward log-slope.
                    let f_u = (-l).exp();
                    let (l_u, _) = bin.gradient(u, T::zero(), T::one());
                    let cc = (g - gl * l_u) / f_u;
                    gx[j] = cc;
                    let (_, gb) = bin.gradient(u, -cc, -gl);
                    sh.knot_gradients(th, &mut kn, e, k, gb, gt);
                } else {
                    let k = sh.bin_index(v, &kn.x, e);
                    let (gv, gb) = sh.bin(th, &kn, e, k).gradient(v, g, gl);
                    gx[j] = gv;
                    sh.knot_gradients(th, &mut kn, e, k, gb, gt);
                }
            }
        }
    }
}

impl CustomOp3 for SplineGrad {
    fn name(&self) -> &'static str {
        "rational-quadratic-spline-grad"
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
        let (batch, n) = dims(&self.shape, l1, l2)?;
        let p = self.shape.params();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(t), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.run(slice(x, l1)?, slice(t, l2)?, slice(g, l3)?, n))
            }
            (CpuStorage::F64(x), CpuStorage::F64(t), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.run(slice(x, l1)?, slice(t, l2)?, slice(g, l3)?, n))
            }
            _ => candle::bail!("the fused spline supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((batch, n + n * p))))
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
        let (batch, n) = dims(&self.shape, l1, l2)?;
        let p = self.shape.params();
        let out = cuda::backward(&self.shape, self.inverse, s1, l1, s2, l2, s3, l3, batch, n)?;
        Ok((out, Shape::from((batch, n + n * p))))
    }
}

/// The fused spline: `(y, log|det|)` with `y` `(batch, n)` and the log-det summed over
/// each row, from inputs `x` `(batch, n)` and raw parameters `θ` `(batch, n, 3K − 1)`;
/// the inverse map where `inverse`. The caller decides that the kernel applies, through
/// [`fused`](crate::fused) with [`Op::Spline`](crate::Op::Spline).
pub fn spline(
    x: &Tensor,
    theta: &Tensor,
    shape: SplineShape,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let n = x.dim(1)?;
    let out = x
        .contiguous()?
        .apply_op2(&theta.contiguous()?, SplineOp { shape, inverse })?;
    // Copied out of the combined output: later layers (permutations) index rows.
    let y = out.narrow(1, 0, n)?.contiguous()?;
    let log_det = out.narrow(1, n, 1)?.squeeze(1)?;
    Ok((y, log_det))
}
