//! The general CPU kernel: networks of any depth and width, plain or residual, in f32
//! and f64. Each linear layer of a batch chunk is one matrix product (the `gemm` crate,
//! which picks AVX2/FMA or AVX-512 at run time and has a portable fallback); each row of
//! the product then gets its bias and activation while it is in cache. The forward pass
//! keeps a plain network's hidden activations (a residual one's streams and inner
//! pre-activations) as its trace; the backward pass reads them (a residual network
//! activates its own again), and accumulates the parameter gradients of a group of
//! chunks in one partial sum; partial sums add up in group order, so the result depends only on
//! the batch, the network and the thread count planned when the op was built.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{Arch, Net};
use crate::{unwritten, Activation};

/// Elements of activation buffers a chunk aims for (rows × widest layer), so that a
/// chunk's activations stay in cache.
const CHUNK_ELEMS: usize = 1 << 16;
/// Fewest rows per chunk, below which a product's weight packing dominates.
const MIN_ROWS: usize = 16;
/// Most rows per chunk.
const MAX_ROWS: usize = 256;
/// Most gradient elements held in partial sums at once, over every group.
const PARTIAL_BUDGET: usize = 1 << 23;

/// A float the network kernels run on.
pub(crate) trait Elem: crate::Real + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}

/// Rows per chunk for a batch on `threads` threads: cache-sized, but small enough
/// that every thread gets two chunks when the batch allows (a single thread takes the
/// batch whole where the cache allows).
pub(super) fn chunk_rows(batch: usize, widest: usize, threads: usize) -> usize {
    let cache = (CHUNK_ELEMS / widest.max(1)).clamp(MIN_ROWS, MAX_ROWS);
    let share = if threads > 1 {
        batch.div_ceil(2 * threads)
    } else {
        batch
    };
    cache.min(share.next_multiple_of(8).max(8))
}

/// Widths up to which a layer's products run as plain loops (vectorised over the other
/// width) rather than through `gemm`, whose set-up costs more than such thin products.
const THIN: usize = 4;

/// One linear layer over its packed parameters `p = [W | b]` `(n, k + 1)`, with the
/// bias gathered and, for a thin input, `Wᵀ` laid out row by row.
struct Layer<'a, T> {
    k: usize,
    n: usize,
    p: &'a [T],
    bias: Vec<T>,
    /// `Wᵀ` `(k, n)` when `k ≤ THIN`.
    wt: Vec<T>,
}

impl<'a, T: Elem> Layer<'a, T> {
    fn new(k: usize, n: usize, p: &'a [T]) -> Self {
        let bias = (0..n).map(|j| p[j * (k + 1) + k]).collect();
        let wt = if k <= THIN {
            (0..k)
                .flat_map(|i| (0..n).map(move |j| p[j * (k + 1) + i]))
                .collect()
        } else {
            Vec::new()
        };
        Self { k, n, p, bias, wt }
    }

    /// Row `j` of `W` (`k` values).
    fn w_row(&self, j: usize) -> &[T] {
        &self.p[j * (self.k + 1)..j * (self.k + 1) + self.k]
    }

    /// `out (rows × n) = h (rows × k) · Wᵀ + b`.
    #[inline(always)]
    fn forward(&self, h: &[T], out: &mut [T]) {
        self.forward_rows(h, out, |_| {});
    }

    /// `y = act(h · Wᵀ + b)`, each row activated in place while it is still in cache.
    #[inline(always)]
    fn forward_act(&self, h: &[T], y: &mut [T], act: &Act<T>) {
        self.forward_rows(h, y, |row| act.apply_in_place(row));
    }

