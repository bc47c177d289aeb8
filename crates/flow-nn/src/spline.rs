use candle::{bail, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{Features, Transform};
use flow_kernels::{Op, SplineShape, SplineStyle};

/// A monotone rational-quadratic spline (Durkan et al. 2019, "Neural Spline Flows"):
/// `bins` bins between knots on `[−bound, bound]` in both directions, the identity (a
/// linear tail of slope 1) outside. Parameters per feature, in order: `bins` widths,
/// `bins` heights, `bins − 1` derivatives at the inner knots (the end derivatives are 1,
/// so the tails join smoothly).
///
/// Defaults: 8 bins, bound 5 (for standardised data), minimum bin width, height and
/// derivative 1e-3, Durkan's parametrisation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spline {
    pub bins: usize,
    #[serde(rename = "tail_bound")]
    pub bound: f64,
    pub style: SplineStyle,
    pub min_bin_width: f64,
    pub min_bin_height: f64,
    pub min_derivative: f64,
}

impl Default for Spline {
    fn default() -> Self {
        Self {
            bins: 8,
            bound: 5.0,
            style: SplineStyle::Durkan,
            min_bin_width: 1e-3,
            min_bin_height: 1e-3,
            min_derivative: 1e-3,
        }
    }
}

/// The knots of one spline per feature: positions `(batch, n, K + 1)` in `x` and `y`,
/// and the derivative at each.
#[derive(Debug, Clone)]
pub struct Knots {
    pub x: Tensor,
    pub y: Tensor,
    pub d: Tensor,
}

/// `log(1 + exp(v))`, stable for large `|v|`.
fn softplus(v: &Tensor) -> Result<Tensor> {
    v.relu()? + v.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

impl Spline {
    pub fn new(bins: usize, bound: f64) -> Self {
        Self {
            bins,
            bound,
            ..Self::default()
        }
    }

    /// Checks the settings; the message names the first that is out of range.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.bins == 0 {
            return Err("a spline needs at least 1 bin".into());
        }
        flow_core::limits::check_at_most("spline bins", self.bins, flow_core::limits::MAX_BINS)?;
        if !(self.bound.is_finite() && self.bound > 0.0) {
            return Err(format!(
                "the tail bound must be positive, got {}",
                self.bound
            ));
        }
        let k = self.bins as f64;
        for (name, v) in [
            ("minimum bin width", self.min_bin_width),
            ("minimum bin height", self.min_bin_height),
        ] {
            if !(v.is_finite() && v >= 0.0 && v * k < 1.0) {
                return Err(format!("{name} {v} does not fit {} bins", self.bins));
            }
        }
        if !(self.min_derivative.is_finite() && self.min_derivative > 0.0) {
            return Err("the minimum derivative must be positive".into());
        }
        Ok(())
    }

    /// Knot positions along one axis, `(…, K + 1)` from the raw sizes `(…, K)`: a
    /// normalised cumulative sum over `[−bound, bound]` with the ends exact.
    fn positions(&self, raw: &Tensor, min: f64) -> Result<Tensor> {
        let k = self.bins;
        let sizes = match self.style {
            SplineStyle::Durkan => {
                candle_nn::ops::softmax(raw, D::Minus1)?.affine(1.0 - min * k as f64, min)?
            }
            SplineStyle::Zuko => candle_nn::ops::softmax(&self.soft_clip(raw, 2.0)?, D::Minus1)?,
        };
        let b = self.bound;
        let ends = |v: f64| -> Result<Tensor> {
            let mut dims = raw.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = 1;
            }
            Tensor::full(v, dims, raw.device())?.to_dtype(raw.dtype())
        };
        if k == 1 {
            return Tensor::cat(&[ends(-b)?, ends(b)?], D::Minus1);
        }
        let inner = sizes
            .cumsum(D::Minus1)?
            .narrow(D::Minus1, 0, k - 1)?
            .affine(2.0 * b, -b)?;
        Tensor::cat(&[ends(-b)?, inner, ends(b)?], D::Minus1)
    }

    /// zuko's soft clip `v / (1 + |f · v / ln slope|)`.
    fn soft_clip(&self, v: &Tensor, f: f64) -> Result<Tensor> {
        let ln = self.min_derivative.ln();
        v.div(&v.abs()?.affine((f / ln).abs(), 1.0)?)
    }

    /// The knots from the stacked raw parameters `(batch, n, 3K − 1)`.
    pub fn knots(&self, theta: &Tensor) -> Result<Knots> {
        let k = self.bins;
        if theta.dim(D::Minus1)? != 3 * k - 1 {
            bail!(
                "a spline of {k} bins takes {} parameters per feature, got {}",
                3 * k - 1,
                theta.dim(D::Minus1)?
            );
        }
        let x = self.positions(&theta.narrow(D::Minus1, 0, k)?, self.min_bin_width)?;
        let y = self.positions(&theta.narrow(D::Minus1, k, k)?, self.min_bin_height)?;
        let raw_d = theta.narrow(D::Minus1, 2 * k, k - 1)?;
        let inner = match self.style {
            SplineStyle::Durkan => softplus(&raw_d)?.affine(1.0, self.min_derivative)?,
            SplineStyle::Zuko => self.soft_clip(&raw_d, 1.0)?.exp()?,
        };
        let mut dims = raw_d.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = 1;
        }
        let one = Tensor::ones(dims, theta.dtype(), theta.device())?;
        let d = Tensor::cat(&[&one, &inner, &one], D::Minus1)?;
        Ok(Knots { x, y, d })
    }
}

