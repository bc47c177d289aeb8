//! The rational-quadratic spline's mathematics, in both parametrisations: it inverts
//! itself, its log-det is the log of its numerical derivative, it passes through its
//! knots (also for inputs exactly on one), it is the identity in its tails (as far out as
//! 1e6), and a flow made of it integrates to one; each through both doors, the
//! reference and the fused kernel, which agree in values and gradients.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use flow_core::sampling::randn;
use flow_nn::{Features, Spline, SplineStyle, Transform};
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

fn splines() -> Vec<Spline> {
    let mut out = Vec::new();
    for style in [SplineStyle::Durkan, SplineStyle::Zuko] {
        for (bins, bound) in [(8, 3.0), (1, 2.0), (5, 5.0)] {
            out.push(Spline {
                style,
                ..Spline::new(bins, bound)
            });
        }
    }
    out
}

/// Raw parameters `(rows, n, 3K − 1)` spread enough to give uneven bins.
fn params(s: &Spline, rows: usize, n: usize, seed: u64) -> Result<Tensor> {
    let rng = &mut StdRng::seed_from_u64(seed);
    let p = 3 * s.bins - 1;
    Ok((randn(rows * n, p, DType::F64, &DEV, rng)? * 1.5)?.reshape((rows, n, p))?)
}

/// The spline over every feature of `x` through one door: the fused kernel
/// ([`Transform::apply_fused`]) or the reference ([`Transform::apply`]).
fn map(
    s: &Spline,
    fused: bool,
    x: &Tensor,
    theta: &Tensor,
    inverse: bool,
) -> Result<(Tensor, Tensor)> {
    let theta = std::slice::from_ref(theta);
    Ok(if fused {
        let all: Vec<usize> = (0..x.dim(1)?).collect();
        s.apply_fused(x, Features::All { indices: &all }, theta, inverse)?
    } else {
        s.apply(x, theta, inverse)?
    })
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

#[test]
fn round_trips_and_log_dets_cancel() -> Result<()> {
    for (s, fused) in splines().into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let (rows, n) = (200, 3);
        let theta = params(&s, rows, n, 1)?;
        let rng = &mut StdRng::seed_from_u64(2);
        // Half the points beyond the bound: the tails as well as the bins.
        let x = (randn(rows, n, DType::F64, &DEV, rng)? * s.bound)?;
        let (y, ld) = map(&s, fused, &x, &theta, false)?;
        let (back, ld_inv) = map(&s, fused, &y, &theta, true)?;
        let err = max_abs(&(&back - &x)?)?;
        ensure!(err < 1e-9, "{s:?} fused {fused}: round trip off by {err:e}");
        let sum = max_abs(&(&ld + &ld_inv)?)?;
        ensure!(
            sum < 1e-9,
            "{s:?} fused {fused}: forward and inverse log-dets differ by {sum:e}"
        );
    }
    Ok(())
}

#[test]
fn log_dets_are_numerical_derivatives() -> Result<()> {
    for (s, fused) in splines().into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let (rows, n) = (100, 1);
        let theta = params(&s, rows, n, 3)?;
        let rng = &mut StdRng::seed_from_u64(4);
        let x = (randn(rows, n, DType::F64, &DEV, rng)? * (0.8 * s.bound))?;
        let eps = 1e-6;
        let (y_hi, _) = map(&s, fused, &x.affine(1.0, eps)?, &theta, false)?;
        let (y_lo, _) = map(&s, fused, &x.affine(1.0, -eps)?, &theta, false)?;
        let numeric = ((y_hi - y_lo)? / (2.0 * eps))?.log()?.squeeze(1)?;
        let (_, ld) = map(&s, fused, &x, &theta, false)?;
        let err = max_abs(&(&ld - &numeric)?)?;
        ensure!(
            err < 1e-5,
            "{s:?} fused {fused}: log-det off its numerical value by {err:e}"
        );
    }
    Ok(())
}

