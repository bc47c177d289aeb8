//! The weight of an LU-parametrised invertible 1×1 convolution (Glow §3.2) as one op
//! with its own backward:
//!
//! `W = P · L · (U + diag(sign · exp(log_s)))`, all `(C, C)`,
//!
//! with `L` unit lower triangular (the strict lower triangle of `l`), `U` the strict
//! upper triangle of `u`, the trainable `l`, `u` and `log_s` `(C,)` the op's inputs,
//! and the permutation `P` and the signs `sign` `(C,)` constant buffers that the op
//! holds (no gradient reaches them). As candle's ops this is masks, an exponential,
//! sums and two products, about a dozen launches forward and more back on CUDA for
//! every flow step of a Glow; here it is one launch each way (`lu_weight.cu`). The CPU
//! runs the same op as plain loops.

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::{on_host, slice, Elem};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;

/// `L[k][m]`.
fn lower<T: Elem>(l: &[T], c: usize, k: usize, m: usize) -> T {
    match m.cmp(&k) {
        std::cmp::Ordering::Less => l[k * c + m],
        std::cmp::Ordering::Equal => T::one(),
        std::cmp::Ordering::Greater => T::zero(),
    }
}

/// The factors' values on the host: `l`, `u`, the diagonal `sign · exp(log_s)`.
struct Factors<'a, T> {
    c: usize,
    l: &'a [T],
    u: &'a [T],
    diag: Vec<T>,
}

impl<T: Elem> Factors<'_, T> {
    /// `U'[m][j]`.
    fn upper(&self, m: usize, j: usize) -> T {
        match m.cmp(&j) {
            std::cmp::Ordering::Less => self.u[m * self.c + j],
            std::cmp::Ordering::Equal => self.diag[j],
            std::cmp::Ordering::Greater => T::zero(),
        }
    }

    /// `M = L · U'`, row-major.
    fn product(&self) -> Vec<T> {
        let c = self.c;
        let mut m = vec![T::zero(); c * c];
        for k in 0..c {
            for j in 0..c {
                let mut sum = T::zero();
                for i in 0..=k.min(j) {
                    sum += lower(self.l, c, k, i) * self.upper(i, j);
                }
                m[k * c + j] = sum;
            }
        }
        m
    }
}

/// `A · B` for row-major `c×c` matrices, `A` transposed when `a_t`.
fn matmul<T: Elem>(a: &[T], b: &[T], c: usize, a_t: bool) -> Vec<T> {
    let mut out = vec![T::zero(); c * c];
    for i in 0..c {
        for k in 0..c {
            let aik = if a_t { a[k * c + i] } else { a[i * c + k] };
            if aik == T::zero() {
                continue;
            }
            for j in 0..c {
                out[i * c + j] += aik * b[k * c + j];
            }
        }
    }
    out
}

/// `W`.
fn forward<T: Elem>(p: &[T], f: &Factors<T>) -> Vec<T> {
    matmul(p, &f.product(), f.c, false)
}

/// `[∂l | ∂u | ∂log_s]` from `∂W`.
fn backward<T: Elem>(p: &[T], f: &Factors<T>, g: &[T]) -> Vec<T> {
    let c = f.c;
    let gm = matmul(p, g, c, true);
    let mut out = vec![T::zero(); 2 * c * c + c];
    let (gl, rest) = out.split_at_mut(c * c);
    let (gu, gs) = rest.split_at_mut(c * c);
    for k in 0..c {
        for m in 0..k {
            let mut sum = T::zero();
            for j in m..c {
                sum += gm[k * c + j] * f.upper(m, j);
            }
            gl[k * c + m] = sum;
        }
    }
    for m in 0..c {
        for j in m..c {
            let mut sum = T::zero();
            for k in m..c {
                sum += lower(f.l, c, k, m) * gm[k * c + j];
            }
            if m < j {
                gu[m * c + j] = sum;
            } else {
                gs[j] = sum * f.diag[j];
            }
        }
    }
    out
}

/// The number of channels, with every tensor's shape checked against it.
fn channels(l: &Layout, u: &Layout, log_s: &Layout, p: &Tensor, sign: &Tensor) -> Result<usize> {
    let c = log_s.shape().dims1()?;
    let square = [c, c];
    let ok = l.shape().dims() == square
        && u.shape().dims() == square
        && p.dims() == square
        && sign.dims() == [c];
    if !ok {
        candle::bail!(
            "fused LU weight: l {:?}, u {:?}, log_s {:?}, p {:?}, sign {:?} are not C×C and (C,)",
            l.shape(),
            u.shape(),
            log_s.shape(),
            p.shape(),
            sign.shape()
        );
    }
    Ok(c)
}

/// Runs `f` on the host values of `p`, `l`, `u` and the factors built from them.
fn with_factors<T: Elem, R>(
    p: &Tensor,
    sign: &Tensor,
    c: usize,
    (l, u, log_s): (&[T], &[T], &[T]),
    f: impl FnOnce(&[T], &Factors<T>) -> Result<R>,
) -> Result<R> {
    on_host::<T, _>(sign, |sign| {
        on_host::<T, _>(p, |p| {
            let diag = sign
                .iter()
                .zip(log_s)
                .map(|(&s, &ls)| s * ls.exp())
                .collect();
            f(p, &Factors { c, l, u, diag })
        })
    })
}