    /// `out = h · Wᵀ + b`, handing each finished row to `then` in order. Each row is
    /// written once with its bias (no separate broadcast of `b` first): thin products
    /// start from it, and a `gemm` product overwrites `out` and gets the bias added
    /// row by row just before `then`.
    #[inline(always)]
    fn forward_rows(&self, h: &[T], out: &mut [T], mut then: impl FnMut(&mut [T])) {
        let (k, n) = (self.k, self.n);
        if k == 0 {
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(&self.bias);
                then(row);
            }
        } else if k <= THIN {
            for (o, h) in out.chunks_exact_mut(n).zip(h.chunks_exact(k)) {
                let mut w = self.wt.chunks_exact(n);
                if let Some(w0) = w.next() {
                    o.iter_mut()
                        .zip(&self.bias)
                        .zip(w0)
                        .for_each(|((o, &b), &w)| *o = b + h[0] * w);
                }
                for (w, &hi) in w.zip(&h[1..]) {
                    axpy(o, hi, w);
                }
                then(o);
            }
        } else if n <= THIN {
            for (o, h) in out.chunks_exact_mut(n).zip(h.chunks_exact(k)) {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = self.bias[j] + dot(h, self.w_row(j));
                }
                then(o);
            }
        } else {
            let rows = h.len() / k;
            // SAFETY: `out` holds rows × n, `h` rows × k and `p` n × (k + 1) elements;
            // the strides address exactly those (rhs(i, j) = W[j, i] = p[j (k + 1) + i]),
            // and `out` does not alias the inputs; it is overwritten (read_dst = false).
            #[allow(unsafe_code)]
            unsafe {
                gemm(
                    rows,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    h.as_ptr(),
                    1,
                    k as isize,
                    self.p.as_ptr(),
                    (k + 1) as isize,
                    1,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for row in out.chunks_exact_mut(n) {
                row.iter_mut()
                    .zip(&self.bias)
                    .for_each(|(o, &b)| *o = *o + b);
                then(row);
            }
        }
    }

    /// `gp += [dzᵀ · h | Σ_rows dz]`: the gradient of `[W | b]` from the output gradient
    /// `dz (rows × n)` and the input `h (rows × k)`.
    #[inline(always)]
    fn weights(&self, dz: &[T], h: &[T], gp: &mut [T]) {
        let (k, n) = (self.k, self.n);
        let mut gb = vec![T::zero(); n];
        for row in dz.chunks_exact(n) {
            axpy(&mut gb, T::one(), row);
        }
        for (j, g) in gb.into_iter().enumerate() {
            gp[j * (k + 1) + k] = gp[j * (k + 1) + k] + g;
        }
        if k == 0 {
            return;
        }
        let rows = dz.len() / n;
        if n <= THIN {
            for (dz, h) in dz.chunks_exact(n).zip(h.chunks_exact(k)) {
                for (j, &d) in dz.iter().enumerate() {
                    axpy(&mut gp[j * (k + 1)..j * (k + 1) + k], d, h);
                }
            }
        } else if k <= THIN {
            // Σ_r h[r, i] dz[r, :] as rows of a (k, n) sum, then into place.
            let mut acc = vec![T::zero(); k * n];
            for (dz, h) in dz.chunks_exact(n).zip(h.chunks_exact(k)) {
                for (a, &hi) in acc.chunks_exact_mut(n).zip(h) {
                    axpy(a, hi, dz);
                }
            }
            for (i, a) in acc.chunks_exact(n).enumerate() {
                for (j, &v) in a.iter().enumerate() {
                    gp[j * (k + 1) + i] = gp[j * (k + 1) + i] + v;
                }
            }
        } else {
            // SAFETY: `gp` holds n × (k + 1), `dz` rows × n and `h` rows × k elements;
            // lhs(j, r) = dz[r n + j], rhs(r, i) = h[r k + i], dst(j, i) = gp[j (k + 1) + i]
            // stay inside them, and `gp` does not alias the inputs.
            #[allow(unsafe_code)]
            unsafe {
                gemm(
                    n,
                    k,
                    rows,
                    gp.as_mut_ptr(),
                    1,
                    (k + 1) as isize,
                    true,
                    dz.as_ptr(),
                    n as isize,
                    1,
                    h.as_ptr(),
                    1,
                    k as isize,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    }

    /// `g (rows × k) = dz (rows × n) · W`.
    #[inline(always)]
    fn input(&self, dz: &[T], g: &mut [T]) {
        let (k, n) = (self.k, self.n);
        if k == 0 {
            return;
        }
        let rows = dz.len() / n;
        if n <= THIN {
            for (g, dz) in g.chunks_exact_mut(k).zip(dz.chunks_exact(n)) {
                g.fill(T::zero());
                for (j, &d) in dz.iter().enumerate() {
                    axpy(g, d, self.w_row(j));
                }
            }
        } else if k <= THIN {
            for (g, dz) in g.chunks_exact_mut(k).zip(dz.chunks_exact(n)) {
                for (g, w) in g.iter_mut().zip(self.wt.chunks_exact(n)) {
                    *g = dot(dz, w);
                }
            }
        } else {
            // SAFETY: `g` holds rows × k, `dz` rows × n and `p` n × (k + 1) elements;
            // rhs(j, i) = W[j, i] = p[j (k + 1) + i]; `g` does not alias the inputs and
            // is overwritten (read_dst = false).
            #[allow(unsafe_code)]
            unsafe {
                gemm(
                    rows,
                    k,
                    n,
                    g.as_mut_ptr(),
                    1,
                    k as isize,
                    false,
                    dz.as_ptr(),
                    1,
                    n as isize,
                    self.p.as_ptr(),
                    1,
                    (k + 1) as isize,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    }
}

/// `y += a · x`.
#[inline(always)]
fn axpy<T: Elem>(y: &mut [T], a: T, x: &[T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y = *y + a * x);
}

/// `Σ a_i b_i`, in eight lanes so that it vectorises.
#[inline(always)]
fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] = lanes[l] + a[l] * b[l];
        }
    }
    let mut sum = ra.iter().zip(rb).fold(T::zero(), |s, (&a, &b)| s + a * b);
    for l in lanes {
        sum = sum + l;
    }
    sum
}

/// The activation and its derivative (from the pre-activation `z` and the value `y`).
#[derive(Clone, Copy)]
struct Act<T> {
    a: Activation,
    slope: T,
}

impl<T: Elem> Act<T> {
    fn new(a: Activation) -> Self {
        Self {
            a,
            slope: T::from(Activation::LEAKY_SLOPE).unwrap_or_else(T::zero),
        }
    }

    /// `act(z)` as a new buffer (written once, never zeroed first).
    #[inline(always)]
    fn applied(&self, z: &[T]) -> Vec<T> {
        let mut y = Vec::with_capacity(z.len());
        self.extend(&mut y, z);
        y
    }

    /// Appends `act(z)` to `y`.
    #[inline(always)]
    fn extend(&self, y: &mut Vec<T>, z: &[T]) {
        match self.a {
            Activation::Tanh => y.extend(z.iter().map(|z| z.tanh())),
            Activation::LeakyRelu => {
                let s = self.slope;
                y.extend(z.iter().map(|&z| z.max(z * s)))
            }
            _ => y.extend(z.iter().map(|&z| z.max(T::zero()))),
        }
    }

    /// `act(z)` in place.
    #[inline(always)]
    fn apply_in_place(&self, z: &mut [T]) {
        match self.a {
            Activation::Tanh => z.iter_mut().for_each(|z| *z = z.tanh()),
            Activation::LeakyRelu => {
                let s = self.slope;
                z.iter_mut().for_each(|z| *z = z.max(*z * s))
            }
            _ => z.iter_mut().for_each(|z| *z = z.max(T::zero())),
        }
    }

    #[inline(always)]
    fn apply(&self, z: &[T], y: &mut [T]) {
        match self.a {
            Activation::Tanh => y.iter_mut().zip(z).for_each(|(y, z)| *y = z.tanh()),
            Activation::LeakyRelu => {
                let s = self.slope;
                y.iter_mut().zip(z).for_each(|(y, &z)| *y = z.max(z * s))
            }
            _ => y
                .iter_mut()
                .zip(z)
                .for_each(|(y, &z)| *y = z.max(T::zero())),
        }
    }

    /// `g ⊙ act'(z)` in place, with `y = act(z)`.
    #[inline(always)]
    fn backward(&self, g: &mut [T], z: &[T], y: &[T]) {
        match self.a {
            Activation::Tanh => g
                .iter_mut()
                .zip(y)
                .for_each(|(g, &y)| *g = *g * (T::one() - y * y)),
            Activation::LeakyRelu => {
                let s = self.slope;
                g.iter_mut()
                    .zip(z)
                    .for_each(|(g, &z)| *g = if z > T::zero() { *g } else { *g * s })
            }
            _ => g
                .iter_mut()
                .zip(z)
                .for_each(|(g, &z)| *g = if z > T::zero() { *g } else { T::zero() }),
        }
    }

    /// `g ⊙ act'(z)` in place from `y = act(z)` alone: each activation here has `y > 0`
    /// exactly where `z > 0`, and tanh's derivative is `1 − y²`.
    #[inline(always)]
    fn backward_from_output(&self, g: &mut [T], y: &[T]) {
        match self.a {
            Activation::Tanh => self.backward(g, &[], y),
            _ => self.backward(g, y, y),
        }
    }
}

/// A network ready to run: its layers with their bias and thin-input weights laid out.
struct Prepared<'a, T> {
    arch: &'a Arch,
    act: Act<T>,
    layers: Vec<Layer<'a, T>>,
    offsets: Vec<usize>,
}

impl<'a, T: Elem> Prepared<'a, T> {
    fn new(net: &'a Net<'a, T>) -> Self {
        Self {
            arch: net.arch,
            act: Act::new(net.activation),
            layers: net
                .layers()
                .into_iter()
                .map(|(k, n, p)| Layer::new(k, n, p))
                .collect(),
            offsets: net.offsets(),
        }
    }

    /// Runs `x (rows × in)` forward into `out (rows × out)` and `trace`
    /// (`rows × trace_width`, layer by layer: see [`Arch::trace_width`]).
    #[inline(always)]
    fn run(&self, x: &[T], out: &mut [T], trace: &mut [T]) {
        let act = self.act;
        let layers = &self.layers;
        let rows = x.len() / self.arch.input().max(1);
        match *self.arch {
            Arch::Plain { .. } => {
                // Each hidden layer's activation goes into the trace, and is the next
                // layer's input from there.
                let (mut input, mut rest) = (x, trace);
                for (l, layer) in layers.iter().enumerate() {
                    if l + 1 == layers.len() {
                        layer.forward(input, out);
                        break;
                    }
                    let (y, tail) = rest.split_at_mut(rows * layer.n);
                    layer.forward_act(input, y, &act);
                    (input, rest) = (y, tail);
                }
            }
            Arch::Residual { hidden, .. } => {
                let size = rows * hidden;
                let (blocks, last) = trace.split_at_mut(trace.len() - size);
                layers[0].forward(x, last);
                let mut y = vec![T::zero(); size];
                let mut v = vec![T::zero(); size];
                let mut w = vec![T::zero(); size];
                for (pair, block) in layers[1..layers.len() - 1]
                    .chunks_exact(2)
                    .zip(blocks.chunks_exact_mut(2 * size))
                {
                    // The stream so far is in `last`; keep it as this block's input.
                    let (h, u) = block.split_at_mut(size);
                    h.copy_from_slice(last);
                    act.apply(h, &mut y);
                    pair[0].forward(&y, u);
                    act.apply(u, &mut v);
                    pair[1].forward(&v, &mut w);
                    last.iter_mut().zip(&w).for_each(|(s, &w)| *s = *s + w);
                }
                layers[layers.len() - 1].forward(last, out);
            }
        }
    }

    /// For one chunk whose [`run`](Self::run) left `trace`: writes `∂x` into `gx` and
    /// adds the parameter gradients into `gp`.
    #[inline(always)]
    fn backward_chunk(&self, x: &[T], trace: &[T], g_out: &[T], gx: &mut [T], gp: &mut [T]) {
        let act = self.act;
        let layers = &self.layers;
        let span = |l: usize| self.offsets[l]..self.offsets[l + 1];
        let rows = g_out.len() / self.arch.output().max(1);
        let activated = |z: &[T]| act.applied(z);
        match *self.arch {
            Arch::Plain { .. } => {
                // Each hidden layer's activation, from the trace.
                let mut ys: Vec<&[T]> = Vec::new();
                let mut rest = trace;
                for layer in &layers[..layers.len() - 1] {
                    let (block, tail) = rest.split_at(rows * layer.n);
                    ys.push(block);
                    rest = tail;
                }
                // The output's gradient, then each hidden layer's in turn.
                let mut dz = std::borrow::Cow::Borrowed(g_out);
                for l in (0..layers.len()).rev() {
                    if l == 0 {
                        layers[l].weights(&dz, x, &mut gp[span(l)]);
                        layers[l].input(&dz, gx);
                    } else {
                        let y = ys[l - 1];
                        layers[l].weights(&dz, y, &mut gp[span(l)]);
                        // SAFETY: `input` writes every element of `g` (a product
                        // that overwrites, or each row set before it is added to).
                        #[allow(unsafe_code)]
                        let mut g = unsafe { unwritten(rows * layers[l].k) };
                        layers[l].input(&dz, &mut g);
                        act.backward_from_output(&mut g, y);
                        dz = g.into();
                    }
                }
            }
            Arch::Residual { hidden, .. } => {
                let size = rows * hidden;
                let (blocks, stream) = trace.split_at(trace.len() - size);
                let last = layers.len() - 1;
                layers[last].weights(g_out, stream, &mut gp[span(last)]);
                let mut gh = vec![T::zero(); size];
                layers[last].input(g_out, &mut gh);
                let mut gu = vec![T::zero(); size];
                let mut ga = vec![T::zero(); size];
                for (b, block) in blocks.chunks_exact(2 * size).enumerate().rev() {
                    let (l0, l1) = (1 + 2 * b, 2 + 2 * b);
                    let (h, u) = block.split_at(size);
                    let (y, v) = (activated(h), activated(u));
                    // w = L1(v): its gradient is the stream's.
                    layers[l1].weights(&gh, &v, &mut gp[span(l1)]);
                    layers[l1].input(&gh, &mut gu);
                    act.backward(&mut gu, u, &v);
                    layers[l0].weights(&gu, &y, &mut gp[span(l0)]);
                    layers[l0].input(&gu, &mut ga);
                    act.backward(&mut ga, h, &y);
                    gh.iter_mut().zip(&ga).for_each(|(g, &a)| *g = *g + a);
                }
                layers[0].weights(&gh, x, &mut gp[span(0)]);
                layers[0].input(&gh, gx);
            }
        }
    }
}

/// The per-chunk passes compiled a second time for AVX2 and chosen at run time, so that
/// binaries stay portable: the element-wise work around the products (bias, activations,
/// thin layers, bias gradients) then runs twice as wide as on the x86-64 baseline (eight
/// f32 lanes instead of four). The products themselves are `gemm`'s, which dispatches on
/// its own.
impl<T: Elem> Prepared<'_, T> {
    fn run_chunk(&self, x: &[T], out: &mut [T], trace: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { self.run_avx2(x, out, trace) };
        }
        self.run(x, out, trace)
    }

    fn backward_of_chunk(&self, x: &[T], trace: &[T], g_out: &[T], gx: &mut [T], gp: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2, checked just above.
            #[allow(unsafe_code)]
            return unsafe { self.backward_avx2(x, trace, g_out, gx, gp) };
        }
        self.backward_chunk(x, trace, g_out, gx, gp)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn run_avx2(&self, x: &[T], out: &mut [T], trace: &mut [T]) {
        self.run(x, out, trace)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn backward_avx2(&self, x: &[T], trace: &[T], g_out: &[T], gx: &mut [T], gp: &mut [T]) {
        self.backward_chunk(x, trace, g_out, gx, gp)
    }
}

