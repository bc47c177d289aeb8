//! The general CPU kernel: networks of any depth and width, plain or residual, in f32
//! and f64. Each linear layer of a batch chunk is one matrix product (the `gemm` crate,
//! which picks AVX2/FMA or AVX-512 at run time and has a portable fallback) into a
//! buffer that already holds the bias, and the activation runs over the chunk's product
//! while it is in cache. The backward pass recomputes a chunk's activations, keeps them
//! in buffers of its own, and accumulates the parameter gradients of a group of chunks
//! in one partial sum; partial sums add up in group order, so the result depends only on
//! the batch, the network and the thread count.

use gemm::{gemm, Parallelism};
use num_traits::Float;
use rayon::prelude::*;

use super::{Arch, Net};
use crate::Activation;

/// Elements of activation buffers a chunk aims for (rows × widest layer), so that a
/// chunk's activations stay in cache.
const CHUNK_ELEMS: usize = 1 << 16;
/// Fewest rows per chunk, below which a product's weight packing dominates.
const MIN_ROWS: usize = 16;
/// Most rows per chunk.
const MAX_ROWS: usize = 256;
/// Most gradient elements held in partial sums at once, over every group.
const PARTIAL_BUDGET: usize = 1 << 23;

/// A float the kernels run on.
pub(super) trait Elem: Float + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}

/// Rows per chunk for a batch: cache-sized, but small enough that every thread gets
/// two chunks when the batch allows.
fn chunk_rows(batch: usize, widest: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let cache = (CHUNK_ELEMS / widest.max(1)).clamp(MIN_ROWS, MAX_ROWS);
    let spread = batch.div_ceil(2 * threads).next_multiple_of(8).max(8);
    cache.min(spread)
}