/// The bin of each value among the knot positions `at` `(…, K + 1)`, one-hot
/// `(…, K)`: `v` in `[at_k, at_{k+1})` (the last bin closed).
fn bin_of(v: &Tensor, at: &Tensor, bins: usize) -> Result<Tensor> {
    let inner = at.narrow(D::Minus1, 1, bins - 1)?;
    let index = v
        .unsqueeze(D::Minus1)?
        .broadcast_ge(&inner)?
        .to_dtype(v.dtype())?
        .sum_keepdim(D::Minus1)?;
    let all = Tensor::arange(0u32, bins as u32, v.device())?.to_dtype(v.dtype())?;
    index.broadcast_eq(&all)?.to_dtype(v.dtype())
}

/// `Σ onehot · values[…, from..from + K]`.
fn pick(onehot: &Tensor, values: &Tensor, from: usize, bins: usize) -> Result<Tensor> {
    (onehot * values.narrow(D::Minus1, from, bins)?)?.sum(D::Minus1)
}

/// The bin's ends and slopes for each value: `(x0, x1, y0, y1, d0, d1)`.
type Bin = (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor);

fn bin(knots: &Knots, onehot: &Tensor, bins: usize) -> Result<Bin> {
    Ok((
        pick(onehot, &knots.x, 0, bins)?,
        pick(onehot, &knots.x, 1, bins)?,
        pick(onehot, &knots.y, 0, bins)?,
        pick(onehot, &knots.y, 1, bins)?,
        pick(onehot, &knots.d, 0, bins)?,
        pick(onehot, &knots.d, 1, bins)?,
    ))
}

/// `log dy/dx` inside a bin at its relative position `z`, with `s` the bin's slope.
fn log_slope(z: &Tensor, s: &Tensor, d0: &Tensor, d1: &Tensor) -> Result<Tensor> {
    let one_z = z.affine(-1.0, 1.0)?;
    let zz = (z * &one_z)?;
    let numerator = ((d1 * z.sqr()?)? + (s * &zz)?.affine(2.0, 0.0)? + (d0 * one_z.sqr()?)?)?;
    let denominator = (s + ((d0 + d1)? - s.affine(2.0, 0.0)?)?.mul(&zz)?)?;
    (s.sqr()?.log()? + numerator.log()?)? - denominator.log()?.affine(2.0, 0.0)?
}

impl Transform for Spline {
    fn params(&self) -> Vec<String> {
        let k = self.bins;
        (0..k)
            .map(|i| format!("w{i}"))
            .chain((0..k).map(|i| format!("h{i}")))
            .chain((1..k).map(|i| format!("d{i}")))
            .collect()
    }

