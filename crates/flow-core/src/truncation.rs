//! A flow confined to a box by rejection: the flow's density restricted to the box and
//! divided by the mass it puts there,
//! `p(x | c) = q(x | c) · 1[x ∈ box] / A(c)`, `A(c) = P_q(x ∈ box | c)`.
//!
//! Samples are the flow's draws that land inside, so they follow that density exactly;
//! the acceptance `A(c)` has no closed form and is estimated from draws, so a
//! log-density is exact up to that estimate. This is the other way to confine a flow
//! to a box besides the fixed logit map of [`Bounded`](crate::Bounded): the flow is
//! trained on the data as they are, and the box is applied when drawing and scoring.

use std::collections::{HashMap, HashSet};

use candle::{bail, DType, Result, Tensor};
use rand::{rngs::StdRng, RngCore, SeedableRng};

use crate::{Bound, Flow};

/// Draws per sample after which sampling gives up: the flow then puts less than one
/// part in this many of its mass inside the box at some context.
pub const MAX_DRAWS_PER_SAMPLE: usize = 1_000;

/// Draws that estimate the acceptance at one context.
pub const ACCEPTANCE_DRAWS: usize = 10_000;

/// The most distinct contexts whose normalisers one [`TruncatedLogProb`] estimates:
/// each takes [`ACCEPTANCE_DRAWS`] draws.
pub const MAX_NORMALISED_CONTEXTS: usize = 1_000;

/// The seed of the draws that estimate normalisers, so that a row's log-density does
/// not change from one evaluation to the next.
const NORMALISER_SEED: u64 = 0x7472_756e_6361_7465;

/// The most draws made in one pass through the flow.
const DRAWS_PER_PASS: usize = 1 << 14;

/// A flow and the box its density is restricted to.
#[derive(Debug)]
pub struct Truncated<'a> {
    flow: &'a Flow,
    bounds: &'a [Bound],
}

impl<'a> Truncated<'a> {
    /// `flow` restricted to `bounds`, one per feature.
    pub fn new(flow: &'a Flow, bounds: &'a [Bound]) -> Result<Self> {
        if bounds.len() != flow.dim() {
            bail!(
                "bounds for {} columns for a flow of {} features",
                bounds.len(),
                flow.dim()
            );
        }
        Ok(Self { flow, bounds })
    }

    fn inside(&self, row: &[f64]) -> bool {
        row.iter().zip(self.bounds).all(|(&v, b)| b.contains(v))
    }

    /// `n` samples `(n, dim)` inside the box, as
    /// [`Flow::sample_with_context`] takes its context and temperature: each row is
    /// drawn until it lands inside. Fails when more than [`MAX_DRAWS_PER_SAMPLE`]
    /// draws per sample have been made.
    pub fn sample(
        &self,
        n: usize,
        temperature: f64,
        context: Option<&Tensor>,
        rng: &mut dyn RngCore,
    ) -> Result<Tensor> {
        let dim = self.flow.dim();
        let per_row = match context {
            Some(c) if c.dim(0)? == n && n != 1 => Some(c),
            Some(c) if c.dim(0)? != 1 => {
                bail!("a context of {} rows for {n} samples", c.dim(0)?)
            }
            _ => None,
        };
        let mut kept: Vec<Option<Vec<f64>>> = vec![None; n];
        let mut pending: Vec<usize> = (0..n).collect();
        let (mut drawn, mut accepted) = (0usize, 0usize);
        let (mut dtype, mut device) = (DType::F32, candle::Device::Cpu);
        while !pending.is_empty() {
            // Each pending row is drawn `copies` times a pass, enough for one to land
            // inside at the acceptance seen so far.
            let rate = (accepted.max(1) as f64) / (drawn.max(1) as f64);
            let copies =
                ((1.0 / rate).ceil() as usize).clamp(1, (DRAWS_PER_PASS / pending.len()).max(1));
            let rows = pending.len() * copies;
            let owner = |j: usize| pending[j / copies];
            let given = match per_row {
                Some(c) => {
                    let index: Vec<u32> = (0..rows).map(|j| owner(j) as u32).collect();
                    let index = Tensor::from_vec(index, rows, c.device())?;
                    Some(c.index_select(&index, 0)?)
                }
                None => context.cloned(),
            };
            let x = self
                .flow
                .sample_with_context(rows, temperature, given.as_ref(), rng)?;
            (dtype, device) = (x.dtype(), x.device().clone());
            let values = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            for (j, row) in values.into_iter().enumerate() {
                let slot = &mut kept[owner(j)];
                if slot.is_none() && self.inside(&row) {
                    *slot = Some(row);
                    accepted += 1;
                }
            }
            drawn += rows;
            pending.retain(|&i| kept[i].is_none());
            if !pending.is_empty() && drawn >= n.saturating_mul(MAX_DRAWS_PER_SAMPLE) {
                bail!(
                    "{} of {n} samples still outside the bounds after {drawn} draws ({MAX_DRAWS_PER_SAMPLE} per sample): the flow puts almost none of its mass inside them{}",
                    pending.len(),
                    match per_row {
                        Some(_) => format!(" at the context of sample {}", pending[0] + 1),
                        None => String::new(),
                    }
                );
            }
        }
        let values: Vec<f64> = kept.into_iter().flatten().flatten().collect();
        Tensor::from_vec(values, (n, dim), &device)?.to_dtype(dtype)
    }

