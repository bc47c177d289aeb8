//! A whole pre-norm Transformer layer as one op with its own backward pass:
//!
//! `h₁ = h + proj(attention(qkv(norm₁(h))))`, `out = h₁ + mlp(norm₂(h₁))`,
//!
//! from the layer norm, attention and network kernels. As separate ops the layer is a
//! dozen graph nodes, and candle's autograd starts each one's gradient as zeros and adds
//! into it; as one op it is one node, its intermediate values kept beside it for the
//! backward pass (recomputed if a second backward pass comes). The `qkv` product writes
//! the attention's lane layout itself, from `norm₁(h)`'s rows regrouped sixteen sequences
//! side by side, so that no head is gathered into it or its gradient scattered out.

use std::sync::{Mutex, PoisonError};

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::{
    mlp::{host_backward, host_forward, Arch, Elem},
    on_host3, slice,
    transformer::{CausalAttention, Lanes, LayerNorm, Sizes, LANES},
    unwritten, Activation,
};

/// A layer's sizes: sequences, heads, the embedding width and the MLP's hidden width,
/// its activation and the layer norms' `ε`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerShape {
    pub batch: usize,
    pub heads: usize,
    pub width: usize,
    pub hidden: usize,
    pub activation: Activation,
    pub eps: f64,
}

/// The parameters, in the order [`transformer_layer`] takes them packed: `norm₁`'s
/// weight and bias, `qkv`'s and `proj`'s `[W | b]`, `norm₂`'s weight and bias, the
/// MLP's two `[W | b]`.
const PARTS: usize = 7;

impl LayerShape {
    fn qkv(&self) -> Arch {
        Arch::Plain {
            widths: vec![self.width, 3 * self.width],
        }
    }

    fn proj(&self) -> Arch {
        Arch::Plain {
            widths: vec![self.width, self.width],
        }
    }

    fn mlp(&self) -> Arch {
        Arch::Plain {
            widths: vec![self.width, self.hidden, self.width],
        }
    }

    /// Where each of the [`PARTS`] starts in the packed parameters, and the end.
    fn offsets(&self) -> [usize; PARTS + 1] {
        let w = self.width;
        let sizes = [
            w,
            w,
            self.qkv().n_params(),
            self.proj().n_params(),
            w,
            w,
            self.mlp().n_params(),
        ];
        let mut at = [0; PARTS + 1];
        for (i, s) in sizes.into_iter().enumerate() {
            at[i + 1] = at[i] + s;
        }
        at
    }
}

/// The activation handed to the networks without hidden layers (`qkv`, `proj`), which
/// apply none.
const LINEAR: Activation = Activation::Relu;

/// The forward pass's values that the backward pass reads, in order: `norm₁(h)` in
/// groups of rows (see [`Pieces::grouped`]) and its rows' statistics, the queries,
/// keys and values in the attention's lane layout and its weights (both flattened), the
/// heads' outputs, `h₁`, `norm₂(h₁)` and its rows' statistics, and the MLP's trace.
type Trace<T> = [Vec<T>; 9];

/// Where a matrix's elements lie in its slice: `(i, j)` at `i·rows + j·cols`.
#[derive(Clone, Copy)]
struct Strides {
    rows: usize,
    cols: usize,
}

impl Strides {
    fn new(rows: usize, cols: usize) -> Self {
        Self { rows, cols }
    }