#[test]
fn knots_bounds_and_far_tails() -> Result<()> {
    for (s, fused) in splines().into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let theta = params(&s, 1, 1, 5)?;
        let knots = s.knots(&theta)?;
        // Every knot, both ends included, maps to its partner exactly and stays finite.
        let xs = knots.x.reshape((s.bins + 1, 1))?;
        let ys = knots.y.reshape((s.bins + 1, 1))?;
        let theta_k = theta
            .broadcast_as((s.bins + 1, 1, 3 * s.bins - 1))?
            .contiguous()?;
        let (y, ld) = map(&s, fused, &xs, &theta_k, false)?;
        ensure!(
            max_abs(&(&y - &ys)?)? < 1e-12,
            "{s:?} fused {fused}: knots move"
        );
        ensure!(
            max_abs(&ld)?.is_finite(),
            "{s:?} fused {fused}: log-det not finite at a knot"
        );
        let (x, ld) = map(&s, fused, &ys, &theta_k, true)?;
        ensure!(
            max_abs(&(&x - &xs)?)? < 1e-9,
            "{s:?} fused {fused}: inverse moves knots"
        );
        ensure!(
            max_abs(&ld)?.is_finite(),
            "{s:?} fused {fused}: inverse log-det not finite at a knot"
        );
        // Ends: the derivative there is 1, so the tails join with slope 1.
        let ends = Tensor::new(&[[-s.bound], [s.bound]], &DEV)?;
        let theta_2 = theta.broadcast_as((2, 1, 3 * s.bins - 1))?.contiguous()?;
        let (y, ld) = map(&s, fused, &ends, &theta_2, false)?;
        ensure!(
            max_abs(&(&y - &ends)?)? < 1e-12 && max_abs(&ld)? < 1e-9,
            "{s:?} fused {fused}: the ends move or their log-det is not 0"
        );
        // Far out: the identity, log-det 0, in both directions.
        let far = Tensor::new(&[[-1e6], [1e6]], &DEV)?;
        for inverse in [false, true] {
            let (y, ld) = map(&s, fused, &far, &theta_2, inverse)?;
            ensure!(
                max_abs(&(&y - &far)?)? == 0.0 && max_abs(&ld)? == 0.0,
                "{s:?} fused {fused} inverse {inverse}: the far tails are not the identity"
            );
        }
    }
    Ok(())
}

#[test]
fn a_spline_flow_integrates_to_one() -> Result<()> {
    // One spline on a standard normal: p(x) = φ(f(x)) f'(x), integrated over a grid
    // reaching far into both tails.
    for (s, fused) in splines().into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let theta = params(&s, 1, 1, 6)?;
        let (n, half) = (200_000usize, 12.0f64);
        let h = 2.0 * half / n as f64;
        let x: Vec<f64> = (0..n).map(|i| -half + (i as f64 + 0.5) * h).collect();
        let x = Tensor::from_vec(x, (n, 1), &DEV)?;
        let theta = theta.broadcast_as((n, 1, 3 * s.bins - 1))?.contiguous()?;
        let (z, ld) = map(&s, fused, &x, &theta, false)?;
        let log_p = (z
            .sqr()?
            .squeeze(1)?
            .affine(-0.5, -0.5 * (std::f64::consts::TAU).ln())?
            + ld)?;
        let mass = log_p.exp()?.sum_all()?.to_scalar::<f64>()? * h;
        ensure!(
            (mass - 1.0).abs() < 1e-5,
            "{s:?} fused {fused}: integrates to {mass}"
        );
    }
    Ok(())
}

#[test]
fn gradients_reach_every_parameter() -> Result<()> {
    let s = Spline::new(6, 3.0);
    let theta = candle::Var::from_tensor(&params(&s, 64, 2, 7)?)?;
    let rng = &mut StdRng::seed_from_u64(8);
    let x = (randn(64, 2, DType::F64, &DEV, rng)? * 1.5)?;
    let (y, ld) = s.apply(&x, &[theta.as_tensor().clone()], false)?;
    let loss = (y.sqr()?.sum_all()? - ld.sum_all()?)?;
    let grads = loss.backward()?;
    let g = grads
        .get(theta.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient"))?;
    ensure!(max_abs(g)?.is_finite(), "non-finite gradient");
    // Every one of the 3K − 1 parameters moves the loss somewhere in the batch.
    let per_param = g.abs()?.sum(0)?.sum(0)?.to_vec1::<f64>()?;
    ensure!(per_param.iter().all(|v| *v > 0.0), "{per_param:?}");
    Ok(())
}

/// Relative difference `max|a − b| / (1 + max|b|)`.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    Ok(max_abs(&(&a - &b)?)? / (1.0 + max_abs(&b)?))
}

