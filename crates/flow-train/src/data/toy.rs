//! Seeded 2-D toy distributions used to demonstrate and test density estimation.
//!
//! At their default noise, eight Gaussians, checkerboard, pinwheel and two spirals are
//! the toy sets of FFJORD (Grathwohl et al., 2019, `lib/toy_data.py`), the ones flow
//! papers report NLLs on. Their entropies, the lowest NLL any model can reach, are
//! [`Toy::entropy`].

use std::f64::consts::PI;

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::Dataset;
use crate::DataError;

/// The built-in data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toy {
    /// Two interleaved half circles (noise: Gaussian jitter, default 0.05).
    Moons,
    /// Two concentric circles of radius 1 and 0.5 (noise: jitter, default 0.05).
    Circles,
    /// FFJORD's eight Gaussians: `(4·c + noise·ε) / 1.414` for `c` one of the eight
    /// points `(cos kπ/4, sin kπ/4)` of the unit circle, chosen uniformly, and `ε`
    /// standard normal. The default noise, 0.5, gives centres on a circle of radius
    /// 2.83 and a std of 0.354 each.
    EightGaussians,
    /// FFJORD's checkerboard: uniform on the 8 black squares of side 2 of a 4 × 4
    /// board over [-4, 4]², a density of 1/32 (noise: jitter, default 0).
    Checkerboard,
    /// FFJORD's two spirals: `n = 3π·√U`, one arm `(−n·cos n + U′/2, n·sin n + U″/2) / 3`
    /// and the other its mirror image through the origin, half the points each, plus
    /// Gaussian jitter (noise: its std, default 0.1); `U`, `U′`, `U″` uniform on [0, 1).
    Spirals,
    /// FFJORD's pinwheel: five arms, `2·R(−θ)·(r, t)` with `r ~ N(1, 0.3²)`,
    /// `t ~ N(0, noise²)` (tangential std, default 0.1), `R(−θ)` the clockwise
    /// rotation by `θ = 2πk/5 + 0.25·exp(r)` for arm `k`; a fifth of the points each.
    Pinwheel,
}

impl Toy {
    pub const ALL: [Toy; 6] = [
        Toy::Moons,
        Toy::Circles,
        Toy::EightGaussians,
        Toy::Checkerboard,
        Toy::Spirals,
        Toy::Pinwheel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Toy::Moons => "moons",
            Toy::Circles => "circles",
            Toy::EightGaussians => "eight-gaussians",
            Toy::Checkerboard => "checkerboard",
            Toy::Spirals => "spirals",
            Toy::Pinwheel => "pinwheel",
        }
    }

    pub fn from_name(name: &str) -> Option<Toy> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn default_noise(self) -> f64 {
        match self {
            Toy::Moons | Toy::Circles => 0.05,
            Toy::EightGaussians => 0.5,
            Toy::Spirals | Toy::Pinwheel => 0.1,
            Toy::Checkerboard => 0.0,
        }
    }

    /// The differential entropy in nats of the set at its default noise, `−∫ p log p`:
    /// the lowest mean NLL any model can reach on it. Checkerboard `ln 32` = 3.466
    /// (uniform on an area of 32); eight Gaussians 2.832, pinwheel 2.318 and two
    /// spirals 2.645 from their exact densities (the Gaussian mixture; the arms'
    /// change of variables; a quadrature over the spiral), integrated on a grid, to
    /// the digits given. The tests check each against the mean `−log p` of generated
    /// points. `None` for moons and circles, whose noiseless points lie on curves.
    pub fn entropy(self) -> Option<f64> {
        match self {
            Toy::Moons | Toy::Circles => None,
            Toy::EightGaussians => Some(2.832),
            Toy::Checkerboard => Some(32f64.ln()),
            Toy::Pinwheel => Some(2.318),
            Toy::Spirals => Some(2.645),
        }
    }
}

/// FFJORD divides its eight Gaussians by this (nearly `√2`, not quite).
const EIGHT_GAUSSIANS_DIVISOR: f64 = 1.414;

fn normal(rng: &mut StdRng) -> f64 {
    StandardNormal.sample(rng)
}

