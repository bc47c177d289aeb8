//! Project automation: `cargo xtask <command>`.
//!
//! - `test`: the full check (formatting, clippy with warnings denied, the test suite);
//! - `train [--features cuda|metal] [-- FLOW TRAIN ARGS]`: the reference job on two
//!   moons, writing `runs/moons/`;
//! - `bench [--features cuda|metal]`: the benchmarks.

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
        Some("bench") => bench(&args[1..]),
        _ => Err(
            "usage: cargo xtask <test | train [--features F] [-- ARGS] | bench [--features F]>"
                .into(),
        ),
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
    let (model, val) = (p("model.safetensors"), p("heldout.csv"));

    run(flow(
        &features,
        &[
            "data", "moons", "--n", "5000", "--noise", "0.05", "--seed", "12345", "--out", &val,
        ],
    ))?;
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
    println!("held-out set ({val}):");
    run(flow(
        &features,
        &["log-prob", "--model", &model, "--input", &val],
    ))?;
    println!("wrote {}", out.display());
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let (features, extra) = split_args(args)?;
    let mut c = cargo();
    c.args(["bench", "-p", "flow-train"]);
    if let Some(f) = features {
        c.args(["--features", &f]);
    }
    c.args(extra);
    run(c)
}
