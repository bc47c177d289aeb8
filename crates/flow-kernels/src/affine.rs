//! The element-wise part of an affine coupling as two ops. From the input `x`
//! `(batch, dim)` and the conditioner's raw outputs `s`, `t` `(batch, n)` (`n`
//! transformed features), [`AffineUpdate`] gives `y` `(batch, dim)`: the kept features
//! of `x`, and the transformed ones
//!
//! - forward: `y_b = x_b ⊙ exp(ŝ) + t`,
//! - inverse: `y_b = (x_b − t) ⊙ exp(−ŝ)`,
//!
//! with `ŝ` the [`ScaleMap`] of `s`; [`LogDet`] gives `Σ ŝ` (or `−Σ ŝ`) `(batch)`. On
//! the graph they replace the split, scale map, exponential, product, sum and merge,
//! about nine ops each with its own backward.

use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;

use crate::{slice, ScaleMap};

#[derive(Debug, Clone)]
struct AffineUpdate {
    /// The transformed features, in the order of the columns of `s` and `t`.
    pub transformed: Vec<usize>,
    pub scale: ScaleMap,
    pub inverse: bool,
}

impl AffineUpdate {
    /// `(batch, dim)`, checked against the shapes of `s` and `t`.
    fn dims(&self, x: &Layout, s: &Layout, t: &Layout) -> Result<(usize, usize)> {
        let (batch, dim) = x.shape().dims2()?;
        let n = self.transformed.len();
        let ok = n > 0
            && dim > 0
            && s.shape().dims() == [batch, n]
            && t.shape().dims() == [batch, n]
            && self.transformed.iter().all(|&j| j < dim);
        if !ok {
            candle::bail!(
                "fused coupling: shapes {:?} {:?} {:?} do not match {n} transformed features",
                x.shape(),
                s.shape(),
                t.shape()
            );
        }
        Ok((batch, dim))
    }

    fn forward<T: Float>(&self, x: &[T], s: &[T], t: &[T], dim: usize) -> Vec<T> {
        let n = self.transformed.len();
        let mut out = x.to_vec();
        let rows = out.chunks_exact_mut(dim).zip(s.chunks_exact(n));
        for ((y, s), t) in rows.zip(t.chunks_exact(n)) {
            for (j, &d) in self.transformed.iter().enumerate() {
                let (ls, _) = self.scale.scalar(s[j]);
                y[d] = if self.inverse {
                    (y[d] - t[j]) * (-ls).exp()
                } else {
                    y[d] * ls.exp() + t[j]
                };
            }
        }
        out
    }

    /// `(∂x, ∂s, ∂t)` from the output gradient `g` and the output `y`, both
    /// `(batch, dim)`.
    #[allow(clippy::type_complexity)]
    fn backward<T: Float>(
        &self,
        x: &[T],
        s: &[T],
        y: &[T],
        g: &[T],
        dim: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let n = self.transformed.len();
        let mut gx = g.to_vec();
        let mut gs = Vec::with_capacity(s.len());
        let mut gt = Vec::with_capacity(s.len());
        let rows = gx.chunks_exact_mut(dim).zip(x.chunks_exact(dim));
        for ((gx, x), (s, y)) in rows.zip(s.chunks_exact(n).zip(y.chunks_exact(dim))) {
            for (j, &d) in self.transformed.iter().enumerate() {
                let (ls, dls) = self.scale.scalar(s[j]);
                let g = gx[d];
                let (g_x, g_ls, g_t) = if self.inverse {
                    // y = (x − t)·e^{−ŝ}, so ∂y/∂ŝ = −y.
                    let e = (-ls).exp();
                    (g * e, -g * y[d], -g * e)
                } else {
                    // y = x·e^{ŝ} + t, so ∂y/∂ŝ = x·e^{ŝ}.
                    let e = ls.exp();
                    (g * e, g * x[d] * e, g)
                };
                gx[d] = g_x;
                gs.push(g_ls * dls);
                gt.push(g_t);
            }
        }
        (gx, gs, gt)
    }