    /// The largest index a `m × n` matrix laid out so reaches.
    fn last(self, m: usize, n: usize) -> usize {
        (m - 1) * self.rows + (n - 1) * self.cols
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or added to `dst` with `add`, each matrix
/// where its strides put it in its slice, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn product<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    d: Strides,
    add: bool,
    lhs: &[T],
    l: Strides,
    rhs: &[T],
    r: Strides,
) {
    assert!(m > 0 && n > 0 && k > 0, "an empty product");
    assert!(d.last(m, n) < dst.len() && l.last(m, k) < lhs.len() && r.last(k, n) < rhs.len());
    // SAFETY: the asserts keep every element the strides address inside its slice, and
    // `dst`, borrowed mutably, aliases neither input; without `add` it is overwritten
    // (`read_dst` false).
    #[allow(unsafe_code)]
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            d.cols as isize,
            d.rows as isize,
            add,
            lhs.as_ptr(),
            l.cols as isize,
            l.rows as isize,
            rhs.as_ptr(),
            r.cols as isize,
            r.rows as isize,
            if add { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The layer's kernels over its packed parameters `p`.
struct Pieces<'a, T> {
    s: &'a LayerShape,
    p: &'a [T],
    at: [usize; PARTS + 1],
    norm: LayerNorm,
    attention: CausalAttention,
    threads: usize,
}

impl<'a, T: Elem> Pieces<'a, T> {
    fn new(s: &'a LayerShape, p: &'a [T], threads: usize) -> Self {
        Self {
            s,
            p,
            at: s.offsets(),
            norm: LayerNorm { eps: s.eps },
            attention: CausalAttention {
                batch: s.batch,
                heads: s.heads,
            },
            threads,
        }
    }

    /// Part `i` of the [`PARTS`].
    fn part(&self, i: usize) -> &'a [T] {
        &self.p[self.at[i]..self.at[i + 1]]
    }

    /// The attention's sizes for rows `h`.
    fn sizes(&self, h: &[T]) -> Result<crate::transformer::Sizes> {
        self.attention
            .sizes(h.len() / self.s.width, 3 * self.s.width)
    }

    /// The rows of each group of [`LANES`] sequences of `n` `(batch·T, width)` ordered
    /// token by token, the group's sequences side by side (zero rows past the batch):
    /// `16·T` rows a group.
    fn grouped(&self, n: &[T], z: Sizes) -> Vec<T> {
        let (t, w) = (z.tokens(), z.width());
        let len = self.attention.groups() * LANES * t * w;
        // SAFETY: every row is written: those of the batch's sequences just below, the
        // rest (a last group's lanes past the batch) filled with zeros first.
        #[allow(unsafe_code)]
        let mut rows: Vec<T> = unsafe { unwritten(len) };
        if !self.s.batch.is_multiple_of(LANES) {
            rows[len - LANES * t * w..].fill(T::zero());
        }
        for (seq, n) in n.chunks_exact(t * w).enumerate() {
            let group = &mut rows[(seq / LANES) * LANES * t * w..][..LANES * t * w];
            for (i, row) in n.chunks_exact(w).enumerate() {
                group[(i * LANES + seq % LANES) * w..][..w].copy_from_slice(row);
            }
        }
        rows
    }

    /// [`grouped`](Self::grouped) undone: rows `(batch·T, width)`.
    fn ungrouped(&self, rows: &[T], z: Sizes) -> Vec<T> {
        let (t, w) = (z.tokens(), z.width());
        // SAFETY: each sequence's rows are copied whole just below.
        #[allow(unsafe_code)]
        let mut n: Vec<T> = unsafe { unwritten(self.s.batch * t * w) };
        for (seq, n) in n.chunks_exact_mut(t * w).enumerate() {
            let group = &rows[(seq / LANES) * LANES * t * w..][..LANES * t * w];
            for (i, row) in n.chunks_exact_mut(w).enumerate() {
                row.copy_from_slice(&group[(i * LANES + seq % LANES) * w..][..w]);
            }
        }
        n
    }

    /// `qkv(n)` in the attention's lane layout from the grouped rows `n1g`: for each
    /// group one product `(16·T, width) · Wᵀ` written feature by feature (the
    /// destination's strides), which is the lane layout, then the bias.
    fn qkv_lanes(&self, n1g: &[T], z: Sizes) -> Vec<Lanes<T>> {
        let (w, r) = (z.width(), LANES * z.tokens());
        let p = self.part(2);
        // SAFETY: each group's product writes its whole block (`read_dst` false).
        #[allow(unsafe_code)]
        let mut x: Vec<Lanes<T>> = unsafe { unwritten(self.attention.groups() * z.group_lanes()) };
        let group = |x: &mut [Lanes<T>], n: &[T]| {
            let x = x.as_flattened_mut();
            // `x` (r × 3w) written feature by feature: (i, f) at f·r + i.
            let (to_x, by_row, w_t) = (
                Strides::new(1, r),
                Strides::new(w, 1),
                Strides::new(1, w + 1),
            );
            product(r, 3 * w, w, x, to_x, false, n, by_row, p, w_t);
            for (f, feature) in x.chunks_exact_mut(r).enumerate() {
                let b = p[f * (w + 1) + w];
                feature.iter_mut().for_each(|v| *v = *v + b);
            }
        };
        // The groups on the planned threads, as the layer's other kernels.
        let (gl, nl) = (z.group_lanes(), r * w);
        if self.threads > 1 {
            x.par_chunks_mut(gl)
                .zip(n1g.par_chunks(nl))
                .for_each(|(x, n)| group(x, n));
        } else {
            x.chunks_mut(gl)
                .zip(n1g.chunks(nl))
                .for_each(|(x, n)| group(x, n));
        }
        x
    }

    /// [`qkv_lanes`](Self::qkv_lanes)' backward pass: `(∂n1g, ∂[W | b])` from `∂x` in
    /// the lane layout.
    fn qkv_lanes_backward(&self, n1g: &[T], dx: &[Lanes<T>], z: Sizes) -> (Vec<T>, Vec<T>) {
        let (w, r) = (z.width(), LANES * z.tokens());
        let p = self.part(2);
        // SAFETY: each group's product writes its rows of `dn` whole.
        #[allow(unsafe_code)]
        let mut dn: Vec<T> = unsafe { unwritten(n1g.len()) };
        let mut dp = vec![T::zero(); p.len()];
        let groups = dn.chunks_exact_mut(r * w).zip(n1g.chunks_exact(r * w));
        for ((dn, n), dx) in groups.zip(dx.chunks_exact(z.group_lanes())) {
            let dx = dx.as_flattened();
            let (by_row, dx_rows, w_rows) = (
                Strides::new(w, 1),
                Strides::new(1, r),
                Strides::new(w + 1, 1),
            );
            product(r, w, 3 * w, dn, by_row, false, dx, dx_rows, p, w_rows);
            let (dp_rows, dx_t, n_rows) = (
                Strides::new(w + 1, 1),
                Strides::new(r, 1),
                Strides::new(w, 1),
            );
            product(3 * w, w, r, &mut dp, dp_rows, true, dx, dx_t, n, n_rows);
            // ∂b: each feature's sum over the group, sixteen lanes at a time.
            for (f, feature) in dx.chunks_exact(r).enumerate() {
                let mut lanes = [T::zero(); LANES];
                for v in feature.as_chunks::<LANES>().0 {
                    for l in 0..LANES {
                        lanes[l] = lanes[l] + v[l];
                    }
                }
                let sum = lanes.into_iter().fold(T::zero(), |a, v| a + v);
                dp[f * (w + 1) + w] = dp[f * (w + 1) + w] + sum;
            }
        }
        (dn, dp)
    }

    /// The layer on rows `h`: its output and what the backward pass reads.
    fn forward(&self, h: &[T]) -> Result<(Vec<T>, Trace<T>)> {
        let (s, t) = (self.s, self.threads);
        let sizes = self.sizes(h)?;
        let (n1, stats1) = self.norm.forward(h, self.part(0), self.part(1));
        let n1g = self.grouped(&n1, sizes);
        let x = self.qkv_lanes(&n1g, sizes);
        let (a, weights) = self.attention.forward(&x, sizes);
        let (mut h1, _) = host_forward(&s.proj(), LINEAR, self.part(3), &a, t);
        h1.iter_mut().zip(h).for_each(|(y, &x)| *y = *y + x);
        let (n2, stats2) = self.norm.forward(&h1, self.part(4), self.part(5));
        let (mut out, y) = host_forward(&s.mlp(), s.activation, self.part(6), &n2, t);
        out.iter_mut().zip(&h1).for_each(|(y, &x)| *y = *y + x);
        let (x, weights) = (x.into_flattened(), weights.into_flattened());
        Ok((out, [n1g, stats1, x, weights, a, h1, n2, stats2, y]))
    }

    /// `(∂h, ∂p)` from the output's gradient `g`, given the forward pass's `trace`.
    fn backward(&self, h: &[T], trace: &Trace<T>, g: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let (s, t) = (self.s, self.threads);
        let [n1g, stats1, x, weights, a, h1, n2, stats2, y] = trace;
        // out = h₁ + mlp(n₂): the stream's gradient passes through, plus the MLP's.
        let (g_n2, g_mlp) = host_backward(&s.mlp(), s.activation, self.part(6), n2, y, g, t);
        let [mut g_h1, g_w2, g_b2] = self.norm.backward(h1, self.part(4), &g_n2, stats2);
        g_h1.iter_mut().zip(g).for_each(|(y, &x)| *y = *y + x);
        // h₁ = h + proj(a).
        let (g_a, g_proj) = host_backward(&s.proj(), LINEAR, self.part(3), a, &[], &g_h1, t);
        let sizes = self.sizes(h)?;
        let (x, weights) = (x.as_chunks::<LANES>().0, weights.as_chunks::<LANES>().0);
        let g_x = self.attention.backward(x, weights, &g_a, sizes);
        let (g_n1g, g_qkv_p) = self.qkv_lanes_backward(n1g, &g_x, sizes);
        let g_n1 = self.ungrouped(&g_n1g, sizes);
        let [mut g_h, g_w1, g_b1] = self.norm.backward(h, self.part(0), &g_n1, stats1);
        g_h.iter_mut().zip(&g_h1).for_each(|(y, &x)| *y = *y + x);
        let g_p = [g_w1, g_b1, g_qkv_p, g_proj, g_w2, g_b2, g_mlp].concat();
        Ok((g_h, g_p))
    }
}

struct TransformerLayer {
    shape: LayerShape,
    /// The threads the kernels plan their chunks for, fixed when the op is built, so
    /// that the result does not depend on the thread that runs the backward pass.
    threads: usize,
    /// Whether a backward pass may follow, so that the forward pass keeps its trace.
    keep: bool,
    /// What the forward pass kept, taken by the first backward pass.
    kept: Mutex<Option<Kept>>,
}

enum Kept {
    F32(Trace<f32>),
    F64(Trace<f64>),
}

/// A dtype the layer runs in, with its slot in [`Kept`].
trait Float: Elem + candle::WithDType {
    fn keep(trace: Trace<Self>) -> Kept;
    fn kept(kept: Kept) -> Option<Trace<Self>>;
}

impl Float for f32 {
    fn keep(trace: Trace<f32>) -> Kept {
        Kept::F32(trace)
    }

