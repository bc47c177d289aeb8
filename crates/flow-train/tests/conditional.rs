//! A conditional flow end to end: two moons, with the moon each point lies on as a
//! one-column condition. Given the true label the held-out points are far likelier than
//! given the other label, and the samples drawn for a label land on its moon.

use anyhow::{ensure, Result};
use candle::{Device, Tensor};
use flow_realnvp::RealNvpConfig;
use flow_train::{
    data::{generate_labeled, Toy},
    Duration, Report, Reporter, TrainConfig, Trainer,
};
use rand::{rngs::StdRng, SeedableRng};

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

/// Distance from `p` to the half circle of radius 1 around `c` spanning the angles
/// `from..=from + π`.
fn to_arc(p: (f64, f64), c: (f64, f64), from: f64) -> f64 {
    let (dx, dy) = (p.0 - c.0, p.1 - c.1);
    let angle = (dy.atan2(dx) - from).rem_euclid(std::f64::consts::TAU);
    if angle <= std::f64::consts::PI {
        (dx.hypot(dy) - 1.0).abs()
    } else {
        let end = |a: f64| (c.0 + a.cos() - p.0).hypot(c.1 + a.sin() - p.1);
        end(from).min(end(from + std::f64::consts::PI))
    }
}

/// Which moon `p` lies nearer: 0, the upper one around (0, 0), or 1, the lower one
/// around (1, 0.5) (the labels `generate_labeled` gives).
fn nearer_moon(p: (f64, f64)) -> f64 {
    let upper = to_arc(p, (0.0, 0.0), 0.0);
    let lower = to_arc(p, (1.0, 0.5), std::f64::consts::PI);
    if upper <= lower {
        0.0
    } else {
        1.0
    }
}

#[test]
fn the_label_conditions_the_moons() -> Result<()> {
    let train = generate_labeled(Toy::Moons, 4000, Some(0.05), 1)?.split_context(1, "train")?;
    let test = generate_labeled(Toy::Moons, 1000, Some(0.05), 2)?.split_context(1, "test")?;
    let model = RealNvpConfig::new(2)
        .with_layers(6)
        .with_hidden(64)
        .with_context_dim(1);
    let cfg = TrainConfig::new(model)
        .with_duration(Duration::Steps(1500))
        .with_batch_size(256);
    let t = Trainer::new(cfg, &Device::Cpu)?.fit(&train, None, &mut Silent)?;
    ensure!(t.model.context_dim == 1);

    let x = test.to_tensor(&Device::Cpu)?;
    let label = test
        .context_tensor(&Device::Cpu)?
        .ok_or_else(|| anyhow::anyhow!("no context"))?;
    let flipped = label.affine(-1.0, 1.0)?;
    let mean_lp = |c: &Tensor| -> Result<f64> {
        Ok(t.flow
            .log_prob_with_context(&x, Some(c))?
            .mean_all()?
            .to_scalar::<f32>()? as f64)
    };
    let (right, wrong) = (mean_lp(&label)?, mean_lp(&flipped)?);
    eprintln!("held-out mean log-prob: {right:.3} with the true label, {wrong:.3} flipped");
    ensure!(
        right - wrong >= 2.0,
        "held-out log-prob {right:.3} with the true label, {wrong:.3} with the other"
    );

    let rng = &mut StdRng::seed_from_u64(3);
    for moon in [0f32, 1.0] {
        let c = Tensor::new(&[[moon]], &Device::Cpu)?;
        let s = t.flow.sample_with_context(2000, 1.0, Some(&c), rng)?;
        let rows = s.to_vec2::<f32>()?;
        let on = rows
            .iter()
            .filter(|r| nearer_moon((r[0] as f64, r[1] as f64)) == moon as f64)
            .count();
        let share = on as f64 / rows.len() as f64;
        eprintln!(
            "moon {moon}: {:.1}% of the samples nearer it",
            100.0 * share
        );
        ensure!(
            share >= 0.9,
            "{:.1}% of the samples for moon {moon} lie nearer it",
            100.0 * share
        );
    }
    Ok(())
}

#[test]
fn the_arc_distance_tells_the_moons_apart() {
    // Points on each moon, and the tips, belong to their own moon.
    for t in [0.0, 0.5, 1.5, 3.1] {
        assert_eq!(nearer_moon((f64::cos(t), f64::sin(t))), 0.0);
        assert_eq!(nearer_moon((1.0 - f64::cos(t), 0.5 - f64::sin(t))), 1.0);
    }
}
