//! The jobs users compare against PyTorch on an accelerator, timed in-process on the
//! device `FLOWS_BENCH_DEVICE` names (`cuda` by default), with the fused kernels on and
//! off: training steps of the reference job, zuko's default architecture and NICE;
//! log-prob and sampling of 1M points; a batch sweep; and the latency of one tiny op,
//! which bounds a step made of many small kernels. Prints one JSON object per line.
//!
//! `benches/pytorch_device_jobs.py` times the same jobs in PyTorch the same way (a
//! fixed batch on the device, no synchronisation inside the timed loop, median of
//! repeats). `scripts/gpu-check.sh` runs both; `cargo xtask bench-device` builds this.

use std::time::Instant;

use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder, Flow};
use flow_kernels::set_fusion;
use flow_models::ModelConfig;
use flow_nn::Activation;
use flow_realnvp::{CouplingKind, RealNvpConfig};
use flow_train::{Adam, OptimizerConfig};
use rand::{rngs::StdRng, SeedableRng};

/// The allocator the `flow` binary uses (see its `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Timed repeats per figure; the median is reported.
const REPEATS: usize = 3;
/// Optimizer steps per timed repeat.
const STEPS: usize = 100;
/// Points of the log-prob and sampling jobs.
const POINTS: usize = 1_000_000;

struct Job {
    flow: Flow,
    vars: Vec<Var>,
    adam: Adam,
}

impl Job {
    fn new(cfg: &RealNvpConfig, dev: &Device) -> candle::Result<Self> {
        let varmap = VarMap::new();
        let flow =
            ModelConfig::realnvp(cfg).build(seeded_var_builder(&varmap, 0, DType::F32, dev))?;
        let vars = varmap.all_vars();
        let adam = Adam::new(vars.clone(), OptimizerConfig::default())?;
        Ok(Self { flow, vars, adam })
    }

    /// One optimizer step: log-prob, backward, Adam; queued, not waited for.
    fn step(&mut self, x: &Tensor) -> candle::Result<()> {
        let loss = self.flow.log_prob(x)?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        let grads: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.adam.step(&grads, 1e-4)
    }
}

/// The median over [`REPEATS`] of `work`'s rate, `units` per second, after one warm-up.
fn rate(dev: &Device, units: f64, mut work: impl FnMut() -> candle::Result<()>) -> f64 {
    let mut timed = || -> candle::Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        work()?;
        dev.synchronize()?;
        Ok(units / t.elapsed().as_secs_f64())
    };
    if let Err(e) = timed() {
        eprintln!("device_jobs: {e}");
        return f64::NAN;
    }
    let mut rates: Vec<f64> = (0..REPEATS).map(|_| timed().unwrap_or(f64::NAN)).collect();
    rates.sort_by(f64::total_cmp);
    rates[REPEATS / 2]
}

fn emit(job: &str, fused: bool, metric: &str, value: f64) {
    println!(r#"{{"job":"{job}","fused":{fused},"{metric}":{value:.1}}}"#);
}

fn main() -> candle::Result<()> {
    flow_kernels::retain_freed_memory();
    let spec = std::env::var("FLOWS_BENCH_DEVICE").unwrap_or_else(|_| "cuda".into());
    let dev = flow_core::parse_device(&spec)?;
    let rng = &mut StdRng::seed_from_u64(0);
    let models = [
        ("reference", RealNvpConfig::new(2), 512),
        (
            "zuko_default",
            RealNvpConfig::new(2)
                .with_layers(6)
                .with_hidden(64)
                .with_hidden_layers(2)
                .with_activation(Activation::Relu),
            256,
        ),
        (
            "nice",
            RealNvpConfig::new(2).with_coupling(CouplingKind::Additive),
            512,
        ),
    ];
    let big = randn(POINTS, 2, DType::F32, &dev, rng)?;
    for fused in [true, false] {
        set_fusion(fused);
        for (name, cfg, batch) in &models {
            let mut job = Job::new(cfg, &dev)?;
            let x = randn(*batch, cfg.dim, DType::F32, &dev, rng)?;
            let steps = rate(&dev, STEPS as f64, || {
                (0..STEPS).try_for_each(|_| job.step(&x))
            });
            emit(&format!("{name}_train"), fused, "steps_per_s", steps);
            let lp = rate(&dev, POINTS as f64, || job.flow.log_prob(&big).map(drop));
            emit(&format!("{name}_log_prob_1m"), fused, "points_per_s", lp);
            let mut draw = StdRng::seed_from_u64(1);
            let s = rate(&dev, POINTS as f64, || {
                job.flow.sample(POINTS, &mut draw).map(drop)
            });
            emit(&format!("{name}_sample_1m"), fused, "points_per_s", s);
        }
        for batch in [64, 4096, 32768] {
            let mut job = Job::new(&RealNvpConfig::new(2), &dev)?;
            let x = randn(batch, 2, DType::F32, &dev, rng)?;
            let steps = rate(&dev, STEPS as f64, || {
                (0..STEPS).try_for_each(|_| job.step(&x))
            });
            emit(
                &format!("reference_train_batch_{batch}"),
                fused,
                "steps_per_s",
                steps,
            );
        }
    }
    // One element-wise add of two (512, 1) tensors: the cost of a kernel launch.
    let (a, b) = (
        randn(512, 1, DType::F32, &dev, rng)?,
        randn(512, 1, DType::F32, &dev, rng)?,
    );
    let ops = 2000;
    let per_s = rate(&dev, ops as f64, || {
        (0..ops).try_for_each(|_| (&a + &b).map(drop))
    });
    println!(r#"{{"job":"tiny_op","us_per_op":{:.2}}}"#, 1e6 / per_s);
    Ok(())
}
