//! Our side of `cargo xtask bench quality`, through the library (built in release with
//! the `quality` feature; `xtask bench quality` runs it, then zuko's side,
//! `benches/zuko_quality.py`, and writes the report).
//!
//! - Density quality: `--flow nsf` at its defaults (`NsfConfig::new(2)`: 5 spline
//!   couplings, one hidden layer of 512 ReLU units, 8 bins, tail bound 3, zero-initialised last layers; data
//!   standardised) trained on each of FFJORD's four toy sets, batch 512, Adam at 1e-3
//!   decayed 0.999 per step (the trainer's default schedule); the held-out NLL in the
//!   data's units and the training rate. The
//!   training and held-out points are written as CSV for zuko's side to read.
//! - Autoregressive directions: MAF and IAF (`MafConfig` defaults over 8 features:
//!   5 layers, MADE networks of 2 × 64 ReLU units) timed on 100 000 points, each
//!   direction (log-prob and sampling).
//!
//! Prints one flat JSON object; threads follow `RAYON_NUM_THREADS`.
//!
//!     quality-job --out DIR [--steps N] [--seed N] [--sections quality,speed]
//!
//! `--seed` seeds the models and the batch order (0 by default, as the bench runs it);
//! the points stay the same.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use flow_core::{sampling::randn, seeded_var_builder, Flow};
use flow_maf::MafConfig;
use flow_models::ModelConfig;
use flow_nsf::NsfConfig;
use flow_train::{
    data::{generate, Dataset, Toy},
    Duration, OptimizerConfig, Report, Reporter, TrainConfig, Trainer,
};
use rand::{rngs::StdRng, SeedableRng};

/// The allocator the `flow` binary and the criterion benches use.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Result<T> = std::result::Result<T, String>;

/// FFJORD's toy sets, in the report's order.
const SETS: [Toy; 4] = [
    Toy::EightGaussians,
    Toy::Checkerboard,
    Toy::Pinwheel,
    Toy::Spirals,
];
const N_TRAIN: usize = 20_000;
const N_TEST: usize = 5_000;
/// Seeds of the training points, the held-out points and (by default) the model.
const TRAIN_SEED: u64 = 1;
const TEST_SEED: u64 = 2;
const MODEL_SEED: u64 = 0;
const BATCH: usize = 512;
const LR: f64 = 1e-3;

/// Autoregressive timings: features, points, timed calls after one warm-up.
const AR_DIM: usize = 8;
const AR_POINTS: usize = 100_000;
const AR_REPEATS: usize = 5;

struct Silent;

impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

