//! Stride-1 "same" convolutions on `(batch, C, H, W)` images — odd square kernels
//! `k×k` with padding `k / 2`, the 3×3 and 1×1 convolutions of image couplings and the
//! invertible 1×1 convolution — as one custom op with its own backward.
//!
//! candle's CPU convolution runs its backward through a transposed convolution that
//! loops per output element, and building the patches from plain ops (pad, narrow, cat)
//! makes their backward allocate and add a full-size zero tensor per patch. Here both
//! passes are im2col plus one matrix product (the `gemm` crate) over the whole batch,
//! in position-major layout `(B·H·W, C)` inside the op — there a patch row is at most
//! `k` contiguous runs of `k·C` values, where channel-major planes of these small
//! images (4×4, 2×2) would need a short copy per channel, tap and image:
//!
//! - forward: `cols (B·H·W, k·k·C_in)` from `x`, `y (B·H·W, C_out) = cols · Wᵀ`, then
//!   the bias, the activation if any, and the transpose back to `(B, C_out, H, W)`;
//! - `∂W = ∂yᵀ · cols`, `∂b = Σ ∂y` over the batch and the pixels;
//! - `∂x` either as `∂y · W` folded back onto the pixels (col2im), when `C_in ≤ C_out`,
//!   or as the convolution of `∂y` with `W` transposed and flipped, when `C_out < C_in`:
//!   for stride 1 and padding `(k − 1) / 2` the two are equal, and each way the
//!   intermediate patches have the smaller channel count.
//!
//! The activation (ReLU, leaky ReLU, tanh) is applied inside the op, its derivative
//! taken from the op's output: on the graph a conditioner layer is one node, not a
//! convolution, a broadcast bias and an activation, each with its own backward.
//!
//! Results equal candle's `conv2d` (plus the bias) up to the order of floating-point
//! sums. With the `cuda` feature the same op runs on CUDA (`cuda.rs`): the same
//! position-major products through cuBLAS, the copies and the epilogue as kernels.

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};
use num_traits::Float;
use rayon::prelude::*;

use crate::{slice, Activation, Elem};

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;

/// Elements above which the copies (im2col, col2im, transposes) split over threads:
/// below it a rayon fork costs more than it saves.
const PAR_ELEMS: usize = 1 << 15;
/// Multiply-adds above which a matrix product runs on every thread.
const PAR_MACS: usize = 1 << 18;

/// The shape of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    batch: usize,
    cin: usize,
    cout: usize,
    height: usize,
    width: usize,
    k: usize,
}

impl Dims {
    /// From the layouts of `x` `(B, C_in, H, W)` and `W` `(C_out, C_in, k, k)`.
    fn new(x: &Layout, w: &Layout) -> Result<Self> {
        let (batch, cin, height, width) = x.shape().dims4()?;
        let (cout, wcin, kh, kw) = w.shape().dims4()?;
        if wcin != cin || kh != kw || kh % 2 == 0 {
            candle::bail!(
                "fused conv: input {:?} and weight {:?} are not a same-padded convolution \
                 with an odd square kernel",
                x.shape(),
                w.shape()
            );
        }
        Ok(Self {
            batch,
            cin,
            cout,
            height,
            width,
            k: kh,
        })
    }

    /// A bias of one value per output channel.
    fn check_bias(&self, bias: &Layout) -> Result<()> {
        if bias.shape().dims() != [self.cout] {
            candle::bail!(
                "fused conv: bias {:?} for {} outputs",
                bias.shape(),
                self.cout
            );
        }
        Ok(())
    }

    fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// Output positions, `B·H·W`: the columns of the patch matrix.
    fn positions(&self) -> usize {
        self.batch * self.pixels()
    }

