//! The element-wise part of an affine coupling as two ops. From the input `x`
//! `(batch, dim)` and the conditioner's raw outputs `s`, `t` `(batch, n)` (`n`
//! transformed features), [`AffineUpdate`] gives `y` `(batch, dim)`: the kept features
//! of `x`, and the transformed ones
//!
//! - forward: `y_b = x_b ⊙ exp(ŝ) + t`,
//! - inverse: `y_b = (x_b − t) ⊙ exp(−ŝ)`,
//!
//! or, with the shift first ([`Order::ShiftThenScale`], Glow's coupling as normflows
//! writes it), `y_b = (x_b + t) ⊙ exp(ŝ)` and its inverse `y_b = x_b ⊙ exp(−ŝ) − t`;
//! with `ŝ` the [`ScaleMap`] of `s`; [`LogDet`] gives `Σ ŝ` (or `−Σ ŝ`) `(batch)`. On
//! the graph they replace the split, scale map, exponential, product, sum and merge,
//! about nine ops each with its own backward. Their backward passes are ops too
//! ([`UpdateGrad`], [`LogDetGrad`]), so that on CUDA (`affine.cu`) a coupling's
//! element-wise work is four launches, forward and back.

use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;

use crate::{slice, ScaleMap};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;

/// Where an affine coupling's shift sits relative to its scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// `y = x ⊙ exp(ŝ) + t` (RealNVP).
    ScaleThenShift,
    /// `y = (x + t) ⊙ exp(ŝ)` (Glow's coupling as normflows writes it).
    ShiftThenScale,
}

#[derive(Debug, Clone)]
struct AffineUpdate {
    /// The transformed features, in the order of the columns of `s` and `t`.
    pub transformed: Vec<usize>,
    pub scale: ScaleMap,
    pub inverse: bool,
    pub order: Order,
}