#[test]
fn fused_kernel_matches_reference_values_and_gradients() -> Result<()> {
    // `apply_fused` runs the kernel whatever the fusion switch; `apply` is plain ops.
    for s in splines() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 2e-5 } else { 1e-11 };
            let (rows, n) = (300, 3);
            let theta = params(&s, rows, n, 9)?.to_dtype(dtype)?;
            let rng = &mut StdRng::seed_from_u64(10);
            let mut x = (randn(rows, n, DType::F64, &DEV, rng)? * s.bound)?.to_vec2::<f64>()?;
            // Exactly on knots (both axes), on the bounds, far out, at zero.
            let kx = s.knots(&params(&s, rows, n, 9)?)?;
            let (kxs, kys) = (kx.x.to_vec3::<f64>()?, kx.y.to_vec3::<f64>()?);
            for (r, row) in x.iter_mut().enumerate().take(60) {
                let k = r % (s.bins + 1);
                row[0] = kxs[r][0][k];
                row[1] = kys[r][1][k];
                row[2] = [s.bound, -s.bound, 1e6, -1e6, 0.0][r % 5];
            }
            let x = Tensor::new(x, &DEV)?.to_dtype(dtype)?;
            for inverse in [false, true] {
                let what = format!("{s:?} {dtype:?} inverse {inverse}");
                let xv = candle::Var::from_tensor(&x)?;
                let tv = candle::Var::from_tensor(&theta)?;
                let (y, ld) = map(&s, true, xv.as_tensor(), tv.as_tensor(), inverse)?;
                let (y_ref, ld_ref) = map(&s, false, xv.as_tensor(), tv.as_tensor(), inverse)?;
                // On knots and bounds in f32 a rounding error moves a point across a
                // knot into a narrow neighbouring bin; those rows are compared in f64.
                let from = if dtype == DType::F32 { 60 } else { 0 };
                let part = |t: &Tensor| t.narrow(0, from, rows - from);
                let (ey, el) = (
                    rel(&part(&y)?, &part(&y_ref)?)?,
                    rel(&part(&ld)?, &part(&ld_ref)?)?,
                );
                ensure!(ey < tol, "{what}: values differ by {ey:e}");
                ensure!(el < tol, "{what}: log-dets differ by {el:e}");
                // Non-uniform upstream gradients on both outputs.
                let wy = randn(rows, n, dtype, &DEV, rng)?;
                let wl = randn(rows, 1, dtype, &DEV, rng)?.squeeze(1)?;
                let loss = |y: &Tensor, ld: &Tensor| -> Result<Tensor> {
                    Ok(((y * &wy)?.sum_all()? + (ld * &wl)?.sum_all()?)?)
                };
                let g = loss(&y, &ld)?.backward()?;
                let g_ref = loss(&y_ref, &ld_ref)?.backward()?;
                for (name, v) in [("x", &xv), ("theta", &tv)] {
                    let (Some(a), Some(b)) = (g.get(v.as_tensor()), g_ref.get(v.as_tensor()))
                    else {
                        anyhow::bail!("{what}: no gradient for {name}");
                    };
                    // On a knot or a bound the derivative in x is one-sided, and which
                    // side is a convention (a knot summed in another order lands a
                    // rounding error to one side): gradients are compared on the
                    // other rows, inside bins and in the tails.
                    let (a, b) = (a.narrow(0, 60, rows - 60)?, b.narrow(0, 60, rows - 60)?);
                    let e = rel(&a, &b)?;
                    ensure!(
                        e < 20.0 * tol,
                        "{what}: gradients to {name} differ by {e:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The CUDA kernel against the CPU's plain-ops reference, values and gradients, on
/// every spline above. Without a GPU this is skipped, unless `FLOWS_REQUIRE_CUDA=1`
/// (set by `scripts/gpu-check.sh`) makes that a failure.
#[cfg(feature = "cuda")]
#[test]
fn fused_cuda_spline_matches_reference() -> Result<()> {
    let Some(gpu) = flow_core::cuda_if_present()? else {
        return Ok(());
    };
    for s in splines() {
        for dtype in [DType::F32, DType::F64] {
            // The GPU's f32 exp and log round differently from the CPU's; the inverse's
            // root and log-slope carry that to a few 1e-5.
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-11 };
            let (rows, n) = (500, 3);
            let theta = params(&s, rows, n, 11)?.to_dtype(dtype)?;
            let rng = &mut StdRng::seed_from_u64(12);
            let x = (randn(rows, n, DType::F64, &DEV, rng)? * s.bound)?.to_dtype(dtype)?;
            let wy = randn(rows, n, dtype, &DEV, rng)?;
            let wl = randn(rows, 1, dtype, &DEV, rng)?.squeeze(1)?;
            for inverse in [false, true] {
                let what = format!("{s:?} {dtype:?} inverse {inverse}");
                let run = |dev: &Device, reference: bool| -> Result<Vec<Tensor>> {
                    let xv = candle::Var::from_tensor(&x.to_device(dev)?)?;
                    let tv = candle::Var::from_tensor(&theta.to_device(dev)?)?;
                    let (y, ld) = map(&s, !reference, xv.as_tensor(), tv.as_tensor(), inverse)?;
                    let loss = ((&y * wy.to_device(dev)?)?.sum_all()?
                        + (&ld * wl.to_device(dev)?)?.sum_all()?)?;
                    let g = loss.backward()?;
                    let grad = |v: &candle::Var| -> Result<Tensor> {
                        Ok(g.get(v.as_tensor())
                            .ok_or_else(|| anyhow::anyhow!("{what}: no gradient"))?
                            .to_device(&DEV)?)
                    };
                    Ok(vec![
                        y.to_device(&DEV)?,
                        ld.to_device(&DEV)?,
                        grad(&xv)?,
                        grad(&tv)?,
                    ])
                };
                let on_gpu = x.to_device(&gpu)?;
                ensure!(
                    flow_kernels::fused(flow_kernels::Op::Spline { bins: s.bins }, &on_gpu),
                    "{what}: the CUDA kernel is not taken"
                );
                let (gpu_out, cpu_out) = (run(&gpu, false)?, run(&DEV, true)?);
                for (i, (a, b)) in gpu_out.iter().zip(&cpu_out).enumerate() {
                    let e = rel(a, b)?;
                    let bound = if i < 2 { tol } else { 20.0 * tol };
                    ensure!(e < bound, "{what}: output {i} differs by {e:e}");
                }
            }
        }
    }
    Ok(())
}
