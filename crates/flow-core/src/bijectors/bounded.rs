use candle::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{zero_log_det, Bijector};

/// The interval one data column lives in: `(low, high)`, either side possibly open
/// (`None`: unbounded on that side).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub low: Option<f64>,
    pub high: Option<f64>,
}

impl Bound {
    pub fn new(low: Option<f64>, high: Option<f64>) -> Self {
        Self { low, high }
    }

    /// No bound on either side.
    pub fn unbounded() -> Self {
        Self::new(None, None)
    }

    /// Checks that each closed side is finite as the `f32` the layer computes in, that
    /// `low < high` there, and that the interval's width is finite there too.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for side in [self.low, self.high].into_iter().flatten() {
            if !(side as f32).is_finite() {
                return Err(format!(
                    "a bound must be finite in f32 (below {:e} in size), got {side:e}",
                    f32::MAX
                ));
            }
        }
        if let (Some(low), Some(high)) = (self.low, self.high) {
            if low as f32 >= high as f32 {
                return Err(format!(
                    "the lower bound {} is not below the upper bound {} in f32",
                    crate::limits::number(low),
                    crate::limits::number(high)
                ));
            }
            if !(high as f32 - low as f32).is_finite() {
                return Err(format!(
                    "the interval {low:e}:{high:e} is wider than f32 holds"
                ));
            }
        }
        Ok(())
    }

    /// Whether `v` lies strictly inside: a density on the interval is zero on its ends.
    /// The ends are those the layer computes with, in f32 (`0.3` is the f32 nearest
    /// it), so that a value inside is one the layer maps to a finite point.
    pub fn contains(&self, v: f64) -> bool {
        let end = |e: f64| f64::from(e as f32);
        self.low.is_none_or(|l| v > end(l)) && self.high.is_none_or(|h| v < end(h)) && !v.is_nan()
    }
}

impl std::fmt::Display for Bound {
    /// `low:high`, with `-inf` and `inf` for open sides (as `flow train --bounds` reads it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.low {
            Some(l) => write!(f, "{l}")?,
            None => write!(f, "-inf")?,
        }
        match self.high {
            Some(h) => write!(f, ":{h}"),
            None => write!(f, ":inf"),
        }
    }
}

/// The columns of one kind of bound, and their ends as `(1, columns)` tensors.
#[derive(Debug, Clone)]
struct Group {
    kind: Kind,
    /// The columns, as indices into the row.
    columns: Tensor,
    ends: Ends,
}

/// One group's ends (0 where a side is open), and the values one step inside them in
/// the layer's dtype: where `σ(y)` or a softplus rounds a sample onto a face, the
/// sample is moved there, so samples never leave the open box.
#[derive(Debug, Clone)]
struct Ends {
    low: Tensor,
    high: Tensor,
    inside_low: Tensor,
    inside_high: Tensor,
}

impl Ends {
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            low: self.low.to_dtype(dtype)?,
            high: self.high.to_dtype(dtype)?,
            inside_low: self.inside_low.to_dtype(dtype)?,
            inside_high: self.inside_high.to_dtype(dtype)?,
        })
    }
}

