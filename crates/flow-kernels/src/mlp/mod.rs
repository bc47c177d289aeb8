//! The fused conditioner network: a whole MLP (plain or residual) as one op, forward
//! and backward.
//!
//! The reference path runs several candle ops per layer and materialises every
//! `(batch, width)` activation, forward and backward; at the shapes of coupling layers
//! that is mostly memory traffic and per-op overhead. These kernels compute each pass in
//! one go over batch chunks in parallel, keeping a chunk's activations in registers or
//! cache. Results equal the reference path up to the order of floating-point sums.
//!
//! Three CPU kernels: for one hidden layer with at most [`NARROW`] inputs and outputs
//! (the reference job's shape), `x86` (f32, piecewise-linear activations, x86-64 with
//! AVX-512, or AVX2 and FMA) keeps a block of hidden units in registers while samples
//! stream past,
//! and [`portable`] covers the other dtypes and activations; every other shape (1 to any
//! number of hidden layers, any widths, residual networks) takes [`deep`], one matrix
//! product per layer and chunk with the bias and activation fused around it. With the
//! `cuda` feature, `mlp.cu` holds the narrow one-hidden-layer passes for the GPU
//! (`cuda`), one thread per sample forward and one per hidden unit backward; networks
//! of every other shape take one cuBLAS product per layer and pass ([`product`]), with
//! the bias, activation and residual added by small kernels around it.
//!
//! Parameters travel packed and flattened into one tensor: `[W₁ | b₁]` `(n₁, k₁ + 1)`,
//! then `[W₂ | b₂]`, and so on in layer order, each built by
//! [`pack_linear`](crate::pack_linear).

use std::sync::{Mutex, PoisonError};

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::{on_host3, pack_linear, slice, Activation, CUDA_MAX_IO};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;
mod deep;
mod portable;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

/// Most inputs and outputs of a one-hidden-layer network for the narrow kernels
/// (`x86`, `portable`): they keep a sample's inputs and outputs in registers.
pub const NARROW: usize = 16;

/// Whether this CPU runs the kernels' AVX2 builds (`portable`, `deep`, the attention's,
/// which also use FMA); the answer is cached by std.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// How a network's linear layers connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arch {
    /// `Linear → act → … → Linear` through the widths `[in, h₁, …, out]`.
    Plain { widths: Vec<usize> },
    /// `Linear(in, h)`, then `blocks` blocks `h + L₁(act(L₀(act(h))))`, then
    /// `Linear(h, out)`.
    Residual {
        input: usize,
        hidden: usize,
        blocks: usize,
        output: usize,
    },
}

impl Arch {
    pub fn input(&self) -> usize {
        match self {
            Self::Plain { widths } => widths.first().copied().unwrap_or(0),
            Self::Residual { input, .. } => *input,
        }
    }

    pub fn output(&self) -> usize {
        match self {
            Self::Plain { widths } => widths.last().copied().unwrap_or(0),
            Self::Residual { output, .. } => *output,
        }
    }