/// The network's outputs `(batch, out)` for inputs `x` `(batch, in)`, in chunks of
/// `rows`, and, with `keep`, the trace the backward pass reads (`batch × trace_width`,
/// chunk by chunk; empty without it, the trace then dropped chunk by chunk).
pub(super) fn forward<T: Elem>(net: &Net<T>, x: &[T], rows: usize, keep: bool) -> (Vec<T>, Vec<T>) {
    let batch = x.len() / net.arch.input().max(1);
    // SAFETY: `forward_into` hands every chunk of `out` and of `trace` to `run`, whose
    // last layer writes the chunk's outputs and whose hidden layers write the trace
    // (`Arch::trace_width` is the sum of what they write).
    #[allow(unsafe_code)]
    let mut out = unsafe { unwritten(batch * net.arch.output()) };
    let kept = if keep {
        batch * net.arch.trace_width()
    } else {
        0
    };
    // SAFETY: as `out`'s, just above.
    #[allow(unsafe_code)]
    let mut trace = unsafe { unwritten(kept) };
    forward_into(net, x, rows, &mut out, &mut trace);
    (out, trace)
}

/// [`forward`] into `out` `(batch, out)` and `trace` (`batch × trace_width`, or empty
/// to drop it).
pub(super) fn forward_into<T: Elem>(
    net: &Net<T>,
    x: &[T],
    rows: usize,
    out: &mut [T],
    trace: &mut [T],
) {
    let (input, output) = (net.arch.input(), net.arch.output());
    let width = net.arch.trace_width();
    let net = Prepared::new(net);
    // A network without hidden layers has no trace to keep.
    if trace.is_empty() {
        out.par_chunks_mut(rows * output)
            .zip(x.par_chunks(rows * input))
            .for_each_init(Vec::new, |trace, (out, x)| {
                // One scratch trace per task, not per chunk.
                trace.resize(out.len() / output.max(1) * width, T::zero());
                net.run_chunk(x, out, trace);
            });
    } else {
        out.par_chunks_mut(rows * output)
            .zip(x.par_chunks(rows * input))
            .zip(trace.par_chunks_mut(rows * width))
            .for_each(|((out, x), trace)| net.run_chunk(x, out, trace));
    }
}

