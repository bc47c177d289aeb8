//! Two pieces of a Transformer layer as ops with their own backward, in place of the
//! dozen candle ops (each with its backward) that spell each out:
//!
//! - [`layer_norm`]: `(x − mean) / √(var + ε) ⊙ w + b` over the last dimension;
//! - [`causal_attention`]: multi-head causal self-attention, from the rows of
//!   queries, keys and values that one linear map gives, to the heads' outputs side by
//!   side, without the heads' transposes and with no mask: each query visits the keys
//!   up to its own position only.
//!
//! Both take and give rows in `f32` or `f64`; as ops, their backward passes recompute
//! what they need (a row's statistics, a query's attention weights) instead of keeping
//! it. The fused Transformer layer ([`crate::transformer_layer`]) calls the same
//! kernels, keeps what they found for its backward pass, and hands the attention its
//! queries, keys and values already in the kernel's lane layout (see
//! `CausalAttention`).

use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::{on_host, on_host3, slice, threads::planned, unwritten, Real};

/// Rows below which an op runs on the calling thread alone.
const PARALLEL_ROWS: usize = 256;

/// `Σ_j f(a_j, b_j, c_j)` over three equally long rows, in eight partial sums so that
/// it vectorises (a single running sum is a chain of dependent additions, and indexing
/// the rows inside `f` would keep the compiler from proving the loads in bounds).
#[inline(always)]
fn sum<T: Float>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let rest = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .fold(T::zero(), |s, ((&a, &b), &c)| s + f(a, b, c));
    let mut lanes = [T::zero(); 8];
    for ((a, b), c) in ca.zip(cb).zip(cc) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = *lane + f(a[l], b[l], c[l]);
        }
    }
    lanes.into_iter().fold(rest, |a, v| a + v)
}

/// A row's mean and `1 / √(var + ε)`.
#[inline(always)]
fn moments<T: Float>(row: &[T], eps: T) -> (T, T) {
    let n = T::from(row.len()).unwrap_or_else(T::one);
    let mean = sum(row, row, row, |x, _, _| x) / n;
    let var = sum(row, row, row, |x, _, _| (x - mean) * (x - mean)) / n;
    (mean, (var + eps).sqrt().recip())
}

/// Rows per block of a layer norm: all of them on one thread, else two blocks per
/// planned thread.
fn block_rows(rows: usize) -> usize {
    let threads = planned();
    if threads > 1 && rows >= PARALLEL_ROWS {
        rows.div_ceil(2 * threads)
    } else {
        rows.max(1)
    }
}

/// Layer norm of the rows `x` into `y`, with weight `w` and bias `b`; each row's mean
/// and `1 / √(var + ε)` into `stats`, two values a row.
#[inline(always)]
fn norm_rows<T: Float>(x: &[T], w: &[T], b: &[T], eps: T, y: &mut [T], stats: &mut [T]) {
    let n = w.len();
    let rows = x.chunks_exact(n).zip(y.chunks_exact_mut(n));
    for ((row, y), stats) in rows.zip(stats.as_chunks_mut::<2>().0) {
        let (mean, inv) = moments(row, eps);
        *stats = [mean, inv];
        for (((y, &v), &w), &b) in y.iter_mut().zip(row).zip(w).zip(b) {
            *y = (v - mean) * inv * w + b;
        }
    }
}

/// [`norm_rows`] compiled for AVX2 and chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn norm_rows_avx2<T: Float>(x: &[T], w: &[T], b: &[T], eps: T, y: &mut [T], stats: &mut [T]) {
    norm_rows(x, w, b, eps, y, stats)
}

/// Each row's mean and `1 / √(var + ε)`, as [`norm_rows`] keeps them.
fn row_stats<T: Float>(x: &[T], n: usize, eps: T) -> Vec<T> {
    x.chunks_exact(n)
        .flat_map(|row| {
            let (mean, inv) = moments(row, eps);
            [mean, inv]
        })
        .collect()
}