    /// `(inputs, outputs)` of each linear layer, in order.
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        match self {
            Self::Plain { widths } => widths.windows(2).map(|w| (w[0], w[1])).collect(),
            Self::Residual {
                input,
                hidden,
                blocks,
                output,
            } => std::iter::once((*input, *hidden))
                .chain(std::iter::repeat_n((*hidden, *hidden), 2 * blocks))
                .chain(std::iter::once((*hidden, *output)))
                .collect(),
        }
    }

    fn widest(&self) -> usize {
        let shapes = self.linear_shapes();
        shapes.iter().map(|&(k, n)| k.max(n)).max().unwrap_or(1)
    }

    /// Values per row the general kernel keeps between its forward and backward
    /// passes: each hidden layer's activation of a plain network; the stream entering each
    /// block and the block's inner pre-activation, then the final stream, of a residual
    /// one.
    pub fn trace_width(&self) -> usize {
        match self {
            Self::Plain { widths } => widths[1..widths.len().saturating_sub(1)].iter().sum(),
            Self::Residual { hidden, blocks, .. } => (2 * blocks + 1) * hidden,
        }
    }

    /// Parameters of the packed layers, `Σ n (k + 1)`.
    pub fn n_params(&self) -> usize {
        self.linear_shapes().iter().map(|&(k, n)| n * (k + 1)).sum()
    }

    /// `(in, hidden, out)` of a plain one-hidden-layer network, the narrow kernels'
    /// shape (at most [`NARROW`] inputs and outputs).
    fn narrow(&self) -> Option<(usize, usize, usize)> {
        match self {
            Self::Plain { widths } => match widths[..] {
                [i, h, o] if i <= NARROW && o <= NARROW => Some((i, h, o)),
                _ => None,
            },
            Self::Residual { .. } => None,
        }
    }

    /// Whether the CUDA kernels take it: the narrow shape, with at most
    /// [`CUDA_MAX_IO`] inputs and outputs.
    pub fn on_cuda(&self) -> bool {
        self.narrow()
            .is_some_and(|(i, _, o)| i <= CUDA_MAX_IO && o <= CUDA_MAX_IO)
    }
}

/// A network over packed parameters, for the kernels.
struct Net<'a, T> {
    arch: &'a Arch,
    activation: Activation,
    params: &'a [T],
}

impl<'a, T> Net<'a, T> {
    /// Where each layer's `[W | b]` starts in `params`, and the end.
    fn offsets(&self) -> Vec<usize> {
        let mut at = vec![0];
        for (k, n) in self.arch.linear_shapes() {
            at.push(at[at.len() - 1] + n * (k + 1));
        }
        at
    }

    /// `(k, n, [W | b])` of each linear layer.
    fn layers(&self) -> Vec<(usize, usize, &'a [T])> {
        let at = self.offsets();
        self.arch
            .linear_shapes()
            .into_iter()
            .enumerate()
            .map(|(l, (k, n))| (k, n, &self.params[at[l]..at[l + 1]]))
            .collect()
    }
}

/// The network `arch` over `x` `(batch, in)`, with `layers` its `(weight, bias)` pairs
/// in order, as one op (and one op for its backward). The caller decides that a kernel
/// applies, through [`fused`](crate::fused) with [`Op::Mlp`](crate::Op::Mlp).
pub fn forward(
    x: &Tensor,
    layers: &[(&Tensor, &Tensor)],
    arch: &Arch,
    activation: Activation,
) -> Result<Tensor> {
    let mut out = forward_op(x, &[layers], arch, activation)?;
    Ok(out.remove(0))
}

/// Whether `copies` networks of shape `arch` on `x` run as one op ([`forward_many`]):
/// on the CPU, for the general kernel's shapes, when there are at least as many
/// networks as threads planned for. Each network then runs as a task of its own, so a
/// coupling's separate scale and shift networks cost one parallel section instead of
/// two (on a few cores, waking the pool's threads for every small product costs more
/// than they save). Planned for one thread (inside
/// [`on_this_thread`](crate::on_this_thread)), that is always one op; an idle thread
/// may still take one of its networks, which changes no result.
pub fn runs_many(x: &Tensor, arch: &Arch, copies: usize) -> bool {
    copies > 1
        && x.device().is_cpu()
        && arch.narrow().is_none()
        && copies >= crate::threads::planned()
}

/// Several networks of one shape `arch` over the same `x` `(batch, in)` as one op (and
/// one op for their backward), one output `(batch, out)` each. The caller decides that
/// they run together, through [`runs_many`], and (as for [`forward`]) that a kernel
/// applies.
pub fn forward_many(
    x: &Tensor,
    nets: &[Vec<(&Tensor, &Tensor)>],
    arch: &Arch,
    activation: Activation,
) -> Result<Vec<Tensor>> {
    let nets: Vec<&[(&Tensor, &Tensor)]> = nets.iter().map(Vec::as_slice).collect();
    forward_op(x, &nets, arch, activation)
}

