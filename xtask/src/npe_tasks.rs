//! Three tasks of the simulation-based inference benchmark (Lueckmann et al. 2021,
//! "Benchmarking Simulation-Based Inference"), written from the paper's definitions:
//! a prior, a simulator, and exact samples of the posterior given an observation.

use std::f64::consts::{FRAC_PI_2, SQRT_2};

use rand::{rngs::StdRng, Rng};
use rand_distr::StandardNormal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// θ ~ U(−1, 1)², a ~ U(−π/2, π/2), r ~ N(0.1, 0.01²),
    /// x = (r cos a + 0.25, r sin a) + (−|θ₁ + θ₂|/√2, (−θ₁ + θ₂)/√2): a crescent
    /// posterior with two modes.
    TwoMoons,
    /// θ ~ U(−1, 1)¹⁰, x ~ N(θ, 0.1·I).
    GaussianLinearUniform,
    /// θ ~ U(−10, 10)², x ~ ½ N(θ, I) + ½ N(θ, 0.01·I).
    GaussianMixture,
}

impl Task {
    pub const ALL: [Task; 3] = [
        Task::TwoMoons,
        Task::GaussianLinearUniform,
        Task::GaussianMixture,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::TwoMoons => "two-moons",
            Task::GaussianLinearUniform => "gaussian-linear-uniform",
            Task::GaussianMixture => "gaussian-mixture",
        }
    }

    pub fn from_name(name: &str) -> Option<Task> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Parameters θ.
    pub fn theta_dim(self) -> usize {
        match self {
            Task::GaussianLinearUniform => 10,
            _ => 2,
        }
    }

    /// The box of the uniform prior, the same on every parameter.
    pub fn prior_box(self) -> (f64, f64) {
        match self {
            Task::GaussianMixture => (-10.0, 10.0),
            _ => (-1.0, 1.0),
        }
    }

    pub fn prior(self, rng: &mut StdRng) -> Vec<f64> {
        let (lo, hi) = self.prior_box();
        (0..self.theta_dim())
            .map(|_| lo + (hi - lo) * rng.random::<f64>())
            .collect()
    }

    fn inside(self, theta: &[f64]) -> bool {
        let (lo, hi) = self.prior_box();
        theta.iter().all(|&t| t > lo && t < hi)
    }

    /// One draw of the simulator at `theta`.
    pub fn simulate(self, theta: &[f64], rng: &mut StdRng) -> Vec<f64> {
        let mut normal = || rng.sample::<f64, _>(StandardNormal);
        match self {
            Task::TwoMoons => {
                let p = moon_point(rng);
                let u = theta[0] + theta[1];
                let v = -theta[0] + theta[1];
                vec![p[0] - u.abs() / SQRT_2, p[1] + v / SQRT_2]
            }
            Task::GaussianLinearUniform => {
                let s = 0.1f64.sqrt();
                theta.iter().map(|t| t + s * normal()).collect()
            }
            Task::GaussianMixture => {
                let s = if rng.random::<bool>() { 1.0 } else { 0.1 };
                let mut normal = || rng.sample::<f64, _>(StandardNormal);
                theta.iter().map(|t| t + s * normal()).collect()
            }
        }
    }

    /// `n` exact draws of the posterior given `x_o`.
    ///
    /// - Gaussian linear uniform: each θⱼ is N(x_oⱼ, 0.1) truncated to (−1, 1), drawn
    ///   by rejection coordinate by coordinate (the posterior factorises).
    /// - Gaussian mixture: ½ N(x_o, I) + ½ N(x_o, 0.01·I) truncated to the box: a
    ///   draw of the mixture, rejected outside.
    /// - Two moons: x = p + g(θ) with p the moon point and g piecewise orthonormal
    ///   (|det| = 1 on either side of θ₁ + θ₂ = 0), so θ = g⁻¹(x_o − p) for a fresh p and
    ///   a fair choice of side is a draw of p(θ | x_o) ∝ p(x_o | θ) on the prior's box;
    ///   draws outside the box, or whose x_o − p has no preimage, are rejected.
    pub fn reference(self, x_o: &[f64], n: usize, rng: &mut StdRng) -> Vec<Vec<f64>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let theta = match self {
                Task::GaussianLinearUniform => {
                    let s = 0.1f64.sqrt();
                    x_o.iter()
                        .map(|&m| loop {
                            let t = m + s * rng.sample::<f64, _>(StandardNormal);
                            if t.abs() < 1.0 {
                                break t;
                            }
                        })
                        .collect()
                }
                Task::GaussianMixture => {
                    let s = if rng.random::<bool>() { 1.0 } else { 0.1 };
                    x_o.iter()
                        .map(|m| m + s * rng.sample::<f64, _>(StandardNormal))
                        .collect()
                }
                Task::TwoMoons => {
                    let p = moon_point(rng);
                    let q = [x_o[0] - p[0], x_o[1] - p[1]];
                    if q[0] > 0.0 {
                        continue;
                    }
                    let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                    let u = -SQRT_2 * q[0] * sign;
                    let v = SQRT_2 * q[1];
                    vec![(u - v) / 2.0, (u + v) / 2.0]
                }
            };
            if self.inside(&theta) {
                out.push(theta);
            }
        }
        out
    }
}

