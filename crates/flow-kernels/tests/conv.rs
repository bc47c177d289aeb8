//! The fused convolution pinned to the reference path (candle's `conv2d` plus a
//! broadcast bias): values and the gradients of input, weight and bias, f32 and f64.

use candle::{DType, Device, Tensor, Var};
use flow_kernels::conv::{conv2d, conv2d_fused, conv2d_reference};
use flow_kernels::Activation;

/// Deterministic values in [−1, 1) from a seed (an LCG): the tests need no RNG crate
/// and every run sees the same inputs.
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, dtype: DType) -> anyhow::Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(values(n, seed), shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Largest `|a − b|` over `1 + max|b|`.
fn gap(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let scale = 1.0 + b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    Ok(diff / scale)
}

type Conv = fn(&Tensor, &Tensor, Option<&Tensor>, Option<Activation>) -> candle::Result<Tensor>;

/// Output and `(∂x, ∂W, ∂b)` of `Σ y ⊙ r` for a fixed random `r`.
fn run(
    conv: Conv,
    (b, cin, cout, h, w, k): (usize, usize, usize, usize, usize, usize),
    bias: bool,
    act: Option<Activation>,
    dtype: DType,
) -> anyhow::Result<Vec<Tensor>> {
    let seed = (b * 131 + cin * 17 + cout * 7 + h * 3 + w + k * 1000) as u64;
    let x = Var::from_tensor(&tensor(&[b, cin, h, w], seed, dtype)?)?;
    let wt = Var::from_tensor(&tensor(&[cout, cin, k, k], seed + 1, dtype)?)?;
    let bs = Var::from_tensor(&tensor(&[cout], seed + 2, dtype)?)?;
    let r = tensor(&[b, cout, h, w], seed + 3, dtype)?;
    let y = conv(
        x.as_tensor(),
        wt.as_tensor(),
        bias.then_some(bs.as_tensor()),
        act,
    )?;
    let grads = y.mul(&r)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in [&x, &wt] {
        out.push(grads.get(v.as_tensor()).expect("a gradient").clone());
    }
    if bias {
        out.push(grads.get(bs.as_tensor()).expect("a gradient").clone());
    }
    Ok(out)
}

fn check(
    shape: (usize, usize, usize, usize, usize, usize),
    bias: bool,
    act: Option<Activation>,
) -> anyhow::Result<()> {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        let fused = run(conv2d_fused, shape, bias, act, dtype)?;
        let reference = run(conv2d_reference, shape, bias, act, dtype)?;
        for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
            assert_eq!(f.dtype(), dtype);
            let g = gap(f, r)?;
            // Sums of up to C·k·k·B·H·W terms: the tolerance grows with their count.
            let terms = (shape.0 * shape.3 * shape.4).max(shape.1 * shape.5 * shape.5) as f64;
            assert!(
                g <= tol * terms.sqrt().max(1.0),
                "{dtype:?} shape {shape:?} bias {bias} {act:?}: output {i} (y, ∂x, ∂W, ∂b) off by {g:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn matches_reference_3x3_and_1x1() -> anyhow::Result<()> {
    // (batch, C_in, C_out, H, W, k): the coupling's shapes on 8×8 digits squeezed once
    // and twice, the edges (one pixel, one channel, one image), wide and narrow
    // channel counts either way round (both backward routes), odd sizes.
    let shapes = [
        (64, 2, 64, 4, 4, 3),
        (64, 64, 64, 4, 4, 1),
        (64, 64, 4, 4, 4, 3),
        (64, 4, 64, 2, 2, 3),
        (64, 64, 8, 2, 2, 3),
        (64, 4, 4, 4, 4, 1),
        (1, 1, 1, 1, 1, 3),
        (1, 1, 1, 1, 1, 1),
        (3, 1, 5, 1, 7, 3),
        (2, 7, 1, 8, 1, 3),
        (70, 3, 9, 8, 8, 3),
        (5, 64, 1, 8, 8, 3),
        (1, 1, 64, 8, 8, 3),
        (17, 33, 12, 5, 3, 1),
        (70, 12, 33, 3, 5, 1),
        (4, 6, 6, 8, 8, 5),
        (9, 16, 16, 2, 3, 3),
    ];
    for shape in shapes {
        check(shape, true, None)?;
        check(shape, false, None)?;
    }
    Ok(())
}

#[test]
fn matches_reference_with_activations() -> anyhow::Result<()> {
    // ReLU, leaky ReLU and tanh run inside the op, GELU after it.
    let shapes = [
        (64, 2, 64, 4, 4, 3),
        (64, 64, 64, 4, 4, 1),
        (5, 64, 3, 2, 2, 3),
        (1, 1, 1, 1, 1, 1),
        (70, 4, 64, 2, 2, 3),
    ];
    for shape in shapes {
        for act in Activation::ALL {
            check(shape, true, Some(act))?;
        }
        check(shape, false, Some(Activation::Relu))?;
    }
    Ok(())
}

#[test]
fn fusion_off_takes_the_reference_path() -> anyhow::Result<()> {
    let x = tensor(&[2, 3, 4, 4], 1, DType::F32)?;
    let w = tensor(&[5, 3, 3, 3], 2, DType::F32)?;
    flow_kernels::set_fusion(false);
    let off = conv2d(&x, &w, None, None);
    flow_kernels::set_fusion(true);
    let on = conv2d(&x, &w, None, None)?;
    assert!(gap(&off?, &conv2d_reference(&x, &w, None, None)?)? == 0.0);
    assert!(gap(&on, &conv2d_fused(&x, &w, None, None)?)? == 0.0);
    Ok(())
}

#[test]
fn rejects_even_or_mismatched_kernels() -> anyhow::Result<()> {
    let x = tensor(&[2, 3, 4, 4], 1, DType::F64)?;
    let not_same_padded = "are not a same-padded convolution with an odd square kernel";
    // An even kernel, then a kernel of 4 input channels for an input of 3.
    for w in [[5, 3, 2, 2], [5, 4, 3, 3]] {
        let err = conv2d_fused(&x, &tensor(&w, 2, DType::F64)?, None, None)
            .expect_err("not a same-padded convolution")
            .to_string();
        assert!(err.contains(not_same_padded), "{w:?}: {err}");
    }
    let b = tensor(&[4], 3, DType::F64)?;
    let err = conv2d_fused(&x, &tensor(&[5, 3, 3, 3], 2, DType::F64)?, Some(&b), None)
        .expect_err("4 biases for 5 outputs")
        .to_string();
    assert!(err.contains("fused conv: bias [4] for 5 outputs"), "{err}");
    Ok(())
}