/// One op for every network in `nets` (each its `(weight, bias)` pairs in order).
fn forward_op(
    x: &Tensor,
    nets: &[&[(&Tensor, &Tensor)]],
    arch: &Arch,
    activation: Activation,
) -> Result<Vec<Tensor>> {
    let packed = nets
        .iter()
        .flat_map(|layers| layers.iter())
        .map(|(w, b)| pack_linear(w, b))
        .collect::<Result<Vec<_>>>()?;
    let params = match &packed[..] {
        [one] => one.clone(),
        _ => Tensor::cat(&packed, 0)?,
    };
    let batch = x.dim(0)?;
    let copies = nets.len();
    // Where a backward pass may follow, the general kernel keeps what it needs from the
    // forward pass (in the op, beside its output), up to a bound: large batches
    // (evaluation, mostly) recompute it if a backward pass comes.
    let tracks = x.track_op()
        || nets
            .iter()
            .flat_map(|layers| layers.iter())
            .any(|(w, b)| w.track_op() || b.track_op());
    let keep = arch.narrow().is_none()
        && x.device().is_cpu()
        && tracks
        && copies * batch * arch.trace_width() <= TRACE_BUDGET;
    let threads = crate::threads::planned();
    let op = FusedMlp {
        arch: arch.clone(),
        activation,
        rows: deep::chunk_rows(batch, arch.widest(), threads),
        threads,
        keep,
        copies,
        trace: KeptTrace::default(),
    };
    let out = x.contiguous()?.apply_op2(&params, op)?;
    if copies == 1 {
        return Ok(vec![out]);
    }
    (0..copies)
        .map(|c| out.narrow(0, c * batch, batch))
        .collect()
}

/// Most values the general kernel keeps from a forward pass for the backward pass.
const TRACE_BUDGET: usize = 1 << 20;

/// Samples per parallel task of the narrow kernels.
const CHUNK: usize = 64;

/// Most block rows a CUDA grid holds: its y dimension's limit.
#[cfg(any(feature = "cuda", test))]
const CUDA_MAX_GRID_Y: usize = 65_535;

/// The fewest samples per block row of the narrow network's CUDA backward pass.
#[cfg(any(feature = "cuda", test))]
const CUDA_CHUNK: usize = 64;

/// Samples per block row of the narrow network's CUDA backward pass (one row of the
/// grid per chunk of samples): [`CUDA_CHUNK`], or more where a batch of `batch` would
/// need more rows than a grid holds.
#[cfg(any(feature = "cuda", test))]
fn cuda_backward_chunk(batch: usize) -> usize {
    CUDA_CHUNK.max(batch.div_ceil(CUDA_MAX_GRID_Y))
}

#[derive(Debug)]
struct FusedMlp {
    arch: Arch,
    activation: Activation,
    /// Rows per chunk of the general kernel, the same forward and backward.
    rows: usize,
    /// The threads the general kernel's backward pass plans its partial sums for,
    /// fixed when the op is built (so that the result does not depend on the thread
    /// that runs the backward pass).
    threads: usize,
    /// Keep the general kernel's trace for the backward pass.
    keep: bool,
    /// Networks of this shape, their parameters one after the other and their outputs
    /// `(copies, batch, out)` (their traces in the same order); more than one only on
    /// the CPU's general kernel, each network on a thread of its own.
    copies: usize,
    /// The trace a forward pass kept.
    trace: KeptTrace,
}

/// The trace a forward pass kept, held beside the op's output rather than in it (a
/// gradient for that part of the output would be materialised as zeros and copied at
/// every step). Taken by the first backward pass; a later one recomputes it.
#[derive(Default)]
struct KeptTrace(Mutex<Option<CpuStorage>>);