/// The backward pass of [`norm_rows`] from the outputs' gradient `g` and the rows'
/// `stats`: `∂x` into `gx`, and `∂w`, `∂b` added into `gw`, `gb`.
#[inline(always)]
fn norm_rows_backward<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    stats: &[T],
    gx: &mut [T],
    gw: &mut [T],
    gb: &mut [T],
) {
    let n = w.len();
    let count = T::from(n).unwrap_or_else(T::one);
    let rows = x.chunks_exact(n).zip(g.chunks_exact(n));
    for (((row, g), gx), &[mean, inv]) in rows
        .zip(gx.chunks_exact_mut(n))
        .zip(stats.as_chunks::<2>().0)
    {
        for (((gw, gb), &v), &g) in gw.iter_mut().zip(gb.iter_mut()).zip(row).zip(g) {
            *gw = *gw + g * (v - mean) * inv;
            *gb = *gb + g;
        }
        let sum_g = sum(g, w, w, |g, w, _| g * w);
        let sum_gx = sum(g, w, row, |g, w, x| g * w * (x - mean) * inv);
        let (mean_g, mean_gx) = (sum_g / count, sum_gx / count);
        for (((gx, &v), &g), &w) in gx.iter_mut().zip(row).zip(g).zip(w) {
            let xh = (v - mean) * inv;
            *gx = inv * (g * w - mean_g - xh * mean_gx);
        }
    }
}

/// [`norm_rows_backward`] compiled for AVX2 and chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn norm_rows_backward_avx2<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    stats: &[T],
    gx: &mut [T],
    gw: &mut [T],
    gb: &mut [T],
) {
    norm_rows_backward(x, w, g, stats, gx, gw, gb)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerNorm {
    pub(crate) eps: f64,
}

impl LayerNorm {
    fn epsilon<T: Float>(&self) -> T {
        T::from(self.eps).unwrap_or_else(T::epsilon)
    }

    /// The rows `x` normalised, and each row's mean and `1 / √(var + ε)` (two values a
    /// row) for [`backward`](Self::backward).
    pub(crate) fn forward<T: Real>(&self, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<T>) {
        let n = w.len();
        let eps = self.epsilon();
        // SAFETY: `norm_rows` writes every row of its block and the row's two
        // statistics, and the blocks cover `out` and `stats`.
        #[allow(unsafe_code)]
        let (mut out, mut stats) = unsafe { (unwritten(x.len()), unwritten(2 * (x.len() / n))) };
        let rows = block_rows(x.len() / n);
        let run = |((y, stats), x): ((&mut [T], &mut [T]), &[T])| {
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2_fma() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                return unsafe { norm_rows_avx2(x, w, b, eps, y, stats) };
            }
            norm_rows(x, w, b, eps, y, stats)
        };
        if rows * n >= x.len() {
            run(((&mut out, &mut stats), x));
        } else {
            out.par_chunks_mut(rows * n)
                .zip(stats.par_chunks_mut(rows * 2))
                .zip(x.par_chunks(rows * n))
                .for_each(run);
        }
        (out, stats)
    }

    /// `(∂x, ∂w, ∂b)` from the output gradient `g` and the rows' statistics as
    /// [`forward`](Self::forward) gave them.
    pub(crate) fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T], stats: &[T]) -> [Vec<T>; 3] {
        let n = w.len();
        // SAFETY: `norm_rows_backward` writes every row of its block's `∂x`, and the
        // blocks cover `gx`.
        #[allow(unsafe_code)]
        let mut gx = unsafe { unwritten(x.len()) };
        let rows = block_rows(x.len() / n);
        // Each block of rows adds into its own `∂w`, `∂b`; the blocks' sums are added in
        // order, so the result depends only on the thread count planned.
        let run = |gx: &mut [T], x: &[T], g: &[T], stats: &[T]| {
            let mut part = vec![T::zero(); 2 * n];
            let (gw, gb) = part.split_at_mut(n);
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2_fma() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                unsafe {
                    norm_rows_backward_avx2(x, w, g, stats, gx, gw, gb)
                };
                return part;
            }
            norm_rows_backward(x, w, g, stats, gx, gw, gb);
            part
        };
        let parts: Vec<Vec<T>> = if rows * n >= x.len() {
            vec![run(&mut gx, x, g, stats)]
        } else {
            gx.par_chunks_mut(rows * n)
                .zip(x.par_chunks(rows * n))
                .zip(g.par_chunks(rows * n))
                .zip(stats.par_chunks(rows * 2))
                .map(|(((gx, x), g), stats)| run(gx, x, g, stats))
                .collect()
        };
        let (mut gw, mut gb) = (vec![T::zero(); n], vec![T::zero(); n]);
        for part in parts {
            let (pw, pb) = part.split_at(n);
            gw.iter_mut().zip(pw).for_each(|(s, &v)| *s = *s + v);
            gb.iter_mut().zip(pb).for_each(|(s, &v)| *s = *s + v);
        }
        [gx, gw, gb]
    }

    fn gradients<T: candle::WithDType + Real>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let [gx, gw, gb] = on_host3(x, w, g, |x: &[T], w, g| {
            // The op keeps nothing between its passes: the statistics are found again.
            let stats = row_stats(x, w.len(), self.epsilon());
            Ok(self.backward(x, w, g, &stats))
        })?;
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
                CpuStorage::F32(self.forward(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?).0)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.forward(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?).0)
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