/// `v` moved one representable step up (`up`) or down in `dtype`, for f32 and f64
/// (the layer's dtypes; in f16 or bf16 the f64 step rounds back onto the face, and
/// samples there are not moved).
fn step(v: f64, up: bool, dtype: DType) -> f64 {
    match (dtype, up) {
        (DType::F32, true) => f64::from((v as f32).next_up()),
        (DType::F32, false) => f64::from((v as f32).next_down()),
        (_, true) => v.next_up(),
        (_, false) => v.next_down(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unbounded,
    /// `(low, high)`: the logit of the position in the interval.
    Both,
    /// `(low, ∞)`: the inverse softplus of `x − low`.
    Lower,
    /// `(−∞, high)`: minus the inverse softplus of `high − x`.
    Upper,
}

/// A fixed map from a box to the whole space, column by column: the logit of
/// `(x − low) / (high − low)` on a bounded interval, the inverse softplus of the
/// distance to the one end of a half-bounded one, the identity on an unbounded one.
///
/// In front of a flow it confines the flow's density to the box: samples (`inverse`)
/// never leave it, and `log p(x)` is a density on it (its log-determinant accounts for
/// the squeeze). A softplus rather than an exponential keeps a half-bounded column's
/// far tail linear, so heavy tails stay within the flow's reach. Points outside the box
/// (or on its faces) map to NaN: check data with [`Bound::contains`] first.
#[derive(Debug, Clone)]
pub struct Bounded {
    bounds: Vec<Bound>,
    groups: Vec<Group>,
    /// Where each column lands when the groups are put side by side; selecting these
    /// puts the columns back in order.
    restore: Tensor,
}

impl Bounded {
    /// One [`Bound`] per column, each valid.
    pub fn new(bounds: &[Bound], dtype: DType, device: &Device) -> Result<Self> {
        if bounds.is_empty() {
            bail!("bounds for no columns");
        }
        for (j, b) in bounds.iter().enumerate() {
            if let Err(e) = b.validate() {
                bail!("column {}: {e}", j + 1);
            }
        }
        let kind_of = |b: &Bound| match (b.low, b.high) {
            (None, None) => Kind::Unbounded,
            (Some(_), Some(_)) => Kind::Both,
            (Some(_), None) => Kind::Lower,
            (None, Some(_)) => Kind::Upper,
        };
        let mut groups = Vec::new();
        let mut placed = Vec::with_capacity(bounds.len());
        for kind in [Kind::Unbounded, Kind::Both, Kind::Lower, Kind::Upper] {
            let columns: Vec<usize> = (0..bounds.len())
                .filter(|&j| kind_of(&bounds[j]) == kind)
                .collect();
            if columns.is_empty() {
                continue;
            }
            let row = |side: &dyn Fn(&Bound) -> Option<f64>| -> Result<Tensor> {
                let v: Vec<f64> = columns
                    .iter()
                    .map(|&j| side(&bounds[j]).unwrap_or(0.0))
                    .collect();
                Tensor::from_vec(v, (1, columns.len()), device)?.to_dtype(dtype)
            };
            let ids: Vec<u32> = columns.iter().map(|&j| j as u32).collect();
            groups.push(Group {
                kind,
                columns: Tensor::from_vec(ids, columns.len(), device)?,
                ends: Ends {
                    low: row(&|b| b.low)?,
                    high: row(&|b| b.high)?,
                    inside_low: row(&|b| b.low.map(|l| step(l, true, dtype)))?,
                    inside_high: row(&|b| b.high.map(|h| step(h, false, dtype)))?,
                },
            });
            placed.extend(columns);
        }
        let mut restore = vec![0u32; bounds.len()];
        for (position, &column) in placed.iter().enumerate() {
            restore[column] = position as u32;
        }
        Ok(Self {
            bounds: bounds.to_vec(),
            groups,
            restore: Tensor::from_vec(restore, bounds.len(), device)?,
        })
    }

    pub fn bounds(&self) -> &[Bound] {
        &self.bounds
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, d] if *d == self.bounds.len() => Ok(()),
            dims => bail!(
                "bounds for {} columns applied to a tensor of shape {dims:?}",
                self.bounds.len()
            ),
        }
    }

    /// Applies `map` to each group's columns and puts the results back in column order,
    /// adding up the groups' log-determinants.
    fn map(
        &self,
        x: &Tensor,
        map: impl Fn(Kind, &Tensor, &Ends) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        self.check(x)?;
        let mut parts = Vec::with_capacity(self.groups.len());
        let mut log_det = zero_log_det(x)?;
        for g in &self.groups {
            let part = x.index_select(&g.columns, 1)?;
            let (y, ld) = map(g.kind, &part, &g.ends.to_dtype(x.dtype())?)?;
            parts.push(y);
            log_det = (log_det + ld.sum(1)?)?;
        }
        let y = Tensor::cat(&parts, 1)?.index_select(&self.restore, 1)?;
        Ok((y, log_det))
    }
}

/// `x`, with each value below `floor` (a `(1, columns)` row) raised to it. A comparison
/// rather than a maximum, so that NaN stays NaN on every device (CUDA's `fmaxf` drops
/// it).
fn above(x: &Tensor, floor: &Tensor) -> Result<Tensor> {
    let floor = floor.broadcast_as(x.shape())?;
    x.lt(&floor)?.where_cond(&floor, x)
}

