//! Validation by default: a run given no validation set holds out a seeded share of its
//! rows, returns the weights of the best validation score, and stops early when that
//! score stops improving; with a share of 0 it trains on every row to the cap.

use anyhow::{ensure, Result};
use candle::Device;
use flow_realnvp::RealNvpConfig;
use flow_train::{
    data::{generate, hold_out, Toy},
    Duration, Report, Reporter, TrainConfig, Trainer,
};

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

fn config(steps: usize) -> TrainConfig {
    let model = RealNvpConfig::new(2).with_layers(2).with_hidden(16);
    TrainConfig::new(model)
        .with_duration(Duration::Steps(steps))
        .with_batch_size(128)
        .with_val_every(10)
}

#[test]
fn a_run_holds_out_a_tenth_and_returns_its_best_weights() -> Result<()> {
    let data = generate(Toy::Moons, 1000, Some(0.05), 1)?;
    let cfg = config(80).with_patience(None);
    let t = Trainer::new(cfg.clone(), &Device::Cpu)?.fit(&data, None, &mut Silent)?;
    let s = &t.summary;
    ensure!((s.n_train, s.n_val) == (900, 100), "{s:?}");
    // The returned weights score the held-out rows at the best score the run saw.
    let (_, val) = hold_out(&data, 0.1, cfg.seed);
    let val = val.ok_or_else(|| anyhow::anyhow!("nothing held out"))?;
    let nll = -t
        .flow
        .log_prob(&val.to_tensor(&Device::Cpu)?)?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let best = s.best_val_nll.ok_or_else(|| anyhow::anyhow!("no score"))?;
    ensure!((nll - best).abs() < 1e-4, "held-out NLL {nll}, best {best}");
    ensure!(s.stopped.is_none() && s.steps == 80, "{s:?}");
    ensure!(
        s.ending() == "reached the cap of 80 steps",
        "{}",
        s.ending()
    );

    // A share of 0 trains on every row, to the cap, and keeps the last weights.
    let t = Trainer::new(config(30).with_val_fraction(0.0), &Device::Cpu)?.fit(
        &data,
        None,
        &mut Silent,
    )?;
    let s = &t.summary;
    ensure!(
        (s.n_train, s.n_val, s.best_step) == (1000, 0, None),
        "{s:?}"
    );
    ensure!(s.steps == 30, "{s:?}");
    Ok(())
}

#[test]
fn training_stops_when_validation_stops_improving() -> Result<()> {
    // Forty rows and a wide network at a high rate: it learns them by heart, and the
    // held-out score turns.
    let data = generate(Toy::Moons, 40, Some(0.05), 2)?;
    let model = RealNvpConfig::new(2).with_layers(4).with_hidden(128);
    let patience = 3;
    let cfg = TrainConfig::new(model)
        .with_duration(Duration::Steps(5000))
        .with_val_fraction(0.25)
        .with_val_every(10)
        .with_patience(Some(patience))
        .with_optimizer(flow_train::OptimizerConfig {
            lr: 1e-2,
            ..Default::default()
        });
    let t = Trainer::new(cfg, &Device::Cpu)?.fit(&data, None, &mut Silent)?;
    let s = &t.summary;
    let best = s.best_step.ok_or_else(|| anyhow::anyhow!("no best step"))?;
    ensure!(s.steps < 5000, "never stopped: {s:?}");
    // It stopped `patience` scores after the best, and returned the best.
    ensure!(s.steps == best + patience * 10, "{s:?}");
    ensure!(
        s.ending()
            == format!(
                "early stop at step {}: no validation improvement in {patience} evaluations",
                s.steps
            ),
        "{}",
        s.ending()
    );
    ensure!(
        s.weights_kept()
            .starts_with(&format!("the weights of step {best}, the best")),
        "{}",
        s.weights_kept()
    );
    Ok(())
}