/// `n` points of `toy`, shuffled, reproducible from `seed`; `noise` defaults per set.
pub fn generate(toy: Toy, n: usize, noise: Option<f64>, seed: u64) -> Result<Dataset, DataError> {
    let labeled = generate_labeled(toy, n, noise, seed)?;
    Ok(Dataset::new(
        2,
        labeled
            .values
            .chunks_exact(3)
            .flat_map(|r| [r[0], r[1]])
            .collect(),
    ))
}

/// The points of [`generate`] (the same ones for the same arguments) with the label of
/// the component each came from as a third column: the moon, the circle (0 outer, 1
/// inner), the Gaussian (0–7), the checkerboard's column (0–3), the spiral (0, 1) or
/// the arm (0–4). As a condition, the label makes a conditional flow's data.
pub fn generate_labeled(
    toy: Toy,
    n: usize,
    noise: Option<f64>,
    seed: u64,
) -> Result<Dataset, DataError> {
    let noise = noise.unwrap_or(toy.default_noise());
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(DataError::new(
            toy.name(),
            None,
            format!("noise must be non-negative, got {noise}"),
        ));
    }
    if n == 0 {
        return Err(DataError::new(
            toy.name(),
            None,
            "the number of points must be at least 1",
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let rng = &mut rng;
    let linspace = |k: usize, i: usize| {
        if k > 1 {
            PI * i as f64 / (k - 1) as f64
        } else {
            0.0
        }
    };
    let mut pts: Vec<([f64; 2], f64)> = match toy {
        Toy::Moons => {
            let outer = n / 2;
            let inner = n - outer;
            (0..outer)
                .map(|i| {
                    let t = linspace(outer, i);
                    ([t.cos(), t.sin()], 0.0)
                })
                .chain((0..inner).map(|i| {
                    let t = linspace(inner, i);
                    ([1.0 - t.cos(), 0.5 - t.sin()], 1.0)
                }))
                .collect()
        }
        Toy::Circles => {
            let outer = n / 2;
            let inner = n - outer;
            let ring = |k: usize, i: usize, r: f64| {
                let t = 2.0 * PI * i as f64 / k as f64;
                [r * t.cos(), r * t.sin()]
            };
            (0..outer)
                .map(|i| (ring(outer, i, 1.0), 0.0))
                .chain((0..inner).map(|i| (ring(inner, i, 0.5), 1.0)))
                .collect()
        }
        Toy::EightGaussians => (0..n)
            .map(|_| {
                let k = rng.random_range(0..8) as f64;
                let a = k * PI / 4.0;
                let p = [
                    (4.0 * a.cos() + noise * normal(rng)) / EIGHT_GAUSSIANS_DIVISOR,
                    (4.0 * a.sin() + noise * normal(rng)) / EIGHT_GAUSSIANS_DIVISOR,
                ];
                (p, k)
            })
            .collect(),
        Toy::Checkerboard => (0..n)
            .map(|_| {
                let x1: f64 = rng.random_range(-2.0..2.0);
                let x2 = rng.random::<f64>() - 2.0 * rng.random_range(0..2) as f64;
                let x2 = x2 + (x1.floor().rem_euclid(2.0));
                ([2.0 * x1, 2.0 * x2], x1.floor() + 2.0)
            })
            .collect(),
        Toy::Spirals => (0..n)
            .map(|i| {
                let r = rng.random::<f64>().sqrt() * 3.0 * PI;
                let (x, y) = (
                    -r.cos() * r + 0.5 * rng.random::<f64>(),
                    r.sin() * r + 0.5 * rng.random::<f64>(),
                );
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                ([sign * x / 3.0, sign * y / 3.0], (i % 2) as f64)
            })
            .collect(),
        Toy::Pinwheel => (0..n)
            .map(|i| {
                let arm = (i % 5) as f64 * 2.0 * PI / 5.0;
                let radial = 1.0 + 0.3 * normal(rng);
                let tangential = noise * normal(rng);
                let angle = arm + 0.25 * radial.exp();
                let (s, c) = angle.sin_cos();
                // The row vector (r, t) times the rotation matrix by `angle`: a
                // clockwise turn, as FFJORD's `einsum("ti,tij->tj", …)` makes it.
                let p = [
                    2.0 * (radial * c + tangential * s),
                    2.0 * (tangential * c - radial * s),
                ];
                (p, (i % 5) as f64)
            })
            .collect(),
    };
    let jitter = matches!(
        toy,
        Toy::Moons | Toy::Circles | Toy::Checkerboard | Toy::Spirals
    );
    if jitter && noise > 0.0 {
        for (p, _) in pts.iter_mut() {
            p[0] += noise * normal(rng);
            p[1] += noise * normal(rng);
        }
    }
    pts.shuffle(rng);
    let values: Vec<f32> = pts
        .iter()
        .flat_map(|(p, label)| [p[0] as f32, p[1] as f32, *label as f32])
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(DataError::new(
            toy.name(),
            None,
            format!("noise {noise:e} puts points beyond the range of f32"),
        ));
    }
    Ok(Dataset::new(3, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_that_overflows_f32_is_refused() {
        let wide = generate(Toy::Moons, 50, Some(1e30), 0).expect("finite in f32");
        assert!(wide.values.iter().all(|v| v.is_finite()));
        let err = generate(Toy::Moons, 50, Some(1e39), 0).expect_err("past f32");
        assert!(err.to_string().contains("beyond the range of f32"), "{err}");
    }

    #[test]
    fn generators_are_seeded_and_finite() {
        for toy in Toy::ALL {
            let a = generate(toy, 501, None, 3).unwrap();
            let b = generate(toy, 501, None, 3).unwrap();
            let c = generate(toy, 501, None, 4).unwrap();
            assert_eq!(a.len(), 501);
            assert_eq!(a, b, "{toy:?}");
            assert_ne!(a, c, "{toy:?}");
            assert!(
                a.values.iter().all(|v| v.is_finite() && v.abs() < 20.0),
                "{toy:?}"
            );
        }
    }

    #[test]
    fn labels_name_the_component() {
        let d = generate_labeled(Toy::Moons, 1000, Some(0.0), 2).unwrap();
        let plain = generate(Toy::Moons, 1000, Some(0.0), 2).unwrap();
        for (row, p) in d.values.chunks(3).zip(plain.values.chunks(2)) {
            assert_eq!(&row[..2], p);
            let (x, y) = (row[0] as f64, row[1] as f64);
            let on_outer = ((x * x + y * y).sqrt() - 1.0).abs() < 1e-5;
            assert_eq!(row[2], if on_outer { 0.0 } else { 1.0 }, "({x}, {y})");
        }
        let g = generate_labeled(Toy::EightGaussians, 500, Some(0.01), 2).unwrap();
        for row in g.values.chunks(3) {
            let a = row[2] as f64 * PI / 4.0;
            let radius = 4.0 / EIGHT_GAUSSIANS_DIVISOR;
            let (dx, dy) = (
                row[0] as f64 - radius * a.cos(),
                row[1] as f64 - radius * a.sin(),
            );
            assert!(dx.hypot(dy) < 0.1, "{row:?}");
        }
    }

    #[test]
    fn moons_lie_on_two_half_circles() {
        let d = generate(Toy::Moons, 2000, Some(0.0), 1).unwrap();
        for p in d.values.chunks(2) {
            let (x, y) = (p[0] as f64, p[1] as f64);
            let outer = (x * x + y * y).sqrt();
            let inner = ((x - 1.0).powi(2) + (y - 0.5).powi(2)).sqrt();
            assert!(
                (outer - 1.0).abs() < 1e-5 || (inner - 1.0).abs() < 1e-5,
                "({x}, {y})"
            );
        }
    }

    // The entropies of FFJORD's sets, checked against their exact densities: the mean
    // of −log p over points drawn by the generators is a Monte-Carlo estimate of the
    // entropy, and must meet `Toy::entropy` within a few standard errors.

    /// `(point, label)` rows of `toy` at its default noise.
    fn labeled(toy: Toy, n: usize, seed: u64) -> Vec<([f64; 2], usize)> {
        generate_labeled(toy, n, None, seed)
            .unwrap()
            .values
            .chunks(3)
            .map(|r| ([r[0] as f64, r[1] as f64], r[2] as usize))
            .collect()
    }

    /// Mean and standard error of the mean.
    fn mean_se(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, (var / n).sqrt())
    }

    fn gauss(x: f64, std: f64) -> f64 {
        (-0.5 * (x / std).powi(2)).exp() / (std * (2.0 * PI).sqrt())
    }

    /// The standard normal distribution function.
    fn normal_cdf(z: f64) -> f64 {
        0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
    }

    /// Eight Gaussians: the mixture of eight isotropic normals of std 0.5/1.414.
    fn eight_gaussians_density(x: [f64; 2]) -> f64 {
        let std = 0.5 / EIGHT_GAUSSIANS_DIVISOR;
        let radius = 4.0 / EIGHT_GAUSSIANS_DIVISOR;
        (0..8)
            .map(|k| {
                let (s, c) = (k as f64 * PI / 4.0).sin_cos();
                gauss(x[0] - radius * c, std) * gauss(x[1] - radius * s, std) / 8.0
            })
            .sum()
    }

    /// Checkerboard: 1/32 on the squares `⌊x/2⌋ + ⌊y/2⌋` even of [-4, 4]², else 0.
    fn checkerboard_density(x: [f64; 2]) -> f64 {
        let inside = x.iter().all(|v| v.abs() < 4.0);
        let (i, j) = ((x[0] / 2.0).floor(), (x[1] / 2.0).floor());
        if inside && (i + j).rem_euclid(2.0) == 0.0 {
            1.0 / 32.0
        } else {
            0.0
        }
    }

    /// Pinwheel: each arm pushes the normal `(r, t)` forward through
    /// `2·R(−θ(r))·(r, t)`, `θ(r) = θ_k + 0.25·e^r`, whose Jacobian determinant is
    /// `4·(1 + 0.25·e^r·t)`. The preimages of a point `2·(ρ cos β, ρ sin β)` are
    /// `(r, t) = ρ·(cos γ, sin γ)` with `γ − θ(ρ cos γ) = β` modulo 2π: found by a scan
    /// over γ and bisection, all of them summed.
    fn pinwheel_density(x: [f64; 2]) -> f64 {
        const STEPS: usize = 512;
        static GRID: std::sync::OnceLock<Vec<(f64, f64)>> = std::sync::OnceLock::new();
        let grid = GRID.get_or_init(|| {
            (0..=STEPS)
                .map(|j| {
                    let g = -PI + 2.0 * PI * j as f64 / STEPS as f64;
                    (g, g.cos())
                })
                .collect()
        });
        let noise = Toy::Pinwheel.default_noise();
        let (qx, qy) = (x[0] / 2.0, x[1] / 2.0);
        let (rho, beta) = (qx.hypot(qy), qy.atan2(qx));
        // `γ − 0.25·e^(ρ cos γ) − β` along the scan, shared by the five arms.
        let phase = |g: f64| g - 0.25 * (rho * g.cos()).exp() - beta;
        let scan: Vec<f64> = grid
            .iter()
            .map(|&(g, c)| g - 0.25 * (rho * c).exp() - beta)
            .collect();
        let mut p = 0.0;
        for k in 0..5 {
            let arm = 2.0 * PI * k as f64 / 5.0;
            // In turns: a preimage wherever this crosses an integer.
            let turns = |phase: f64| (phase - arm) / (2.0 * PI);
            for j in 0..STEPS {
                let (a, b) = (turns(scan[j]), turns(scan[j + 1]));
                if a.floor() == b.floor() {
                    continue;
                }
                let level = a.floor().max(b.floor());
                let (mut lo, mut hi) = (grid[j].0, grid[j + 1].0);
                let rising = a < b;
                for _ in 0..60 {
                    let mid = 0.5 * (lo + hi);
                    if (turns(phase(mid)) < level) == rising {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                let (s, c) = (0.5 * (lo + hi)).sin_cos();
                let (r, t) = (rho * c, rho * s);
                let det = 4.0 * (1.0 + 0.25 * r.exp() * t).abs();
                p += gauss(r - 1.0, 0.3) * gauss(t, noise) / det / 5.0;
            }
        }
        p
    }

    /// Two spirals: with `y = 3x`, an arm is the law of `c(n) + u/2 + 3·noise·ε`,
    /// `c(n) = (−n cos n, n sin n)`, `n` of density `2n/(3π)²` on [0, 3π], `u` uniform
    /// on [0, 1)²: an integral over `n` (midpoint rule) of a box convolved with a
    /// normal in each coordinate. The other arm is its mirror image; `9` is `|∂y/∂x|`.
    fn spirals_density(x: [f64; 2]) -> f64 {
        const NODES: usize = 1500;
        let h = 3.0 * PI / NODES as f64;
        // Per node: `c(n)` and the weight `h·2n/(3π)²`.
        static NODE: std::sync::OnceLock<Vec<[f64; 3]>> = std::sync::OnceLock::new();
        let nodes = NODE.get_or_init(|| {
            (0..NODES)
                .map(|i| {
                    let n = (i as f64 + 0.5) * h;
                    let (sin, cos) = n.sin_cos();
                    [-n * cos, n * sin, h * 2.0 * n / (9.0 * PI * PI)]
                })
                .collect()
        });
        let s = 3.0 * Toy::Spirals.default_noise();
        let box_normal = |v: f64| 2.0 * (normal_cdf(v / s) - normal_cdf((v - 0.5) / s));
        let reach = |v: f64| (-8.0 * s..=0.5 + 8.0 * s).contains(&v);
        let arm = |y: [f64; 2]| {
            nodes
                .iter()
                .filter(|[cx, cy, _]| reach(y[0] - cx) && reach(y[1] - cy))
                .map(|[cx, cy, w]| w * box_normal(y[0] - cx) * box_normal(y[1] - cy))
                .sum::<f64>()
        };
        let y = [3.0 * x[0], 3.0 * x[1]];
        9.0 * 0.5 * (arm(y) + arm([-y[0], -y[1]]))
    }

    /// `∫ density` over [-r, r]² by the midpoint rule with step `h`.
    fn mass(density: fn([f64; 2]) -> f64, r: f64, h: f64) -> f64 {
        let k = (2.0 * r / h).round() as usize;
        let at = |i: usize| -r + (i as f64 + 0.5) * h;
        (0..k)
            .flat_map(|i| (0..k).map(move |j| [at(i), at(j)]))
            .map(density)
            .sum::<f64>()
            * h
            * h
    }

    /// Checks the Monte-Carlo entropy of `n` points of `toy` under `density` against
    /// `Toy::entropy`, within four standard errors (and the stated value's rounding).
    fn check_entropy(toy: Toy, density: fn([f64; 2]) -> f64, n: usize) {
        let nll: Vec<f64> = labeled(toy, n, 17)
            .iter()
            .map(|(x, _)| -density(*x).ln())
            .collect();
        let (h, se) = mean_se(&nll);
        let stated = toy.entropy().unwrap();
        assert!(
            (h - stated).abs() <= 4.0 * se + 5e-4,
            "{toy:?}: Monte-Carlo entropy {h:.4} ± {se:.4}, stated {stated}"
        );
    }

    #[test]
    fn eight_gaussians_have_the_mixture_entropy() {
        assert!((mass(eight_gaussians_density, 6.0, 0.05) - 1.0).abs() < 1e-6);
        check_entropy(Toy::EightGaussians, eight_gaussians_density, 100_000);
        // Each point sits near the centre its label names, with FFJORD's spread.
        let pts = labeled(Toy::EightGaussians, 50_000, 5);
        let radius = 4.0 / EIGHT_GAUSSIANS_DIVISOR;
        let offsets: Vec<f64> = pts
            .iter()
            .flat_map(|(x, k)| {
                let (s, c) = (*k as f64 * PI / 4.0).sin_cos();
                [x[0] - radius * c, x[1] - radius * s]
            })
            .collect();
        let (mean, _) = mean_se(&offsets);
        let var = offsets.iter().map(|d| d * d).sum::<f64>() / offsets.len() as f64;
        assert!(mean.abs() < 0.01, "mean offset {mean}");
        let std = 0.5 / EIGHT_GAUSSIANS_DIVISOR;
        assert!((var.sqrt() / std - 1.0).abs() < 0.02, "std {}", var.sqrt());
    }

    #[test]
    fn checkerboard_is_uniform_on_eight_squares() {
        let pts = labeled(Toy::Checkerboard, 80_000, 5);
        let mut counts = [0usize; 8];
        for (x, label) in &pts {
            assert_eq!(checkerboard_density(*x), 1.0 / 32.0, "{x:?} off the board");
            assert_eq!(*label as f64, (x[0] / 2.0).floor() + 2.0);
            // Column 0–3, then which of the column's two squares.
            let (i, j) = ((x[0] / 2.0).floor() + 2.0, (x[1] / 2.0).floor() + 2.0);
            let square = i * 2.0 + (j / 2.0).floor();
            counts[square as usize] += 1;
        }
        // Every point has density 1/32, so −E log p is ln 32 exactly; the squares are
        // equally likely (binomial counts within five standard deviations).
        let (n, p) = (pts.len() as f64, 1.0 / 8.0);
        for c in counts {
            assert!(
                (c as f64 - n * p).abs() < 5.0 * (n * p * (1.0 - p)).sqrt(),
                "{counts:?}"
            );
        }
        assert_eq!(Toy::Checkerboard.entropy(), Some(32f64.ln()));
        assert!((mass(checkerboard_density, 4.0, 0.1) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn pinwheel_has_its_entropy_and_turns_clockwise() {
        assert!((mass(pinwheel_density, 6.0, 0.1) - 1.0).abs() < 1e-3);
        check_entropy(Toy::Pinwheel, pinwheel_density, 10_000);
        let pts = labeled(Toy::Pinwheel, 50_000, 5);
        // E|x|² = 4·(E r² + E t²) = 4·(1 + 0.3² + 0.1²).
        let sq: Vec<f64> = pts.iter().map(|(x, _)| x[0] * x[0] + x[1] * x[1]).collect();
        let (m, se) = mean_se(&sq);
        assert!((m - 4.4).abs() < 4.0 * se, "E|x|² = {m} ± {se}");
        // Turned back by its arm's angle, a point lies at angle −0.25·e^r (plus the
        // small atan(t/r)): on average −0.25·e^(1 + 0.3²/2), clockwise.
        let offsets: Vec<f64> = pts
            .iter()
            .map(|(x, k)| {
                let (s, c) = (2.0 * PI * *k as f64 / 5.0).sin_cos();
                (x[1] * c + x[0] * s).atan2(x[0] * c - x[1] * s)
            })
            .collect();
        let (m, se) = mean_se(&offsets);
        let expected = -0.25 * (1.0f64 + 0.045).exp();
        assert!((m - expected).abs() < 4.0 * se, "{m} ± {se}, {expected}");
    }

    #[test]
    fn spirals_have_their_entropy_and_moments() {
        assert!((mass(spirals_density, 4.5, 0.05) - 1.0).abs() < 1e-4);
        check_entropy(Toy::Spirals, spirals_density, 20_000);
        // Arm 0's mean: E[−n cos n] = 4/(3π) and E[n sin n] = 2 − 8/(3π)², plus the
        // uniform offsets' 1/4, all over 3; arm 1 is its mirror image.
        let pts = labeled(Toy::Spirals, 50_000, 5);
        let e_cos = 4.0 / (3.0 * PI);
        let e_sin = 2.0 - 8.0 / (9.0 * PI * PI);
        let expected = [(e_cos + 0.25) / 3.0, (e_sin + 0.25) / 3.0];
        for arm in 0..2 {
            let sign = if arm == 0 { 1.0 } else { -1.0 };
            for j in 0..2 {
                let v: Vec<f64> = pts
                    .iter()
                    .filter(|(_, k)| *k == arm)
                    .map(|(x, _)| x[j])
                    .collect();
                let (m, se) = mean_se(&v);
                assert!(
                    (m - sign * expected[j]).abs() < 4.0 * se,
                    "arm {arm}, coordinate {j}: {m} ± {se}, {}",
                    sign * expected[j]
                );
            }
        }
        // E|3x|² = E n² + E[c(n)·u] + E|u|²/4 + 2·(3·0.1)² with E n² = (3π)²/2.
        let sq: Vec<f64> = pts.iter().map(|(x, _)| x[0] * x[0] + x[1] * x[1]).collect();
        let (m, se) = mean_se(&sq);
        let expected = (4.5 * PI * PI + 0.5 * (e_cos + e_sin) + 1.0 / 6.0 + 0.18) / 9.0;
        assert!(
            (m - expected).abs() < 4.0 * se,
            "E|x|² = {m} ± {se}, {expected}"
        );
        // Without noise every point is within the spiral's reach: |3x| ≤ 3π + √2/2.
        let bare = generate(Toy::Spirals, 20_000, Some(0.0), 5).unwrap();
        let reach = (3.0 * PI + 0.5f64.sqrt()) / 3.0;
        assert!(bare
            .values
            .chunks(2)
            .all(|p| (p[0] as f64).hypot(p[1] as f64) <= reach + 1e-6));
    }
}