impl KeptTrace {
    fn put(&self, trace: CpuStorage) {
        // The slot is a plain value: a panic elsewhere leaves nothing half-written.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(trace);
    }

    fn take(&self) -> Option<CpuStorage> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl std::fmt::Debug for KeptTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeptTrace")
    }
}

/// Dimensions of one call of the narrow kernels.
#[derive(Debug, Clone, Copy)]
struct Dims {
    pub batch: usize,
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
}

/// Runs `chunk(x, out)` over batch chunks in parallel and returns the outputs
/// `(batch, out)`.
fn par_forward<T: Float + Send + Sync>(
    x: &[T],
    d: Dims,
    chunk: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); d.batch * d.output];
    out.par_chunks_mut(CHUNK * d.output)
        .zip(x.par_chunks(CHUNK * d.input))
        .for_each(|(out, x)| chunk(x, out));
    out
}

/// Runs `chunk(x, g_out, gx)` over batch chunks in parallel: each writes its input
/// gradients and returns its share of `(∂p1, ∂p2)`, summed here in chunk order (so the
/// result does not depend on scheduling).
fn par_backward<T: Float + Send + Sync>(
    x: &[T],
    g_out: &[T],
    d: Dims,
    chunk: impl Fn(&[T], &[T], &mut [T]) -> (Vec<T>, Vec<T>) + Sync,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut gx = vec![T::zero(); d.batch * d.input];
    let partial: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(CHUNK * d.input)
        .zip(x.par_chunks(CHUNK * d.input))
        .zip(g_out.par_chunks(CHUNK * d.output))
        .map(|((gx, x), g_out)| chunk(x, g_out, gx))
        .collect();
    let mut gp1 = vec![T::zero(); d.hidden * (d.input + 1)];
    let mut gp2 = vec![T::zero(); d.output * (d.hidden + 1)];
    for (p1, p2) in partial {
        gp1.iter_mut().zip(p1).for_each(|(s, v)| *s = *s + v);
        gp2.iter_mut().zip(p2).for_each(|(s, v)| *s = *s + v);
    }
    (gx, gp1, gp2)
}

pub(crate) use deep::Elem;

/// The network `arch` over `params` for ops that embed one, and the rows per chunk in
/// which the general kernel takes the inputs `x` on `threads` threads.
fn embedded<'a, T: Elem>(
    arch: &'a Arch,
    activation: Activation,
    params: &'a [T],
    x: &[T],
    threads: usize,
) -> (Net<'a, T>, usize) {
    let batch = x.len() / arch.input().max(1);
    let rows = deep::chunk_rows(batch, arch.widest(), threads);
    let net = Net {
        arch,
        activation,
        params,
    };
    (net, rows)
}

/// A network's forward pass on host values through the general kernel, for ops that
/// embed one: its outputs `(rows, out)` and the trace its backward pass reads (empty
/// without hidden layers), in chunks planned for `threads` threads.
pub(crate) fn host_forward<T: Elem>(
    arch: &Arch,
    activation: Activation,
    params: &[T],
    x: &[T],
    threads: usize,
) -> (Vec<T>, Vec<T>) {
    let (net, rows) = embedded(arch, activation, params, x, threads);
    deep::forward(&net, x, rows, true)
}

/// [`host_forward`]'s backward pass: `(∂x, ∂params)` from its `trace` and the
/// outputs' gradient `g`.
pub(crate) fn host_backward<T: Elem>(
    arch: &Arch,
    activation: Activation,
    params: &[T],
    x: &[T],
    trace: &[T],
    g: &[T],
    threads: usize,
) -> (Vec<T>, Vec<T>) {
    let (net, rows) = embedded(arch, activation, params, x, threads);
    deep::backward(&net, x, trace, g, rows, threads)
}

/// The narrow kernels for one dtype.
trait Kernel: candle::WithDType + deep::Elem {
    fn forward(a: Activation, x: &[Self], p1: &[Self], p2: &[Self], d: Dims) -> Vec<Self>;