    /// The estimated mass `A(c)` the flow puts inside the box at one context
    /// (`(1, context features)`, or `None` for an unconditional flow): the fraction of
    /// `draws` samples that land inside.
    pub fn acceptance(
        &self,
        context: Option<&Tensor>,
        draws: usize,
        rng: &mut dyn RngCore,
    ) -> Result<f64> {
        if draws == 0 {
            bail!("the acceptance needs at least one draw");
        }
        let (mut left, mut inside) = (draws, 0usize);
        while left > 0 {
            let rows = left.min(DRAWS_PER_PASS);
            let x = self.flow.sample_with_context(rows, 1.0, context, rng)?;
            let values = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            inside += values.iter().filter(|row| self.inside(row)).count();
            left -= rows;
        }
        Ok(inside as f64 / draws as f64)
    }

    /// `−log A(c)`, the term that turns the flow's log-density at context `c` into the
    /// truncated one, from [`ACCEPTANCE_DRAWS`] draws; fails when none lands inside.
    pub fn log_normaliser(&self, context: Option<&Tensor>, rng: &mut dyn RngCore) -> Result<f64> {
        let a = self.acceptance(context, ACCEPTANCE_DRAWS, rng)?;
        if a == 0.0 {
            bail!("none of {ACCEPTANCE_DRAWS} draws of the flow lies inside the bounds: its density there cannot be normalised");
        }
        Ok(-a.ln())
    }
}

/// Log-densities of a flow restricted to a box: the flow's, minus the log of its mass
/// inside at each row's context (estimated once per distinct context, from a fixed
/// seed), and `−∞` outside the box.
#[derive(Debug)]
pub struct TruncatedLogProb<'a> {
    truncated: Truncated<'a>,
    /// `−log A(c)` by the context's values (their bits; empty without a context).
    normalisers: HashMap<Vec<u64>, f64>,
    rng: StdRng,
}

impl<'a> TruncatedLogProb<'a> {
    pub fn new(flow: &'a Flow, bounds: &'a [Bound]) -> Result<Self> {
        Ok(Self {
            truncated: Truncated::new(flow, bounds)?,
            normalisers: HashMap::new(),
            rng: StdRng::seed_from_u64(NORMALISER_SEED),
        })
    }