/// Causal multi-head attention over `batch` sequences, taken [`LANES`] at a time (a
/// group). Its kernels read a group's queries, keys and values in the lane layout:
/// feature `f` (queries `0..width`, keys `width..2·width`, values `2·width..3·width`,
/// head `h` at `h·d .. (h + 1)·d` of each) of token `i` at lane vector `[f·T + i]` of
/// the group's `3·width·T`, sequence `l` of the group in lane `l`. Lanes past the batch
/// hold anything finite (zeros from the attention op, the `qkv` bias from the fused
/// layer): each lane is a sequence of its own, and those lanes' outputs are dropped. The
/// fused Transformer layer's `qkv` product writes that layout directly; the attention op
/// alone converts its rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalAttention {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
}

/// The shape of one sequence's rows: tokens, embedding width, head width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    tokens: usize,
    width: usize,
    head: usize,
}

/// Sequences that the attention kernel takes side by side, one in each lane of its
/// vectors: every product, softmax and gradient then runs across sequences, whatever
/// the head's width and however few keys a query sees (a loop over keys `0..=i` is too
/// short to fill a vector for the first queries; one over sixteen sequences is not).
pub(crate) const LANES: usize = 16;

/// One value of each of [`LANES`] sequences.
pub(crate) type Lanes<T> = [T; LANES];

/// `y += a ⊙ x`, lane by lane.
#[inline(always)]
fn fma<T: Float>(y: &mut Lanes<T>, a: &Lanes<T>, x: &Lanes<T>) {
    for l in 0..LANES {
        y[l] = a[l].mul_add(x[l], y[l]);
    }
}

/// Keys scored at once by [`dots`], and columns summed at once by [`weighted_sum`]:
/// their [`LANES`]-wide sums stay in registers (four named accumulators) while the
/// other operand streams past.
const BLOCK: usize = 4;

/// `out[j] = Σ_{c<d} a[c·a_stride] ⊙ x[c·x_stride + j]` for `j < out.len()`: a query
/// (or a gradient row) against each key (or value) of a head stored feature by feature.
#[inline(always)]
fn dots<T: Float>(
    a: &[Lanes<T>],
    a_stride: usize,
    x: &[Lanes<T>],
    x_stride: usize,
    d: usize,
    out: &mut [Lanes<T>],
) {
    let mut j = 0;
    while j + BLOCK <= out.len() {
        let zero = [T::zero(); LANES];
        let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
        for c in 0..d {
            let a = &a[c * a_stride];
            let r = &x[c * x_stride + j..][..BLOCK];
            fma(&mut s0, a, &r[0]);
            fma(&mut s1, a, &r[1]);
            fma(&mut s2, a, &r[2]);
            fma(&mut s3, a, &r[3]);
        }
        out[j..j + BLOCK].copy_from_slice(&[s0, s1, s2, s3]);
        j += BLOCK;
    }
    for (j, out) in out.iter_mut().enumerate().skip(j) {
        let mut s = [T::zero(); LANES];
        for c in 0..d {
            fma(&mut s, &a[c * a_stride], &x[c * x_stride + j]);
        }
        *out = s;
    }
}