    fn backward(
        a: Activation,
        x: &[Self],
        p1: &[Self],
        p2: &[Self],
        g_out: &[Self],
        d: Dims,
    ) -> (Vec<Self>, Vec<Self>, Vec<Self>);
}

impl Kernel for f32 {
    fn forward(a: Activation, x: &[f32], p1: &[f32], p2: &[f32], d: Dims) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::Weights::new(a, p1, p2, d) {
            return k.forward(x);
        }
        portable::forward(a, x, p1, p2, d)
    }

    fn backward(
        a: Activation,
        x: &[f32],
        p1: &[f32],
        p2: &[f32],
        g_out: &[f32],
        d: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::Weights::new(a, p1, p2, d) {
            return k.backward(x, g_out);
        }
        portable::backward(a, x, p1, p2, g_out, d)
    }
}

impl Kernel for f64 {
    fn forward(a: Activation, x: &[f64], p1: &[f64], p2: &[f64], d: Dims) -> Vec<f64> {
        portable::forward(a, x, p1, p2, d)
    }

    fn backward(
        a: Activation,
        x: &[f64],
        p1: &[f64],
        p2: &[f64],
        g_out: &[f64],
        d: Dims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        portable::backward(a, x, p1, p2, g_out, d)
    }
}

impl FusedMlp {
    /// Checks the shapes of `x` `(batch, in)` and the packed parameters; the batch.
    fn batch(&self, x: &Layout, p: &Layout) -> Result<usize> {
        let (batch, input) = x.shape().dims2()?;
        if input != self.arch.input()
            || p.shape().elem_count() != self.copies * self.arch.n_params()
        {
            candle::bail!(
                "fused mlp: input {:?} and {} parameters do not fit {:?}",
                x.shape(),
                p.shape().elem_count(),
                self.arch
            );
        }
        Ok(batch)
    }

    /// The narrow kernels' dimensions, where they take this network.
    fn narrow(&self, batch: usize) -> Option<Dims> {
        self.arch.narrow().map(|(input, hidden, output)| Dims {
            batch,
            input,
            hidden,
            output,
        })
    }

    /// The outputs and, when it is kept, the trace (else empty).
    fn forward<T: Kernel>(&self, x: &[T], p: &[T], batch: usize) -> (Vec<T>, Vec<T>) {
        if self.copies > 1 {
            return self.forward_copies(x, p, batch);
        }
        match self.narrow(batch) {
            Some(d) => {
                let (p1, p2) = p.split_at(d.hidden * (d.input + 1));
                (T::forward(self.activation, x, p1, p2, d), Vec::new())
            }
            None => deep::forward(&self.net(p), x, self.rows, self.keep),
        }
    }

    /// Every network's outputs and (when kept) every network's trace, each network on a
    /// thread of its own.
    fn forward_copies<T: Kernel>(&self, x: &[T], p: &[T], batch: usize) -> (Vec<T>, Vec<T>) {
        let (n_out, n_params) = (batch * self.arch.output(), self.arch.n_params());
        let n_trace = if self.keep {
            batch * self.arch.trace_width()
        } else {
            0
        };
        let mut outs = vec![T::zero(); self.copies * n_out];
        let mut kept = vec![T::zero(); self.copies * n_trace];
        let traces: Vec<&mut [T]> = if n_trace == 0 {
            (0..self.copies).map(|_| <&mut [T]>::default()).collect()
        } else {
            kept.chunks_mut(n_trace).collect()
        };
        outs.par_chunks_mut(n_out.max(1))
            .zip(traces)
            .zip(p.par_chunks(n_params.max(1)))
            .for_each(|((out, trace), p)| {
                deep::forward_into(&self.net(p), x, self.rows, out, trace)
            });
        (outs, kept)
    }

