//! Data-parallel training with ranks that are threads of this process (flow-dist's
//! `ThreadGroup`): the replicas train the model one process trains on the same
//! batches, up to the order of float additions, and stay bit-for-bit equal to each
//! other; a stop asked of one replica stops all after the same step, and so does an
//! early stop on the rows held out to validate on; replicas that drift apart are
//! caught.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration as Wait,
};

use anyhow::{anyhow, ensure, Result};
use candle::{DType, Device, Tensor};
use flow_dist::{checksum, ThreadGroup};
use flow_glow::{GlowConfig, ImageShape, RealNvpImageConfig};
use flow_models::ModelConfig;
use flow_train::{
    data::{digits, generate, Dataset, Toy, DIGITS_LEVELS},
    dequantize, CheckpointSink, Control, Duration, LowMemory, Replicas, Report, Reporter,
    TrainCheckpoint, TrainConfig, TrainError, Trained, Trainer,
};

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

/// How long a replica waits for the others: far longer than any step here.
const PATIENCE: Wait = Wait::from_secs(120);

/// Trains `cfg` on `data` as `world` replicas, each on a thread of its own with the
/// control `control(rank)` gives, checking the replicas every `check_every` steps.
fn replicated(
    world: usize,
    cfg: &TrainConfig,
    data: &Dataset,
    check_every: usize,
    control: impl Fn(usize) -> Control<'static> + Sync,
) -> Vec<Result<Trained, TrainError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(world, PATIENCE)
            .into_iter()
            .enumerate()
            .map(|(rank, member)| {
                let control = &control;
                s.spawn(move || {
                    let replicas =
                        Replicas::new(Arc::new(member)).with_check_every(Some(check_every));
                    let control = Control {
                        replicas: Some(replicas),
                        ..control(rank)
                    };
                    Trainer::new(cfg.clone(), &Device::Cpu)?.fit_with(
                        data,
                        None,
                        &mut Silent,
                        control,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(TrainError::InvalidConfig("a replica panicked".into())))
            })
            .collect()
    })
}

/// Every tensor of a trained model (weights and buffers), in the order of their names.
fn tensors(t: &Trained) -> Vec<Tensor> {
    let map = t.varmap.data().lock().expect("variables");
    let mut named: Vec<_> = map.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named
        .into_iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect()
}