impl AffineUpdate {
    /// `(batch, dim)`, checked against the shapes of `s` and `t`, with the transformed
    /// features checked to be distinct features of `x` (each column of `s` and `t`
    /// then has one feature, and every gradient entry one writer).
    fn dims(&self, x: &Layout, s: &Layout, t: &Layout) -> Result<(usize, usize)> {
        let (batch, dim) = x.shape().dims2()?;
        let n = self.transformed.len();
        let ok =
            n > 0 && dim > 0 && s.shape().dims() == [batch, n] && t.shape().dims() == [batch, n];
        if !ok {
            candle::bail!(
                "fused coupling: shapes {:?} {:?} {:?} do not match {n} transformed features",
                x.shape(),
                s.shape(),
                t.shape()
            );
        }
        let mut seen = vec![false; dim];
        for &j in &self.transformed {
            if j >= dim || std::mem::replace(&mut seen[j], true) {
                candle::bail!(
                    "fused coupling: transformed features {:?} are not distinct features of {dim}",
                    self.transformed
                );
            }
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
                y[d] = match (self.order, self.inverse) {
                    (Order::ScaleThenShift, false) => y[d] * ls.exp() + t[j],
                    (Order::ScaleThenShift, true) => (y[d] - t[j]) * (-ls).exp(),
                    (Order::ShiftThenScale, false) => (y[d] + t[j]) * ls.exp(),
                    (Order::ShiftThenScale, true) => y[d] * (-ls).exp() - t[j],
                };
            }
        }
        out
    }

    /// `[∂x | ∂s | ∂t]` (flattened `(batch, dim)`, then `(batch, n)` twice) from the
    /// output gradient `g`; `xy` is the one of the op's input and output that the
    /// derivative in `ŝ` needs ([`Self::needs_output`]).
    fn backward<T: Float>(&self, xy: &[T], s: &[T], g: &[T], dim: usize) -> Vec<T> {
        let n = self.transformed.len();
        let elems = g.len();
        let mut out = g.to_vec();
        out.resize(elems + 2 * s.len(), T::zero());
        let (gx, rest) = out.split_at_mut(elems);
        let (gs, gt) = rest.split_at_mut(s.len());
        let rows = gx.chunks_exact_mut(dim).zip(xy.chunks_exact(dim));
        let params = gs.chunks_exact_mut(n).zip(gt.chunks_exact_mut(n));
        for (((gx, xy), s), (gs, gt)) in rows.zip(s.chunks_exact(n)).zip(params) {
            for (j, &d) in self.transformed.iter().enumerate() {
                let (ls, dls) = self.scale.scalar(s[j]);
                let g = gx[d];
                let (g_x, g_ls, g_t) = match (self.order, self.inverse) {
                    (Order::ScaleThenShift, false) => {
                        // y = x·e^{ŝ} + t, so ∂y/∂ŝ = x·e^{ŝ}.
                        let e = ls.exp();
                        (g * e, g * xy[d] * e, g)
                    }
                    (Order::ScaleThenShift, true) => {
                        // y = (x − t)·e^{−ŝ}, so ∂y/∂ŝ = −y.
                        let e = (-ls).exp();
                        (g * e, -g * xy[d], -g * e)
                    }
                    (Order::ShiftThenScale, false) => {
                        // y = (x + t)·e^{ŝ}, so ∂y/∂ŝ = y.
                        let e = ls.exp();
                        (g * e, g * xy[d], g * e)
                    }
                    (Order::ShiftThenScale, true) => {
                        // y = x·e^{−ŝ} − t, so ∂y/∂ŝ = −x·e^{−ŝ}.
                        let e = (-ls).exp();
                        (g * e, -g * xy[d] * e, -g)
                    }
                };
                gx[d] = g_x;
                gs[j] = g_ls * dls;
                gt[j] = g_t;
            }
        }
        out
    }

    /// Whether the backward pass needs the op's output (else its input): the output
    /// of the forward map with the shift first, or of the inverse with the scale first.
    fn needs_output(&self) -> bool {
        self.inverse != (self.order == Order::ShiftThenScale)
    }

    /// For each feature, its column of `s` and `t`, or −1 where it is copied through.
    #[cfg(feature = "cuda")]
    fn columns(&self, dim: usize) -> Result<Vec<i32>> {
        let mut out = vec![-1; dim];
        for (j, &d) in self.transformed.iter().enumerate() {
            out[d] = i32::try_from(j)
                .map_err(|_| candle::Error::Msg(format!("{j} features are too many")))?;
        }
        Ok(out)
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
        let (batch, dim) = self.dims(l1, l2, l3)?;
        let n = self.transformed.len();
        let columns = self.columns(dim)?;
        let code = cuda::Code::new(self.scale, self.inverse, batch, dim, n)?.with_order(self.order);
        let out = cuda::update(&code, &columns, (s1, l1), (s2, l2), (s3, l3))?;
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
        let (batch, dim) = x.dims2()?;
        let n = self.transformed.len();
        let xy = if self.needs_output() { res } else { x };
        let packed = xy.apply_op3_no_bwd(
            s,
            &grad.contiguous()?,
            &UpdateGrad {
                update: self.clone(),
            },
        )?;
        let (elems, params) = (batch * dim, batch * n);
        let gx = packed.narrow(0, 0, elems)?.reshape((batch, dim))?;
        let gs = packed.narrow(0, elems, params)?.reshape((batch, n))?;
        let gt = packed
            .narrow(0, elems + params, params)?
            .reshape((batch, n))?;
        Ok((Some(gx), Some(gs), Some(gt)))
    }
}

/// The backward pass of [`AffineUpdate`] as an op: `(xy, s, g)` to `[∂x | ∂s | ∂t]`,
/// flattened (see [`AffineUpdate::backward`]).
#[derive(Debug, Clone)]
struct UpdateGrad {
    update: AffineUpdate,
}

impl CustomOp3 for UpdateGrad {
    fn name(&self) -> &'static str {
        "affine-coupling-update-grad"
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
        let (batch, dim) = self.update.dims(l1, l2, l2)?;
        if l3.shape().dims() != [batch, dim] {
            candle::bail!("the fused coupling's gradient has shape {:?}", l3.shape());
        }
        let u = &self.update;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(xy), CpuStorage::F32(s), CpuStorage::F32(g)) => {
                CpuStorage::F32(u.backward(slice(xy, l1)?, slice(s, l2)?, slice(g, l3)?, dim))
            }
            (CpuStorage::F64(xy), CpuStorage::F64(s), CpuStorage::F64(g)) => {
                CpuStorage::F64(u.backward(slice(xy, l1)?, slice(s, l2)?, slice(g, l3)?, dim))
            }
            _ => candle::bail!("the fused coupling's backward takes f32 or f64 of one dtype"),
        };
        let len = batch * (dim + 2 * u.transformed.len());
        Ok((out, Shape::from(len)))
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
        let u = &self.update;
        let (batch, dim) = u.dims(l1, l2, l2)?;
        if l3.shape().dims() != [batch, dim] {
            candle::bail!("the fused coupling's gradient has shape {:?}", l3.shape());
        }
        let n = u.transformed.len();
        let columns = u.columns(dim)?;
        let code = cuda::Code::new(u.scale, u.inverse, batch, dim, n)?.with_order(u.order);
        let out = cuda::update_grad(&code, &columns, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(batch * (dim + 2 * n))))
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

    /// `∂s` from the gradient `g` `(batch)` of each row's log-det.
    fn backward<T: Float>(&self, s: &[T], g: &[T], n: usize) -> Vec<T> {
        s.chunks_exact(n)
            .zip(g)
            .flat_map(|(row, &g)| {
                let k = self.sign::<T>() * g;
                row.iter().map(move |&v| k * self.scale.scalar(v).1)
            })
            .collect()
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (batch, n) = layout.shape().dims2()?;
        if n == 0 {
            candle::bail!("the fused log-det needs at least one log-scale per row");
        }
        let code = cuda::Code::new(self.scale, self.inverse, batch, n, n)?;
        let out = cuda::log_det(&code, (storage, layout))?;
        Ok((out, Shape::from(batch)))
    }

    fn bwd(&self, s: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = s.apply_op2_no_bwd(&grad.contiguous()?, &LogDetGrad { log_det: *self })?;
        Ok(Some(g))
    }
}