/// `put(c, Σ_{j<n} w[j·w_stride] ⊙ x[j·j_stride + c·c_stride])` for each `c < d`: a
/// weighted sum of `n` rows of `d` lane vectors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weighted_sum<T: Float>(
    w: &[Lanes<T>],
    w_stride: usize,
    n: usize,
    x: &[Lanes<T>],
    j_stride: usize,
    c_stride: usize,
    d: usize,
    mut put: impl FnMut(usize, Lanes<T>),
) {
    let mut c = 0;
    while c + BLOCK <= d {
        let zero = [T::zero(); LANES];
        let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
        for j in 0..n {
            let w = &w[j * w_stride];
            let at = j * j_stride + c * c_stride;
            fma(&mut s0, w, &x[at]);
            fma(&mut s1, w, &x[at + c_stride]);
            fma(&mut s2, w, &x[at + 2 * c_stride]);
            fma(&mut s3, w, &x[at + 3 * c_stride]);
        }
        for (b, s) in [s0, s1, s2, s3].into_iter().enumerate() {
            put(c + b, s);
        }
        c += BLOCK;
    }
    for c in c..d {
        let mut s = [T::zero(); LANES];
        for j in 0..n {
            fma(&mut s, &w[j * w_stride], &x[j * j_stride + c * c_stride]);
        }
        put(c, s);
    }
}

/// A softmax over each lane of `p` in place.
#[inline(always)]
fn softmax<T: Real>(p: &mut [Lanes<T>]) {
    let mut max = [T::neg_infinity(); LANES];
    for p in p.iter() {
        for l in 0..LANES {
            max[l] = max[l].max(p[l]);
        }
    }
    for p in p.iter_mut() {
        for l in 0..LANES {
            p[l] = p[l] - max[l];
        }
    }
    T::exp_nonpositive(p.as_flattened_mut());
    let mut sum = [T::zero(); LANES];
    for p in p.iter() {
        for l in 0..LANES {
            sum[l] = sum[l] + p[l];
        }
    }
    let inv = sum.map(T::recip);
    for p in p.iter_mut() {
        for l in 0..LANES {
            p[l] = p[l] * inv[l];
        }
    }
}

/// Sequences of at most this many tokens keep their attention weights (`T²` lane
/// vectors a head) from the forward pass for the backward pass; longer ones find them
/// again, so that the weights kept grow no faster than the queries, keys and values.
const KEPT_WEIGHTS_TOKENS: usize = 64;

/// One head's attention weights into `p` (`T × T`): query `i`'s weight of key `j` at
/// `[i·T + j]`, zero for `j > i`, from its queries `q` and keys `k` in the lane layout
/// (`d` features, `T` apart).
#[inline(always)]
fn head_weights<T: Real>(q: &[Lanes<T>], k: &[Lanes<T>], s: Sizes, p: &mut [Lanes<T>]) {
    let (t, d) = (s.tokens, s.head);
    let scale = [s.scale::<T>(); LANES];
    for (i, p) in p.chunks_exact_mut(t).enumerate() {
        dots(&q[i..], t, k, t, d, &mut p[..=i]);
        for p in &mut p[..=i] {
            for l in 0..LANES {
                p[l] = p[l] * scale[l];
            }
        }
        softmax(&mut p[..=i]);
        p[i + 1..].fill([T::zero(); LANES]);
    }
}

impl Sizes {
    /// `1/√d`, the scores' scale.
    fn scale<T: Float>(&self) -> T {
        T::from(self.head).unwrap_or_else(T::one).sqrt().recip()
    }

    /// Lane vectors of a group's queries, keys and values (see [`CausalAttention`]'s
    /// lane layout).
    pub(crate) fn group_lanes(&self) -> usize {
        3 * self.width * self.tokens
    }

    pub(crate) fn tokens(&self) -> usize {
        self.tokens
    }

    pub(crate) fn width(&self) -> usize {
        self.width
    }
}

/// Columns `at .. at + d` of the rows `(sequences·T, stride)` into lane-interleaved
/// `dst` `[i·d + c][l]`, every value of `dst` written (zeros in the lanes past the
/// rows' sequences).
#[inline(always)]
fn gather<T: Float>(rows: &[T], s: Sizes, stride: usize, at: usize, dst: &mut [Lanes<T>]) {
    let (t, d) = (s.tokens, s.head);
    if rows.len() < LANES * t * stride {
        dst.fill([T::zero(); LANES]);
    }
    for (l, seq) in rows.chunks_exact(t * stride).enumerate() {
        for i in 0..t {
            let src = &seq[i * stride + at..][..d];
            for c in 0..d {
                dst[i * d + c][l] = src[c];
            }
        }
    }
}

