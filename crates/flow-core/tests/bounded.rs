//! The bounds map: it inverts, its log-determinant is the numerical Jacobian's, a flow
//! behind it is a density on the box (it integrates to one there) and its samples stay
//! inside, and bad bounds are refused with their reason.

use anyhow::{ensure, Result};
use candle::{DType, Device, Tensor};
use flow_core::{Bijector, Bound, Bounded, Chain, Flow, StandardNormal, Standardize};
use rand::{rngs::StdRng, Rng, SeedableRng};

const DEV: Device = Device::Cpu;

/// One column of each kind, out of the order the map groups them in.
fn mixed() -> Vec<Bound> {
    vec![
        Bound::new(Some(0.5), None),
        Bound::new(Some(-1.0), Some(2.0)),
        Bound::unbounded(),
        Bound::new(None, Some(-3.0)),
    ]
}

/// Points strictly inside `bounds`, some near the ends.
fn inside(bounds: &[Bound], n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n * bounds.len());
    for i in 0..n {
        for b in bounds {
            // Every fifth row within 1e-6 of a finite end.
            let gap = if i % 5 == 0 {
                1e-6 * rng.random::<f64>() + 1e-9
            } else {
                4.0 * rng.random::<f64>() + 1e-3
            };
            out.push(match (b.low, b.high) {
                (Some(l), Some(h)) => {
                    let u = (gap / 4.0).min(1.0 - 1e-9);
                    if rng.random::<bool>() {
                        l + (h - l) * u
                    } else {
                        h - (h - l) * u
                    }
                }
                (Some(l), None) => l + gap,
                (None, Some(h)) => h - gap,
                (None, None) => 6.0 * rng.random::<f64>() - 3.0,
            });
        }
    }
    out
}