/// `out (rows × n) = h (rows × k) · Wᵀ + b`, with `p = [W | b]` `(n, k + 1)`.
fn linear<T: Elem>(h: &[T], p: &[T], k: usize, n: usize, out: &mut [T]) {
    let rows = h.len() / k.max(1);
    for row in out.chunks_exact_mut(n) {
        for (j, o) in row.iter_mut().enumerate() {
            *o = p[j * (k + 1) + k];
        }
    }
    if k == 0 || rows == 0 {
        return;
    }
    // SAFETY: `out` holds rows × n, `h` rows × k and `p` n × (k + 1) elements; the
    // strides below address exactly those (rhs(i, j) = W[j, i] = p[j (k + 1) + i]), and
    // `out` does not alias the inputs.
    #[allow(unsafe_code)]
    unsafe {
        gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            h.as_ptr(),
            1,
            k as isize,
            p.as_ptr(),
            (k + 1) as isize,
            1,
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `gp += [dzᵀ · h | Σ_rows dz]`: the gradient of `p = [W | b]` `(n, k + 1)` from the
/// output gradient `dz (rows × n)` and the input `h (rows × k)`.
fn linear_weights<T: Elem>(dz: &[T], h: &[T], k: usize, n: usize, gp: &mut [T]) {
    let rows = dz.len() / n;
    for r in 0..rows {
        for j in 0..n {
            gp[j * (k + 1) + k] = gp[j * (k + 1) + k] + dz[r * n + j];
        }
    }
    if k == 0 || rows == 0 {
        return;
    }
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

/// `g (rows × k) = dz (rows × n) · W`, with `p = [W | b]` `(n, k + 1)`.
fn linear_input<T: Elem>(dz: &[T], p: &[T], k: usize, n: usize, g: &mut [T]) {
    let rows = dz.len() / n;
    if k == 0 || rows == 0 {
        return;
    }
    // SAFETY: `g` holds rows × k, `dz` rows × n and `p` n × (k + 1) elements;
    // rhs(j, i) = W[j, i] = p[j (k + 1) + i]; `g` does not alias the inputs and is
    // overwritten (read_dst = false).
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
            p.as_ptr(),
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
}

/// One chunk's values through the network: for a plain network the pre-activations
/// `z[l]` and activations `y[l]` of each hidden layer; for a residual one the stream
/// before each block `z[b]`, its activation `y[b]`, and the block's inner
/// pre-activation `u[b]` and activation `v[b]`, then the final stream in `z`.
struct Trace<T> {
    z: Vec<Vec<T>>,
    y: Vec<Vec<T>>,
    u: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: Elem> Net<'_, T> {
    /// Runs `x (rows × in)` forward into `out (rows × out)`, recording what the
    /// backward pass needs when `trace` is given.
    fn run(&self, x: &[T], out: &mut [T], mut trace: Option<&mut Trace<T>>) {
        let act = Act::new(self.activation);
        let rows = x.len() / self.arch.input().max(1);
        let layers = self.layers();
        match *self.arch {
            Arch::Plain { .. } => {
                let mut h = x.to_vec();
                for (l, &(k, n, p)) in layers.iter().enumerate() {
                    if l + 1 == layers.len() {
                        linear(&h, p, k, n, out);
                        break;
                    }
                    let mut z = vec![T::zero(); rows * n];
                    linear(&h, p, k, n, &mut z);
                    let mut y = vec![T::zero(); rows * n];
                    act.apply(&z, &mut y);
                    if let Some(t) = trace.as_deref_mut() {
                        t.z.push(z);
                        t.y.push(y.clone());
                    }
                    h = y;
                }
            }
            Arch::Residual { hidden, .. } => {
                let mut h = vec![T::zero(); rows * hidden];
                let (k, n, p) = layers[0];
                linear(x, p, k, n, &mut h);
                for pair in layers[1..layers.len() - 1].chunks_exact(2) {
                    let mut y = vec![T::zero(); rows * hidden];
                    act.apply(&h, &mut y);
                    let mut u = vec![T::zero(); rows * hidden];
                    linear(&y, pair[0].2, hidden, hidden, &mut u);
                    let mut v = vec![T::zero(); rows * hidden];
                    act.apply(&u, &mut v);
                    let mut w = vec![T::zero(); rows * hidden];
                    linear(&v, pair[1].2, hidden, hidden, &mut w);
                    let next: Vec<T> = h.iter().zip(&w).map(|(&a, &b)| a + b).collect();
                    if let Some(t) = trace.as_deref_mut() {
                        t.z.push(std::mem::replace(&mut h, next));
                        t.y.push(y);
                        t.u.push(u);
                        t.v.push(v);
                    } else {
                        h = next;
                    }
                }
                let (k, n, p) = layers[layers.len() - 1];
                linear(&h, p, k, n, out);
                if let Some(t) = trace {
                    t.z.push(h);
                }
            }
        }
    }

    /// For one chunk: writes `∂x` into `gx` and adds the parameter gradients into `gp`.
    fn backward_chunk(&self, x: &[T], g_out: &[T], gx: &mut [T], gp: &mut [T]) {
        let act = Act::new(self.activation);
        let mut t = Trace {
            z: Vec::new(),
            y: Vec::new(),
            u: Vec::new(),
            v: Vec::new(),
        };
        let mut out = vec![T::zero(); g_out.len()];
        self.run(x, &mut out, Some(&mut t));
        let layers = self.layers();
        let offsets = self.offsets();
        let rows = g_out.len() / self.arch.output().max(1);
        let span = |l: usize| offsets[l]..offsets[l + 1];
        match *self.arch {
            Arch::Plain { .. } => {
                let mut dz = g_out.to_vec();
                for l in (0..layers.len()).rev() {
                    let (k, n, p) = layers[l];
                    let input = if l == 0 { x } else { &t.y[l - 1][..] };
                    let r = span(l);
                    linear_weights(&dz, input, k, n, &mut gp[r]);
                    if l == 0 {
                        linear_input(&dz, p, k, n, gx);
                    } else {
                        let mut g = vec![T::zero(); rows * k];
                        linear_input(&dz, p, k, n, &mut g);
                        act.backward(&mut g, &t.z[l - 1], &t.y[l - 1]);
                        dz = g;
                    }
                }
            }
            Arch::Residual { hidden, .. } => {
                let last = layers.len() - 1;
                let (k, n, p) = layers[last];
                let r = span(last);
                let stream = &t.z[t.z.len() - 1];
                linear_weights(g_out, stream, k, n, &mut gp[r]);
                let mut gh = vec![T::zero(); rows * hidden];
                linear_input(g_out, p, k, n, &mut gh);
                for b in (0..(last - 1) / 2).rev() {
                    let (l0, l1) = (1 + 2 * b, 2 + 2 * b);
                    // w = L1(v): its gradient is the stream's.
                    let r = span(l1);
                    linear_weights(&gh, &t.v[b], hidden, hidden, &mut gp[r]);
                    let mut gu = vec![T::zero(); rows * hidden];
                    linear_input(&gh, layers[l1].2, hidden, hidden, &mut gu);
                    act.backward(&mut gu, &t.u[b], &t.v[b]);
                    let r = span(l0);
                    linear_weights(&gu, &t.y[b], hidden, hidden, &mut gp[r]);
                    let mut ga = vec![T::zero(); rows * hidden];
                    linear_input(&gu, layers[l0].2, hidden, hidden, &mut ga);
                    act.backward(&mut ga, &t.z[b], &t.y[b]);
                    gh.iter_mut().zip(&ga).for_each(|(g, &a)| *g = *g + a);
                }
                let (k, n, p) = layers[0];
                let r = span(0);
                linear_weights(&gh, x, k, n, &mut gp[r]);
                linear_input(&gh, p, k, n, gx);
            }
        }
    }
}

/// The network's outputs `(batch, out)` for inputs `x` `(batch, in)`.
pub(super) fn forward<T: Elem>(net: &Net<T>, x: &[T]) -> Vec<T> {
    let (input, output) = (net.arch.input(), net.arch.output());
    let batch = x.len() / input.max(1);
    let rows = chunk_rows(batch, net.arch.widest());
    let mut out = vec![T::zero(); batch * output];
    out.par_chunks_mut(rows * output)
        .zip(x.par_chunks(rows * input))
        .for_each(|(out, x)| net.run(x, out, None));
    out
}

/// `(∂x, ∂p)` for inputs `x` `(batch, in)` and output gradient `g_out` `(batch, out)`.
pub(super) fn backward<T: Elem>(net: &Net<T>, x: &[T], g_out: &[T]) -> (Vec<T>, Vec<T>) {
    let (input, output) = (net.arch.input(), net.arch.output());
    let batch = x.len() / input.max(1);
    let rows = chunk_rows(batch, net.arch.widest());
    let n_params = net.params.len();
    let chunks = batch.div_ceil(rows).max(1);
    let threads = rayon::current_num_threads().max(1);
    let groups = chunks
        .min(2 * threads)
        .min((PARTIAL_BUDGET / n_params.max(1)).max(1));
    let per_group = chunks.div_ceil(groups) * rows;
    let mut gx = vec![T::zero(); batch * input];
    let partial: Vec<Vec<T>> = gx
        .par_chunks_mut(per_group * input)
        .zip(x.par_chunks(per_group * input))
        .zip(g_out.par_chunks(per_group * output))
        .map(|((gx, x), g)| {
            let mut gp = vec![T::zero(); n_params];
            let parts = gx
                .chunks_mut(rows * input)
                .zip(x.chunks(rows * input))
                .zip(g.chunks(rows * output));
            for ((gx, x), g) in parts {
                net.backward_chunk(x, g, gx, &mut gp);
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