/// `(l, u, log_s) ↦ W`, holding `P` and the signs.
#[derive(Debug, Clone)]
struct LuWeight {
    p: Tensor,
    sign: Tensor,
}

impl LuWeight {
    fn cpu<T: Elem>(
        &self,
        c: usize,
        (l, ll): (&CpuStorage, &Layout),
        (u, lu): (&CpuStorage, &Layout),
        (s, ls): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let values = (
            slice(l.as_slice::<T>()?, ll)?,
            slice(u.as_slice::<T>()?, lu)?,
            slice(s.as_slice::<T>()?, ls)?,
        );
        let w = with_factors(&self.p, &self.sign, c, values, |p, f| Ok(forward(p, f)))?;
        Ok(T::to_cpu_storage_owned(w))
    }
}

impl CustomOp3 for LuWeight {
    fn name(&self) -> &'static str {
        "fused-lu-weight"
    }

    fn cpu_fwd(
        &self,
        l: &CpuStorage,
        ll: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = channels(ll, lu, ls, &self.p, &self.sign)?;
        let args = ((l, ll), (u, lu), (s, ls));
        let w = match (
            l.dtype(),
            u.dtype(),
            s.dtype(),
            self.p.dtype(),
            self.sign.dtype(),
        ) {
            (DType::F32, DType::F32, DType::F32, DType::F32, DType::F32) => {
                self.cpu::<f32>(c, args.0, args.1, args.2)?
            }
            (DType::F64, DType::F64, DType::F64, DType::F64, DType::F64) => {
                self.cpu::<f64>(c, args.0, args.1, args.2)?
            }
            _ => candle::bail!("the fused LU weight supports f32 and f64 inputs of one dtype"),
        };
        Ok((w, Shape::from((c, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        l: &candle::CudaStorage,
        ll: &Layout,
        u: &candle::CudaStorage,
        lu: &Layout,
        s: &candle::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let c = channels(ll, lu, ls, &self.p, &self.sign)?;
        let w = cuda::forward(c, &self.p, &self.sign, (l, ll), (u, lu), (s, ls))?;
        Ok((w, Shape::from((c, c))))
    }

    fn bwd(
        &self,
        l: &Tensor,
        u: &Tensor,
        log_s: &Tensor,
        _w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = LuWeightGrad {
            p: self.p.clone(),
            sign: self.sign.clone(),
            l: l.contiguous()?,
            u: u.contiguous()?,
            log_s: log_s.contiguous()?,
        };
        let packed = g.contiguous()?.apply_op1_no_bwd(&grad)?;
        let (cc, c) = (l.elem_count(), log_s.elem_count());
        Ok((
            Some(packed.narrow(0, 0, cc)?.reshape(l.shape())?),
            Some(packed.narrow(0, cc, cc)?.reshape(u.shape())?),
            Some(packed.narrow(0, 2 * cc, c)?),
        ))
    }
}

/// `∂W ↦ [∂l | ∂u | ∂log_s]` flattened, holding everything else the gradients need.
#[derive(Debug, Clone)]
struct LuWeightGrad {
    p: Tensor,
    sign: Tensor,
    l: Tensor,
    u: Tensor,
    log_s: Tensor,
}

impl LuWeightGrad {
    fn check(&self, g: &Layout) -> Result<usize> {
        let c = channels(
            self.l.layout(),
            self.u.layout(),
            self.log_s.layout(),
            &self.p,
            &self.sign,
        )?;
        if g.shape().dims() != [c, c] {
            candle::bail!("fused LU weight: gradient {:?} for {c} channels", g.shape());
        }
        Ok(c)
    }

    fn cpu<T: Elem>(&self, c: usize, g: &[T]) -> Result<CpuStorage> {
        let out = on_host::<T, _>(&self.l, |l| {
            on_host::<T, _>(&self.u, |u| {
                on_host::<T, _>(&self.log_s, |s| {
                    with_factors(&self.p, &self.sign, c, (l, u, s), |p, f| {
                        Ok(backward(p, f, g))
                    })
                })
            })
        })?;
        Ok(T::to_cpu_storage_owned(out))
    }
}

impl CustomOp1 for LuWeightGrad {
    fn name(&self) -> &'static str {
        "fused-lu-weight-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.check(lg)?;
        let out = match (g.dtype(), self.l.dtype()) {
            (DType::F32, DType::F32) => self.cpu::<f32>(c, slice(g.as_slice::<f32>()?, lg)?)?,
            (DType::F64, DType::F64) => self.cpu::<f64>(c, slice(g.as_slice::<f64>()?, lg)?)?,
            _ => candle::bail!("the fused LU weight supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, Shape::from(2 * c * c + c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let c = self.check(lg)?;
        let out = cuda::backward(c, self, (g, lg))?;
        Ok((out, Shape::from(2 * c * c + c)))
    }
}

/// The fused kernel: `W = P · L · (U + diag(sign · exp(log_s)))` from the trainable
/// `l`, `u` `(C, C)` (their strict lower and upper triangles) and `log_s` `(C,)`, with
/// the buffers `p` `(C, C)` and `sign` `(C,)` held as constants. CPU, and CUDA with the
/// `cuda` feature; f32 and f64. The caller decides that the kernel applies, through
/// [`fused`](crate::fused) with [`Op::LuWeight`](crate::Op::LuWeight), and keeps its
/// own reference path of candle's ops.
pub fn lu_weight_fused(
    p: &Tensor,
    l: &Tensor,
    u: &Tensor,
    log_s: &Tensor,
    sign: &Tensor,
) -> Result<Tensor> {
    let op = LuWeight {
        p: p.detach().contiguous()?,
        sign: sign.detach().contiguous()?,
    };
    l.contiguous()?
        .apply_op3(&u.contiguous()?, &log_s.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor, Var};

    use super::lu_weight_fused;
    use crate::test_support::gap;

    /// A `c×c` 0/1 matrix with ones where `keep(row, column)`.
    fn mask(c: usize, keep: fn(usize, usize) -> bool, dtype: DType) -> candle::Result<Tensor> {
        let v: Vec<f64> = (0..c * c)
            .map(|k| if keep(k / c, k % c) { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(v, (c, c), &Device::Cpu)?.to_dtype(dtype)
    }

    /// The weight from its definition in candle's ops.
    fn reference(
        p: &Tensor,
        l: &Tensor,
        u: &Tensor,
        log_s: &Tensor,
        sign: &Tensor,
    ) -> candle::Result<Tensor> {
        let (c, dtype) = (log_s.dim(0)?, l.dtype());
        let lt = (l.mul(&mask(c, |i, j| i > j, dtype)?)? + mask(c, |i, j| i == j, dtype)?)?;
        let diag = mask(c, |i, j| i == j, dtype)?
            .broadcast_mul(&sign.mul(&log_s.exp()?)?.unsqueeze(0)?)?;
        let ut = (u.mul(&mask(c, |i, j| i < j, dtype)?)? + diag)?;
        p.matmul(&lt)?.matmul(&ut)
    }

    /// Values and the gradients of `l`, `u` and `log_s` against candle's ops, f32 and
    /// f64, for permutations and for a general `P`, with every entry of `l` and `u`
    /// random (the op must ignore the triangles it does not use).
    #[test]
    fn the_op_matches_its_definition() -> candle::Result<()> {
        let dev = Device::Cpu;
        for c in [1, 3, 6] {
            let perm: Vec<usize> = (0..c).map(|i| (i * 5 + 2) % c).collect();
            let mut pv = vec![0.0; c * c];
            for (i, &k) in perm.iter().enumerate() {
                pv[i * c + k] = 1.0;
            }
            let permutation = Tensor::from_vec(pv, (c, c), &dev)?;
            let general = Tensor::randn(0.0, 1.0, (c, c), &dev)?.to_dtype(DType::F64)?;
            let signs: Vec<f64> = (0..c)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let sign = Tensor::from_vec(signs, c, &dev)?;
            for p in [&permutation, &general] {
                for dtype in [DType::F32, DType::F64] {
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    let draw =
                        |shape: &[usize]| Tensor::randn(0.0, 0.7, shape, &dev)?.to_dtype(dtype);
                    let l = Var::from_tensor(&draw(&[c, c])?)?;
                    let u = Var::from_tensor(&draw(&[c, c])?)?;
                    let log_s = Var::from_tensor(&draw(&[c])?)?;
                    let (p, sign) = (p.to_dtype(dtype)?, sign.to_dtype(dtype)?);
                    let r = draw(&[c, c])?;
                    let fused = lu_weight_fused(&p, &l, &u, &log_s, &sign)?;
                    let want = reference(&p, &l, &u, &log_s, &sign)?;
                    assert!(gap(&fused, &want)? < tol, "W c={c} {dtype:?}");
                    let gf = (fused * &r)?.sum_all()?.backward()?;
                    let gr = (want * &r)?.sum_all()?.backward()?;
                    for (name, v) in [("∂l", &l), ("∂u", &u), ("∂log_s", &log_s)] {
                        let (a, o) = (gf.get(v).expect("grad"), gr.get(v).expect("grad"));
                        assert_eq!(a.dims(), o.dims(), "{name}");
                        assert!(gap(a, o)? < tol, "{name} c={c} {dtype:?}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> candle::Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::eye(3, DType::F32, &dev)?;
        let l = Tensor::zeros((3, 3), DType::F32, &dev)?;
        let s = Tensor::zeros(4, DType::F32, &dev)?;
        let err = lu_weight_fused(&p, &l, &l, &s, &s).unwrap_err().to_string();
        assert!(err.contains("fused LU weight"), "{err}");
        Ok(())
    }
}