#[test]
fn inverts_both_ways_to_rounding() -> Result<()> {
    let bounds = mixed();
    let map = Bounded::new(&bounds, DType::F64, &DEV)?;
    let x = Tensor::from_vec(inside(&bounds, 200, 1), (200, 4), &DEV)?;
    let (y, ld) = map.forward(&x)?;
    let (back, ld_back) = map.inverse(&y)?;
    let err = (back - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(err < 1e-12, "x → y → x is off by {err}");
    let ld_err = (ld + ld_back)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(ld_err < 1e-9, "the log-dets do not cancel: {ld_err}");
    // The whole space maps into the box and back, tails included (as far as f64 tells
    // points apart near an end: at |y| = 15, within 3e-7 of it).
    let mut rng = StdRng::seed_from_u64(2);
    let y: Vec<f64> = (0..800)
        .map(|_| 30.0 * rng.random::<f64>() - 15.0)
        .collect();
    let y = Tensor::from_vec(y, (200, 4), &DEV)?;
    let (x, _) = map.inverse(&y)?;
    let (again, _) = map.forward(&x)?;
    let err = ((again - &y)?.abs()? / (y.abs()? + 1.0)?)?
        .max_all()?
        .to_scalar::<f64>()?;
    ensure!(err < 1e-6, "y → x → y is off by {err} (relative)");
    Ok(())
}

#[test]
fn the_log_det_is_the_numerical_jacobians() -> Result<()> {
    let bounds = mixed();
    let map = Bounded::new(&bounds, DType::F64, &DEV)?;
    let points = inside(&bounds, 20, 3);
    let h = 1e-7;
    for (i, row) in points.chunks(4).enumerate() {
        // Skip the rows a step of h would push out of the box.
        if i % 5 == 0 {
            continue;
        }
        let at = |p: &[f64]| -> Result<(Vec<f64>, f64)> {
            let (y, ld) = map.forward(&Tensor::from_slice(p, (1, 4), &DEV)?)?;
            Ok((y.flatten_all()?.to_vec1()?, ld.to_vec1::<f64>()?[0]))
        };
        let (_, ld) = at(row)?;
        let mut jacobian = [[0.0; 4]; 4];
        for j in 0..4 {
            let (mut up, mut down) = (row.to_vec(), row.to_vec());
            up[j] += h;
            down[j] -= h;
            let (yu, yd) = (at(&up)?.0, at(&down)?.0);
            for k in 0..4 {
                jacobian[k][j] = (yu[k] - yd[k]) / (2.0 * h);
            }
        }
        // Column by column: the Jacobian is diagonal, each column in its place.
        for (k, jrow) in jacobian.iter().enumerate() {
            for (j, v) in jrow.iter().enumerate() {
                ensure!(k == j || v.abs() < 1e-6, "∂y{k}/∂x{j} = {v} at {row:?}");
            }
        }
        let numeric: f64 = (0..4).map(|j| jacobian[j][j].abs().ln()).sum();
        ensure!(
            (numeric - ld).abs() < 1e-5,
            "log-det {ld} against the numerical {numeric} at {row:?}"
        );
    }
    Ok(())
}

/// A fixed flow on `bounds`: the map, a shift and stretch (so the density is not the
/// map's alone), then a standard normal.
fn flow(bounds: &[Bound], dtype: DType) -> Result<Flow> {
    let d = bounds.len();
    let mut chain = Chain::default();
    chain.push(Bounded::new(bounds, dtype, &DEV)?);
    let mean: Vec<f64> = (0..d).map(|j| 0.7 - 0.4 * j as f64).collect();
    let std: Vec<f64> = (0..d).map(|j| 1.3 + 0.3 * j as f64).collect();
    let t = |v: Vec<f64>| Tensor::from_vec(v, d, &DEV)?.to_dtype(dtype);
    chain.push(Standardize::new(&t(mean)?, &t(std)?)?);
    Ok(Flow::new(chain, StandardNormal::new(d, dtype, &DEV)))
}

/// Midpoint-rule integral of `exp(log p)` over `[lo, hi]` in each of the columns.
fn integral(flow: &Flow, ranges: &[(f64, f64)], cells: &[usize]) -> Result<f64> {
    let (d, total): (usize, usize) = (ranges.len(), cells.iter().product());
    let mut points = Vec::with_capacity(total * d);
    let mut volume = 1.0;
    for (&(lo, hi), &n) in ranges.iter().zip(cells) {
        volume *= (hi - lo) / n as f64;
    }
    for index in 0..total {
        let mut rest = index;
        for (&(lo, hi), &n) in ranges.iter().zip(cells) {
            let k = rest % n;
            rest /= n;
            points.push(lo + (hi - lo) * (k as f64 + 0.5) / n as f64);
        }
    }
    let x = Tensor::from_vec(points, (total, d), &DEV)?;
    let p = flow.log_prob(&x)?.exp()?.sum_all()?.to_scalar::<f64>()?;
    Ok(p * volume)
}

#[test]
fn densities_integrate_to_one_over_the_box() -> Result<()> {
    // One dimension, each kind of interval; an open side is integrated far enough out
    // that the rest is below 1e-12.
    let cases = [
        (Bound::new(Some(-1.0), Some(2.0)), (-1.0, 2.0)),
        (Bound::new(Some(0.5), None), (0.5, 40.0)),
        (Bound::new(None, Some(-3.0)), (-40.0, -3.0)),
    ];
    for (bound, range) in cases {
        let f = flow(&[bound], DType::F64)?;
        let total = integral(&f, &[range], &[400_000])?;
        ensure!(
            (total - 1.0).abs() < 1e-4,
            "{bound}: the density integrates to {total}"
        );
    }
    // Two dimensions: a bounded column beside a half-bounded one.
    let bounds = [
        Bound::new(Some(-1.0), Some(1.0)),
        Bound::new(Some(0.0), None),
    ];
    let total = integral(
        &flow(&bounds, DType::F64)?,
        &[(-1.0, 1.0), (0.0, 30.0)],
        &[1000, 3000],
    )?;
    ensure!(
        (total - 1.0).abs() < 1e-3,
        "the 2-d density integrates to {total}"
    );
    Ok(())
}

#[test]
fn samples_never_leave_the_box() -> Result<()> {
    let bounds = mixed();
    let f = flow(&bounds, DType::F32)?;
    let rng = &mut StdRng::seed_from_u64(4);
    // A high temperature sends draws far into the tails, where f32 rounds hardest.
    for temperature in [1.0, 20.0] {
        let s = f.sample_with_temperature(20_000, temperature, rng)?;
        for row in s.to_vec2::<f32>()? {
            for (v, b) in row.iter().zip(&bounds) {
                let v = f64::from(*v);
                ensure!(b.contains(v), "the sample {v} left the open interval {b}");
                ensure!(v.is_finite(), "a sample of {b} is {v}");
            }
        }
    }
    Ok(())
}

#[test]
fn latents_far_out_map_strictly_inside_the_box_in_either_precision() -> Result<()> {
    // Where σ(y) or the softplus rounds to an end, the point is kept one step inside.
    let bounds = [
        Bound::new(Some(-1.0), Some(2.0)),
        Bound::new(Some(1.0), None),
        Bound::new(None, Some(-3.0)),
    ];
    let far = [-1e4, -100.0, -40.0, 40.0, 100.0, 1e4];
    for dtype in [DType::F32, DType::F64] {
        let map = Bounded::new(&bounds, dtype, &DEV)?;
        let y: Vec<f64> = far.iter().flat_map(|&v| [v, v, v]).collect();
        let y = Tensor::from_vec(y, (far.len(), 3), &DEV)?.to_dtype(dtype)?;
        let (x, _) = map.inverse(&y)?;
        for row in x.to_dtype(DType::F64)?.to_vec2::<f64>()? {
            for (v, b) in row.iter().zip(&bounds) {
                ensure!(b.contains(*v), "{dtype:?}: {v} is not inside {b}");
            }
        }
        // A latent that is not a number stays one: the clamp does not hide it.
        let nan = Tensor::from_vec(vec![f64::NAN; 3], (1, 3), &DEV)?.to_dtype(dtype)?;
        let x = map
            .inverse(&nan)?
            .0
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        ensure!(
            x[0].iter().all(|v| v.is_nan()),
            "{dtype:?}: NaN became {x:?}"
        );
    }
    Ok(())
}

#[test]
fn bad_bounds_are_refused_with_their_reason() -> Result<()> {
    let refused = |bounds: &[Bound]| match Bounded::new(bounds, DType::F32, &DEV) {
        // The message's first line: candle may append a backtrace.
        Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
        Ok(_) => "accepted".into(),
    };
    assert_eq!(
        refused(&[Bound::unbounded(), Bound::new(Some(1.0), Some(1.0))]),
        "column 2: the lower bound 1 is not below the upper bound 1 in f32"
    );
    assert_eq!(
        refused(&[Bound::new(Some(f64::NAN), None)]),
        "column 1: a bound must be finite in f32 (below 3.4028235e38 in size), got NaN"
    );
    assert_eq!(
        refused(&[Bound::new(None, Some(f64::INFINITY))]),
        "column 1: a bound must be finite in f32 (below 3.4028235e38 in size), got inf"
    );
    assert_eq!(refused(&[]), "bounds for no columns");
    // Inside means strictly inside: a density on the box is zero on its faces.
    let b = Bound::new(Some(0.0), Some(1.0));
    assert!(b.contains(0.5) && !b.contains(0.0) && !b.contains(1.0) && !b.contains(f64::NAN));
    assert_eq!(b.to_string(), "0:1");
    assert_eq!(Bound::new(None, Some(2.5)).to_string(), "-inf:2.5");
    Ok(())
}