    /// Rows of the patch matrix, `C_in·k·k`.
    fn patch(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// The convolution that carries `∂y` back to `∂x`: channels swapped.
    fn transposed(&self) -> Self {
        Self {
            cin: self.cout,
            cout: self.cin,
            ..*self
        }
    }
}

fn threads() -> usize {
    crate::threads::planned()
}

/// `dst (m×n, row-major) = [dst +] a · b`, with `a` (`m×k`) and `b` (`k×n`) given by
/// their row and column strides.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs + 1
    };
    // Checked always: they are what makes the raw-pointer product below sound.
    assert!(dst.len() >= m * n, "matmul: destination too short");
    assert!(
        m * k == 0 || a.len() >= last(m, k, a_rs, a_cs),
        "matmul: lhs too short"
    );
    assert!(
        k * n == 0 || b.len() >= last(k, n, b_rs, b_cs),
        "matmul: rhs too short"
    );
    if m * n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    let parallelism = if m * n * k >= PAR_MACS && threads() > 1 {
        Parallelism::Rayon(threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every element the strides address, `dst` holds
    // the m×n result and is a unique borrow, so it aliases neither input; `gemm` reads
    // `dst` only when `accumulate` (read_dst), and f32/f64 are types it supports.
    #[allow(unsafe_code)]
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Runs `f(index, chunk)` over `data` cut into chunks of `len`, on every thread when the
/// whole is large.
fn for_chunks<T: Send>(data: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if len == 0 {
        return;
    }
    if data.len() >= PAR_ELEMS && threads() > 1 {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// For output column `x` of a `k`-wide kernel over a `W`-wide row: the taps `kx` whose
/// input column `x + kx − k/2` lies in the image, `lo..hi`. In position-major layout
/// those taps read one contiguous run of `(hi − lo)·C` values.
fn valid_taps(x: usize, k: usize, width: usize) -> (usize, usize) {
    let pad = k / 2;
    let lo = pad.saturating_sub(x);
    let hi = (width + pad).saturating_sub(x).min(k);
    (lo, hi.max(lo))
}

/// The patch matrix `(B·H·W, k·k·C)` of `x` in position-major layout `(B, H, W, C)`:
/// row `(b, h, w)`, column `(ky, kx, c)` holds `x[b, h + ky − k/2, w + kx − k/2, c]`,
/// zero outside the image. For each row and `ky` the valid `kx` read one contiguous
/// run of the input, so a row is at most `k` copies.
fn im2col<T: Elem>(xt: &[T], d: &Dims, c: usize) -> Vec<T> {
    let (h, w, k) = (d.height, d.width, d.k);
    let (pad, kc, row) = (k / 2, k * c, k * k * c);
    let mut cols = vec![T::zero(); d.positions() * row];
    // One image per task.
    for_chunks(&mut cols, d.pixels() * row, |b, img| {
        let src = &xt[b * d.pixels() * c..][..d.pixels() * c];
        for (i, out) in img.chunks_exact_mut(row).enumerate() {
            let (y, x) = (i / w, i % w);
            let (lo, hi) = valid_taps(x, k, w);
            for (ky, out) in out.chunks_exact_mut(kc).enumerate() {
                let Some(sy) = (y + ky).checked_sub(pad).filter(|&sy| sy < h) else {
                    continue;
                };
                let first = (sy * w + x + lo - pad) * c;
                out[lo * c..hi * c].copy_from_slice(&src[first..first + (hi - lo) * c]);
            }
        }
    });
    cols
}

/// The adjoint of [`im2col`]: each entry of the patch matrix `(B·H·W, k·k·C)` added
/// back onto the input it was read from, giving `(B, H, W, C)`.
fn col2im<T: Elem>(cols: &[T], d: &Dims, c: usize) -> Vec<T> {
    let (h, w, k) = (d.height, d.width, d.k);
    let (pad, kc, row) = (k / 2, k * c, k * k * c);
    let mut xt = vec![T::zero(); d.positions() * c];
    // One image per task: every task writes only its own image.
    for_chunks(&mut xt, d.pixels() * c, |b, dst| {
        let img = &cols[b * d.pixels() * row..][..d.pixels() * row];
        for (i, patch) in img.chunks_exact(row).enumerate() {
            let (y, x) = (i / w, i % w);
            let (lo, hi) = valid_taps(x, k, w);
            for (ky, taps) in patch.chunks_exact(kc).enumerate() {
                let Some(sy) = (y + ky).checked_sub(pad).filter(|&sy| sy < h) else {
                    continue;
                };
                let first = (sy * w + x + lo - pad) * c;
                let run = &mut dst[first..first + (hi - lo) * c];
                for (o, &v) in run.iter_mut().zip(&taps[lo * c..hi * c]) {
                    *o += v;
                }
            }
        }
    });
    xt
}

/// Position-major `(B, HW, C)` from channel-major `(B, C, HW)`.
fn to_positions<T: Elem>(x: &[T], batch: usize, c: usize, hw: usize) -> Vec<T> {
    let mut out = vec![T::zero(); batch * c * hw];
    for_chunks(&mut out, hw * c, |b, img| {
        let src = &x[b * c * hw..][..c * hw];
        for (i, px) in img.chunks_exact_mut(c).enumerate() {
            for (ch, o) in px.iter_mut().enumerate() {
                *o = src[ch * hw + i];
            }
        }
    });
    out
}

/// Channel-major `(B, C, HW)` from position-major `(B, HW, C)`, plus `bias[c]`.
fn to_channels<T: Elem>(y: &[T], batch: usize, c: usize, hw: usize, bias: Option<&[T]>) -> Vec<T> {
    let mut out = vec![T::zero(); batch * c * hw];
    for_chunks(&mut out, c * hw, |b, img| {
        let src = &y[b * hw * c..][..hw * c];
        for (ch, plane) in img.chunks_exact_mut(hw).enumerate() {
            let add = bias.map_or(T::zero(), |bias| bias[ch]);
            for (i, o) in plane.iter_mut().enumerate() {
                *o = src[i * c + ch] + add;
            }
        }
    });
    out
}

/// `W` `(C_out, C_in, k, k)` with its columns in patch order, `(C_out, k, k, C_in)`.
fn taps_last<T: Elem>(w: &[T], cin: usize, kk: usize) -> Vec<T> {
    let mut out = vec![T::zero(); w.len()];
    for (o, wo) in out.chunks_exact_mut(cin * kk).zip(w.chunks_exact(cin * kk)) {
        for (ci, taps) in wo.chunks_exact(kk).enumerate() {
            for (t, &v) in taps.iter().enumerate() {
                o[t * cin + ci] = v;
            }
        }
    }
    out
}

/// The inverse of [`taps_last`].
fn channels_last<T: Elem>(w: &[T], cin: usize, kk: usize) -> Vec<T> {
    let mut out = vec![T::zero(); w.len()];
    for (o, wo) in out.chunks_exact_mut(cin * kk).zip(w.chunks_exact(cin * kk)) {
        for (ci, taps) in o.chunks_exact_mut(kk).enumerate() {
            for (t, v) in taps.iter_mut().enumerate() {
                *v = wo[t * cin + ci];
            }
        }
    }
    out
}

/// The patch matrix `(P, k·k·C)` of position-major `xt`: `xt` itself for `k = 1`.
fn patches<'a, T: Elem>(xt: &'a [T], d: &Dims, c: usize) -> std::borrow::Cow<'a, [T]> {
    if d.k == 1 {
        std::borrow::Cow::Borrowed(xt)
    } else {
        std::borrow::Cow::Owned(im2col(xt, d, c))
    }
}

/// `conv(x, W) + b` in position-major layout: `(P, C_out)` from `xt` `(P, C_in)`, with
/// `wt` in patch order ([`taps_last`]).
fn forward_positions<T: Elem>(xt: &[T], wt: &[T], d: &Dims) -> Vec<T> {
    let (p, kp) = (d.positions(), d.patch());
    let cols = patches(xt, d, d.cin);
    let mut y = vec![T::zero(); p * d.cout];
    // y (P, C_out) = cols (P, K) · Wᵀ (K, C_out).
    matmul((p, d.cout, kp), &mut y, false, &cols, (kp, 1), wt, (1, kp));
    y
}

/// `y = conv(x, W) + b`, `(B, C_out, H, W)`.
fn forward<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, d: &Dims) -> Vec<T> {
    let hw = d.pixels();
    let xt = to_positions(x, d.batch, d.cin, hw);
    let y = forward_positions(&xt, &taps_last(w, d.cin, d.k * d.k), d);
    to_channels(&y, d.batch, d.cout, hw, bias)
}

/// `(∂x, ∂W, ∂b)` from `x`, `W` and the output gradient `g` `(B, C_out, H, W)`.
fn backward<T: Elem>(x: &[T], w: &[T], g: &[T], d: &Dims) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (p, kp, hw, kk) = (d.positions(), d.patch(), d.pixels(), d.k * d.k);
    let gt = to_positions(g, d.batch, d.cout, hw);
    let mut gb = vec![T::zero(); d.cout];
    for px in gt.chunks_exact(d.cout.max(1)) {
        for (s, &v) in gb.iter_mut().zip(px) {
            *s += v;
        }
    }
    let xt = to_positions(x, d.batch, d.cin, hw);
    let cols = patches(&xt, d, d.cin);
    // ∂W (C_out, K) = ∂yᵀ (C_out, P) · cols (P, K), in patch order.
    let mut gwt = vec![T::zero(); d.cout * kp];
    matmul(
        (d.cout, kp, p),
        &mut gwt,
        false,
        &gt,
        (1, d.cout),
        &cols,
        (kp, 1),
    );
    drop(cols);
    let gw = channels_last(&gwt, d.cin, kk);
    let wt = taps_last(w, d.cin, kk);
    let gxt = if d.cin <= d.cout || d.k == 1 {
        // ∂cols (P, K) = ∂y (P, C_out) · W (C_out, K), folded back onto the pixels.
        let mut gcols = vec![T::zero(); p * kp];
        matmul(
            (p, kp, d.cout),
            &mut gcols,
            false,
            &gt,
            (d.cout, 1),
            &wt,
            (kp, 1),
        );
        if d.k == 1 {
            gcols
        } else {
            col2im(&gcols, d, d.cin)
        }
    } else {
        // ∂x = conv(∂y, W') with W'[ci, co, ky, kx] = W[co, ci, k−1−ky, k−1−kx]; in
        // patch order W' is (C_in, k, k, C_out).
        let mut wf = vec![T::zero(); w.len()];
        for (co, wc) in w.chunks_exact(d.cin * kk).enumerate() {
            for (ci, taps) in wc.chunks_exact(kk).enumerate() {
                for (t, &v) in taps.iter().enumerate() {
                    wf[(ci * kk + (kk - 1 - t)) * d.cout + co] = v;
                }
            }
        }
        forward_positions(&gt, &wf, &d.transposed())
    };
    (to_channels(&gxt, d.batch, d.cin, hw, None), gw, gb)
}

