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

use crate::{on_host, on_host3, slice, threads::planned, unwritten, Real};

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
            if crate::mlp::has_avx2() {
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
            if crate::mlp::has_avx2() {
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

/// Keys scored at once by [`dots`] (written out there four times): their
/// [`LANES`]-wide sums stay in registers while the query streams past, so that the
/// additions form independent chains instead of one chain per key as long as the head
/// is wide.
const KEY_BLOCK: usize = 4;

/// `out[j] = Σ_c a[c] ⊙ rows[j·d + c]` for `j < out.len()`, `d = a.len()`, the rows
/// taken [`KEY_BLOCK`] at a time (`rows` holds whole blocks: see [`Group`]).
#[inline(always)]
fn dots<T: Float>(a: &[Lanes<T>], rows: &[Lanes<T>], out: &mut [Lanes<T>]) {
    let d = a.len();
    for (j0, out) in (0..out.len())
        .step_by(KEY_BLOCK)
        .zip(out.chunks_mut(KEY_BLOCK))
    {
        let block = &rows[j0 * d..][..KEY_BLOCK * d];
        let (r0, rest) = block.split_at(d);
        let (r1, rest) = rest.split_at(d);
        let (r2, r3) = rest.split_at(d);
        let mut s = [[T::zero(); LANES]; KEY_BLOCK];
        // Zipped, not indexed: a bounds check in the loop would keep the sums in memory.
        for ((((a, x0), x1), x2), x3) in a.iter().zip(r0).zip(r1).zip(r2).zip(r3) {
            fma(&mut s[0], a, x0);
            fma(&mut s[1], a, x1);
            fma(&mut s[2], a, x2);
            fma(&mut s[3], a, x3);
        }
        match <&mut [Lanes<T>; KEY_BLOCK]>::try_from(&mut *out) {
            Ok(out) => *out = s,
            Err(_) => out.copy_from_slice(&s[..out.len()]),
        }
    }
}

/// Columns summed at once by [`weighted_sum`]: their [`LANES`]-wide sums stay in
/// registers while the weights and rows stream past, instead of each column being
/// loaded, added to and stored again for every row.
const COLUMN_BLOCK: usize = 4;

/// `out[c] = Σ_{j<n} w[j·stride] ⊙ rows[j·d + c]` for `c < d = out.len()`: a weighted
/// sum of `n` rows of `d` lane vectors, the weights `stride` apart.
#[inline(always)]
fn weighted_sum<T: Float>(
    w: &[Lanes<T>],
    stride: usize,
    n: usize,
    rows: &[Lanes<T>],
    out: &mut [Lanes<T>],
) {
    let d = out.len();
    for (c, out) in (0..d)
        .step_by(COLUMN_BLOCK)
        .zip(out.chunks_mut(COLUMN_BLOCK))
    {
        if let Ok(out) = <&mut [Lanes<T>; COLUMN_BLOCK]>::try_from(&mut *out) {
            *out = column_sums(w, stride, n, &rows[c..], d);
        } else {
            for (b, out) in out.iter_mut().enumerate() {
                [*out] = column_sums(w, stride, n, &rows[c + b..], d);
            }
        }
    }
}

/// `Σ_{j<n} w[j·stride] ⊙ rows[j·d + b]` for `b < B`.
#[inline(always)]
fn column_sums<T: Float, const B: usize>(
    w: &[Lanes<T>],
    stride: usize,
    n: usize,
    rows: &[Lanes<T>],
    d: usize,
) -> [Lanes<T>; B] {
    let mut acc = [[T::zero(); LANES]; B];
    // Iterated, not indexed, as in `dots`.
    for (w, r) in w.iter().step_by(stride).zip(rows.chunks(d)).take(n) {
        if let Some(r) = r.first_chunk::<B>() {
            for (a, r) in acc.iter_mut().zip(r) {
                fma(a, w, r);
            }
        }
    }
    acc
}

/// One head of up to [`LANES`] sequences, lane-interleaved: value `c` of token `i`
/// of sequence `l` at `[i·d + c][l]`; queries scaled by `1/√d`. Lanes past the
/// group's sequences stay zero (uniform weights over zero values: harmless, unread),
/// as do the tokens that round the keys and values up to whole [`KEY_BLOCK`]s.
/// The forward pass gathers it from the rows of queries, keys and values and keeps
/// it, laid out as [`Sizes::head_block`] says, for the backward pass, with the
/// attention weights it found: query `i`'s weight of key `j` at `[i·T + j]`, zero for
/// `j > i`.
struct Head<'a, T> {
    q: &'a [Lanes<T>],
    k: &'a [Lanes<T>],
    v: &'a [Lanes<T>],
}

impl Sizes {
    /// Key and value tokens of a [`Head`], rounded up to whole [`KEY_BLOCK`]s.
    fn padded(&self) -> usize {
        self.tokens.next_multiple_of(KEY_BLOCK)
    }

    /// Lane vectors of one [`Head`]'s queries, keys and values.
    fn head_values(&self) -> usize {
        (self.tokens + 2 * self.padded()) * self.head
    }

    /// Lane vectors of one kept head: its [`Head`], then its attention weights.
    fn head_block(&self) -> usize {
        self.head_values() + self.tokens * self.tokens
    }

    /// `1/√d`, the queries' scale.
    fn scale<T: Float>(&self) -> T {
        T::from(self.head).unwrap_or_else(T::one).sqrt().recip()
    }
}

impl<'a, T: Real> Head<'a, T> {
    /// The head kept in `block` ([`Sizes::head_values`] long).
    fn new(block: &'a [Lanes<T>], s: Sizes) -> Self {
        let (q, kv) = block.split_at(s.tokens * s.head);
        let (k, v) = kv.split_at(s.padded() * s.head);
        Self { q, k, v }
    }

    /// Head `h` of a group's rows `qkv` `(sequences·T, 3·width)` gathered into `block`.
    #[inline(always)]
    fn gather(block: &'a mut [Lanes<T>], qkv: &[T], h: usize, s: Sizes) -> Self {
        let (w, d) = (s.width, s.head);
        let (q, kv) = block.split_at_mut(s.tokens * d);
        let (k, v) = kv.split_at_mut(s.padded() * d);
        gather(qkv, s, 3 * w, h * d, s.scale(), q);
        gather(qkv, s, 3 * w, w + h * d, T::one(), k);
        gather(qkv, s, 3 * w, 2 * w + h * d, T::one(), v);
        Self { q, k, v }
    }

    /// Query `i`'s attention weights over keys `0..=i`, into `p[..=i]`.
    #[inline(always)]
    fn weights(&self, i: usize, d: usize, p: &mut [Lanes<T>]) {
        let p = &mut p[..=i];
        dots(&self.q[i * d..][..d], self.k, p);
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
}

/// Columns `at .. at + d` of the rows `(sequences·T, stride)`, times `scale`, into
/// lane-interleaved `dst` `[i·d + c][l]`, every value of `dst` written.
#[inline(always)]
fn gather<T: Float>(
    rows: &[T],
    s: Sizes,
    stride: usize,
    at: usize,
    scale: T,
    dst: &mut [Lanes<T>],
) {
    let (t, d) = (s.tokens, s.head);
    // Lanes past the rows' sequences, and values past their tokens, are zeros.
    if rows.len() < LANES * t * stride {
        dst.fill([T::zero(); LANES]);
    } else {
        dst[t * d..].fill([T::zero(); LANES]);
    }
    for (l, seq) in rows.chunks_exact(t * stride).enumerate() {
        for i in 0..t {
            let src = &seq[i * stride + at..][..d];
            for c in 0..d {
                dst[i * d + c][l] = src[c] * scale;
            }
        }
    }
}

/// Lane-interleaved values `src` `[i·d + c][l]` into columns `at .. at + d` of the
/// rows `(sequences·T, stride)`, times `scale`.
#[inline(always)]
fn scatter<T: Float>(
    src: &[Lanes<T>],
    s: Sizes,
    rows: &mut [T],
    stride: usize,
    at: usize,
    scale: T,
) {
    let (t, d) = (s.tokens, s.head);
    for (l, seq) in rows.chunks_exact_mut(t * stride).enumerate() {
        for i in 0..t {
            let dst = &mut seq[i * stride + at..][..d];
            for c in 0..d {
                dst[c] = src[i * d + c][l] * scale;
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

    /// The heads' outputs `(rows, width)` from the rows `qkv` `(rows, 3·width)`, and the
    /// heads as the backward pass reads them ([`backward`](Self::backward)).
    pub(crate) fn forward<T: Real>(&self, qkv: &[T], s: Sizes) -> (Vec<T>, Vec<Lanes<T>>) {
        let rows = self.batch * s.tokens;
        // SAFETY: each group scatters every head's `d` columns of each of its
        // sequences' rows, which make up its chunk of `out`.
        #[allow(unsafe_code)]
        let mut out = unsafe { unwritten(rows * s.width) };
        let kept_len = self.heads * s.head_block();
        // SAFETY: `Head::gather` writes the whole of each head's values (zeros where no
        // row gives a value) and `group` all of its weights, and the groups' heads cover
        // `kept`.
        #[allow(unsafe_code)]
        let mut kept = unsafe { unwritten(self.batch.div_ceil(LANES) * kept_len) };
        let (len, out_len) = (LANES * s.tokens * 3 * s.width, LANES * s.tokens * s.width);
        let run = |((out, kept), g): ((&mut [T], &mut [Lanes<T>]), usize)| {
            let qkv = &qkv[g * len..(g * len + len).min(qkv.len())];
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.group_avx2(qkv, out, kept, s) };
            }
            self.group(qkv, out, kept, s);
        };
        if planned() > 1 && rows >= PARALLEL_ROWS {
            out.par_chunks_mut(out_len)
                .zip(kept.par_chunks_mut(kept_len))
                .zip(0..self.batch.div_ceil(LANES))
                .for_each(run);
        } else {
            out.chunks_mut(out_len)
                .zip(kept.chunks_mut(kept_len))
                .zip(0..)
                .for_each(run);
        }
        (out, kept)
    }

    /// The outputs `out` `(sequences·T, width)` of up to [`LANES`] sequences from
    /// their rows `qkv` `(sequences·T, 3·width)`, their heads gathered into `kept`.
    #[inline(always)]
    fn group<T: Real>(&self, qkv: &[T], out: &mut [T], kept: &mut [Lanes<T>], s: Sizes) {
        let d = s.head;
        let t = s.tokens;
        // SAFETY: `weighted_sum` writes each query's outputs whole.
        #[allow(unsafe_code)]
        let mut o = unsafe { unwritten(t * d) };
        for (h, block) in kept.chunks_exact_mut(s.head_block()).enumerate() {
            let (values, weights) = block.split_at_mut(s.head_values());
            let head = Head::gather(values, qkv, h, s);
            for (i, p) in weights.chunks_exact_mut(t).enumerate() {
                head.weights(i, d, p);
                p[i + 1..].fill([T::zero(); LANES]);
                weighted_sum(p, 1, i + 1, head.v, &mut o[i * d..][..d]);
            }
            scatter(&o, s, out, s.width, h * d, T::one());
        }
    }

    /// [`group`](Self::group) compiled for AVX2 and chosen at run time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn group_avx2<T: Real>(&self, qkv: &[T], out: &mut [T], kept: &mut [Lanes<T>], s: Sizes) {
        self.group(qkv, out, kept, s)
    }

    /// `∂qkv` `(rows, 3·width)` from the output gradient `g` `(rows, width)` and the
    /// heads that [`forward`](Self::forward) kept.
    pub(crate) fn backward<T: Real>(&self, kept: &[Lanes<T>], g: &[T], s: Sizes) -> Vec<T> {
        let (stride, t) = (3 * s.width, s.tokens);
        let rows = self.batch * t;
        // SAFETY: each group scatters every head's query, key and value columns of each
        // of its sequences' rows, which make up its chunk of `grad`.
        #[allow(unsafe_code)]
        let mut grad = unsafe { unwritten(rows * stride) };
        let (len, g_len, kept_len) = (
            LANES * t * stride,
            LANES * t * s.width,
            self.heads * s.head_block(),
        );
        for_chunks(&mut grad, len, rows, |c, grad| {
            let g = &g[c * g_len..][..grad.len() / 3];
            let kept = &kept[c * kept_len..][..kept_len];
            #[cfg(target_arch = "x86_64")]
            if crate::mlp::has_avx2() {
                // SAFETY: the CPU has AVX2, checked just above.
                #[allow(unsafe_code)]
                return unsafe { self.group_backward_avx2(kept, g, grad, s) };
            }
            self.group_backward(kept, g, grad, s);
        });
        grad
    }

    /// [`group_backward`](Self::group_backward) compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn group_backward_avx2<T: Real>(&self, kept: &[Lanes<T>], g: &[T], grad: &mut [T], s: Sizes) {
        self.group_backward(kept, g, grad, s)
    }

    /// `∂qkv` `(sequences·T, 3·width)` of up to [`LANES`] sequences from their kept
    /// heads and output gradient `g` `(sequences·T, width)`.
    #[inline(always)]
    fn group_backward<T: Real>(&self, kept: &[Lanes<T>], g: &[T], grad: &mut [T], s: Sizes) {
        let (stride, d, t) = (3 * s.width, s.head, s.tokens);
        // SAFETY: `gather` writes every value of `gh`; the loop over `i` writes row `i`
        // of `ds` up to `i` and `dp` up to `i` before they are read (the sums over
        // `i ≥ j` read only those); `weighted_sum` writes each row of `dq`, `dk` and `dv`
        // whole.
        #[allow(unsafe_code)]
        let [mut gh, mut dq, mut dk, mut dv, mut dp, mut ds] =
            unsafe { [t * d, t * d, t * d, t * d, t, t * t].map(|n| unwritten(n)) };
        for (h, block) in kept.chunks_exact(s.head_block()).enumerate() {
            let (values, p) = block.split_at(s.head_values());
            let head = Head::new(values, s);
            gather(g, s, s.width, h * d, T::one(), &mut gh);
            // Row by row, queries: the weights `p_i` as the forward pass kept them, then
            // ∂p_ij = g_i · v_j and their mean under p_i, then
            // ∂s_ij = p_ij (∂p_ij − Σ_k p_ik ∂p_ik). With s_ij = (q_i / √d)·k_j,
            // ∂q_i = Σ_j ∂s_ij k_j / √d (the scale applied once, at the end).
            for i in 0..t {
                let (p, ds) = (&p[i * t..][..t], &mut ds[i * t..][..=i]);
                let gi = &gh[i * d..][..d];
                dots(gi, head.v, &mut dp[..=i]);
                let mut dot = [T::zero(); LANES];
                for (p, dpj) in p.iter().zip(&dp[..=i]) {
                    fma(&mut dot, p, dpj);
                }
                for ((ds, p), dp) in ds.iter_mut().zip(p).zip(&dp) {
                    for l in 0..LANES {
                        ds[l] = p[l] * (dp[l] - dot[l]);
                    }
                }
                weighted_sum(ds, 1, i + 1, head.k, &mut dq[i * d..][..d]);
            }
            // Column by column, keys and values: ∂v_j = Σ_{i≥j} p_ij g_i and
            // ∂k_j = Σ_{i≥j} ∂s_ij q_i / √d (the queries kept scaled).
            for j in 0..t {
                let (w, n) = (j * t + j, t - j);
                weighted_sum(&p[w..], t, n, &gh[j * d..], &mut dv[j * d..][..d]);
                weighted_sum(&ds[w..], t, n, &head.q[j * d..], &mut dk[j * d..][..d]);
            }
            scatter(&dq, s, grad, stride, h * d, s.scale());
            scatter(&dk, s, grad, stride, s.width + h * d, T::one());
            scatter(&dv, s, grad, stride, 2 * s.width + h * d, T::one());
        }
    }

    fn gradient<T: candle::WithDType + Real>(&self, qkv: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (rows, cols) = qkv.dims2()?;
        let s = self.sizes(rows, cols)?;
        // The op keeps nothing between its passes: the heads are gathered again.
        let grad = on_host(qkv, |qkv: &[T]| {
            let (_, kept) = self.forward(qkv, s);
            on_host(g, |g| Ok(self.backward(&kept, g, s)))
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
            CpuStorage::F32(x) => CpuStorage::F32(self.forward(slice(x, layout)?, s).0),
            CpuStorage::F64(x) => CpuStorage::F64(self.forward(slice(x, layout)?, s).0),
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