/// `x`, with each value above `ceiling` lowered to it; NaN stays NaN.
fn below(x: &Tensor, ceiling: &Tensor) -> Result<Tensor> {
    let ceiling = ceiling.broadcast_as(x.shape())?;
    x.gt(&ceiling)?.where_cond(&ceiling, x)
}

/// `log(1 + exp(v))` without overflow: `max(v, 0) + log(1 + exp(−|v|))`.
fn softplus(v: &Tensor) -> Result<Tensor> {
    v.relu()? + (v.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `1 − exp(−t)` for `t > 0`, accurate for small `t` too: for `t ≤ 1`, Kahan's
/// `(1 − e)·t / (−log e)` with `e = exp(−t)` (whose rounding errors cancel), and `t`
/// itself where `e` rounds to 1.
fn one_minus_exp_neg(t: &Tensor) -> Result<Tensor> {
    let e = t.neg()?.exp()?;
    let plain = e.affine(-1.0, 1.0)?;
    let kahan = (&plain * t)?.div(&e.log()?.neg()?)?;
    let small = e.eq(1.0)?.where_cond(t, &kahan)?;
    t.gt(1.0)?.where_cond(&plain, &small)
}

/// `(y, log|dy/dx|)` of the inverse softplus `y = t + log(1 − exp(−t))` at `t > 0`.
fn inverse_softplus(t: &Tensor) -> Result<(Tensor, Tensor)> {
    let log_q = one_minus_exp_neg(t)?.log()?;
    Ok(((t + &log_q)?, log_q.neg()?))
}

impl Bijector for Bounded {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.map(x, |kind, x, ends| {
            let (low, high) = (&ends.low, &ends.high);
            match kind {
                Kind::Unbounded => Ok((x.clone(), x.zeros_like()?)),
                Kind::Both => {
                    // The logit of (x − low) / (high − low), as a difference of logs so that
                    // both ends keep their precision.
                    let to_low = x.broadcast_sub(low)?.log()?;
                    let to_high = high.broadcast_sub(x)?.log()?;
                    let width = (high - low)?.log()?;
                    let ld = (to_low.neg()? - &to_high)?.broadcast_add(&width)?;
                    Ok(((to_low - to_high)?, ld))
                }
                Kind::Lower => inverse_softplus(&x.broadcast_sub(low)?),
                Kind::Upper => {
                    let (y, ld) = inverse_softplus(&high.broadcast_sub(x)?)?;
                    Ok((y.neg()?, ld))
                }
            }
        })
    }

    fn inverse(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        self.map(y, |kind, y, ends| {
            let (low, high) = (&ends.low, &ends.high);
            match kind {
                Kind::Unbounded => Ok((y.clone(), y.zeros_like()?)),
                Kind::Both => {
                    let width = (high - low)?;
                    let (up, down) = (softplus(y)?, softplus(&y.neg()?)?);
                    // low + width·σ(y) from the nearer end, so neither end loses precision.
                    let from_low = down
                        .neg()?
                        .exp()?
                        .broadcast_mul(&width)?
                        .broadcast_add(low)?;
                    let from_high = high.broadcast_sub(&up.neg()?.exp()?.broadcast_mul(&width)?)?;
                    let x = y.gt(0.0)?.where_cond(&from_high, &from_low)?;
                    let x = above(&x, &ends.inside_low)?;
                    let x = below(&x, &ends.inside_high)?;
                    let ld = (up + down)?.neg()?.broadcast_add(&width.log()?)?;
                    Ok((x, ld))
                }
                Kind::Lower => Ok((
                    above(&softplus(y)?.broadcast_add(low)?, &ends.inside_low)?,
                    softplus(&y.neg()?)?.neg()?,
                )),
                Kind::Upper => Ok((
                    below(
                        &high.broadcast_sub(&softplus(&y.neg()?)?)?,
                        &ends.inside_high,
                    )?,
                    softplus(y)?.neg()?,
                )),
            }
        })
    }
}
