//! Adam's and Adamax's updates as in-place CPU kernels: moments and parameters are
//! rewritten where they lie, so a step allocates nothing (the tensor-op form allocates
//! about ten tensors per variable). Each kernel is one pass over contiguous
//! `f32`/`f64` slices.

use candle::{bail, CpuStorage, InplaceOp3, Layout, Result};
use num_traits::Float;

/// Which running statistic of `u = g + λ·θ` (L2 weight decay; `λ` is zero otherwise) a
/// [`Moment`] keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Statistic {
    /// `m ← β·m + (1 − β)·u`: Adam's and Adamax's first moment.
    Mean,
    /// `v ← β·v + (1 − β)·u²`: Adam's second moment.
    MeanSquare,
    /// `u ← max(β·u, |u| + ε)`: Adamax's infinity norm (PyTorch's form, with `ε` inside).
    MaxAbs { eps: f64 },
}

/// A moment estimate of the gradient, applied to `m` with `(g, θ)`.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub beta: f64,
    pub l2: f64,
    pub statistic: Statistic,
}

/// The parameter update, applied to `θ` with `(m, v)`: Adam's
/// `θ ← (1 − δ)·θ − α·m / (√(v·κ) + ε)`, or with `infinity_norm` Adamax's
/// `θ ← θ − α·m / v`; `α = lr / (1 − β₁ᵗ)`, `κ = 1 / (1 − β₂ᵗ)` and `δ = lr·λ` for
/// decoupled weight decay (else zero).
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub alpha: f64,
    pub kappa: f64,
    pub eps: f64,
    pub decay: f64,
    pub infinity_norm: bool,
}

/// The contiguous part of `s` that `l` describes.
fn part<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("in-place Adam needs contiguous tensors"),
    }
}

fn part_mut<'a, T>(s: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut s[a..b]),
        None => bail!("in-place Adam needs contiguous tensors"),
    }
}

fn same_len(n: usize, m: usize, k: usize) -> Result<()> {
    if n != m || n != k {
        bail!("in-place Adam got tensors of {n}, {m} and {k} elements");
    }
    Ok(())
}

/// `f64` hyper-parameters in the tensors' precision.
fn cast<T: Float>(v: f64) -> Result<T> {
    match T::from(v) {
        Some(v) => Ok(v),
        None => bail!("{v} does not fit the tensors' dtype"),
    }
}

impl Moment {
    fn run<T: Float>(&self, m: &mut [T], g: &[T], theta: &[T]) -> Result<()> {
        same_len(m.len(), g.len(), theta.len())?;
        let (beta, rest, l2) = (
            cast::<T>(self.beta)?,
            cast::<T>(1.0 - self.beta)?,
            cast::<T>(self.l2)?,
        );
        let terms = m.iter_mut().zip(g).zip(theta);
        match self.statistic {
            Statistic::Mean => {
                terms.for_each(|((m, &g), &th)| *m = beta * *m + rest * (g + l2 * th))
            }
            Statistic::MeanSquare => terms.for_each(|((m, &g), &th)| {
                let u = g + l2 * th;
                *m = beta * *m + rest * u * u
            }),
            Statistic::MaxAbs { eps } => {
                let eps = cast::<T>(eps)?;
                terms.for_each(|((m, &g), &th)| *m = (beta * *m).max((g + l2 * th).abs() + eps))
            }
        }
        Ok(())
    }
}

impl Update {
    fn run<T: Float>(&self, theta: &mut [T], m: &[T], v: &[T]) -> Result<()> {
        same_len(theta.len(), m.len(), v.len())?;
        let alpha = cast::<T>(self.alpha)?;
        let (kappa, eps, keep) = (
            cast::<T>(self.kappa)?,
            cast::<T>(self.eps)?,
            cast::<T>(1.0 - self.decay)?,
        );
        let terms = theta.iter_mut().zip(m).zip(v);
        if self.infinity_norm {
            terms.for_each(|((th, &m), &v)| *th = keep * *th - alpha * m / v);
        } else {
            terms.for_each(|((th, &m), &v)| {
                *th = keep * *th - alpha * m / ((v * kappa).sqrt() + eps)
            });
        }
        Ok(())
    }
}

/// Runs `f` on the destination and the two sources as slices of one float type.
fn dispatch(
    dst: (&mut CpuStorage, &Layout),
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    f32_fn: impl FnOnce(&mut [f32], &[f32], &[f32]) -> Result<()>,
    f64_fn: impl FnOnce(&mut [f64], &[f64], &[f64]) -> Result<()>,
) -> Result<()> {
    match (dst.0, a.0, b.0) {
        (CpuStorage::F32(d), CpuStorage::F32(x), CpuStorage::F32(y)) => {
            f32_fn(part_mut(d, dst.1)?, part(x, a.1)?, part(y, b.1)?)
        }
        (CpuStorage::F64(d), CpuStorage::F64(x), CpuStorage::F64(y)) => {
            f64_fn(part_mut(d, dst.1)?, part(x, a.1)?, part(y, b.1)?)
        }
        _ => bail!("in-place Adam needs three f32 or three f64 tensors"),
    }
}

impl InplaceOp3 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        lm: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        theta: &CpuStorage,
        lt: &Layout,
    ) -> Result<()> {
        dispatch(
            (m, lm),
            (g, lg),
            (theta, lt),
            |m, g, t| self.run(m, g, t),
            |m, g, t| self.run(m, g, t),
        )
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        lt: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<()> {
        dispatch(
            (theta, lt),
            (m, lm),
            (v, lv),
            |t, m, v| self.run(t, m, v),
            |t, m, v| self.run(t, m, v),
        )
    }
}