/// Lane-interleaved values `src` `[i·d + c][l]` into columns `at .. at + d` of the
/// rows `(sequences·T, stride)`.
#[inline(always)]
fn scatter<T: Float>(src: &[Lanes<T>], s: Sizes, rows: &mut [T], stride: usize, at: usize) {
    let (t, d) = (s.tokens, s.head);
    for (l, seq) in rows.chunks_exact_mut(t * stride).enumerate() {
        for i in 0..t {
            let dst = &mut seq[i * stride + at..][..d];
            for c in 0..d {
                dst[c] = src[i * d + c][l];
            }
        }
    }
}

impl CausalAttention {
    pub(crate) fn sizes(&self, rows: usize, cols: usize) -> Result<Sizes> {
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

    /// Groups of [`LANES`] sequences (the last one partly filled).
    pub(crate) fn groups(&self) -> usize {
        self.batch.div_ceil(LANES)
    }

    /// Lane vectors of one group's kept attention weights: `heads × T × T`, none past
    /// [`KEPT_WEIGHTS_TOKENS`].
    fn weights_lanes(&self, s: Sizes) -> usize {
        if s.tokens <= KEPT_WEIGHTS_TOKENS {
            self.heads * s.tokens * s.tokens
        } else {
            0
        }
    }

    /// Each group's part of `weights`: empty slices where none are kept.
    fn per_group<'a, W>(&self, weights: &'a mut [W], len: usize) -> Vec<&'a mut [W]> {
        match len {
            0 => (0..self.groups()).map(|_| <&mut [W]>::default()).collect(),
            _ => weights.chunks_mut(len).collect(),
        }
    }

    /// The rows `qkv` `(batch·T, 3·width)` in the lane layout.
    fn lanes_of_rows<T: Real>(&self, qkv: &[T], s: Sizes) -> Vec<Lanes<T>> {
        let (t, cols) = (s.tokens, 3 * s.width);
        let mut x = vec![[T::zero(); LANES]; self.groups() * s.group_lanes()];
        for (seq, rows) in qkv.chunks_exact(t * cols).enumerate() {
            let (g, l) = (seq / LANES, seq % LANES);
            let x = &mut x[g * s.group_lanes()..][..s.group_lanes()];
            for (i, row) in rows.chunks_exact(cols).enumerate() {
                for (f, &v) in row.iter().enumerate() {
                    x[f * t + i][l] = v;
                }
            }
        }
        x
    }

    /// [`lanes_of_rows`](Self::lanes_of_rows) undone: rows `(batch·T, 3·width)`.
    fn rows_of_lanes<T: Real>(&self, x: &[Lanes<T>], s: Sizes) -> Vec<T> {
        let (t, cols) = (s.tokens, 3 * s.width);
        let mut qkv = vec![T::zero(); self.batch * t * cols];
        for (seq, rows) in qkv.chunks_exact_mut(t * cols).enumerate() {
            let (g, l) = (seq / LANES, seq % LANES);
            let x = &x[g * s.group_lanes()..][..s.group_lanes()];
            for (i, row) in rows.chunks_exact_mut(cols).enumerate() {
                for (f, v) in row.iter_mut().enumerate() {
                    *v = x[f * t + i][l];
                }
            }
        }
        qkv
    }

    /// The heads' outputs `(batch·T, width)` from the queries, keys and values `x` in
    /// the lane layout, and each group's attention weights for
    /// [`backward`](Self::backward).
    pub(crate) fn forward<T: Real>(&self, x: &[Lanes<T>], s: Sizes) -> (Vec<T>, Vec<Lanes<T>>) {
        let rows = self.batch * s.tokens;
        // SAFETY: each group scatters every head's `d` columns of each of its
        // sequences' rows, which make up its chunk of `out`.
        #[allow(unsafe_code)]
        let mut out = unsafe { unwritten(rows * s.width) };
        let (wl, gl) = (self.weights_lanes(s), s.group_lanes());
        // SAFETY: `group` writes every weight of its heads it keeps, zeros above the
        // diagonal.
        #[allow(unsafe_code)]
        let mut weights = unsafe { unwritten(self.groups() * wl) };
        let mut kept = self.per_group(&mut weights, wl);
        let out_len = LANES * s.tokens * s.width;
        let run = |out: &mut [T], p: &mut [Lanes<T>], x: &[Lanes<T>]| {
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.group_avx2(x, out, p, s) };
            }
            self.group(x, out, p, s);
        };
        if planned() > 1 && rows >= PARALLEL_ROWS {
            out.par_chunks_mut(out_len)
                .zip(kept.par_iter_mut())
                .zip(x.par_chunks(gl))
                .for_each(|((out, p), x)| run(out, p, x));
        } else {
            out.chunks_mut(out_len)
                .zip(kept.iter_mut())
                .zip(x.chunks(gl))
                .for_each(|((out, p), x)| run(out, p, x));
        }
        drop(kept);
        (out, weights)
    }

    /// The outputs `out` `(sequences·T, width)` of a group of up to [`LANES`]
    /// sequences from their queries, keys and values `x`, the weights into `p`.
    #[inline(always)]
    fn group<T: Real>(&self, x: &[Lanes<T>], out: &mut [T], kept: &mut [Lanes<T>], s: Sizes) {
        let (t, d, w) = (s.tokens, s.head, s.width);
        // SAFETY: `weighted_sum` writes each query's outputs whole; `head_weights`
        // writes every weight of a head before they are read.
        #[allow(unsafe_code)]
        let (mut o, mut scratch) = unsafe { (unwritten(t * d), unwritten(t * t)) };
        for h in 0..self.heads {
            let p = match kept.get_mut(h * t * t..(h + 1) * t * t) {
                Some(p) => p,
                None => &mut scratch,
            };
            let (q, k, v) = (
                &x[h * d * t..],
                &x[(w + h * d) * t..],
                &x[(2 * w + h * d) * t..],
            );
            head_weights(q, k, s, p);
            for (i, p) in p.chunks_exact(t).enumerate() {
                let o = &mut o[i * d..][..d];
                weighted_sum(p, 1, i + 1, v, 1, t, d, |c, s| o[c] = s);
            }
            scatter(&o, s, out, w, h * d);
        }
    }

    /// [`group`](Self::group) compiled for AVX2 and FMA and chosen at run time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn group_avx2<T: Real>(&self, x: &[Lanes<T>], out: &mut [T], kept: &mut [Lanes<T>], s: Sizes) {
        self.group(x, out, kept, s)
    }

    /// `∂x` in the lane layout from the output gradient `g` `(batch·T, width)`, the
    /// queries, keys and values `x` and the weights [`forward`](Self::forward) gave.
    pub(crate) fn backward<T: Real>(
        &self,
        x: &[Lanes<T>],
        weights: &[Lanes<T>],
        g: &[T],
        s: Sizes,
    ) -> Vec<Lanes<T>> {
        let rows = self.batch * s.tokens;
        // SAFETY: each group writes the gradient of every query, key and value of its
        // heads, which make up its chunk of `dx`.
        #[allow(unsafe_code)]
        let mut dx = unsafe { unwritten(x.len()) };
        let (gl, wl, g_len) = (
            s.group_lanes(),
            self.weights_lanes(s),
            LANES * s.tokens * s.width,
        );
        let run = |dx: &mut [Lanes<T>], x: &[Lanes<T>], p: &[Lanes<T>], g: &[T]| {
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.group_backward_avx2(x, p, g, dx, s) };
            }
            self.group_backward(x, p, g, dx, s);
        };
        let kept: Vec<&[Lanes<T>]> = match wl {
            0 => vec![&[]; self.groups()],
            _ => weights.chunks(wl).collect(),
        };
        if planned() > 1 && rows >= PARALLEL_ROWS {
            dx.par_chunks_mut(gl)
                .zip(x.par_chunks(gl))
                .zip(kept.par_iter())
                .zip(g.par_chunks(g_len))
                .for_each(|(((dx, x), p), g)| run(dx, x, p, g));
        } else {
            dx.chunks_mut(gl)
                .zip(x.chunks(gl))
                .zip(kept.iter())
                .zip(g.chunks(g_len))
                .for_each(|(((dx, x), p), g)| run(dx, x, p, g));
        }
        dx
    }

    /// [`group_backward`](Self::group_backward) compiled for AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn group_backward_avx2<T: Real>(
        &self,
        x: &[Lanes<T>],
        p: &[Lanes<T>],
        g: &[T],
        dx: &mut [Lanes<T>],
        s: Sizes,
    ) {
        self.group_backward(x, p, g, dx, s)
    }

    /// `∂x` of a group of up to [`LANES`] sequences from their queries, keys and values
    /// `x`, weights `p` and output gradient `g` `(sequences·T, width)`.
    #[inline(always)]
    fn group_backward<T: Real>(
        &self,
        x: &[Lanes<T>],
        p: &[Lanes<T>],
        g: &[T],
        dx: &mut [Lanes<T>],
        s: Sizes,
    ) {
        let (t, d, w) = (s.tokens, s.head, s.width);
        let scale = [s.scale::<T>(); LANES];
        let scaled = |mut v: Lanes<T>| {
            for l in 0..LANES {
                v[l] = v[l] * scale[l];
            }
            v
        };
        // SAFETY: `gather` writes every value of `gh`; `head_weights` every weight of
        // `scratch` before it is read; the loop over `i` writes row `i` of `ds` up to `i`
        // and `dp` up to `i` before they are read (the sums over `i ≥ j` read only
        // those).
        #[allow(unsafe_code)]
        let [mut gh, mut dp, mut ds, mut scratch] =
            unsafe { [t * d, t, t * t, t * t].map(|n| unwritten(n)) };
        for h in 0..self.heads {
            let (qa, ka, va) = (h * d * t, (w + h * d) * t, (2 * w + h * d) * t);
            let (q, k, v) = (&x[qa..], &x[ka..], &x[va..]);
            // The weights as the forward pass kept them, or found again.
            let p = match p.get(h * t * t..(h + 1) * t * t) {
                Some(p) => p,
                None => {
                    head_weights(q, k, s, &mut scratch);
                    &scratch
                }
            };
            gather(g, s, w, h * d, &mut gh);
            // Row by row, queries: ∂p_ij = g_i · v_j, their mean under p_i, then
            // ∂s_ij = p_ij (∂p_ij − Σ_k p_ik ∂p_ik); with s_ij = q_i·k_j / √d,
            // ∂q_i = Σ_j ∂s_ij k_j / √d.
            for i in 0..t {
                let (p, ds) = (&p[i * t..][..=i], &mut ds[i * t..][..=i]);
                dots(&gh[i * d..], 1, v, t, d, &mut dp[..=i]);
                let mut dot = [T::zero(); LANES];
                for (p, dp) in p.iter().zip(&dp) {
                    fma(&mut dot, p, dp);
                }
                for ((ds, p), dp) in ds.iter_mut().zip(p).zip(&dp) {
                    for l in 0..LANES {
                        ds[l] = p[l] * (dp[l] - dot[l]);
                    }
                }
                weighted_sum(ds, 1, i + 1, k, 1, t, d, |c, s| {
                    dx[qa + c * t + i] = scaled(s)
                });
            }
            // Column by column, keys and values: ∂v_j = Σ_{i≥j} p_ij g_i and
            // ∂k_j = Σ_{i≥j} ∂s_ij q_i / √d.
            for j in 0..t {
                let (at, n) = (j * t + j, t - j);
                weighted_sum(&p[at..], t, n, &gh[j * d..], d, 1, d, |c, s| {
                    dx[va + c * t + j] = s
                });
                weighted_sum(&ds[at..], t, n, &q[j..], 1, t, d, |c, s| {
                    dx[ka + c * t + j] = scaled(s)
                });
            }
        }
    }

    fn gradient<T: candle::WithDType + Real>(&self, qkv: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (rows, cols) = qkv.dims2()?;
        let s = self.sizes(rows, cols)?;
        // The op keeps nothing between its passes: the weights are found again.
        let grad = on_host(qkv, |qkv: &[T]| {
            let x = self.lanes_of_rows(qkv, s);
            let (_, weights) = self.forward(&x, s);
            on_host(g, |g| {
                Ok(self.rows_of_lanes(&self.backward(&x, &weights, g, s), s))
            })
        })?;
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
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.forward(&self.lanes_of_rows(slice(x, layout)?, s), s).0)
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.forward(&self.lanes_of_rows(slice(x, layout)?, s), s).0)
            }
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