    fn kept(kept: Kept) -> Option<Trace<f32>> {
        match kept {
            Kept::F32(t) => Some(t),
            Kept::F64(_) => None,
        }
    }
}

impl Float for f64 {
    fn keep(trace: Trace<f64>) -> Kept {
        Kept::F64(trace)
    }

    fn kept(kept: Kept) -> Option<Trace<f64>> {
        match kept {
            Kept::F64(t) => Some(t),
            Kept::F32(_) => None,
        }
    }
}

impl TransformerLayer {
    fn check(&self, h: &Layout, p: &Layout) -> Result<()> {
        let s = &self.shape;
        let (rows, width) = h.shape().dims2()?;
        let params = s.offsets()[PARTS];
        if width != s.width
            || !rows.is_multiple_of(s.batch.max(1))
            || p.shape().elem_count() != params
        {
            candle::bail!(
                "transformer layer: rows {:?} and {} parameters for width {}, {} sequences ({params} parameters)",
                h.shape(),
                p.shape().elem_count(),
                s.width,
                s.batch
            );
        }
        Ok(())
    }

    fn run<T: Float>(&self, h: &[T], p: &[T]) -> Result<Vec<T>> {
        let (out, trace) = Pieces::new(&self.shape, p, self.threads).forward(h)?;
        if self.keep {
            *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(T::keep(trace));
        }
        Ok(out)
    }