/// The backward pass of [`LogDet`] as an op: `(s, g)` to `∂s` `(batch, n)`.
#[derive(Debug, Clone, Copy)]
struct LogDetGrad {
    log_det: LogDet,
}

impl LogDetGrad {
    fn dims(s: &Layout, g: &Layout) -> Result<(usize, usize)> {
        let (batch, n) = s.shape().dims2()?;
        if n == 0 || g.shape().dims() != [batch] {
            candle::bail!(
                "the fused log-det's gradient {:?} does not match log-scales {:?}",
                g.shape(),
                s.shape()
            );
        }
        Ok((batch, n))
    }
}

impl CustomOp2 for LogDetGrad {
    fn name(&self) -> &'static str {
        "affine-coupling-log-det-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, n) = Self::dims(l1, l2)?;
        let d = &self.log_det;
        let out = match (s1, s2) {
            (CpuStorage::F32(s), CpuStorage::F32(g)) => {
                CpuStorage::F32(d.backward(slice(s, l1)?, slice(g, l2)?, n))
            }
            (CpuStorage::F64(s), CpuStorage::F64(g)) => {
                CpuStorage::F64(d.backward(slice(s, l1)?, slice(g, l2)?, n))
            }
            _ => candle::bail!("the fused log-det's backward takes f32 or f64 of one dtype"),
        };
        Ok((out, Shape::from((batch, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (batch, n) = Self::dims(l1, l2)?;
        let d = &self.log_det;
        let code = cuda::Code::new(d.scale, d.inverse, batch, n, n)?;
        let out = cuda::log_det_grad(&code, (s1, l1), (s2, l2))?;
        Ok((out, Shape::from((batch, n))))
    }
}

/// The fused affine coupling: `(y, log|det|)` from the whole input `x` `(batch, dim)`,
/// the transformed features' indices and the conditioner's raw `s` and `t`
/// `(batch, n)`, for the forward map or (`inverse`) its inverse, the scale before the
/// shift ([`coupling_in_order`] takes the order). The caller decides that the kernel
/// applies, through [`fused`](crate::fused) with
/// [`Op::AffineCoupling`](crate::Op::AffineCoupling).
pub fn coupling(
    x: &Tensor,
    transformed: &[usize],
    s: &Tensor,
    t: &Tensor,
    scale: ScaleMap,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    coupling_in_order(x, transformed, s, t, scale, inverse, Order::ScaleThenShift)
}

/// [`coupling`] with the shift before or after the scale.
pub fn coupling_in_order(
    x: &Tensor,
    transformed: &[usize],
    s: &Tensor,
    t: &Tensor,
    scale: ScaleMap,
    inverse: bool,
    order: Order,
) -> Result<(Tensor, Tensor)> {
    let update = AffineUpdate {
        transformed: transformed.to_vec(),
        scale,
        inverse,
        order,
    };
    let s = s.contiguous()?;
    let y = x.contiguous()?.apply_op3(&s, &t.contiguous()?, update)?;
    let log_det = s.apply_op1(LogDet { scale, inverse })?;
    Ok((y, log_det))
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, IndexOp, Tensor, Var};

    use super::{coupling_in_order, Order};
    use crate::ScaleMap;

    /// The coupling from its definition in plain candle ops, for both orders.
    fn reference(
        x: &Tensor,
        transformed: &[usize],
        s: &Tensor,
        t: &Tensor,
        scale: ScaleMap,
        inverse: bool,
        order: Order,
    ) -> candle::Result<(Tensor, Tensor)> {
        let ls = scale.log_scale(s)?;
        let mut cols: Vec<Tensor> = (0..x.dim(1)?)
            .map(|d| x.i((.., d..d + 1)))
            .collect::<candle::Result<_>>()?;
        for (j, &d) in transformed.iter().enumerate() {
            let (xd, tj, lj) = (&cols[d], &t.i((.., j..j + 1))?, &ls.i((.., j..j + 1))?);
            cols[d] = match (order, inverse) {
                (Order::ScaleThenShift, false) => (xd * lj.exp()?)?.add(tj)?,
                (Order::ScaleThenShift, true) => (xd - tj)?.mul(&lj.neg()?.exp()?)?,
                (Order::ShiftThenScale, false) => (xd + tj)?.mul(&lj.exp()?)?,
                (Order::ShiftThenScale, true) => (xd * lj.neg()?.exp()?)?.sub(tj)?,
            };
        }
        let log_det = ls.sum(1)?;
        let log_det = if inverse { log_det.neg()? } else { log_det };
        Ok((Tensor::cat(&cols, 1)?, log_det))
    }

    /// A feature transformed twice, or one past the last, is refused rather than
    /// leaving a column of the gradients unwritten.
    #[test]
    fn transformed_features_must_be_distinct_features() -> candle::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let st = Tensor::zeros((2, 2), DType::F32, &dev)?;
        let run = |transformed: &[usize]| {
            let order = Order::ScaleThenShift;
            coupling_in_order(&x, transformed, &st, &st, ScaleMap::Exp, false, order)
        };
        assert!(run(&[3, 1]).is_ok());
        for bad in [[1, 1], [0, 4]] {
            let err = run(&bad).expect_err("refused").to_string();
            assert!(err.contains("not distinct features"), "{bad:?}: {err}");
        }
        Ok(())
    }

    /// The fused ops against the definition: values, and the gradients in `x`, `s` and
    /// `t` of a weighted sum of the outputs and log-dets, both orders and directions.
    #[test]
    fn both_orders_match_their_definition() -> candle::Result<()> {
        let dev = Device::Cpu;
        let (batch, dim) = (6, 7);
        let transformed = [5, 1, 3, 6];
        let n = transformed.len();
        let scales = [
            ScaleMap::Exp,
            ScaleMap::Sigmoid,
            ScaleMap::Tanh { clamp: 2.0 },
        ];
        for order in [Order::ScaleThenShift, Order::ShiftThenScale] {
            for inverse in [false, true] {
                for scale in scales {
                    let var = |rows, cols| -> candle::Result<Var> {
                        Var::from_tensor(
                            &Tensor::randn(0.0, 1.0, (rows, cols), &dev)?.to_dtype(DType::F64)?,
                        )
                    };
                    let (x, s, t) = (var(batch, dim)?, var(batch, n)?, var(batch, n)?);
                    let wy = Tensor::randn(0.0, 1.0, (batch, dim), &dev)?.to_dtype(DType::F64)?;
                    let wl = Tensor::randn(0.0, 1.0, batch, &dev)?.to_dtype(DType::F64)?;
                    let run = |fused: bool| -> candle::Result<Vec<Tensor>> {
                        let args = (
                            x.as_tensor(),
                            &transformed[..],
                            s.as_tensor(),
                            t.as_tensor(),
                        );
                        let (y, ld) = if fused {
                            coupling_in_order(
                                args.0, args.1, args.2, args.3, scale, inverse, order,
                            )?
                        } else {
                            reference(args.0, args.1, args.2, args.3, scale, inverse, order)?
                        };
                        let loss = ((&y * &wy)?.sum_all()? + (&ld * &wl)?.sum_all()?)?;
                        let g = loss.backward()?;
                        let mut out = vec![y, ld];
                        for v in [&x, &s, &t] {
                            out.push(g.get(v.as_tensor()).expect("a gradient").clone());
                        }
                        Ok(out)
                    };
                    let (fused, plain) = (run(true)?, run(false)?);
                    for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                        let gap = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                        assert!(gap < 1e-12, "{order:?} inverse {inverse} {scale:?}: output {i} (y, log-det, ∂x, ∂s, ∂t) off by {gap:e}");
                    }
                }
            }
        }
        Ok(())
    }
}