fn log_probs(t: &Trained, x: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flow.log_prob(x)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn largest_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Trains `cfg` alone and as `world` replicas, and returns the largest difference of
/// their log-probs on `x`, after checking that the replicas are equal bit for bit.
fn gap_to_one_process(world: usize, cfg: &TrainConfig, data: &Dataset, x: &Tensor) -> Result<f64> {
    let alone = Trainer::new(cfg.clone(), &Device::Cpu)?.fit(data, None, &mut Silent)?;
    let replicas = replicated(world, cfg, data, 5, |_| Control::default())
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let sums = replicas
        .iter()
        .map(|t| checksum(&tensors(t)))
        .collect::<candle::Result<Vec<_>>>()?;
    ensure!(
        sums.iter().all(|&s| s == sums[0]),
        "replicas differ: {sums:?}"
    );
    ensure!(replicas[0].summary.steps == alone.summary.steps);
    Ok(largest_gap(
        &log_probs(&alone, x)?,
        &log_probs(&replicas[0], x)?,
    ))
}

fn moons_job(steps: usize) -> TrainConfig {
    let model = flow_realnvp::RealNvpConfig::new(2)
        .with_layers(3)
        .with_hidden(32);
    TrainConfig::new(model)
        .with_duration(Duration::Steps(steps))
        .with_batch_size(96)
        .with_seed(3)
}

#[test]
fn replicas_train_the_model_one_process_trains() -> Result<()> {
    let data = generate(Toy::Moons, 1000, None, 1)?;
    let x = generate(Toy::Moons, 200, None, 9)?.to_tensor(&Device::Cpu)?;
    // Two shares of 48 rows, and three uneven ones of 32 (the batch 96 cut at 32, 64).
    for world in [2, 3] {
        let gap = gap_to_one_process(world, &moons_job(60), &data, &x)?;
        ensure!(gap < 1e-4, "{world} replicas: log-probs differ by {gap}");
    }
    Ok(())
}

/// Nats per image of 64 values in one bit per dimension.
const BITS: f64 = 64.0 * std::f64::consts::LN_2;

/// The first `n` digits, and pixel rows of other digits dequantised once.
fn digits_job(n: usize) -> Result<(Dataset, Tensor)> {
    let all = digits().data;
    let rows = |from: usize, count: usize| {
        Dataset::new(64, all.values[from * 64..(from + count) * 64].to_vec())
    };
    let test = rows(1500, 100).to_tensor(&Device::Cpu)?;
    Ok((rows(0, n), dequantize(&test, DIGITS_LEVELS, 0.0, 5)?))
}

#[test]
fn glow_replicas_start_from_one_actnorm_initialisation() -> Result<()> {
    // ActNorm initialises on the first (whole) batch: the replicas agree with one
    // process, which they could not had each initialised on its share.
    let (data, x) = digits_job(256)?;
    let model = GlowConfig::new(ImageShape::new(1, 8, 8))
        .with_levels(1)
        .with_depth(2)
        .with_hidden_channels(8)
        .with_pixel_levels(DIGITS_LEVELS);
    let cfg = TrainConfig::new(ModelConfig::glow(&model))
        .with_duration(Duration::Steps(12))
        .with_batch_size(64);
    let gap = gap_to_one_process(2, &cfg, &data, &x)?;
    ensure!(gap < 1e-3 * BITS, "log-probs differ by {gap} nats");
    Ok(())
}

#[test]
fn batch_norm_replicas_use_the_whole_batch_statistics() -> Result<()> {
    // Each replica normalises with the statistics of all the shares: the map one
    // process computes on the whole batch. Per-share statistics would differ between
    // the replicas, which the checks would catch, and from one process's.
    let (data, x) = digits_job(256)?;
    let model = RealNvpImageConfig::new(ImageShape::new(1, 8, 8))
        .with_scales(1)
        .with_hidden_channels(8)
        .with_batch_norm(true)
        .with_pixel_levels(DIGITS_LEVELS);
    let cfg = TrainConfig::new(ModelConfig::realnvp_image(&model)).with_batch_size(64);
    // One step: the first batch's loss, and the running averages it moved, are one
    // process's up to rounding.
    let one = cfg.clone().with_duration(Duration::Steps(1));
    let alone = Trainer::new(one.clone(), &Device::Cpu)?.fit(&data, None, &mut Silent)?;
    let replica = replicated(2, &one, &data, 1, |_| Control::default())
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no replica"))??;
    let (a, r) = (alone.summary.final_loss, replica.summary.final_loss);
    ensure!((a - r).abs() < 1e-5 * a.abs(), "first losses {a} and {r}");
    let buffers = |t: &Trained| -> Result<Vec<f32>> {
        let map = t.varmap.data().lock().expect("variables");
        let mut running: Vec<_> = map.iter().filter(|(k, _)| k.contains("running_")).collect();
        running.sort_by(|a, b| a.0.cmp(b.0));
        ensure!(running.len() >= 2, "no running statistics");
        let values = running
            .into_iter()
            .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(values.concat())
    };
    let gap = largest_gap(
        &buffers(&alone)?
            .iter()
            .map(|&v| f64::from(v))
            .collect::<Vec<_>>(),
        &buffers(&replica)?
            .iter()
            .map(|&v| f64::from(v))
            .collect::<Vec<_>>(),
    );
    ensure!(gap < 1e-5, "running statistics differ by {gap}");
    // Later steps: Adam turns rounding in gradients that are zero in exact
    // arithmetic (batch norm's at its fixed point) into whole steps of either sign,
    // so the models agree in bits/dim, not to rounding.
    let cfg = cfg.with_duration(Duration::Steps(12));
    let gap = gap_to_one_process(2, &cfg, &data, &x)?;
    ensure!(gap < 0.01 * BITS, "log-probs differ by {gap} nats");
    Ok(())
}

#[test]
fn a_stop_asked_of_one_replica_stops_all_after_the_same_step() -> Result<()> {
    let data = generate(Toy::Moons, 500, None, 1)?;
    let flags: Vec<&'static AtomicBool> = (0..2)
        .map(|_| &*Box::leak(Box::new(AtomicBool::new(false))))
        .collect();
    // Rank 1 is "signalled" while its 7th step's checkpoint is handed over.
    let runs = replicated(2, &moons_job(40), &data, 1, |rank| {
        let flag = flags[rank];
        let on_checkpoint: CheckpointSink<'static> =
            Box::leak(Box::new(move |ck: &TrainCheckpoint| {
                if rank == 1 && ck.state.step == 7 {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(())
            }));
        Control {
            checkpoint_every: Some(1),
            on_checkpoint: Some(on_checkpoint),
            stop: Some(flag),
            ..Control::default()
        }
    });
    for (rank, run) in runs.into_iter().enumerate() {
        let s = run?.summary;
        ensure!(s.interrupted && s.steps == 7, "rank {rank}: {s:?}");
        ensure!(
            flags[rank].load(std::sync::atomic::Ordering::SeqCst),
            "rank {rank} was not told of the stop"
        );
    }
    Ok(())
}

#[test]
fn replicas_hold_rows_out_and_stop_early_together_at_the_step_one_process_does() -> Result<()> {
    let data = generate(Toy::Moons, 600, None, 1)?;
    // A noisy run scored every other step with a patience of 1 stops early soon.
    let mut cfg = moons_job(400).with_val_every(2).with_patience(Some(1));
    cfg.optimizer.lr = 3e-2;
    let alone = Trainer::new(cfg.clone(), &Device::Cpu)?.fit(&data, None, &mut Silent)?;
    let stopped = alone.summary.stopped.clone().unwrap_or_default();
    ensure!(stopped.starts_with("early stop"), "{:?}", alone.summary);
    ensure!(alone.summary.n_val == 60 && alone.summary.n_train == 540);
    let runs = replicated(2, &cfg, &data, 1, |_| Control::default())
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    for (rank, run) in runs.iter().enumerate() {
        let s = &run.summary;
        ensure!(
            (s.steps, s.best_step, s.n_val) == (alone.summary.steps, alone.summary.best_step, 60),
            "rank {rank}: {s:?} against one process's {:?}",
            alone.summary
        );
    }
    ensure!(checksum(&tensors(&runs[0]))? == checksum(&tensors(&runs[1]))?);
    Ok(())
}

#[test]
fn replicas_diverge_as_one_process_does() -> Result<()> {
    let data = generate(Toy::Moons, 500, None, 1)?;
    let mut cfg = moons_job(20);
    cfg.optimizer.lr = 1e30;
    let alone = Trainer::new(cfg.clone(), &Device::Cpu)?.fit(&data, None, &mut Silent)?;
    for run in replicated(2, &cfg, &data, 5, |_| Control::default()) {
        let s = run?.summary;
        ensure!(s.kept_step == alone.summary.kept_step && s.stopped == alone.summary.stopped);
        ensure!(s.kept_step == Some(0), "{s:?}");
    }
    Ok(())
}

#[test]
fn replicas_that_drift_apart_are_caught_at_the_next_check() -> Result<()> {
    let data = generate(Toy::Moons, 500, None, 1)?;
    // Rank 1 trains with another learning rate: the same summed gradients move its
    // weights elsewhere from the first step on.
    let cfg = moons_job(20);
    let mut other = cfg.clone();
    other.optimizer.lr *= 2.0;
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2, PATIENCE)
            .into_iter()
            .zip([cfg.clone(), other])
            .map(|(member, cfg)| {
                let data = &data;
                s.spawn(move || {
                    let replicas = Replicas::new(Arc::new(member)).with_check_every(Some(5));
                    let control = Control {
                        replicas: Some(replicas),
                        ..Control::default()
                    };
                    Trainer::new(cfg, &Device::Cpu)?.fit_with(data, None, &mut Silent, control)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("panicked")))
            .collect()
    });
    for run in runs {
        match run? {
            Ok(t) => return Err(anyhow!("drifted replicas trained: {:?}", t.summary)),
            Err(e) => ensure!(
                e.to_string()
                    == "invalid training configuration: the replicas' weights differ after step 5: 1 of 2 processes hold other weights than rank 0 (are they all given the same data and settings?)",
                "{e}"
            ),
        }
    }
    Ok(())
}

#[test]
fn a_batch_smaller_than_the_replicas_is_refused() -> Result<()> {
    let data = generate(Toy::Moons, 100, None, 1)?;
    let cfg = moons_job(5).with_batch_size(2);
    for run in replicated(3, &cfg, &data, 1, |_| Control::default()) {
        let Err(e) = run else {
            return Err(anyhow!("three replicas shared a batch of two rows"));
        };
        ensure!(
            e.to_string()
                == "invalid training configuration: a batch of 2 rows cannot be shared out between 3 processes",
            "{e}"
        );
    }
    Ok(())
}

#[test]
fn low_memory_training_is_refused_on_replicas() -> Result<()> {
    let data = generate(Toy::Moons, 100, None, 1)?;
    let cfg = moons_job(5);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2, PATIENCE)
            .into_iter()
            .map(|member| {
                let cfg = cfg.clone();
                let data = &data;
                s.spawn(move || {
                    let control = Control {
                        replicas: Some(Replicas::new(Arc::new(member))),
                        ..Control::default()
                    };
                    Trainer::new(cfg, &Device::Cpu)?
                        .with_low_memory(LowMemory::new())?
                        .fit_with(data, None, &mut Silent, control)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(_)) => "trained".into(),
                Err(_) => "panicked".into(),
            })
            .collect()
    });
    for e in errors {
        ensure!(
            e == "invalid training configuration: low-memory training does not run on several processes yet",
            "{e}"
        );
    }
    Ok(())
}
