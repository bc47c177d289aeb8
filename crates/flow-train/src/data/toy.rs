//! Seeded 2-D toy distributions used to demonstrate and test density estimation.

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
    /// Eight Gaussians on a circle of radius 2 (noise: their std, default 0.1).
    EightGaussians,
    /// A 4 × 4 checkerboard of uniform squares over [-4, 4]² (noise: jitter, default 0).
    Checkerboard,
    /// Two interleaved spirals (noise: jitter, default 0.1).
    Spirals,
    /// Five curved arms (noise: tangential std, default 0.1).
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
            Toy::EightGaussians | Toy::Spirals | Toy::Pinwheel => 0.1,
            Toy::Checkerboard => 0.0,
        }
    }
}

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
                    2.0 * a.cos() + noise * normal(rng),
                    2.0 * a.sin() + noise * normal(rng),
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
                let p = [
                    2.0 * (radial * c - tangential * s),
                    2.0 * (radial * s + tangential * c),
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
    Ok(Dataset::new(
        3,
        pts.iter()
            .flat_map(|(p, label)| [p[0] as f32, p[1] as f32, *label as f32])
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let (dx, dy) = (row[0] as f64 - 2.0 * a.cos(), row[1] as f64 - 2.0 * a.sin());
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
}