/// `(∂x, ∂p)` for inputs `x` `(batch, in)` and output gradient `g_out` `(batch, out)`,
/// in the chunks of `rows` that [`forward`] used, planned for `threads` threads;
/// `trace` is what it kept (recomputed here when empty).
pub(super) fn backward<T: Elem>(
    net: &Net<T>,
    x: &[T],
    trace: &[T],
    g_out: &[T],
    rows: usize,
    threads: usize,
) -> (Vec<T>, Vec<T>) {
    let (input, output) = (net.arch.input(), net.arch.output());
    let width = net.arch.trace_width();
    let batch = x.len() / input.max(1);
    let n_params = net.params.len();
    let chunks = batch.div_ceil(rows).max(1);
    let groups = chunks
        .min(2 * threads)
        .min((PARTIAL_BUDGET / n_params.max(1)).max(1));
    let per_group = chunks.div_ceil(groups) * rows;
    let net = Prepared::new(net);
    // SAFETY: every chunk of `gx` goes to `backward_of_chunk`, whose first layer's
    // `input` writes all of it.
    #[allow(unsafe_code)]
    let mut gx = unsafe { unwritten(batch * input) };
    let partial: Vec<Vec<T>> = gx
        .par_chunks_mut(per_group * input)
        .zip(x.par_chunks(per_group * input))
        .zip(g_out.par_chunks(per_group * output))
        .enumerate()
        .map(|(group, ((gx, x), g))| {
            let mut gp = vec![T::zero(); n_params];
            let parts = gx
                .chunks_mut(rows * input)
                .zip(x.chunks(rows * input))
                .zip(g.chunks(rows * output))
                .enumerate();
            for (c, ((gx, x), g)) in parts {
                let n = g.len() / output.max(1);
                let at = (group * per_group + c * rows) * width;
                if width == 0 {
                    // A network without hidden layers has no trace to recompute.
                    net.backward_of_chunk(x, &[], g, gx, &mut gp);
                } else if trace.is_empty() {
                    let mut t = vec![T::zero(); n * width];
                    net.run_chunk(x, &mut vec![T::zero(); g.len()], &mut t);
                    net.backward_of_chunk(x, &t, g, gx, &mut gp);
                } else {
                    net.backward_of_chunk(x, &trace[at..at + n * width], g, gx, &mut gp);
                }
            }
            gp
        })
        .collect();
    let mut gp = vec![T::zero(); n_params];
    for p in partial {
        gp.iter_mut().zip(p).for_each(|(s, v)| *s = *s + v);
    }
    (gx, gp)
}