/// The contiguous values of a CPU tensor, borrowed for `f`.
fn with_values<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(slice(cpu.as_slice::<T>()?, layout)?)),
        _ => candle::bail!("the fused conv runs on the CPU only"),
    }
}

/// An activation applied inside the op: one whose derivative is a function of its
/// output, so the backward needs only the op's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Relu,
    LeakyRelu,
    Tanh,
}

impl Inner {
    fn new(a: Activation) -> Option<Self> {
        match a {
            Activation::Relu => Some(Self::Relu),
            Activation::LeakyRelu => Some(Self::LeakyRelu),
            Activation::Tanh => Some(Self::Tanh),
            Activation::Gelu => None,
        }
    }

    fn apply<T: Elem>(self, y: &mut [T]) {
        let slope = T::from(Activation::LEAKY_SLOPE).unwrap_or_else(T::zero);
        for_chunks(y, 1 << 12, |_, y| match self {
            Self::Relu => y.iter_mut().for_each(|v| *v = Float::max(*v, T::zero())),
            Self::LeakyRelu => y.iter_mut().for_each(|v| *v = Float::max(*v, slope * *v)),
            Self::Tanh => y.iter_mut().for_each(|v| *v = v.tanh()),
        });
    }

    /// `g ⊙ act'(pre)` from the output `y = act(pre)`. A pre-activation of exactly 0
    /// (an output of 0) counts as negative here, where candle's `relu` backward counts
    /// it as positive: the two differ only on that measure-zero set.
    fn backward<T: Elem>(self, g: &mut [T], y: &[T]) {
        let slope = T::from(Activation::LEAKY_SLOPE).unwrap_or_else(T::zero);
        for (g, &y) in g.iter_mut().zip(y) {
            *g = match self {
                Self::Relu if y > T::zero() => *g,
                Self::Relu => T::zero(),
                Self::LeakyRelu if y > T::zero() => *g,
                Self::LeakyRelu => *g * slope,
                Self::Tanh => *g * (T::one() - y * y),
            };
        }
    }
}