    fn gradients<T: candle::WithDType + Float>(
        &self,
        x: &Tensor,
        s: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let dim = x.dim(1)?;
        let (gx, gs, gt) = self.backward(&flat(x)?, &flat(s)?, &flat(y)?, &flat(g)?, dim);
        let dev = x.device();
        Ok((
            Tensor::from_vec(gx, x.shape(), dev)?,
            Tensor::from_vec(gs, s.shape(), dev)?,
            Tensor::from_vec(gt, s.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for AffineUpdate {
    fn name(&self) -> &'static str {
        "affine-coupling-update"
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
        let (batch, dim) = self.dims(l1, l2, l3)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(s), CpuStorage::F32(t)) => {
                CpuStorage::F32(self.forward(slice(x, l1)?, slice(s, l2)?, slice(t, l3)?, dim))
            }
            (CpuStorage::F64(x), CpuStorage::F64(s), CpuStorage::F64(t)) => {
                CpuStorage::F64(self.forward(slice(x, l1)?, slice(s, l2)?, slice(t, l3)?, dim))
            }
            _ => candle::bail!("the fused coupling supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((batch, dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _t: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gs, gt) = match x.dtype() {
            DType::F32 => self.gradients::<f32>(x, s, res, grad)?,
            DType::F64 => self.gradients::<f64>(x, s, res, grad)?,
            other => candle::bail!("the fused coupling has no backward for {other:?}"),
        };
        Ok((Some(gx), Some(gs), Some(gt)))
    }
}

/// `Σ ŝ` over each row of the raw log-scales `s` `(batch, n)`, negated for an inverse.
#[derive(Debug, Clone, Copy)]
struct LogDet {
    pub scale: ScaleMap,
    pub inverse: bool,
}

impl LogDet {
    fn sign<T: Float>(&self) -> T {
        if self.inverse {
            -T::one()
        } else {
            T::one()
        }
    }

    fn forward<T: Float>(&self, s: &[T], n: usize) -> Vec<T> {
        s.chunks_exact(n)
            .map(|row| {
                let sum = row
                    .iter()
                    .fold(T::zero(), |acc, &v| acc + self.scale.scalar(v).0);
                self.sign::<T>() * sum
            })
            .collect()
    }

    fn gradient<T: candle::WithDType + Float>(&self, s: &Tensor, g: &Tensor) -> Result<Tensor> {
        let n = s.dim(1)?.max(1);
        let (s_v, g_v) = (s.flatten_all()?.to_vec1::<T>()?, g.to_vec1::<T>()?);
        let gs: Vec<T> = s_v
            .chunks_exact(n)
            .zip(g_v)
            .flat_map(|(row, g)| {
                let k = self.sign::<T>() * g;
                row.iter().map(move |&v| k * self.scale.scalar(v).1)
            })
            .collect();
        Tensor::from_vec(gs, s.shape(), s.device())
    }
}

impl CustomOp1 for LogDet {
    fn name(&self) -> &'static str {
        "affine-coupling-log-det"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, n) = layout.shape().dims2()?;
        if n == 0 {
            candle::bail!("the fused log-det needs at least one log-scale per row");
        }
        let out = match storage {
            CpuStorage::F32(s) => CpuStorage::F32(self.forward(slice(s, layout)?, n)),
            CpuStorage::F64(s) => CpuStorage::F64(self.forward(slice(s, layout)?, n)),
            _ => candle::bail!("the fused log-det supports f32 and f64"),
        };
        Ok((out, Shape::from(batch)))
    }

    fn bwd(&self, s: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = match s.dtype() {
            DType::F32 => self.gradient::<f32>(s, grad)?,
            DType::F64 => self.gradient::<f64>(s, grad)?,
            other => candle::bail!("the fused log-det has no backward for {other:?}"),
        };
        Ok(Some(g))
    }
}

/// The fused affine coupling: `(y, log|det|)` from the whole input `x` `(batch, dim)`,
/// the transformed features' indices and the conditioner's raw `s` and `t`
/// `(batch, n)`, for the forward map or (`inverse`) its inverse. The caller decides that
/// the kernel applies, through [`fused`](crate::fused) with
/// [`Op::AffineCoupling`](crate::Op::AffineCoupling).
pub fn coupling(
    x: &Tensor,
    transformed: &[usize],
    s: &Tensor,
    t: &Tensor,
    scale: ScaleMap,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let update = AffineUpdate {
        transformed: transformed.to_vec(),
        scale,
        inverse,
    };
    let s = s.contiguous()?;
    let y = x.contiguous()?.apply_op3(&s, &t.contiguous()?, update)?;
    let log_det = s.apply_op1(LogDet { scale, inverse })?;
    Ok((y, log_det))
}
