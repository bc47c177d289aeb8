//! Adam's and Adamax's updates in place: moments and parameters are rewritten where
//! they lie, so a step allocates nothing (the tensor-op form allocates about ten
//! tensors per variable). On the CPU each of [`Moment`] and [`Update`] is one pass over
//! a variable's contiguous `f32`/`f64` slices; on CUDA, [`step_all`] runs the whole
//! step, every variable, in one launch (`adam.cu`).

use candle::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;
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

/// A whole optimiser step: the first moment's `β₁`, the second statistic's `β₂` (a
/// mean square, or Adamax's infinity norm when `update.infinity_norm`, whose `ε` is
/// `update.eps`), L2 weight decay `λ` and the update.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub beta1: f64,
    pub beta2: f64,
    pub l2: f64,
    pub update: Update,
}

impl Step {
    /// The first moment's part of the step.
    pub fn first(&self) -> Moment {
        Moment {
            beta: self.beta1,
            l2: self.l2,
            statistic: Statistic::Mean,
        }
    }

    /// The second statistic's part of the step.
    pub fn second(&self) -> Moment {
        Moment {
            beta: self.beta2,
            l2: self.l2,
            statistic: if self.update.infinity_norm {
                Statistic::MaxAbs {
                    eps: self.update.eps,
                }
            } else {
                Statistic::MeanSquare
            },
        }
    }
}

/// Whether [`step_all`] runs on `x`'s device: CUDA, with the `cuda` feature.
pub fn steps_all_at_once(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda()
}

/// One step for every variable at once, each group `[θ, m, v, g]` (one device, one
/// dtype, contiguous, equal lengths) updated as [`Step::first`], [`Step::second`] and
/// then the update would in turn: one launch on CUDA (see [`steps_all_at_once`]).
pub fn step_all(step: &Step, groups: &[[&Tensor; 4]]) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        cuda::step_all(step, groups)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (step, groups);
        bail!("the one-launch optimiser step needs the cuda feature")
    }
}

/// Whether any written address range `(start, length)` shares an address with another
/// range, written or read (`true` marks a written one). The one-launch step writes each
/// group's θ, m and v from threads of its own and reads g, so no written element may
/// be any other range's; read ranges may share with each other.
#[cfg(any(feature = "cuda", test))]
fn conflicts(mut ranges: Vec<(u64, u64, bool)>) -> bool {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable_by_key(|r| r.0);
    let (mut end_written, mut end_any) = (0u64, 0u64);
    for (start, len, written) in ranges {
        if start < end_written || (written && start < end_any) {
            return true;
        }
        let end = start.saturating_add(len);
        end_any = end_any.max(end);
        if written {
            end_written = end_written.max(end);
        }
    }
    false
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

#[cfg(test)]
mod tests {
    use super::conflicts;

    #[test]
    fn a_written_range_may_share_no_address_with_another() {
        let (w, r) = (true, false);
        assert!(!conflicts(vec![(0, 8, w), (8, 8, w), (32, 4, r)]));
        assert!(!conflicts(vec![
            (32, 4, w),
            (0, 8, w),
            (16, 0, w),
            (16, 4, w),
            (4, 0, w)
        ]));
        assert!(conflicts(vec![(32, 4, w), (0, 8, w), (8, 8, w), (0, 8, w)]));
        assert!(conflicts(vec![(40, 8, w), (0, 8, w), (36, 8, w)]));
        // Reads may overlap each other, but not a write, whichever comes first.
        assert!(!conflicts(vec![(0, 8, r), (4, 8, r), (16, 4, w)]));
        assert!(conflicts(vec![(0, 16, r), (40, 4, w), (8, 4, w)]));
        assert!(conflicts(vec![(0, 16, w), (40, 4, r), (8, 4, r)]));
    }
}
