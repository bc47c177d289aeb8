//! Two pieces of a Transformer layer as ops with their own backward, in place of the
//! dozen candle ops (each with its backward) that spell each out:
//!
//! - [`layer_norm`]: `(x − mean) / √(var + ε) ⊙ w + b` over the last dimension;
//! - [`causal_attention`]: multi-head causal self-attention, from the rows of
//!   queries, keys and values that one linear map gives, to the heads' outputs side by
//!   side, without the heads' transposes and with no mask: each query visits the keys
//!   up to its own position only.
//!
//! Both take and give rows in `f32` or `f64`; the backward passes recompute what they
//! need (a row's statistics, a query's attention weights) instead of keeping it.

use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::{slice, threads::planned};

/// Rows below which an op runs on the calling thread alone.
const PARALLEL_ROWS: usize = 256;

/// `f` on each chunk of `len` values of `out` (with its index), across the planned
/// threads when there are many rows.
fn for_chunks<T: Send>(out: &mut [T], len: usize, rows: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if planned() > 1 && rows >= PARALLEL_ROWS {
        out.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        out.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// A row's mean and `1 / √(var + ε)`.
#[inline(always)]
fn moments<T: Float>(row: &[T], eps: T) -> (T, T) {
    let n = T::from(row.len()).unwrap_or_else(T::one);
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = row
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, (var + eps).sqrt().recip())
}

#[derive(Debug, Clone, Copy)]
struct LayerNorm {
    eps: f64,
}

impl LayerNorm {
    fn forward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let n = w.len();
        let eps = T::from(self.eps).unwrap_or_else(T::epsilon);
        let mut out = vec![T::zero(); x.len()];
        for_chunks(&mut out, n, x.len() / n, |r, y| {
            let row = &x[r * n..(r + 1) * n];
            let (mean, inv) = moments(row, eps);
            for j in 0..n {
                y[j] = (row[j] - mean) * inv * w[j] + b[j];
            }
        });
        out
    }

    /// `(∂x, ∂w, ∂b)` from the output gradient `g`.
    fn backward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &[T]) -> [Vec<T>; 3] {
        let n = w.len();
        let eps = T::from(self.eps).unwrap_or_else(T::epsilon);
        let count = T::from(n).unwrap_or_else(T::one);
        let stats: Vec<(T, T)> = x.chunks_exact(n).map(|row| moments(row, eps)).collect();
        let (mut gw, mut gb) = (vec![T::zero(); n], vec![T::zero(); n]);
        for ((row, g), &(mean, inv)) in x.chunks_exact(n).zip(g.chunks_exact(n)).zip(&stats) {
            for j in 0..n {
                gw[j] = gw[j] + g[j] * (row[j] - mean) * inv;
                gb[j] = gb[j] + g[j];
            }
        }
        let mut gx = vec![T::zero(); x.len()];
        for_chunks(&mut gx, n, stats.len(), |r, gx| {
            let (row, g) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let (mean, inv) = stats[r];
            let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
            for j in 0..n {
                let gh = g[j] * w[j];
                sum_g = sum_g + gh;
                sum_gx = sum_gx + gh * (row[j] - mean) * inv;
            }
            let (mean_g, mean_gx) = (sum_g / count, sum_gx / count);
            for j in 0..n {
                let xh = (row[j] - mean) * inv;
                gx[j] = inv * (g[j] * w[j] - mean_g - xh * mean_gx);
            }
        });
        [gx, gw, gb]
    }

    fn gradients<T: candle::WithDType + Float + Send + Sync>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let [gx, gw, gb] = self.backward(&flat(x)?, &flat(w)?, &flat(g)?);
        let dev = x.device();
        Ok((
            Tensor::from_vec(gx, x.shape(), dev)?,
            Tensor::from_vec(gw, w.shape(), dev)?,
            Tensor::from_vec(gb, w.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let n = l2.shape().elem_count();
        let dims = l1.shape().dims();
        if n == 0 || dims.last() != Some(&n) || l3.shape().elem_count() != n {
            candle::bail!(
                "layer norm: input {:?} with weight {:?} and bias {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?))
            }
            _ => candle::bail!("the fused layer norm supports f32 and f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = match x.dtype() {
            DType::F32 => self.gradients::<f32>(x, w, grad)?,
            DType::F64 => self.gradients::<f64>(x, w, grad)?,
            other => candle::bail!("the fused layer norm has no backward for {other:?}"),
        };
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(x − mean) / √(var + ε) ⊙ weight + bias` over the last dimension of `x`, one op
/// forward and one backward (CPU). The caller decides that the kernel applies, through
/// [`fused`](crate::fused) with [`Op::LayerNorm`](crate::Op::LayerNorm).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

#[derive(Debug, Clone, Copy)]
struct CausalAttention {
    batch: usize,
    heads: usize,
}

/// The shape of one sequence's rows: tokens, embedding width, head width.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    tokens: usize,
    width: usize,
    head: usize,
}

/// `y += a·x`, element by element (a loop the compiler vectorises).
#[inline(always)]
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}

/// One head of one sequence, gathered out of the rows of queries, keys and values:
/// queries (scaled by `1/√d`, and as given), keys row by row and transposed, values row
/// by row and transposed, and the attention weights of the query last asked for.
struct Head<T> {
    s: Sizes,
    scale: T,
    q: Vec<T>,
    q_raw: Vec<T>,
    k: Vec<T>,
    kt: Vec<T>,
    v: Vec<T>,
    vt: Vec<T>,
    p: Vec<T>,
}

impl<T: Float> Head<T> {
    fn new(s: Sizes) -> Self {
        let n = s.tokens * s.head;
        Self {
            s,
            scale: T::from(s.head).unwrap_or_else(T::one).sqrt().recip(),
            q: vec![T::zero(); n],
            q_raw: vec![T::zero(); n],
            k: vec![T::zero(); n],
            kt: vec![T::zero(); n],
            v: vec![T::zero(); n],
            vt: vec![T::zero(); n],
            p: vec![T::zero(); s.tokens],
        }
    }

    /// Head `h` of one sequence's rows `qkv` `(T, 3·width)`.
    #[inline(always)]
    fn gather(&mut self, qkv: &[T], h: usize) {
        let Sizes {
            tokens: t,
            width,
            head: d,
        } = self.s;
        for i in 0..t {
            let row = &qkv[i * 3 * width..][..3 * width];
            for c in 0..d {
                let (q, k, v) = (
                    row[h * d + c],
                    row[width + h * d + c],
                    row[2 * width + h * d + c],
                );
                self.q_raw[i * d + c] = q;
                self.q[i * d + c] = q * self.scale;
                self.k[i * d + c] = k;
                self.kt[c * t + i] = k;
                self.v[i * d + c] = v;
                self.vt[c * t + i] = v;
            }
        }
    }

    /// Query `i`'s attention weights over keys `0..=i`, into `p[..=i]`.
    #[inline(always)]
    fn weights(&mut self, i: usize) {
        let (t, d) = (self.s.tokens, self.s.head);
        let p = &mut self.p[..=i];
        p.iter_mut().for_each(|v| *v = T::zero());
        for c in 0..d {
            axpy(p, self.q[i * d + c], &self.kt[c * t..][..=i]);
        }
        let max = p.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        let inv = sum.recip();
        p.iter_mut().for_each(|v| *v = *v * inv);
    }
}

impl CausalAttention {
    fn sizes(&self, rows: usize, cols: usize) -> Result<Sizes> {
        let width = cols / 3;
        let ok = self.batch > 0
            && self.heads > 0
            && rows.is_multiple_of(self.batch)
            && cols == 3 * width
            && width.is_multiple_of(self.heads)
            && width > 0;
        if !ok {
            candle::bail!(
                "causal attention: rows ({rows}, {cols}) are not queries, keys and values of {} sequences in {} heads",
                self.batch,
                self.heads
            );
        }
        Ok(Sizes {
            tokens: rows / self.batch,
            width,
            head: width / self.heads,
        })
    }

    fn forward<T: Float + Send + Sync>(&self, qkv: &[T], s: Sizes) -> Vec<T> {
        let mut out = vec![T::zero(); self.batch * s.tokens * s.width];
        let rows = self.batch * s.tokens;
        let len = s.tokens * 3 * s.width;
        for_chunks(&mut out, s.tokens * s.width, rows, |b, out| {
            let qkv = &qkv[b * len..][..len];
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.sequence_avx2(qkv, out, s) };
            }
            self.sequence(qkv, out, s);
        });
        out
    }

    /// One sequence's outputs `out` `(T, width)` from its rows `qkv` `(T, 3·width)`.
    #[inline(always)]
    fn sequence<T: Float>(&self, qkv: &[T], out: &mut [T], s: Sizes) {
        let mut head = Head::new(s);
        for h in 0..self.heads {
            head.gather(qkv, h);
            for i in 0..s.tokens {
                head.weights(i);
                let o = &mut out[i * s.width + h * s.head..][..s.head];
                for (j, &p) in head.p[..=i].iter().enumerate() {
                    axpy(o, p, &head.v[j * s.head..][..s.head]);
                }
            }
        }
    }

    /// [`sequence`](Self::sequence) compiled for AVX2 and chosen at run time (the
    /// loops over a head's width and over keys then run eight f32 lanes wide).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn sequence_avx2<T: Float>(&self, qkv: &[T], out: &mut [T], s: Sizes) {
        self.sequence(qkv, out, s)
    }

    /// `∂qkv` from the output gradient `g` `(rows, width)`.
    fn backward<T: Float + Send + Sync>(&self, qkv: &[T], g: &[T], s: Sizes) -> Vec<T> {
        let (stride, t) = (3 * s.width, s.tokens);
        let mut grad = vec![T::zero(); qkv.len()];
        let rows = self.batch * t;
        for_chunks(&mut grad, t * stride, rows, |b, grad| {
            let qkv = &qkv[b * t * stride..][..t * stride];
            let g = &g[b * t * s.width..][..t * s.width];
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.sequence_backward_avx2(qkv, g, grad, s) };
            }
            self.sequence_backward(qkv, g, grad, s);
        });
        grad
    }

    /// [`sequence_backward`](Self::sequence_backward) compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn sequence_backward_avx2<T: Float>(&self, qkv: &[T], g: &[T], grad: &mut [T], s: Sizes) {
        self.sequence_backward(qkv, g, grad, s)
    }

    /// One sequence's `∂qkv` `(T, 3·width)` from its rows and output gradient `g`
    /// `(T, width)`.
    #[inline(always)]
    fn sequence_backward<T: Float>(&self, qkv: &[T], g: &[T], grad: &mut [T], s: Sizes) {
        let (stride, d, t) = (3 * s.width, s.head, s.tokens);
        let mut head = Head::new(s);
        let (mut dp, mut gh) = (vec![T::zero(); t], vec![T::zero(); d * t]);
        let mut dqkv = vec![T::zero(); 3 * t * d];
        for h in 0..self.heads {
            head.gather(qkv, h);
            // The head's output gradient, transposed: `gh[c·T + i]`.
            for i in 0..t {
                for c in 0..d {
                    gh[c * t + i] = g[i * s.width + h * d + c];
                }
            }
            dqkv.iter_mut().for_each(|v| *v = T::zero());
            let (dq, rest) = dqkv.split_at_mut(t * d);
            let (dk, dv) = rest.split_at_mut(t * d);
            for i in 0..t {
                head.weights(i);
                // ∂p_ij = g_i · v_j; ∂v_j += p_ij g_i.
                dp[..=i].iter_mut().for_each(|v| *v = T::zero());
                for c in 0..d {
                    axpy(&mut dp[..=i], gh[c * t + i], &head.vt[c * t..][..=i]);
                }
                let dot = head.p[..=i]
                    .iter()
                    .zip(&dp[..=i])
                    .fold(T::zero(), |a, (&p, &q)| a + p * q);
                let q = &head.q_raw[i * d..][..d];
                let gi = &g[i * s.width + h * d..][..d];
                for j in 0..=i {
                    let p = head.p[j];
                    axpy(&mut dv[j * d..][..d], p, gi);
                    // ∂s_ij = p_ij (∂p_ij − Σ_k p_ik ∂p_ik), scores q·k / √d.
                    let ds = p * (dp[j] - dot) * head.scale;
                    axpy(&mut dq[i * d..][..d], ds, &head.k[j * d..][..d]);
                    axpy(&mut dk[j * d..][..d], ds, q);
                }
            }
            for i in 0..t {
                let row = &mut grad[i * stride..][..stride];
                for (part, src) in [&*dq, &*dk, &*dv].into_iter().enumerate() {
                    let at = part * s.width + h * d;
                    row[at..at + d].copy_from_slice(&src[i * d..][..d]);
                }
            }
        }
    }

    fn gradient<T: candle::WithDType + Float + Send + Sync>(
        &self,
        qkv: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        let (rows, cols) = qkv.dims2()?;
        let s = self.sizes(rows, cols)?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let grad = self.backward(&flat(qkv)?, &flat(g)?, s);
        Tensor::from_vec(grad, qkv.shape(), qkv.device())
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = layout.shape().dims2()?;
        let s = self.sizes(rows, cols)?;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.forward(slice(x, layout)?, s)),
            CpuStorage::F64(x) => CpuStorage::F64(self.forward(slice(x, layout)?, s)),
            _ => candle::bail!("the fused attention supports f32 and f64"),
        };
        Ok((out, Shape::from((rows, s.width))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = match qkv.dtype() {
            DType::F32 => self.gradient::<f32>(qkv, grad)?,
            DType::F64 => self.gradient::<f64>(qkv, grad)?,
            other => candle::bail!("the fused attention has no backward for {other:?}"),
        };
        Ok(Some(g))
    }
}

/// Causal multi-head self-attention, one op forward and one backward (CPU): `qkv`
/// `(batch·T, 3·width)` holds each token's queries, keys and values (each `width`
/// wide, head `h` at columns `h·d .. (h + 1)·d` of its part, `d = width / heads`);
/// the result `(batch·T, width)` holds, for each token `i` and head, `Σ_{j ≤ i}
/// softmax_j(q_i·k_j / √d) v_j`. The caller decides that the kernel applies, through
/// [`fused`](crate::fused) with [`Op::Attention`](crate::Op::Attention).
pub fn causal_attention(qkv: &Tensor, batch: usize, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op1(CausalAttention { batch, heads })
}