    fn stacked(&self) -> bool {
        true
    }

    /// The spline as plain candle ops.
    fn apply(&self, x: &Tensor, theta: &[Tensor], inverse: bool) -> Result<(Tensor, Tensor)> {
        let theta = one(theta)?;
        let knots = self.knots(theta)?;
        let k = self.bins;
        let b = self.bound;
        // Inside [−b, b] the spline; outside the identity. The clamped value keeps the
        // unused branch finite (so its gradient, multiplied by zero, stays zero).
        let inside = x.ge(-b)?.mul(&x.le(b)?)?;
        let v = x.clamp(-b, b)?;
        let (y, ld) = if inverse {
            let onehot = bin_of(&v, &knots.y, k)?;
            let (x0, x1, y0, y1, d0, d1) = bin(&knots, &onehot, k)?;
            let (w, h) = ((&x1 - &x0)?, (&y1 - &y0)?);
            let s = (&h / &w)?;
            let dy = (&v - &y0)?;
            let curve = ((&d0 + &d1)? - s.affine(2.0, 0.0)?)?;
            let a = ((&h * (&s - &d0)?)? + (&dy * &curve)?)?;
            let bq = ((&h * &d0)? - (&dy * &curve)?)?;
            let c = (s.neg()? * &dy)?;
            let disc = (bq.sqr()? - (&a * &c)?.affine(4.0, 0.0)?)?.relu()?;
            let z = (c.affine(2.0, 0.0)? / (bq.neg()? - disc.sqrt()?)?)?;
            let out = (&x0 + (&z * &w)?)?;
            (out, log_slope(&z, &s, &d0, &d1)?.neg()?)
        } else {
            let onehot = bin_of(&v, &knots.x, k)?;
            let (x0, x1, y0, y1, d0, d1) = bin(&knots, &onehot, k)?;
            let (w, h) = ((&x1 - &x0)?, (&y1 - &y0)?);
            let s = (&h / &w)?;
            let z = ((&v - &x0)? / &w)?;
            let one_z = z.affine(-1.0, 1.0)?;
            let zz = (&z * &one_z)?;
            let numerator = ((&s * z.sqr()?)? + (&d0 * &zz)?)?;
            let denominator = (&s + ((&d0 + &d1)? - s.affine(2.0, 0.0)?)?.mul(&zz)?)?;
            let out = (&y0 + (&h * (numerator / denominator)?)?)?;
            (out, log_slope(&z, &s, &d0, &d1)?)
        };
        let y = inside.where_cond(&y, x)?;
        let ld = inside.where_cond(&ld, &ld.zeros_like()?)?;
        Ok((y, ld.sum(D::Minus1)?))
    }

    fn check(&self) -> std::result::Result<(), String> {
        Spline::check(self)
    }

    fn kernel(&self) -> Option<Op> {
        Some(Op::Spline { bins: self.bins })
    }

    /// One op over the mapped features, knots to log-slope.
    fn apply_fused(
        &self,
        x: &Tensor,
        features: Features,
        theta: &[Tensor],
        inverse: bool,
    ) -> Result<(Tensor, Tensor)> {
        let theta = one(theta)?;
        let (y, log_det) =
            flow_kernels::spline::spline(&features.select(x)?, theta, self.shape(), inverse)?;
        Ok((features.merge(y)?, log_det))
    }
}

/// The stacked parameters `(batch, n, 3K − 1)`.
fn one(theta: &[Tensor]) -> Result<&Tensor> {
    match theta {
        [theta] => Ok(theta),
        _ => bail!("a spline takes its parameters stacked as one tensor"),
    }
}

impl Spline {
    /// The settings as the fused kernel takes them.
    fn shape(&self) -> SplineShape {
        SplineShape {
            bins: self.bins,
            bound: self.bound,
            style: self.style,
            min_bin_width: self.min_bin_width,
            min_bin_height: self.min_bin_height,
            min_derivative: self.min_derivative,
        }
    }
}