/// The moon's point: (r cos a + 0.25, r sin a) with a ~ U(−π/2, π/2), r ~ N(0.1, 0.01²).
fn moon_point(rng: &mut StdRng) -> [f64; 2] {
    let a = -FRAC_PI_2 + std::f64::consts::PI * rng.random::<f64>();
    let r = 0.1 + 0.01 * rng.sample::<f64, _>(StandardNormal);
    [r * a.cos() + 0.25, r * a.sin()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The posterior's mean by self-normalised importance sampling, the likelihood
    /// written out as the weight of uniform draws on the prior's box within `reach`
    /// of `x_o` (where all but a negligible share of the posterior lies): an
    /// independent check of `reference`.
    fn importance_mean(
        task: Task,
        x_o: &[f64],
        reach: f64,
        likelihood: impl Fn(&[f64]) -> f64,
    ) -> Vec<f64> {
        let rng = &mut StdRng::seed_from_u64(11);
        let (lo, hi) = task.prior_box();
        let (mut sum, mut total) = (vec![0.0; x_o.len()], 0.0);
        for _ in 0..2_000_000 {
            let t: Vec<f64> = x_o
                .iter()
                .map(|&m| {
                    let (a, b) = ((m - reach).max(lo), (m + reach).min(hi));
                    a + (b - a) * rng.random::<f64>()
                })
                .collect();
            let w = likelihood(&t);
            total += w;
            sum.iter_mut().zip(&t).for_each(|(s, v)| *s += w * v);
        }
        sum.iter().map(|s| s / total).collect()
    }

    fn mean(draws: &[Vec<f64>]) -> Vec<f64> {
        let n = draws.len() as f64;
        (0..draws[0].len())
            .map(|j| draws.iter().map(|d| d[j]).sum::<f64>() / n)
            .collect()
    }

    #[test]
    fn the_reference_posteriors_agree_with_importance_sampling() {
        let rng = &mut StdRng::seed_from_u64(3);
        // The mixture near a face of the box, where truncation matters.
        let x_o = [9.5, -3.0];
        let gauss = |t: &[f64], s: f64| {
            let d2: f64 = t.iter().zip(&x_o).map(|(a, b)| (a - b).powi(2)).sum();
            (-0.5 * d2 / (s * s)).exp() / (s * s)
        };
        let want = importance_mean(Task::GaussianMixture, &x_o, 6.0, |t| {
            0.5 * gauss(t, 1.0) + 0.5 * gauss(t, 0.1)
        });
        let got = mean(&Task::GaussianMixture.reference(&x_o, 100_000, rng));
        for j in 0..2 {
            assert!((got[j] - want[j]).abs() < 0.02, "{got:?} against {want:?}");
        }
        // Two moons: the likelihood is the density of the moon's point at x_o − g(θ), a
        // ring of radius 0.1 (width 0.01) around (0.25, 0) over the right half plane.
        let x_o = [-0.3, 0.2];
        let moons = |t: &[f64]| {
            let (u, v) = (t[0] + t[1], -t[0] + t[1]);
            let p = [x_o[0] + u.abs() / SQRT_2 - 0.25, x_o[1] - v / SQRT_2];
            let r = p[0].hypot(p[1]);
            if p[0] < 0.0 {
                return 0.0;
            }
            // Density of (r, a) over the Jacobian r of polar coordinates.
            (-0.5 * ((r - 0.1) / 0.01).powi(2)).exp() / r
        };
        let want = importance_mean(Task::TwoMoons, &x_o, 2.0, moons);
        let draws = Task::TwoMoons.reference(&x_o, 100_000, rng);
        let got = mean(&draws);
        for j in 0..2 {
            assert!((got[j] - want[j]).abs() < 0.02, "{got:?} against {want:?}");
        }
        // And each draw simulates back near x_o: within the moon's ring.
        for t in draws.iter().take(100) {
            let (u, v) = (t[0] + t[1], -t[0] + t[1]);
            let p = [x_o[0] + u.abs() / SQRT_2 - 0.25, x_o[1] - v / SQRT_2];
            assert!((p[0].hypot(p[1]) - 0.1).abs() < 0.06, "{t:?}");
        }
    }
}