    fn gradients<T: Float>(&self, h: &Tensor, p: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .and_then(T::kept);
        let (gh, gp) = on_host3(h, p, g, |h: &[T], p, g| {
            let pieces = Pieces::new(&self.shape, p, self.threads);
            let trace = match kept {
                Some(t) => t,
                None => pieces.forward(h)?.1,
            };
            pieces.backward(h, &trace, g)
        })?;
        let dev = h.device();
        Ok((
            Tensor::from_vec(gh, h.shape(), dev)?,
            Tensor::from_vec(gp, p.shape(), dev)?,
        ))
    }
}

impl CustomOp2 for TransformerLayer {
    fn name(&self) -> &'static str {
        "transformer-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(p)) => {
                CpuStorage::F32(self.run(slice(h, l1)?, slice(p, l2)?)?)
            }
            (CpuStorage::F64(h), CpuStorage::F64(p)) => {
                CpuStorage::F64(self.run(slice(h, l1)?, slice(p, l2)?)?)
            }
            _ => candle::bail!("the fused transformer layer supports f32 and f64 of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gh, gp) = match h.dtype() {
            DType::F32 => self.gradients::<f32>(h, p, grad)?,
            DType::F64 => self.gradients::<f64>(h, p, grad)?,
            other => candle::bail!("the fused transformer layer has no backward for {other:?}"),
        };
        Ok((Some(gh), Some(gp)))
    }
}

/// A pre-norm Transformer layer over `shape.batch` sequences, one op forward and one
/// backward (CPU): `h` `(batch·T, width)` to `h₁ + mlp(norm₂(h₁))`, `h₁ = h +
/// proj(attention(qkv(norm₁(h))))`, attention causal and multi-head as
/// [`causal_attention`](crate::transformer::causal_attention) and the MLP plain with
/// one hidden layer. `params` is one vector of the layer's parameters packed in order:
/// `norm₁`'s weight and bias, `qkv`'s and `proj`'s [`pack_linear`](crate::pack_linear),
/// `norm₂`'s weight and bias, the MLP's two. The caller decides that the kernel
/// applies, through [`fused`](crate::fused) with
/// [`Op::TransformerLayer`](crate::Op::TransformerLayer).
pub fn transformer_layer(h: &Tensor, params: &Tensor, shape: LayerShape) -> Result<Tensor> {
    let op = TransformerLayer {
        shape,
        threads: crate::threads::planned(),
        keep: h.track_op() || params.track_op(),
        kept: Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&params.contiguous()?, op)
}