    /// The flow restricted to the box, for drawing.
    pub fn truncated(&self) -> &Truncated<'a> {
        &self.truncated
    }

    /// The distinct contexts whose normalisers have been estimated.
    pub fn contexts(&self) -> usize {
        self.normalisers.len()
    }

    /// The smallest estimated mass inside the box over those contexts.
    pub fn smallest_acceptance(&self) -> Option<f64> {
        self.normalisers
            .values()
            .map(|s| (-s).exp())
            .min_by(f64::total_cmp)
    }

    /// `log p(x | context)` `(batch,)`, the context as [`Flow::log_prob_with_context`]
    /// takes it. Fails, before estimating any, when the rows' new contexts would pass
    /// [`MAX_NORMALISED_CONTEXTS`].
    pub fn log_prob(&mut self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let flow = self.truncated.flow;
        let log_p = flow.log_prob_with_context(x, context)?;
        let rows = x.dim(0)?;
        let contexts: Vec<Vec<f64>> = match context {
            Some(c) => c.to_dtype(DType::F64)?.to_vec2()?,
            None => vec![Vec::new()],
        };
        // Each context row's key (its values' bits), and each point's context row, or
        // `None` outside the box, where the density is zero.
        let keys: Vec<Vec<u64>> = contexts
            .iter()
            .map(|c| c.iter().map(|v| v.to_bits()).collect())
            .collect();
        let points = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let owners: Vec<Option<usize>> = points
            .iter()
            .enumerate()
            .map(|(i, point)| {
                let c = if contexts.len() == 1 { 0 } else { i };
                self.truncated.inside(point).then_some(c)
            })
            .collect();
        let mut new = Vec::new();
        let mut seen = HashSet::new();
        for &c in owners.iter().flatten() {
            if !self.normalisers.contains_key(&keys[c]) && seen.insert(&keys[c]) {
                new.push(c);
            }
        }
        if self.normalisers.len() + new.len() > MAX_NORMALISED_CONTEXTS {
            bail!(
                "log-probs inside bounds held by rejection estimate the flow's mass at each distinct context, at most {MAX_NORMALISED_CONTEXTS} of them ({ACCEPTANCE_DRAWS} draws each): these rows have more"
            );
        }
        for c in new {
            let row = match context {
                Some(t) => {
                    let c = &contexts[c];
                    Some(
                        Tensor::from_vec(c.clone(), (1, c.len()), t.device())?
                            .to_dtype(t.dtype())?,
                    )
                }
                None => None,
            };
            let s = self.truncated.log_normaliser(row.as_ref(), &mut self.rng)?;
            self.normalisers.insert(keys[c].clone(), s);
        }
        let shifts: Vec<f64> = owners
            .iter()
            .map(|o| o.map_or(f64::NEG_INFINITY, |c| self.normalisers[&keys[c]]))
            .collect();
        let shifts = Tensor::from_vec(shifts, rows, log_p.device())?.to_dtype(log_p.dtype())?;
        log_p + shifts
    }
}

#[cfg(test)]
mod tests {
    use candle::Device;
    use rand::{rngs::StdRng, SeedableRng};

    use super::*;
    use crate::{Chain, StandardNormal, Standardize};

