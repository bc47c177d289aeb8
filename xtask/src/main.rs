//! Project automation: `cargo xtask <command>`.
//!
//! - `test`: the full check (formatting, clippy with warnings denied, the test suite);
//! - `train [--features cuda|metal] [-- FLOW TRAIN ARGS]`: the reference job on two
//!   moons, writing `runs/moons/`;
//! - `bench [--features cuda|metal]`: the benchmarks, on the device that
//!   `FLOWS_BENCH_DEVICE` names (default `cpu`), written to BENCHMARKS.md;
//! - `bench quality [--steps N] [--threads N]`: only the comparison with zuko on
//!   FFJORD's toy sets and the autoregressive directions (see `quality.rs`), written
//!   to `target/bench-quality/report.md` (the whole `bench` runs it too);
//! - `bench digits [--steps N] [--threads N] [--seeds N] [--tarflow-steps N]`: only Glow
//!   against normflows' Glow on the 8×8 digits (see `images.rs`), then TarFlow at its
//!   defaults against that Glow and against a PyTorch TarFlow (`tarflow.rs`), written to
//!   `target/bench-digits/report.md`
//!   (the whole `bench` runs it too);
//! - `fashion-mnist [--device cuda|metal] [--features F] [-- FLOW TRAIN ARGS]`: Glow on
//!   Fashion-MNIST, test bits/dim and samples in `runs/fashion-mnist/`;
//! - `npe [--tasks T,…] [--sims N,…] [--no-sbi] [-- FLOW TRAIN FLAGS]`: neural posterior
//!   estimation on sbibm tasks against the `sbi` package, scored by C2ST (see `npe.rs`).
//!
//! Python (the peers' side) is `python3`, or the interpreter `FLOWS_PYTHON` names.

mod images;
mod npe;
mod npe_tasks;
mod quality;
mod tarflow;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("train") => train(&args[1..]),
        Some("bench") if args.get(1).is_some_and(|a| a == "quality") => {
            quality::command(&args[2..])
        }
        Some("bench") if args.get(1).is_some_and(|a| a == "digits") => {
            images::digits_command(&args[2..])
        }
        Some("fashion-mnist") => images::fashion_mnist(&args[1..]),
        Some("npe") => npe::command(&args[1..]),
        Some("bench") => bench(&args[1..]),
        _ => Err("usage: cargo xtask <test | train [--features F] [-- ARGS] \
             | bench [--features F] | bench quality [--steps N] [--threads N] \
             | bench digits [--steps N] [--threads N] [--seeds N] [--tarflow-steps N] \
             | fashion-mnist [--device D] [--features F] [-- ARGS] \
             | npe [--tasks T,…] [--sims N,…] [--no-sbi] [-- FLOW TRAIN FLAGS]>"
            .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

/// Runs `flow args` (a training run) and returns the `trained …` line it reports.
fn trained_line(features: &Option<String>, args: &[&str]) -> Result<String> {
    let output = flow(features, args).output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&output.stderr)
        .lines()
        .find(|l| l.starts_with("trained"))
        .unwrap_or("(flow train failed)")
        .to_string())
}

/// `[--steps N] [--threads N]` of the `bench` subcommands, over the defaults given;
/// `command` names the subcommand in the error.
fn steps_and_threads(
    args: &[String],
    mut steps: usize,
    mut threads: usize,
    command: &str,
) -> Result<(usize, usize)> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
                .ok_or_else(|| format!("{name} needs a positive whole number"))
        };
        match a.as_str() {
            "--steps" => steps = number("--steps")?,
            "--threads" => threads = number("--threads")?,
            other => {
                return Err(format!(
                    "unexpected argument `{other}` ({command} [--steps N] [--threads N])"
                ))
            }
        }
    }
    Ok((steps, threads))
}

/// Splits `[--features F] [-- rest]` into the features and the pass-through arguments.
fn split_args(args: &[String]) -> Result<(Option<String>, Vec<String>)> {
    let (ours, rest) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let mut features = None;
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--features" => features = it.next().cloned(),
            f if f.starts_with("--features=") => features = Some(f["--features=".len()..].into()),
            other => {
                return Err(format!(
                    "unexpected argument `{other}` (put flow's arguments after `--`)"
                ))
            }
        }
    }
    Ok((features, rest))
}