fn main() -> ExitCode {
    flow_nn::pin_thread_count();
    flow_nn::retain_freed_memory();
    match run() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quality-job: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String> {
    let mut out: Option<PathBuf> = None;
    let mut steps = 2000;
    let mut seed = MODEL_SEED;
    let mut sections = vec!["quality".to_string(), "speed".to_string()];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--steps" => {
                steps = value()?
                    .parse()
                    .map_err(|e| format!("--steps: {e}"))
                    .and_then(|s: usize| {
                        if s == 0 {
                            Err("--steps must be at least 1".to_string())
                        } else {
                            Ok(s)
                        }
                    })?
            }
            "--seed" => seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--sections" => sections = value()?.split(',').map(str::to_string).collect(),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    flow_core::join_cpu_pool();
    let mut json = format!(
        "{{\"threads\": {}, \"steps\": {steps}",
        candle::utils::get_num_threads()
    );
    for section in &sections {
        match section.as_str() {
            "quality" => quality(&out, steps, seed, &mut json)?,
            "speed" => speed(&mut json)?,
            other => return Err(format!("unknown section `{other}` (quality, speed)")),
        }
    }
    json.push('}');
    Ok(json)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One row per point, `x0,x1`, each value as Rust writes an f32 (it reads back exactly).
fn write_csv(path: &Path, data: &Dataset) -> Result<()> {
    let mut text = String::with_capacity(data.values.len() * 12);
    for row in data.values.chunks(data.dim) {
        let cells: Vec<String> = row.iter().map(f32::to_string).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Mean `−log p` of `data` under `flow`, in chunks.
fn mean_nll(flow: &Flow, data: &Dataset) -> candle::Result<f64> {
    let x = data.to_tensor(&Device::Cpu)?;
    let n = data.len();
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = 8192.min(n - start);
        let lp = flow.log_prob(&x.narrow(0, start, len)?)?.detach();
        total += lp.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        start += len;
    }
    Ok(-total / n as f64)
}

fn quality(out: &Path, steps: usize, seed: u64, json: &mut String) -> Result<()> {
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for toy in SETS {
        let name = toy.name();
        let train = generate(toy, N_TRAIN, None, TRAIN_SEED).map_err(err)?;
        let test = generate(toy, N_TEST, None, TEST_SEED).map_err(err)?;
        write_csv(&dir.join(format!("{name}-train.csv")), &train)?;
        write_csv(&dir.join(format!("{name}-test.csv")), &test)?;
        let cfg = TrainConfig::new(NsfConfig::new(2))
            .with_duration(Duration::Steps(steps))
            .with_batch_size(BATCH)
            .with_seed(seed)
            .with_standardize(true)
            // zuko trains on every row for the same steps: so do we.
            .with_val_fraction(0.0)
            .with_optimizer(OptimizerConfig {
                lr: LR,
                ..OptimizerConfig::default()
            });
        let trained = Trainer::new(cfg, &Device::Cpu)
            .map_err(err)?
            .fit(&train, None, &mut Silent)
            .map_err(err)?;
        let nll = mean_nll(&trained.flow, &test).map_err(err)?;
        let entropy = toy.entropy().unwrap_or(f64::NAN);
        eprintln!(
            "ours {name}: held-out NLL {nll:.4} (entropy {entropy:.3}), {:.1} steps/s",
            trained.summary.steps_per_sec
        );
        write!(
            json,
            ", \"{name}_nll\": {nll}, \"{name}_steps_per_s\": {}, \"{name}_entropy\": {entropy}, \"{name}_final_loss\": {}",
            trained.summary.steps_per_sec, trained.summary.final_loss
        )
        .map_err(err)?;
    }
    Ok(())
}

/// The median of `AR_REPEATS` timed calls of `work` after one warm-up, in seconds.
fn median_secs(mut work: impl FnMut() -> candle::Result<Tensor>) -> Result<f64> {
    work().map_err(err)?;
    let mut secs: Vec<f64> = (0..AR_REPEATS)
        .map(|_| {
            let start = Instant::now();
            let t = work()?;
            // The result's values are all there: CPU tensors are computed eagerly.
            drop(t);
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<candle::Result<_>>()
        .map_err(err)?;
    secs.sort_by(f64::total_cmp);
    Ok(secs[AR_REPEATS / 2])
}

fn speed(json: &mut String) -> Result<()> {
    let device = Device::Cpu;
    let x = randn(
        AR_POINTS,
        AR_DIM,
        DType::F32,
        &device,
        &mut StdRng::seed_from_u64(TEST_SEED),
    )
    .map_err(err)?;
    for (name, inverse) in [("maf", false), ("iaf", true)] {
        let varmap = VarMap::new();
        let model = ModelConfig::maf(&MafConfig::new(AR_DIM).with_inverse(inverse));
        let flow = model
            .build(seeded_var_builder(&varmap, MODEL_SEED, DType::F32, &device))
            .map_err(err)?;
        let log_prob = median_secs(|| flow.log_prob(&x).map(|t| t.detach()))?;
        let mut rng = StdRng::seed_from_u64(0);
        let sample = median_secs(|| flow.sample(AR_POINTS, &mut rng).map(|t| t.detach()))?;
        eprintln!("ours {name}: log-prob {log_prob:.4} s, sampling {sample:.4} s");
        write!(
            json,
            ", \"{name}_log_prob_s\": {log_prob}, \"{name}_sample_s\": {sample}"
        )
        .map_err(err)?;
    }
    write!(
        json,
        ", \"ar_dim\": {AR_DIM}, \"ar_points\": {AR_POINTS}, \"ar_repeats\": {AR_REPEATS}"
    )
    .map_err(err)
}