    /// `(∂x, ∂p)` on host slices, from the trace the forward pass kept (if any).
    fn backward<T: Kernel>(
        &self,
        x: &[T],
        p: &[T],
        trace: &[T],
        g: &[T],
        batch: usize,
    ) -> (Vec<T>, Vec<T>) {
        match self.narrow(batch) {
            Some(d) => {
                let (p1, p2) = p.split_at(d.hidden * (d.input + 1));
                let (gx, mut g1, g2) = T::backward(self.activation, x, p1, p2, g, d);
                g1.extend(g2);
                (gx, g1)
            }
            None => deep::backward(&self.net(p), x, trace, g, self.rows, self.threads),
        }
    }

    /// [`backward`](Self::backward) of every network, each on a thread of its own:
    /// `∂x` sums the networks' in their order, `∂p` is theirs one after the other.
    fn backward_copies<T: Kernel>(
        &self,
        x: &[T],
        p: &[T],
        trace: &[T],
        g: &[T],
        batch: usize,
    ) -> (Vec<T>, Vec<T>) {
        if self.copies == 1 {
            return self.backward(x, p, trace, g, batch);
        }
        let n_params = self.arch.n_params().max(1);
        let n_out = (batch * self.arch.output()).max(1);
        let n_trace = trace.len() / self.copies;
        let parts: Vec<(Vec<T>, Vec<T>)> = p
            .par_chunks(n_params)
            .zip(g.par_chunks(n_out))
            .enumerate()
            .map(|(c, (p, g))| {
                let trace = &trace[c * n_trace..(c + 1) * n_trace];
                self.backward(x, p, trace, g, batch)
            })
            .collect();
        let mut gx = vec![T::zero(); x.len()];
        let mut gp = Vec::with_capacity(p.len());
        for (gx_c, gp_c) in parts {
            gx.iter_mut().zip(gx_c).for_each(|(s, v)| *s += v);
            gp.extend(gp_c);
        }
        (gx, gp)
    }

    fn net<'a, T>(&'a self, params: &'a [T]) -> Net<'a, T> {
        Net {
            arch: &self.arch,
            activation: self.activation,
            params,
        }
    }

    /// The backward pass on the tensors' host values (borrowed where they lie),
    /// returned as tensors; `grad` is the gradient of the op's output.
    fn gradients<T: Kernel>(
        &self,
        x: &Tensor,
        p: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let batch = x.dim(0)?;
        let kept = self.trace.take();
        // Without a kept trace (a second backward pass) the kernel recomputes it.
        let trace: &[T] = match &kept {
            Some(storage) => T::cpu_storage_as_slice(storage)?,
            None => &[],
        };
        let (gx, gp) = on_host3(x, p, grad, |x: &[T], p, g| {
            Ok(self.backward_copies(x, p, trace, g, batch))
        })?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(gx, x.shape(), dev)?,
            Tensor::from_vec(gp, p.shape(), dev)?,
        ))
    }
}