/// The same-padded convolution, with a bias (`(x, W, b)`) or without (`(x, W)`), and
/// optionally an activation on its output.
#[derive(Debug, Clone, Copy)]
struct Conv {
    act: Option<Inner>,
}

impl Conv {
    fn cpu<T: Elem>(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(lx, lw)?;
        let x = slice(x.as_slice::<T>()?, lx)?;
        let w = slice(w.as_slice::<T>()?, lw)?;
        let bias = match b {
            Some((b, lb)) => {
                d.check_bias(lb)?;
                Some(slice(b.as_slice::<T>()?, lb)?)
            }
            None => None,
        };
        let mut y = forward(x, w, bias, &d);
        if let Some(act) = self.act {
            act.apply(&mut y);
        }
        let shape = Shape::from((d.batch, d.cout, d.height, d.width));
        Ok((T::to_cpu_storage_owned(y), shape))
    }

    fn fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        match (x.dtype(), w.dtype(), b.map(|(b, _)| b.dtype())) {
            (DType::F32, DType::F32, None | Some(DType::F32)) => self.cpu::<f32>(x, lx, w, lw, b),
            (DType::F64, DType::F64, None | Some(DType::F64)) => self.cpu::<f64>(x, lx, w, lw, b),
            _ => candle::bail!("the fused conv supports f32 and f64 inputs of one dtype"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: &candle::CudaStorage,
        lx: &Layout,
        w: &candle::CudaStorage,
        lw: &Layout,
        b: Option<(&candle::CudaStorage, &Layout)>,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let d = Dims::new(lx, lw)?;
        if let Some((_, lb)) = b {
            d.check_bias(lb)?;
        }
        let y = cuda::forward(d, self.act, (x, lx), (w, lw), b)?;
        Ok((y, Shape::from((d.batch, d.cout, d.height, d.width))))
    }

    fn grads<T: Elem>(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = Dims::new(x.layout(), w.layout())?;
        // The gradient before the activation.
        let g = match self.act {
            Some(act) => {
                let mut g = with_values::<T, _>(g, |g| g.to_vec())?;
                with_values::<T, _>(y, |y| act.backward(&mut g, y))?;
                Tensor::from_vec(g, y.shape(), y.device())?
            }
            None => g.clone(),
        };
        let (gx, gw, gb) = with_values::<T, _>(x, |xv| {
            with_values::<T, _>(w, |wv| {
                with_values::<T, _>(&g, |gv| backward(xv, wv, gv, &d))
            })
        })???;
        let dev = x.device();
        Ok((
            Tensor::from_vec(gx, x.shape(), dev)?,
            Tensor::from_vec(gw, w.shape(), dev)?,
            Tensor::from_vec(gb, d.cout, dev)?,
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if !x.device().is_cpu() {
            return self.grads_by_ops(x, w, y, g);
        }
        match x.dtype() {
            DType::F32 => self.grads::<f32>(x, w, y, g),
            DType::F64 => self.grads::<f64>(x, w, y, g),
            other => candle::bail!("the fused conv has no backward for {other:?}"),
        }
    }

    /// The gradients through the two ops below, as on CUDA: `∂z = g ⊙ act'(y)`, then
    /// `[∂x | ∂W | ∂b]` in one buffer, split into views.
    fn grads_by_ops(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let g = g.contiguous()?;
        let dz = match self.act {
            Some(act) => g.apply_op2_no_bwd(&y.contiguous()?, &ActivationGrad { act })?,
            None => g,
        };
        let packed = x.apply_op3_no_bwd(w, &dz, &ConvGrad)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let cout = w.dim(0)?;
        Ok((
            packed.narrow(0, 0, nx)?.reshape(x.shape())?,
            packed.narrow(0, nx, nw)?.reshape(w.shape())?,
            packed.narrow(0, nx + nw, cout)?,
        ))
    }
}

/// `g ⊙ act'(z)` from the output's gradient `g` and the output `y = act(z)`.
#[derive(Debug, Clone, Copy)]
struct ActivationGrad {
    act: Inner,
}

impl ActivationGrad {
    fn cpu<T: Elem>(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<CpuStorage> {
        let mut out = slice(g.as_slice::<T>()?, lg)?.to_vec();
        let y = slice(y.as_slice::<T>()?, ly)?;
        if y.len() != out.len() {
            candle::bail!(
                "fused conv: gradient {:?} for output {:?}",
                lg.shape(),
                ly.shape()
            );
        }
        self.act.backward(&mut out, y);
        Ok(T::to_cpu_storage_owned(out))
    }
}

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "fused-conv2d-activation-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (g.dtype(), y.dtype()) {
            (DType::F32, DType::F32) => self.cpu::<f32>(g, lg, y, ly)?,
            (DType::F64, DType::F64) => self.cpu::<f64>(g, lg, y, ly)?,
            _ => candle::bail!("the fused conv supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle::CudaStorage,
        lg: &Layout,
        y: &candle::CudaStorage,
        ly: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = cuda::activation_grad(self.act, (g, lg), (y, ly))?;
        Ok((out, lg.shape().clone()))
    }
}

/// `[∂x | ∂W | ∂b]` flattened, from `x`, `W` and the gradient `∂z` before the
/// activation `(B, C_out, H, W)`.
#[derive(Debug, Clone, Copy)]
struct ConvGrad;

impl ConvGrad {
    fn cpu<T: Elem>(
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<CpuStorage> {
        let d = Dims::new(lx, lw)?;
        let (gx, gw, gb) = backward(
            slice(x.as_slice::<T>()?, lx)?,
            slice(w.as_slice::<T>()?, lw)?,
            slice(g.as_slice::<T>()?, lg)?,
            &d,
        );
        let mut out = gx;
        out.extend_from_slice(&gw);
        out.extend_from_slice(&gb);
        Ok(T::to_cpu_storage_owned(out))
    }

    /// The convolution's shape, with `∂z` checked against it.
    fn dims(lx: &Layout, lw: &Layout, lg: &Layout) -> Result<(Dims, Shape)> {
        let d = Dims::new(lx, lw)?;
        if lg.shape().dims() != [d.batch, d.cout, d.height, d.width] {
            candle::bail!(
                "fused conv: gradient {:?} for input {:?} and weight {:?}",
                lg.shape(),
                lx.shape(),
                lw.shape()
            );
        }
        let n = d.batch * d.cin * d.pixels() + d.cout * d.patch() + d.cout;
        Ok((d, Shape::from(n)))
    }
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "fused-conv2d-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, shape) = Self::dims(lx, lw, lg)?;
        let out = match (x.dtype(), w.dtype(), g.dtype()) {
            (DType::F32, DType::F32, DType::F32) => Self::cpu::<f32>(x, lx, w, lw, g, lg)?,
            (DType::F64, DType::F64, DType::F64) => Self::cpu::<f64>(x, lx, w, lw, g, lg)?,
            _ => candle::bail!("the fused conv supports f32 and f64 inputs of one dtype"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        lx: &Layout,
        w: &candle::CudaStorage,
        lw: &Layout,
        g: &candle::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (d, shape) = Self::dims(lx, lw, lg)?;
        Ok((cuda::grad(d, (x, lx), (w, lw), (g, lg))?, shape))
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "fused-conv2d"
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
        self.fwd(s1, l1, s2, l2, Some((s3, l3)))
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
        self.cuda(s1, l1, s2, l2, Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = Conv::bwd(self, x, w, res, grad)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "fused-conv2d-no-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, s2, l2, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = Conv::bwd(self, x, w, res, grad)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// The fused kernel: `act(conv(x, W) + b)` for `x` `(B, C_in, H, W)`, `W`
/// `(C_out, C_in, k, k)` with `k` odd, stride 1 and padding `k / 2` (the output has
/// the input's height and width), `b` `(C_out,)`, and `act` none or an [`Activation`]
/// (ReLU, leaky ReLU and tanh run inside the op; GELU runs after it as candle's op).
/// CPU, and CUDA with the `cuda` feature; f32 and f64. The caller decides that the
/// kernel applies, through [`fused`](crate::fused) with [`Op::Conv`](crate::Op::Conv);
/// [`conv2d`] does both.
pub fn conv2d_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let inner = act.and_then(Inner::new);
    let op = Conv { act: inner };
    let y = match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, op)?,
        None => x.apply_op2(&weight, op)?,
    };
    match act {
        Some(a) if inner.is_none() => a.apply(&y),
        _ => Ok(y),
    }
}

/// The reference path: candle's `conv2d` and a broadcast bias, as `candle_nn::Conv2d`
/// computes it, then the activation's candle ops.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor> {
    let k = weight.dim(3)?;
    let y = x.conv2d(weight, k / 2, 1, 1, 1)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    match act {
        Some(a) => a.apply(&y),
        None => Ok(y),
    }
}

/// `act(conv(x, W) + b)`, same-padded with stride 1: the fused kernel when
/// [`fused`](crate::fused) allows it for [`Op::Conv`](crate::Op::Conv), else the
/// reference path.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
) -> Result<Tensor> {
    if crate::fused(crate::Op::Conv, x) {
        conv2d_fused(x, weight, bias, act)
    } else {
        conv2d_reference(x, weight, bias, act)
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor};

    use super::{Conv, Inner};

    /// The backward route that CUDA takes (two ops, one packed buffer split into
    /// views), run on the CPU against the CPU's own route: the same kernels underneath,
    /// so the same numbers, which pins the packing and the split.
    #[test]
    fn the_route_through_ops_gives_the_cpus_gradients() -> candle::Result<()> {
        let dev = Device::Cpu;
        for (b, cin, cout, h, w, k) in [(3, 2, 5, 4, 3, 3), (2, 6, 1, 5, 5, 1), (1, 3, 3, 2, 2, 5)]
        {
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0.0, 1.0, (b, cin, h, w), &dev)?.to_dtype(dtype)?;
                let wt = Tensor::randn(0.0, 1.0, (cout, cin, k, k), &dev)?.to_dtype(dtype)?;
                let g = Tensor::randn(0.0, 1.0, (b, cout, h, w), &dev)?.to_dtype(dtype)?;
                for act in [
                    None,
                    Some(Inner::Relu),
                    Some(Inner::LeakyRelu),
                    Some(Inner::Tanh),
                ] {
                    let conv = Conv { act };
                    let y = x.apply_op2_no_bwd(&wt, &conv)?;
                    let direct = conv.bwd(&x, &wt, &y, &g)?;
                    let by_ops = conv.grads_by_ops(&x, &wt, &y, &g)?;
                    for (name, a, o) in [
                        ("∂x", &direct.0, &by_ops.0),
                        ("∂W", &direct.1, &by_ops.1),
                        ("∂b", &direct.2, &by_ops.2),
                    ] {
                        assert_eq!(a.dims(), o.dims(), "{name}");
                        let gap = (a - o)?.abs()?.max_all()?.to_dtype(DType::F64)?;
                        assert_eq!(gap.to_scalar::<f64>()?, 0.0, "{name} {act:?} {dtype:?}");
                    }
                }
            }
        }
        Ok(())
    }
}
