//! Short training runs: the likelihood improves, runs are reproducible, bad settings
//! and non-finite losses are handled.

use anyhow::{ensure, Result};
use candle::{DType, Device};
use flow_nn::ScaleMap;
use flow_realnvp::RealNvpConfig;
use flow_train::{
    data::{generate, Toy},
    Duration, OptimizerConfig, Report, Reporter, Schedule, TrainConfig, Trainer,
};

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

fn small(steps: usize) -> TrainConfig {
    TrainConfig::new(RealNvpConfig::new(2).with_layers(4).with_hidden(32))
        .with_duration(Duration::Steps(steps))
        .with_batch_size(256)
        .with_val_every(50)
}

fn weights(t: &flow_train::Trained) -> Result<Vec<(String, Vec<f32>)>> {
    let mut out: Vec<(String, Vec<f32>)> = t
        .varmap
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[test]
fn training_lowers_the_held_out_nll() -> Result<()> {
    let train = generate(Toy::Moons, 4000, Some(0.05), 1)?;
    let val = generate(Toy::Moons, 1000, Some(0.05), 2)?;
    let untrained = Trainer::new(small(1), &Device::Cpu)?.fit(&train, Some(&val), &mut Silent)?;
    let trained = Trainer::new(small(400), &Device::Cpu)?.fit(&train, Some(&val), &mut Silent)?;
    let before = untrained.summary.best_val_nll.expect("scored");
    let after = trained.summary.best_val_nll.expect("scored");
    ensure!(
        after < before - 0.5,
        "validation NLL went from {before} to {after}"
    );
    ensure!(
        after < 1.5,
        "validation NLL {after} is far from a fitted moons model"
    );
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_model() -> Result<()> {
    let train = generate(Toy::Circles, 1000, None, 3)?;
    let run = |seed| -> Result<_> {
        let cfg = small(30).with_seed(seed);
        weights(&Trainer::new(cfg, &Device::Cpu)?.fit(&train, None, &mut Silent)?)
    };
    let (a, b, c) = (run(5)?, run(5)?, run(6)?);
    ensure!(a == b, "same seed, different weights");
    ensure!(a != c, "different seeds, same weights");
    Ok(())
}

#[test]
fn epochs_schedules_clipping_and_f64_run() -> Result<()> {
    let train = generate(Toy::EightGaussians, 600, None, 3)?;
    let cfg = small(0)
        .with_duration(Duration::Epochs(2))
        .with_batch_size(200)
        .with_schedule(Schedule::Cosine { warmup: 2 })
        .with_clip_grad(Some(1.0));
    let t = Trainer::new(cfg, &Device::Cpu)?
        .with_dtype(DType::F64)
        .fit(&train, None, &mut Silent)?;
    ensure!(
        t.summary.steps == 6,
        "2 epochs of 3 batches, got {} steps",
        t.summary.steps
    );
    ensure!(t.summary.final_loss.is_finite());
    Ok(())
}

#[test]
fn a_diverging_run_stops_and_keeps_finite_weights() -> Result<()> {
    // A learning rate warmed up towards 3 with the unbounded exp scale blows up after a
    // few dozen steps.
    let train = generate(Toy::Moons, 1000, None, 3)?;
    let cfg = TrainConfig::new(
        RealNvpConfig::new(2)
            .with_layers(4)
            .with_hidden(32)
            .with_scale(ScaleMap::Exp),
    )
    .with_optimizer(OptimizerConfig {
        lr: 3.0,
        ..OptimizerConfig::default()
    })
    .with_schedule(Schedule::Cosine { warmup: 250 })
    .with_duration(Duration::Steps(300));
    let t = Trainer::new(cfg.clone(), &Device::Cpu)?.fit(&train, None, &mut Silent)?;
    let reason = t.summary.stopped.clone().unwrap_or_default();
    ensure!(
        reason.contains("step"),
        "expected a stop naming the step, got {reason:?}"
    );
    ensure!(t.summary.steps < 300);
    for (name, w) in weights(&t)? {
        ensure!(
            w.iter().all(|v| v.is_finite()),
            "{name} holds non-finite weights"
        );
    }
    // The kept weights are those the last finite loss was computed with: the weights of
    // the same run stopped one step earlier (during the warm-up, the learning rate does
    // not depend on the run's length).
    let steps = t.summary.steps;
    ensure!(
        (2..250).contains(&steps),
        "expected divergence during the warm-up, after {steps} steps: {reason}"
    );
    let earlier = Trainer::new(cfg.with_duration(Duration::Steps(steps - 1)), &Device::Cpu)?.fit(
        &train,
        None,
        &mut Silent,
    )?;
    ensure!(
        weights(&t)? == weights(&earlier)?,
        "the kept weights are not those of step {}",
        steps - 1
    );
    Ok(())
}

#[test]
fn bad_settings_are_rejected_before_training() {
    // Each with the words that name its fault.
    let bad = [
        (small(0), "`steps` must be at least 1"),
        (small(10).with_batch_size(0), "`batch` must be at least 1"),
        (
            small(10).with_optimizer(OptimizerConfig {
                lr: -1.0,
                ..OptimizerConfig::default()
            }),
            "`lr` must be positive and finite in f32, got -1",
        ),
        (
            small(10).with_schedule(Schedule::Exp { decay: 1.5 }),
            "`lr-decay` must lie in (0, 1], got 1.5",
        ),
        (
            small(10).with_clip_grad(Some(0.0)),
            "`clip-grad` must be positive and finite in f32, got 0",
        ),
        (
            TrainConfig::new(RealNvpConfig::new(1)),
            "a coupling mask must keep at least one feature",
        ),
        (
            TrainConfig::new(RealNvpConfig::new(2).with_layers(0)),
            "a model to train needs at least one layer",
        ),
    ];
    for (cfg, want) in bad {
        let err = Trainer::new(cfg.clone(), &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("accepted {cfg:?}"))
            .to_string();
        assert!(err.contains(want), "`{err}` lacks `{want}`");
    }
}