impl CustomOp2 for FusedMlp {
    fn name(&self) -> &'static str {
        "fused-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let batch = self.batch(l1, l2)?;
        let (out, trace) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(p)) => {
                let (out, trace) = self.forward(slice(x, l1)?, slice(p, l2)?, batch);
                (CpuStorage::F32(out), CpuStorage::F32(trace))
            }
            (CpuStorage::F64(x), CpuStorage::F64(p)) => {
                let (out, trace) = self.forward(slice(x, l1)?, slice(p, l2)?, batch);
                (CpuStorage::F64(out), CpuStorage::F64(trace))
            }
            _ => candle::bail!("fused mlp supports f32 and f64 inputs of one dtype"),
        };
        if self.keep {
            self.trace.put(trace);
        }
        Ok((out, Shape::from((self.copies * batch, self.arch.output()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let batch = self.batch(l1, l2)?;
        if self.copies > 1 {
            candle::bail!("fused mlp: several networks in one op run on the CPU only");
        }
        let Some(d) = self.narrow(batch).filter(|_| self.arch.on_cuda()) else {
            let out = cuda::forward_general(&self.arch, self.activation, (s1, l1), (s2, l2))?;
            return Ok((out, Shape::from((batch, self.arch.output()))));
        };
        let Some((start, _)) = l2.contiguous_offsets() else {
            candle::bail!("fused mlp expects contiguous parameters");
        };
        let n1 = d.hidden * (d.input + 1);
        let l_p1 = Layout::contiguous_with_offset(n1, start);
        let l_p2 = Layout::contiguous_with_offset(d.output * (d.hidden + 1), start + n1);
        let out = cuda::forward(self.activation, (s1, l1), (s2, &l_p1), (s2, &l_p2), d)?;
        Ok((out, Shape::from((batch, d.output))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = FusedMlpGrad {
                arch: self.arch.clone(),
                activation: self.activation,
                batch: x.dim(0)?,
            };
            let (gx, gp) = op.apply(x, p, grad)?;
            return Ok((Some(gx), Some(gp)));
        }
        let (gx, gp) = match x.dtype() {
            DType::F32 => self.gradients::<f32>(x, p, grad)?,
            DType::F64 => self.gradients::<f64>(x, p, grad)?,
            other => candle::bail!("fused mlp has no backward for {other:?}"),
        };
        Ok((Some(gx), Some(gp)))
    }
}

/// The backward pass as an op of its own, for devices whose kernels take tensors: inputs
/// `x`, the packed parameters and the output gradient; output the gradients flattened
/// and concatenated `[∂x | ∂p]`.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
struct FusedMlpGrad {
    arch: Arch,
    activation: Activation,
    batch: usize,
}

#[cfg(feature = "cuda")]
impl FusedMlpGrad {
    fn apply(&self, x: &Tensor, p: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let packed =
            x.contiguous()?
                .apply_op3_no_bwd(&p.contiguous()?, &grad.contiguous()?, self)?;
        let n0 = self.batch * self.arch.input();
        Ok((
            packed.narrow(0, 0, n0)?.reshape(x.shape())?,
            packed.narrow(0, n0, p.elem_count())?.reshape(p.shape())?,
        ))
    }

    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<()> {
        let a = &self.arch;
        if l1.shape().dims() != [self.batch, a.input()]
            || l2.shape().elem_count() != a.n_params()
            || l3.shape().dims() != [self.batch, a.output()]
        {
            candle::bail!(
                "fused mlp backward: shapes {:?} {:?} {:?} do not match {a:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl candle::CustomOp3 for FusedMlpGrad {
    fn name(&self) -> &'static str {
        "fused-mlp-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The CPU backward runs in `FusedMlp::bwd` directly.
        candle::bail!("fused-mlp-grad is a GPU op")
    }

    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.check(l1, l2, l3)?;
        let n = self.batch * self.arch.input() + self.arch.n_params();
        let out = match self.arch.narrow().filter(|_| self.arch.on_cuda()) {
            Some((input, hidden, output)) => {
                let d = Dims {
                    batch: self.batch,
                    input,
                    hidden,
                    output,
                };
                cuda::backward(self.activation, (s1, l1), (s2, l2), (s3, l3), d)?
            }
            None => {
                cuda::backward_general(&self.arch, self.activation, (s1, l1), (s2, l2), (s3, l3))?
            }
        };
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cuda_backward_grid_fits_any_batch_a_kernel_int_holds() {
        let most = CUDA_MAX_GRID_Y * CUDA_CHUNK;
        for batch in [1, CUDA_CHUNK, most, most + 1, 10_000_000, i32::MAX as usize] {
            let chunk = cuda_backward_chunk(batch);
            assert!(chunk >= CUDA_CHUNK);
            assert!(batch.div_ceil(chunk) <= CUDA_MAX_GRID_Y, "batch {batch}");
        }
        assert_eq!(cuda_backward_chunk(1_000), CUDA_CHUNK);
    }
}