fn test() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let mut t = cargo();
    t.args(["test", "--release", "--workspace"]);
    run(t)
}

fn flow(features: &Option<String>, args: &[&str]) -> Command {
    let mut c = cargo();
    c.args(["run", "--release", "--quiet", "-p", "flow-cli"]);
    if let Some(f) = features {
        c.args(["--features", f]);
    }
    c.arg("--").args(args);
    c
}

fn train(args: &[String]) -> Result<()> {
    let (features, extra) = split_args(args)?;
    let out = root().join("runs").join("moons");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let p = |name: &str| out.join(name).to_string_lossy().into_owned();
    // Two held-out sets from other seeds: validation picks the best weights, test
    // scores them (data that took no part in choosing them).
    let (model, val, test) = (p("model.safetensors"), p("validation.csv"), p("test.csv"));
    for (file, seed) in [(&val, "12345"), (&test, "54321")] {
        run(flow(
            &features,
            &[
                "data", "moons", "--n", "5000", "--noise", "0.05", "--seed", seed, "--out", file,
            ],
        ))?;
    }
    let metrics = p("metrics.jsonl");
    let mut train_args = vec![
        "train",
        "--data",
        "moons",
        "--n",
        "20000",
        "--noise",
        "0.05",
        "--val",
        &val,
        "--out",
        &model,
        "--metrics",
        &metrics,
    ];
    train_args.extend(extra.iter().map(String::as_str));
    run(flow(&features, &train_args))?;
    let (samples, samples_png, density) = (p("samples.csv"), p("samples.png"), p("density.png"));
    run(flow(
        &features,
        &[
            "sample",
            "--model",
            &model,
            "--n",
            "3000",
            "--seed",
            "0",
            "--out",
            &samples,
            "--plot",
            &samples_png,
        ],
    ))?;
    run(flow(
        &features,
        &["plot", "--model", &model, "--data", &val, "--out", &density],
    ))?;
    println!("test set ({test}):");
    run(flow(
        &features,
        &["log-prob", "--model", &model, "--input", &test],
    ))?;
    println!("wrote {}", out.display());
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let (features, extra) = split_args(args)?;
    let mut c = cargo();
    c.args(["bench", "-p", "flow-train", "--bench", "seed_job"]);
    if let Some(f) = &features {
        c.args(["--features", f]);
    }
    c.arg("--").args(&extra);
    run(c)?;

    // The end-to-end job through the binary: steps/s and peak memory.
    let out = root().join("target").join("bench-run");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let model = out.join("model.safetensors").to_string_lossy().into_owned();
    let device = bench_device();
    let trained = trained_line(
        &features,
        &[
            "train",
            "--data",
            "moons",
            "--n",
            "20000",
            "--noise",
            "0.05",
            "--device",
            &device,
            "--val-fraction",
            "0",
            "--out",
            &model,
        ],
    )?;

    // zuko's default architecture through the binary, and the log-prob of 100 000
    // points read from CSV, timed as a whole process.
    let zuko_model = out.join("zuko.safetensors").to_string_lossy().into_owned();
    let zuko_arch = [
        "train",
        "--data",
        "moons",
        "--hidden",
        "64",
        "--hidden-layers",
        "2",
        "--layers",
        "6",
        "--batch",
        "256",
        "--activation",
        "relu",
        "--steps",
        "1000",
        "--val-fraction",
        "0",
        "--device",
        &device,
    ];
    let zuko_trained = trained_line(
        &features,
        &[&zuko_arch[..], &["--out", &zuko_model]].concat(),
    )?;
    // The same with one joint conditioner per coupling, as zuko's and normflows' are.
    let joint_model = out
        .join("zuko-joint.safetensors")
        .to_string_lossy()
        .into_owned();
    let joint_trained = trained_line(
        &features,
        &[&zuko_arch[..], &["--nets", "joint", "--out", &joint_model]].concat(),
    )?;
    let points = out.join("points.csv").to_string_lossy().into_owned();
    run(flow(
        &features,
        &[
            "data", "moons", "--n", "100000", "--seed", "7", "--out", &points,
        ],
    ))?;
    // Built by the runs above: the timed process is the binary alone, the median of
    // LOG_PROB_RUNS runs.
    let binary = root().join("target/release/flow");
    let mut times = Vec::new();
    let mut peak = String::new();
    for _ in 0..LOG_PROB_RUNS {
        let started = std::time::Instant::now();
        let log_prob = Command::new(&binary)
            .args([
                "log-prob",
                "--model",
                &zuko_model,
                "--input",
                &points,
                "--device",
                &device,
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        times.push(started.elapsed().as_secs_f64());
        if !log_prob.status.success() {
            return Err(format!(
                "flow log-prob failed: {}",
                String::from_utf8_lossy(&log_prob.stderr).trim()
            ));
        }
        peak = String::from_utf8_lossy(&log_prob.stderr)
            .lines()
            .find(|l| l.starts_with("peak memory"))
            .unwrap_or("peak memory not read")
            .to_string();
    }
    times.sort_by(f64::total_cmp);
    let log_prob_secs = times[times.len() / 2];
    let log_prob_line = format!(
        "{:.0} points/s ({:.3} s for 100 000 points, process start and CSV read included; the median of {LOG_PROB_RUNS} runs), {peak}",
        1e5 / log_prob_secs,
        log_prob_secs
    );

    let python = |script: &str, extra: &[&str]| -> Option<String> {
        Command::new(python_program())
            .current_dir(root())
            .arg(script)
            .args(["--threads", &threads().to_string()])
            .args(extra)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let pytorch = python(
        "benches/pytorch_seed_job.py",
        &["--device", &pytorch_device()],
    );
    let peers = python("benches/zuko_jobs.py", &[]);
    // The Python package against the binary, on the same data, runs alternating.
    let python_train = python_training(&out, &features)?;
    // FFJORD's toy sets and the autoregressive directions against zuko, on the CPU.
    let quality = quality::run(&quality::Options {
        threads: threads(),
        ..quality::Options::default()
    })
    .unwrap_or_else(|e| {
        format!("## Density quality and autoregressive directions\n\nNot measured: {e}\n")
    });
    // Glow on the digits against normflows', on the CPU.
    let digits = images::digits(&images::DigitsOptions {
        threads: threads(),
        ..images::DigitsOptions::default()
    })
    .unwrap_or_else(|e| format!("## Glow on scikit-learn's digits\n\nNot measured: {e}\n"));

    let runs = Runs {
        trained: &trained,
        zuko_trained: &zuko_trained,
        joint_trained: &joint_trained,
        log_prob: &log_prob_line,
        pytorch: pytorch.as_deref(),
        peers: peers.as_deref(),
        quality: &quality,
        python_train: &python_train,
        digits: &digits,
    };
    let mut report = report(&runs)?;
    let path = root().join("BENCHMARKS.md");
    // What follows the generated part was measured elsewhere (by hand, on a GPU
    // machine, across processes): keep it.
    if let Ok(old) = std::fs::read_to_string(&path) {
        if let Some(i) = old.find(KEPT_HEADING) {
            report.push('\n');
            report.push_str(&old[i + 1..]);
        }
    }
    std::fs::write(&path, report).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// BENCHMARKS.md's generated part is its title's section; from the next top-level
/// heading on, the page is kept as it is.
const KEPT_HEADING: &str = "\n# ";

/// The device the benchmarks run on (read by the criterion benches too).
fn bench_device() -> String {
    env::var("FLOWS_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// The Python interpreter that runs the peers' side: `FLOWS_PYTHON`, else `python3`.
fn python_program() -> String {
    env::var("FLOWS_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The Python interpreter that has the flows package: `FLOWS_PACKAGE_PYTHON`, else the
/// environment `scripts/test-python.sh` builds.
fn package_python() -> PathBuf {
    env::var_os("FLOWS_PACKAGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/pyenv/bin/python"))
}

/// `benches/python_train.py`'s section: training from Python against `flow train` on
/// the same moons points (written to `out`), or a line saying why it did not run.
fn python_training(out: &Path, features: &Option<String>) -> Result<String> {
    let skipped = |why: String| Ok(format!("## Training from Python\n\nSkipped: {why}\n"));
    let python = package_python();
    if !python.exists() {
        return skipped(format!(
            "no {} (`scripts/test-python.sh` builds the package into it; FLOWS_PACKAGE_PYTHON names another)",
            python.display()
        ));
    }
    let data = out.join("moons.npy").to_string_lossy().into_owned();
    run(flow(
        features,
        &[
            "data", "moons", "--n", "20000", "--seed", "0", "--out", &data,
        ],
    ))?;
    let binary = root().join("target/release/flow");
    let output = Command::new(&python)
        .current_dir(root())
        .arg("benches/python_train.py")
        .args(["--flow", &binary.to_string_lossy(), "--data", &data])
        .args([
            "--out",
            &out.join("python-bench.safetensors").to_string_lossy(),
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        return skipped(format!(
            "benches/python_train.py failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The same device as PyTorch names it.
fn pytorch_device() -> String {
    bench_device().replace("metal", "mps")
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Mean time in nanoseconds of a criterion benchmark, read from its estimates file.
fn mean_ns(group: &str, id: &str) -> Option<f64> {
    let path = root()
        .join("target/criterion")
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.find("\"mean\"")?..];
    let v = &after[after.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = v.find([',', '}'])?;
    v[..end].trim().parse().ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs of the timed `flow log-prob` process; the report gives their median.
const LOG_PROB_RUNS: usize = 5;

/// Flops of one forward pass of a network of layer widths `widths`, per sample: the
/// products' multiply-adds, twice each. A training step is about three forward passes.
fn network_flops(widths: &[usize]) -> f64 {
    let macs: usize = widths.windows(2).map(|w| w[0] * w[1]).sum();
    2.0 * macs as f64
}

/// [`network_flops`] of a coupling's separate networks (one per parameter of an affine
/// transform, so two).
fn coupling_flops(widths: &[usize]) -> f64 {
    2.0 * network_flops(widths)
}

/// Floating-point operations of the conditioners' forward pass over `batch` samples
/// (they dominate): per `Linear(1, H) → act → Linear(H, 1)` network and sample `2·H`
/// for each linear layer plus `H` for the activation, two networks per layer. A
/// training step costs about three times this: the backward pass recomputes the hidden
/// layer and does twice the forward's work.
fn net_flops(batch: f64, layers: f64, hidden: f64) -> f64 {
    let per_net = 2.0 * hidden * 2.0 + hidden;
    batch * layers * 2.0 * per_net
}

/// What `bench` measured beside criterion.
struct Runs<'a> {
    /// `flow train`'s summary line for the reference job.
    trained: &'a str,
    /// The same for zuko's default architecture.
    zuko_trained: &'a str,
    /// And with one joint conditioner per coupling (`--nets joint`).
    joint_trained: &'a str,
    /// `flow log-prob` of 100 000 points, timed as a process.
    log_prob: &'a str,
    /// `benches/pytorch_seed_job.py`'s JSON.
    pytorch: Option<&'a str>,
    /// `benches/zuko_jobs.py`'s JSON.
    peers: Option<&'a str>,
    /// The sections of `bench quality`, as markdown.
    quality: &'a str,
    /// Training from Python against `flow train`, as markdown.
    python_train: &'a str,
    /// The section of `bench digits`, as markdown.
    digits: &'a str,
}

/// A number in a flat JSON object, by key.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// `ours / theirs` as a ratio, or a dash.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn rate(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn report(runs: &Runs) -> Result<String> {
    let (trained, pytorch) = (runs.trained, runs.pytorch);
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    line("# Benchmarks".into());
    line(String::new());
    line(format!(
        "Measured by `cargo xtask bench` on {} ({} threads), device `{}`, f32. Criterion means; rates derived from them.",
        cpu_model(),
        threads(),
        bench_device()
    ));
    line(String::new());
    line("## Reference job (2-D moons, 5 affine couplings, s/t nets 1→512→1, batch 512)".into());
    line(String::new());
    line("| what | time | rate |".into());
    line("| --- | --- | --- |".into());
    let peak = mean_ns("machine", "matmul_1024").map(|ns| 2.0 * 1024f64.powi(3) / ns);
    // GB/s: three 64 MiB arrays per triad.
    let bandwidth = mean_ns("machine", "triad_64mib").map(|ns| 3.0 * 64.0 * 1048576.0 / ns);
    let of_peak = |gflops: f64| match peak {
        Some(p) => format!("{gflops:.1} GFLOP/s ({:.0}% of matmul)", 100.0 * gflops / p),
        None => format!("{gflops:.1} GFLOP/s"),
    };
    if let Some(ns) = mean_ns("seed_job", "train_step") {
        let gflops = 3.0 * net_flops(512.0, 5.0, 512.0) / ns;
        line(format!(
            "| training step | {:.2} ms | {:.0} steps/s, {} |",
            ns / 1e6,
            1e9 / ns,
            of_peak(gflops)
        ));
    }
    for (id, what) in [
        ("log_prob_100k", "log-prob, 100 000 points"),
        ("sample_100k", "sampling, 100 000 points"),
    ] {
        if let Some(ns) = mean_ns("seed_job", id) {
            line(format!(
                "| {what} | {:.1} ms | {:.0} points/s, {} |",
                ns / 1e6,
                1e5 * 1e9 / ns,
                of_peak(net_flops(1e5, 5.0, 512.0) / ns)
            ));
        }
    }
    line(String::new());
    line("## The machine, same threads".into());
    line(String::new());
    line("| what | time | rate |".into());
    line("| --- | --- | --- |".into());
    if let (Some(ns), Some(p)) = (mean_ns("machine", "matmul_1024"), peak) {
        line(format!(
            "| f32 matmul 1024 × 1024 × 1024 (candle) | {:.1} ms | {p:.1} GFLOP/s: attainable compute |",
            ns / 1e6
        ));
    }
    if let (Some(ns), Some(bw)) = (mean_ns("machine", "triad_64mib"), bandwidth) {
        line(format!(
            "| triad `a = b + 3·c`, 3 × 64 MiB f32 | {:.1} ms | {bw:.1} GB/s: memory bandwidth |",
            ns / 1e6
        ));
    }
    if let (Some(lp), Some(bw)) = (mean_ns("seed_job", "log_prob_100k"), bandwidth) {
        // Per coupling layer every point's features are read and written once and its
        // running log-det read and written once: the least traffic any implementation
        // of the pass needs (f32, 2 features, 5 layers).
        let bytes = 1e5 * 5.0 * (2.0 * 2.0 * 4.0 + 2.0 * 4.0);
        line(String::new());
        line(format!(
            "Log-prob's compulsory memory traffic (features and log-det read and written once \
             per layer) is {:.0} MB per 100 000 points: {:.2} GB/s at the measured speed, \
             {:.1}% of the triad's bandwidth.",
            bytes / 1e6,
            bytes / lp,
            100.0 * (bytes / lp) / bw
        ));
    }
    line(String::new());
    line(format!("End to end, `flow train --data moons --n 20000` (1000 steps, reporting, checkpoint write): {trained}"));
    line(String::new());
    line("## Sweeps (training step, other settings as the reference job)".into());
    // The points each sweep of `benches/seed_job.rs` runs (criterion's folder may hold
    // others from earlier versions).
    for (group, what, ids) in [
        ("train_step_by_batch", "batch", &[64, 512, 2048, 8192][..]),
        ("train_step_by_dim", "dimension", &[2, 8, 64, 256][..]),
        (
            "train_step_by_depth",
            "hidden layers (zuko's default)",
            &[1, 2, 3, 4][..],
        ),
        ("train_step_by_layers", "layers", &[2, 5, 8, 16][..]),
        (
            "train_step_by_hidden",
            "hidden width",
            &[64, 256, 512, 1024][..],
        ),
    ] {
        line(String::new());
        line(format!("| {what} | step time | samples/s |"));
        line("| --- | --- | --- |".into());
        for &id in ids {
            if let Some(ns) = mean_ns(group, &id.to_string()) {
                let batch = match group {
                    "train_step_by_batch" => id as f64,
                    "train_step_by_depth" => 256.0,
                    _ => 512.0,
                };
                line(format!(
                    "| {id} | {:.2} ms | {:.0} |",
                    ns / 1e6,
                    batch * 1e9 / ns
                ));
            }
        }
    }
    line(String::new());
    line("## The peers' own architectures (zuko, normflows), same machine, same threads".into());
    line(String::new());
    let peer = |key: &str| runs.peers.and_then(|j| json_number(j, key));
    let steps = |group: &str, id: &str| mean_ns(group, id).map(|ns| 1e9 / ns);
    line("zuko's default `RealNVP(2, transforms=6, hidden_features=(64, 64))`; ours is the same depth and width (separate `s` and `t` networks), batch 256. Training steps on a fixed batch, log-prob of 100 000 points in process:".into());
    line(String::new());
    line("| what | ours | zuko | ours / zuko | normflows | ours / normflows |".into());
    line("| --- | --- | --- | --- | --- | --- |".into());
    for (what, ours, key) in [
        (
            "training, steps/s",
            steps("zuko_default", "train_step"),
            "default_train_steps_per_s",
        ),
        (
            "log-prob, points/s",
            mean_ns("zuko_default", "log_prob_100k").map(|ns| 1e5 * 1e9 / ns),
            "default_log_prob_points_per_s",
        ),
    ] {
        let (z, n) = (
            peer(&format!("zuko_{key}")),
            peer(&format!("normflows_{key}")),
        );
        line(format!(
            "| {what} | {} | {} | {} | {} | {} |",
            rate(ours),
            rate(z),
            ratio(ours, z),
            rate(n),
            ratio(ours, n)
        ));
    }
    line(String::new());
    line(format!(
        "End to end, `flow train --data moons --hidden 64 --hidden-layers 2 --layers 6 --batch 256 --activation relu --steps 1000`: {}",
        runs.zuko_trained
    ));
    line(String::new());
    line(format!(
        "With one joint conditioner per coupling, as zuko's and normflows' are (`--nets joint`, half the arithmetic): {}",
        runs.joint_trained
    ));
    line(String::new());
    line(format!(
        "`flow log-prob` of the separate-network model on 100 000 points from CSV, as a whole process: {}",
        runs.log_prob
    ));
    line(String::new());
    // Forward flops per point: 6 couplings of networks 1 → 64 → 64 → 1, ours two per
    // coupling, zuko's one joint network (half of ours, up to its wider output layer).
    let ours_point = 6.0 * coupling_flops(&[1, 64, 64, 1]);
    let joint_point = 6.0 * network_flops(&[1, 64, 64, 2]);
    if let Some(z) = peer("zuko_default_log_prob_points_per_s") {
        line(format!(
            "Arithmetic: a point's log-prob takes {:.1} kflop in our networks and {:.1} kflop in zuko's joint ones; 5× zuko's in-process rate ({:.0} points/s) would take {} with ours, {} with the joint layout.",
            ours_point / 1e3,
            joint_point / 1e3,
            5.0 * z,
            of_peak(5.0 * z * ours_point / 1e9),
            of_peak(5.0 * z * joint_point / 1e9)
        ));
        line(String::new());
    }
    line("Dimension sweep: our reference job's network (5 couplings, `s`/`t` nets of one hidden layer of 512) against zuko's `RealNVP(d, transforms=5, hidden_features=(512,))`, batch 512. The arithmetic columns count our networks' products (3 passes per step); the last is the rate 3× zuko's steps/s would take:".into());
    line(String::new());
    line("| dimension | ours, steps/s | zuko, steps/s | ours / zuko | ours, arithmetic | 3× zuko needs |".into());
    line("| --- | --- | --- | --- | --- | --- |".into());
    for d in [2, 8, 64, 256] {
        let (ours, z) = (
            steps("train_step_by_dim", &d.to_string()),
            peer(&format!("zuko_dim_{d}_train_steps_per_s")),
        );
        let step_flops = 3.0 * 5.0 * 512.0 * coupling_flops(&[d / 2, 512, d - d / 2]);
        let gflops =
            |steps: Option<f64>| steps.map_or("–".into(), |s| of_peak(step_flops * s / 1e9));
        line(format!(
            "| {d} | {} | {} | {} | {} | {} |",
            rate(ours),
            rate(z),
            ratio(ours, z),
            gflops(ours),
            gflops(z.map(|z| 3.0 * z))
        ));
    }
    line(String::new());
    line("Depth sweep: zuko's default with 1–4 hidden layers of 64 (zuko: `hidden_features=(64,) * k`), batch 256:".into());
    line(String::new());
    line("| hidden layers | ours, steps/s | zuko, steps/s | ours / zuko |".into());
    line("| --- | --- | --- | --- |".into());
    for k in 1..=4 {
        let (ours, z) = (
            steps("train_step_by_depth", &k.to_string()),
            peer(&format!("zuko_depth_{k}_train_steps_per_s")),
        );
        line(format!(
            "| {k} | {} | {} | {} |",
            rate(ours),
            rate(z),
            ratio(ours, z)
        ));
    }
    if runs.peers.is_none() {
        line(String::new());
        line("The peers were not measured: `python3 benches/zuko_jobs.py` failed (`pip install torch zuko normflows`).".into());
    }
    line(String::new());
    line(runs.quality.trim_end().to_string());
    line(String::new());
    line(runs.python_train.trim_end().to_string());
    line(String::new());
    line(runs.digits.trim_end().to_string());
    line(String::new());
    line("## PyTorch, same machine, same threads".into());
    line(String::new());
    match pytorch {
        Some(json) => line(format!(
            "`python3 benches/pytorch_seed_job.py --threads {} --device {}`: `{json}`",
            threads(),
            pytorch_device()
        )),
        None => line("Not measured: `python3 -c 'import torch, sklearn'` failed (`pip install torch scikit-learn`).".into()),
    }
    md.push_str(NOTES);
    Ok(md)
}

const NOTES: &str = "
## Notes

- GFLOP/s counts the conditioner arithmetic only (per network and sample: forward `5·H` for
  `Linear(1, H) → act → Linear(H, 1)`, a training step about three times that), which is
  where the time goes, and sets it against the machine's matmul rate (a compute-bound
  GEMM: about what the cores' FMA units attain). The rest of a step is candle's graph
  and autograd overhead around the fused ops (a few small ops per coupling layer, and
  the gradient store's zero-fill and sum for each of them), and the in-place Adam update.
- Our training steps, criterion's as `flow train`'s, split each batch across the threads
  (`flow_train::batch_parts`: one part per thread, so two of 256 rows for the reference
  job on 2 threads), each part with its own graph; the peers' steps run each op across
  the threads.
- On a shared virtual machine, rates move with the host's load: compare rows of one run
  (the matmul row shows the run's conditions).
- Memory bandwidth does not bound the reference job: one network's parameters (about
  6 KiB) and a batch's features (4 KiB) stay in L1/L2; the triad row is the ceiling that
  streaming over large data would meet.
- Peak memory is the `flow train` process's resident high-water mark (`VmHWM`).
- The PyTorch numbers come from `benches/pytorch_seed_job.py`, and zuko's and normflows'
  from `benches/zuko_jobs.py`, run by the same `cargo xtask bench` with the same thread count.
- The density-quality and autoregressive sections: our side is `xtask/src/quality_job.rs`
  (the library, in release), zuko's `benches/zuko_quality.py` on the same points;
  `cargo xtask bench quality [--steps N]` reruns them alone, into
  `target/bench-quality/report.md`.
- The top-level sections after these notes (measured by hand, GPU, MPI, posterior
  estimation) come from the commands they name; `cargo xtask bench` keeps them as they
  are. GPU: `scripts/gpu-check.sh` on a GPU machine (build its binaries with
  `scripts/gpu-build.sh`).
  `FLOWS_BENCH_DEVICE=cuda cargo xtask bench --features cuda` runs this page's
  benchmarks on CUDA (fused CUDA kernels on; `FLOWS_FUSION=0` turns them off); the
  triad row always measures the host's memory.
";
