//! Throughput of the reference job (2-D, 5 affine couplings, `s`/`t` nets
//! `Linear(1, 512) → LeakyReLU → Linear(512, 1)`, batch 512, Adam) and sweeps around it.
//! Run with `cargo xtask bench`, which also writes BENCHMARKS.md.

use std::sync::OnceLock;
use std::time::Duration;

use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use flow_core::{sampling::randn, seeded_var_builder, Flow};
use flow_models::ModelConfig;
use flow_nn::Activation;
use flow_realnvp::RealNvpConfig;
use flow_train::{batch_parts, nll_and_gradients, Adam, OptimizerConfig};
use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;

/// The allocator the `flow` binary uses (see its `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The device benchmarked: `FLOWS_BENCH_DEVICE` (`cpu`, `cuda`, `metal`; default the
/// CPU).
fn device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let spec = std::env::var("FLOWS_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
        flow_core::parse_device(&spec).expect("FLOWS_BENCH_DEVICE names a usable device")
    })
}

/// Waits for the device to finish queued work, so that GPU timings cover it.
fn sync() {
    device().synchronize().expect("synchronize");
}

struct Job {
    flow: Flow,
    vars: Vec<Var>,
    adam: Adam,
}

fn job(cfg: &RealNvpConfig) -> Job {
    flow_core::join_cpu_pool();
    let varmap = VarMap::new();
    let model = ModelConfig::realnvp(cfg);
    let flow = model
        .build(seeded_var_builder(&varmap, 0, DType::F32, device()))
        .expect("model");
    let vars = varmap.all_vars();
    let adam = Adam::new(vars.clone(), OptimizerConfig::default()).expect("adam");
    Job { flow, vars, adam }
}

/// One optimizer step as the trainer takes it: log-prob and backward (the batch split
/// over the threads where [`batch_parts`] allows), then Adam.
fn step(job: &mut Job, x: &Tensor) {
    let parts = batch_parts(x.dims()[0], &job.flow, device());
    let (_, grads) = nll_and_gradients(&job.flow, &job.vars, x, None, parts).expect("loss");
    job.adam
        .step(&grads.expect("a finite loss"), 1e-4)
        .expect("adam");
    sync();
}

/// `(n, dim)` standard-normal points drawn from `seed`.
fn data(n: usize, dim: usize, seed: u64) -> Tensor {
    randn(
        n,
        dim,
        DType::F32,
        device(),
        &mut StdRng::seed_from_u64(seed),
    )
    .expect("data")
}

fn seed_job(c: &mut Criterion) {
    let mut g = c.benchmark_group("seed_job");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let cfg = RealNvpConfig::new(2);
    let mut j = job(&cfg);
    let x = data(512, 2, 1);
    g.throughput(Throughput::Elements(1));
    g.bench_function("train_step", |b| b.iter(|| step(&mut j, &x)));
    let big = data(100_000, 2, 2);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("log_prob_100k", |b| {
        b.iter(|| {
            let lp = j.flow.log_prob(&big).expect("log_prob").detach();
            sync();
            lp
        })
    });
    let mut rng = StdRng::seed_from_u64(0);
    g.bench_function("sample_100k", |b| {
        b.iter(|| {
            let x = j.flow.sample(100_000, &mut rng).expect("sample").detach();
            sync();
            x
        })
    });
    g.finish();
}

/// zuko's default RealNVP in our terms: 6 couplings, conditioners of two hidden layers
/// of 64 ReLU units, batch 256 (the `flow train` command BENCHMARKS.md times too).
fn zuko_default() -> RealNvpConfig {
    RealNvpConfig::new(2)
        .with_layers(6)
        .with_hidden(64)
        .with_hidden_layers(2)
        .with_activation(Activation::Relu)
}

fn zuko_job(c: &mut Criterion) {
    let mut g = c.benchmark_group("zuko_default");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut j = job(&zuko_default());
    let x = data(256, 2, 3);
    g.throughput(Throughput::Elements(1));
    g.bench_function("train_step", |b| b.iter(|| step(&mut j, &x)));
    let big = data(100_000, 2, 4);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("log_prob_100k", |b| {
        b.iter(|| {
            let lp = j.flow.log_prob(&big).expect("log_prob").detach();
            sync();
            lp
        })
    });
    g.finish();
}

fn sweep(
    c: &mut Criterion,
    name: &str,
    points: &[usize],
    make: impl Fn(usize) -> (RealNvpConfig, usize),
) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for &p in points {
        let (cfg, batch) = make(p);
        let mut j = job(&cfg);
        let x = data(batch, cfg.dim, 5);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(p), &p, |b, _| {
            b.iter(|| step(&mut j, &x))
        });
    }
    g.finish();
}

fn sweeps(c: &mut Criterion) {
    sweep(c, "train_step_by_batch", &[64, 512, 2048, 8192], |b| {
        (RealNvpConfig::new(2), b)
    });
    sweep(c, "train_step_by_dim", &[2, 8, 64, 256], |d| {
        (RealNvpConfig::new(d), 512)
    });
    sweep(c, "train_step_by_depth", &[1, 2, 3, 4], |d| {
        (zuko_default().with_hidden_layers(d), 256)
    });
    sweep(c, "train_step_by_layers", &[2, 5, 8, 16], |l| {
        (RealNvpConfig::new(2).with_layers(l), 512)
    });
    sweep(c, "train_step_by_hidden", &[64, 256, 512, 1024], |h| {
        (RealNvpConfig::new(2).with_hidden(h), 512)
    });
}

/// What the machine itself reaches, to set the job's figures against: f32 matmul at a
/// size where it is compute-bound (attainable flops), and a STREAM-style triad
/// `a = b + s·c` over arrays far larger than the caches (memory bandwidth), both on
/// all threads.
fn machine(c: &mut Criterion) {
    flow_core::join_cpu_pool();
    let mut g = c.benchmark_group("machine");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let n = 1024;
    let (a, b) = (data(n, n, 6), data(n, n, 7));
    g.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    g.bench_function("matmul_1024", |bch| {
        bch.iter(|| {
            let c = a.matmul(&b).expect("matmul");
            sync();
            c
        })
    });
    // Three arrays of 64 MiB each.
    let len = 16 << 20;
    let (mut x, y, z) = (vec![0f32; len], vec![1f32; len], vec![2f32; len]);
    g.throughput(Throughput::Bytes((3 * len * 4) as u64));
    g.bench_function("triad_64mib", |bch| {
        bch.iter(|| {
            x.par_chunks_mut(1 << 16)
                .zip(y.par_chunks(1 << 16))
                .zip(z.par_chunks(1 << 16))
                .for_each(|((x, y), z)| {
                    for ((x, &y), &z) in x.iter_mut().zip(y).zip(z) {
                        *x = y + 3.0 * z;
                    }
                })
        })
    });
    g.finish();
}

criterion_group!(benches, seed_job, zuko_job, sweeps, machine);

/// criterion's `main`, after fixing candle's thread counts as the `flow` binary does.
fn main() {
    flow_kernels::pin_thread_count();
    flow_kernels::retain_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