    /// The flow whose density is `N(mean, diag(std²))`.
    fn gaussian(mean: &[f64], std: &[f64]) -> Flow {
        let d = mean.len();
        let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), d, &Device::Cpu).unwrap();
        let mut chain = Chain::default();
        chain.push(Standardize::new(&t(mean), &t(std)).unwrap());
        Flow::new(chain, StandardNormal::new(d, DType::F64, &Device::Cpu))
    }

    /// The standard normal distribution function.
    fn phi(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    #[test]
    fn samples_follow_the_truncated_density() {
        // N(0.3, 0.5²) on (0, 1): every sample inside, the mean the truncated normal's
        // μ + σ (φ(α) − φ(β)) / (Φ(β) − Φ(α)).
        let flow = gaussian(&[0.3], &[0.5]);
        let bounds = [Bound::new(Some(0.0), Some(1.0))];
        let t = Truncated::new(&flow, &bounds).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let x = t.sample(40_000, 1.0, None, &mut rng).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(x.iter().all(|&v| v > 0.0 && v < 1.0));
        let density = |v: f64| (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let (a, b) = ((0.0 - 0.3) / 0.5, (1.0 - 0.3) / 0.5);
        let mass = phi(b) - phi(a);
        let expected = 0.3 + 0.5 * (density(a) - density(b)) / mass;
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        // The truncated normal's std is below 0.29: 4 standard errors of 40 000 draws.
        assert!((mean - expected).abs() < 0.006, "{mean} against {expected}");
        let acceptance = t.acceptance(None, 100_000, &mut rng).unwrap();
        assert!(
            (acceptance - mass).abs() < 0.006,
            "{acceptance} against {mass}"
        );
    }

    #[test]
    fn log_probs_integrate_to_one_over_the_box() {
        // 1-d: (0, 1) holds about 64% of N(0.3, 0.5²).
        let flow = gaussian(&[0.3], &[0.5]);
        let bounds = [Bound::new(Some(0.0), Some(1.0))];
        let mut scores = TruncatedLogProb::new(&flow, &bounds).unwrap();
        let n = 2_000;
        let x: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect();
        let x = Tensor::from_vec(x, (n, 1), &Device::Cpu).unwrap();
        let p = scores.log_prob(&x, None).unwrap().exp().unwrap();
        let integral = p.sum_all().unwrap().to_scalar::<f64>().unwrap() / n as f64;
        // The estimate of 10 000 draws has a relative error near 0.007.
        assert!((integral - 1.0).abs() < 0.03, "{integral}");

        // 2-d, one side open: (0, 1) × (−1, ∞) under N((0.3, −0.2), diag(0.5², 0.8²)),
        // integrated on (0, 1) × (−1, 6.2) (the rest holds under 1e-14 of the mass).
        let flow = gaussian(&[0.3, -0.2], &[0.5, 0.8]);
        let bounds = [
            Bound::new(Some(0.0), Some(1.0)),
            Bound::new(Some(-1.0), None),
        ];
        let mut scores = TruncatedLogProb::new(&flow, &bounds).unwrap();
        let (m, top) = (400, 6.2);
        let step = (1.0 / m as f64, (top + 1.0) / m as f64);
        let mut points = Vec::with_capacity(2 * m * m);
        for i in 0..m {
            for j in 0..m {
                points.push((i as f64 + 0.5) * step.0);
                points.push(-1.0 + (j as f64 + 0.5) * step.1);
            }
        }
        let x = Tensor::from_vec(points, (m * m, 2), &Device::Cpu).unwrap();
        let p = scores.log_prob(&x, None).unwrap().exp().unwrap();
        let integral = p.sum_all().unwrap().to_scalar::<f64>().unwrap() * step.0 * step.1;
        assert!((integral - 1.0).abs() < 0.03, "{integral}");
        // Outside the box the density is zero; one context, estimated once.
        let outside = Tensor::new(&[[1.5f64, 0.0], [0.5, -2.0], [0.5, 0.0]], &Device::Cpu).unwrap();
        let log_p = scores
            .log_prob(&outside, None)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(log_p[..2], [f64::NEG_INFINITY; 2]);
        assert!(log_p[2].is_finite());
        assert_eq!(scores.contexts(), 1);
        let a = scores.smallest_acceptance().unwrap();
        // The box's mass under the flow: (Φ(1.4) − Φ(−0.6)) · (1 − Φ(−1))
        let mass = (phi(1.4) - phi(-0.6)) * (1.0 - phi(-1.0));
        assert!((a - mass).abs() < 0.02, "{a} against {mass}");
    }

    #[test]
    fn a_box_the_flow_misses_is_refused() {
        let flow = gaussian(&[0.0], &[1.0]);
        let bounds = [Bound::new(Some(9.0), Some(10.0))];
        let t = Truncated::new(&flow, &bounds).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let e = t.sample(3, 1.0, None, &mut rng).unwrap_err().to_string();
        assert!(e.contains("outside the bounds after"), "{e}");
        let e = t.log_normaliser(None, &mut rng).unwrap_err().to_string();
        assert!(e.contains("none of 10000 draws"), "{e}");
        let two = [Bound::new(None, None), Bound::new(None, None)];
        assert!(Truncated::new(&flow, &two).is_err());
    }
}
